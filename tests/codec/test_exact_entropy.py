"""Exact scale indexes (.sodec version 2): the integer network of codec/integer_prior.py gives
every machine the same indexes; its primitives; how it tracks the float path; version 1 files.

The micro random codec puts every sigma at the lower bound (index 0), so the tests below use a
`spread` codec: the same random weights with H_a's last conv and P's scale synthesis scaled up,
which spreads the indexes over most of the table on a photo.
"""

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax import api
from sodec_jax.codec import bitstream, entropy, integer_prior
from sodec_jax.layers import ConvTranspose2d
from sodec_jax.pretrained import build_model
from tests.codec.conftest import load_photo, micro_codec_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V1_FILE = os.path.join(ROOT, "tests", "data", "v1_micro_astronaut_64x96.sodec")
# the weights that wrote V1_FILE: the micro codec's seed-0 random init as XLA's CPU backend made
# it at its default optimisation level (the suite runs at level 0, whose initialisers differ in
# the last bit; tests/conftest.py)
V1_PARAMS = os.path.join(ROOT, "tests", "data", "v1_micro_codec_params.npz")


def spread_config(dtype="float32"):
  c = micro_codec_config()
  c.model.dtype = dtype
  return c


def spread_params():
  """Flat {path: float32 array} of the spread codec (see the module docstring)."""
  model = build_model(spread_config(), nnx.Rngs(0))
  st, ha = model.codec.prior.scale_synthesis, model.codec.hyper_analysis.conv3
  for conv in (st.conv1, st.conv2, st.conv3):
    conv.kernel[...] = conv.kernel[...] * 4.0
  st.conv3.bias[...] = jnp.abs(st.conv3.bias[...]) * 10.0 + 1.0
  ha.kernel[...] = ha.kernel[...] * 300.0
  return {
    "/".join(map(str, p)): np.asarray(v.value)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def model_from_params(params: dict, dtype="float32") -> api.LoadedModel:
  """A coding-ready model holding `params` exactly (the random init is overwritten)."""
  c = spread_config(dtype)
  model = build_model(c, nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(
    model, nnx.from_flat_state([(p, jnp.asarray(params["/".join(map(str, p))])) for p, _ in flat])
  )
  return api.prepare(c, model)


@pytest.fixture(scope="module")
def params():
  return spread_params()


@pytest.fixture(scope="module")
def spread(params):
  return model_from_params(params)


def _crops(n=8, size=64):
  photos = [load_photo(f) for f in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]
  return [
    np.ascontiguousarray(photos[i % 4][(i // 4) * size : (i // 4 + 1) * size, 40 : 40 + size])
    for i in range(n)
  ]


# --------------------------------------------------------------------------- the primitives
def test_rounding_div_is_round_half_up_for_negatives_too():
  acc = np.arange(-60, 61)
  for d in range(1, 8):
    expect = [math.floor(Fraction(int(a), d) + Fraction(1, 2)) for a in acc]
    np.testing.assert_array_equal(integer_prior.rounding_div(acc, np.int64(d)), expect)
  big = np.asarray([(1 << 52) - 1, -(1 << 52) + 1, 7, -7, -5, 5], np.int64)
  np.testing.assert_array_equal(
    integer_prior.rounding_div(big, np.int64(2)), [1 << 51, -(1 << 51) + 1, 4, -3, -2, 3]
  )


def test_thresholds_follow_the_scale_table():
  s = integer_prior.OUTPUT_SCALE
  t, floor_index = integer_prior.thresholds(0.11, 256.0, 64, s, 0.11)
  table = entropy.scale_table(0.11, 256.0, 64)
  assert floor_index == 0
  frac = table * s - np.floor(table * s)  # T_j = floor(table_j S) + 1 (float64 table: away
  clear = (frac > 1e-6) & (frac < 1 - 1e-6)  # from integers; 256 S itself is one)
  np.testing.assert_array_equal(t[clear], np.floor(table * s)[clear] + 1)
  assert clear.sum() >= 62 and t[-1] == 256 * s + 1
  # integer lookups agree with searchsorted on the float table away from the boundaries
  v = np.unique(np.round(np.exp(np.linspace(np.log(0.05), np.log(400), 3000)) * s)).astype(np.int64)
  far = np.min(np.abs(v[:, None] / s / table[None] - 1.0), axis=1) > 1e-9
  idx = np.minimum(np.searchsorted(t, v, side="right"), 63)
  ref = np.minimum(np.searchsorted(table, v / s, side="left"), 63)
  np.testing.assert_array_equal(idx[far], ref[far])
  assert far.sum() > 2900
  # a lower bound above the first scales raises the smallest index
  _, floor_index = integer_prior.thresholds(0.11, 256.0, 64, s, 0.2)
  assert floor_index == int(np.sum(table < 0.2)) == 5
  # exact table ends: scale_min itself is index 0, the next integer above it is index 1
  assert np.searchsorted(t, [t[0] - 1, t[0]], side="right").tolist() == [0, 1]


@pytest.mark.parametrize("k,s,p,op", [(5, 2, 2, 1), (3, 1, 1, 0)])
def test_integer_layer_is_the_transposed_convolution(k, s, p, op):
  """With divisor 1 and small integers, the integer layer equals the float ConvTranspose2d
  (layers.py, PyTorch geometry) exactly, ReLU and clip included."""
  rng = np.random.default_rng(0)
  conv = ConvTranspose2d(3, 4, k, stride=s, padding=p, output_padding=op, rngs=nnx.Rngs(0))
  w = rng.integers(-8, 9, (k, k, 3, 4)).astype(np.float32)
  b = rng.integers(-20, 21, 4).astype(np.float32)
  conv.kernel[...], conv.bias[...] = jnp.asarray(w), jnp.asarray(b)
  layer = integer_prior.IntegerLayer(
    w.astype(np.float64), b.astype(np.int64), np.ones(4, np.int64), 200, s, p, op
  )
  x = rng.integers(-9, 10, (2, 5, 6, 3))
  ref = np.clip(np.asarray(conv(jnp.asarray(x, jnp.float32))), 0, 200)
  np.testing.assert_array_equal(layer(x), ref)
  layer3 = integer_prior.IntegerLayer(
    w.astype(np.float64), b.astype(np.int64), np.full(4, 3, np.int64), 200, s, p, op
  )
  np.testing.assert_array_equal(
    layer3(x), np.clip(np.floor(np.asarray(conv(jnp.asarray(x, jnp.float32))) / 3 + 0.5), 0, 200)
  )


def _transposed_conv_int64(x, w, k, s, p, op):
  """Reference: the transposed convolution by its definition, in int64 (exact: |sums| < 2^63).
  out[b, s i + kh - p, s j + kw - p, o] += sum_c x[b, i, j, c] w[kh, kw, c, o]."""
  b, h, wd, _ = x.shape
  ho, wo = (h - 1) * s - 2 * p + k + op, (wd - 1) * s - 2 * p + k + op
  full = np.zeros((b, (h - 1) * s + k + op, (wd - 1) * s + k + op, w.shape[3]), np.int64)
  for kh in range(k):
    for kw in range(k):
      full[:, kh : kh + s * (h - 1) + 1 : s, kw : kw + s * (wd - 1) + 1 : s] += np.einsum(
        "bijc,co->bijo", x, w[kh, kw]
      )
  return full[:, p : p + ho, p : p + wo]


@pytest.mark.parametrize("k,s,p,op", [(5, 2, 2, 1), (3, 1, 1, 0), (4, 2, 1, 0), (3, 2, 0, 1)])
def test_integer_layer_is_exact_at_the_bound(k, s, p, op, monkeypatch):
  """Weights near +-W_MAX and inputs near +-A with A as large as the 2^53 bound allows: the
  float64 GEMM + canvas sums (blocked down to single rows) equal int64 arithmetic bit for bit."""
  rng = np.random.default_rng(k * 10 + s + op)
  cin, cout = 5, 3
  taps = math.ceil(k / s) ** 2 * cin
  a_max = 1 << int(math.floor(math.log2((1 << 52) / (taps * integer_prior.W_MAX))))
  sign = lambda shape: rng.choice([-1, 1], shape)  # noqa: E731
  w = sign((k, k, cin, cout)) * rng.integers(
    integer_prior.W_MAX - 999, integer_prior.W_MAX + 1, (k, k, cin, cout)
  )
  x = sign((3, 4, 5, cin)) * rng.integers(a_max - 99_999, a_max + 1, (3, 4, 5, cin))
  x[0] = a_max * np.sign(w[0, 0, :, 0])  # one image at the largest |sum| channel 0 can reach
  ref = _transposed_conv_int64(x, w, k, s, p, op)
  assert np.abs(ref).max() > 1 << 50  # near the bound: float32 or a lost low bit would show
  bias = rng.integers(-(1 << 50), 1 << 50, cout)
  div = np.asarray([1, 3, (1 << 28) - 1], np.int64)
  acc = ref + bias
  expect = np.clip(integer_prior.rounding_div(acc, div), 0, 1 << 40)
  assert np.any(acc % div != 0) and 0 < np.mean(expect > 0) < 1
  monkeypatch.setattr(integer_prior, "_BLOCK_BYTES", 1)  # one input row per GEMM
  monkeypatch.setattr(integer_prior, "_POST_ELEMENTS", 7)  # and per division chunk
  layer = integer_prior.IntegerLayer(w.astype(np.float64), bias, div, 1 << 40, s, p, op)
  np.testing.assert_array_equal(layer(x), expect)
  np.testing.assert_array_equal(layer(x.astype(np.float64)), expect)


def test_derivation_is_bounded_and_deterministic(spread, params):
  ix = spread.indexer
  for layer in ix.layers:
    assert np.all(layer.divisor >= 1) and np.abs(layer.weight).max() <= 2 * integer_prior.W_MAX
    assert np.array_equal(layer.weight, np.round(layer.weight))
  again = model_from_params(params).indexer
  for a, b in zip(ix.layers, again.layers):
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert np.array_equal(a.divisor, b.divisor)


# ------------------------------------------------------------------------- tracking the float path
@pytest.mark.parametrize("photo", ["astronaut.png", "coffee.png"])
def test_integer_indexes_track_the_float_ones(spread, photo):
  lat = api.encode_latents(spread, load_photo(photo))
  float_idx = entropy.scale_indexes(lat.sigma, spread.scales)
  assert len(np.unique(lat.indexes)) > 20  # the photo spreads over the table
  assert np.mean(lat.indexes == float_idx) >= 0.99
  assert np.abs(lat.indexes.astype(int) - float_idx).max() <= 1
  # the integer output is sigma (before its lower bound) to within ~1e-3
  pre = np.asarray(spread.model.codec.prior.scale_synthesis(jnp.asarray(lat.z_hat)))
  v = spread.indexer.outputs(lat.z_hat) / integer_prior.OUTPUT_SCALE
  assert np.abs(v - np.clip(pre, 0, None)).max() < 1e-3


# ----------------------------------------------------------------------- the same indexes anywhere
def test_float_sigma_is_never_read(spread, astronaut):
  """Perturbing P's float sigma by a relative 1e-3 changes no index, on either side; the same
  perturbation does flip float32-sigma indexes (what version 1 read)."""
  image = np.ascontiguousarray(astronaut[:128, :192])
  lat = api.encode_latents(spread, image)
  rng = np.random.default_rng(0)
  noisy = lat.sigma * (1 + 1e-3 * rng.choice([-1.0, 1.0], lat.sigma.shape)).astype(np.float32)
  x = api.pad_image(spread, image)
  y, _ = api.analysis(spread, x)
  lat2 = api.Latents.from_prior(spread, y, lat.z_hat, lat.mu, noisy)
  np.testing.assert_array_equal(lat2.indexes, lat.indexes)
  assert np.any(
    entropy.scale_indexes(noisy, spread.scales) != entropy.scale_indexes(lat.sigma, spread.scales)
  )
  data = api.compress(spread, image)
  _, y_hat, _ = api.decode_latents(
    spread,
    data,
    lambda z: (lambda m, s: (m, s * (1 + 1e-3 * rng.choice([-1.0, 1.0], s.shape))))(
      *map(np.asarray, api.prior(spread, z))
    ),
  )
  np.testing.assert_array_equal(y_hat, lat.y_hat)


def test_batch_of_8_and_batch_of_1_give_the_same_indexes(spread):
  images = _crops()
  batch = api.encode_latents(spread, images)
  files = api.compress_batch(spread, images)
  for b, (image, data) in enumerate(zip(images, files)):
    one = api.encode_latents(spread, image)
    np.testing.assert_array_equal(spread.indexer(batch.z_hat[b : b + 1]), batch.indexes[b : b + 1])
    if np.array_equal(one.z_hat, batch.z_hat[b : b + 1]):
      np.testing.assert_array_equal(one.indexes, batch.indexes[b : b + 1])
    _, y_hat, z_hat = api.decode_latents(spread, data)  # a batch-8 file decodes alone
    mu, _ = api.prior(spread, z_hat)
    np.testing.assert_array_equal(np.round(y_hat - np.asarray(mu)), batch.y_symbols[b : b + 1])


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, ROOT)
    from sodec_jax import api
    from tests.codec.test_exact_entropy import model_from_params
    mode, folder = sys.argv[1], sys.argv[2]
    params = dict(np.load(folder + "/params.npz"))
    m = model_from_params(params)
    if mode == "encode":
      image = np.load(folder + "/image.npy")
      lat = api.encode_latents(m, image)
      open(folder + "/f.sodec", "wb").write(api.pack(m, lat, *image.shape[:2]))
      np.savez(folder + "/enc.npz", indexes=lat.indexes, symbols=lat.y_symbols, sigma=lat.sigma)
    else:
      _, y_hat, z_hat = api.decode_latents(m, open(folder + "/f.sodec", "rb").read())
      mu, sigma = (np.asarray(a) for a in api.prior(m, z_hat))
      np.savez(folder + "/dec.npz", indexes=m.indexer(z_hat), symbols=np.round(y_hat - mu),
               sigma=sigma)
""")


def test_encode_and_decode_under_different_xla_flags(params, tmp_path):
  """Encode in a process with fast math, decode in one with two host devices and one thread."""
  np.savez(tmp_path / "params.npz", **params)
  np.save(tmp_path / "image.npy", np.ascontiguousarray(load_photo("coffee.png")[:128, :192]))
  script = "ROOT = " + repr(ROOT) + "\n" + _WORKER
  flags = {
    "encode": "--xla_cpu_enable_fast_math=true",
    "decode": "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1",
  }
  for mode in ("encode", "decode"):
    env = dict(os.environ, XLA_FLAGS=flags[mode], PYTHONPATH=ROOT)
    r = subprocess.run(
      [sys.executable, "-c", script, mode, str(tmp_path)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
  enc, dec = np.load(tmp_path / "enc.npz"), np.load(tmp_path / "dec.npz")
  np.testing.assert_array_equal(enc["indexes"], dec["indexes"])
  np.testing.assert_array_equal(enc["symbols"], dec["symbols"])
  assert len(np.unique(enc["indexes"])) > 20


def test_bfloat16_prior_decodes_a_float32_file(params):
  """A model computing in bfloat16 (same float32 parameters) derives the same integer network,
  so its float mu / sigma (which flip many float32-sigma indexes) decode a float32 file."""
  f32, bf16 = model_from_params(params), model_from_params(params, "bfloat16")
  for a, b in zip(f32.indexer.layers, bf16.indexer.layers):
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
  image = np.ascontiguousarray(load_photo("chelsea.png")[:128, :128])
  lat = api.encode_latents(f32, image)
  mu16, sigma16 = (np.asarray(a, np.float32) for a in api.prior(bf16, lat.z_hat))
  assert np.sum(entropy.scale_indexes(sigma16, f32.scales) != lat.indexes) > 10
  _, y_hat, z_hat = api.decode_latents(f32, api.pack(f32, lat, 128, 128), lambda z: (mu16, sigma16))
  np.testing.assert_array_equal(np.round(y_hat - mu16), lat.y_symbols)
  np.testing.assert_array_equal(bf16.indexer(z_hat), lat.indexes)


# --------------------------------------------------------------------------- version 1 files
def _pack_v1(model, image):
  """A version-1 file as sodec-jax wrote it before version 2: float32 sigma indexes."""
  lat = api.encode_latents(model, image)
  z_hat, y_sym = lat.z_hat[0], lat.y_symbols[0]
  z_stream, z_over = model.z_coder.encode(z_hat.astype(np.int64), lat.z_indexes[0])
  y_stream, y_over = model.y_coder.encode(
    y_sym.astype(np.int64), entropy.scale_indexes(lat.sigma[0], model.scales)
  )
  header = bitstream.Header(
    model.decoder, *image.shape[:2], model.fingerprint, z_hat.shape, y_sym.shape, version=1
  )
  return bitstream.pack(header, [z_stream, y_stream, bitstream.encode_overflow(z_over + y_over)])


def test_version_1_files_still_decode(spread, astronaut):
  image = np.ascontiguousarray(astronaut[:128, :192])
  v1, v2 = _pack_v1(spread, image), api.compress(spread, image)
  assert v1[5] == 1 and v2[5] == 2 and api.read_header(v1).version == 1
  np.testing.assert_array_equal(api.decompress(spread, v1), api.decompress(spread, v2))
  # a file the previous release wrote (tests/data), with the weights that wrote it
  data = open(V1_FILE, "rb").read()
  with np.load(V1_PARAMS) as f:
    writer = model_from_params(dict(f))
  assert api.read_header(data).fingerprint == writer.fingerprint
  crop = np.ascontiguousarray(astronaut[:64, :96])
  np.testing.assert_array_equal(
    api.decompress(writer, data), api.decompress(writer, api.compress(writer, crop))
  )


def test_unknown_version_names_the_versions(spread, astronaut):
  from sodec_jax.fuzz import fix_crc

  data = api.compress(spread, np.ascontiguousarray(astronaut[:64, :64]))
  with pytest.raises(api.SodecError, match=r"version 3 .*versions 1, 2"):
    api.decompress(spread, fix_crc(data[:5] + bytes([3]) + data[6:]))

"""Compress -> decompress on real photos: exact latents, sizes, rate estimate vs bytes."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sodec_jax import api
from sodec_jax.codec import bitstream
from tests.codec.conftest import load_photo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (513, 769)])
def test_roundtrip_odd_sizes_exact_latents(codec_model, size):
  photo = load_photo("chelsea.png") if size[0] < 300 else load_photo("coffee.png")
  h, w = size
  # 513x769 is larger than coffee (400x600): reflect-extend a real photo to reach it
  image = np.pad(
    photo,
    ((0, max(0, h - photo.shape[0])), (0, max(0, w - photo.shape[1])), (0, 0)),
    mode="reflect",
  )[:h, :w]
  data = api.compress(codec_model, np.ascontiguousarray(image))
  header = api.read_header(data)
  assert (header.height, header.width) == (h, w)
  out = api.decompress(codec_model, data)
  assert out.shape == (h, w, 3) and out.dtype == np.uint8
  own = api.encode_latents(codec_model, image)
  assert api.pack(codec_model, own, h, w) == data  # compress is encode_latents + pack
  _, y_hat, z_hat = api.decode_latents(codec_model, data)
  np.testing.assert_array_equal(y_hat, own.y_hat)  # the decoder sees the encoder's y_hat exactly
  np.testing.assert_array_equal(z_hat, own.z_hat)
  # and the image is D_a(y_hat) of the model's own latent
  ref = api.to_uint8(np.asarray(api.fidelity(codec_model, own.y_hat)), h, w)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png"])
def test_rate_estimate_matches_bytes(codec_model, name):
  image = load_photo(name)
  data = api.compress(codec_model, image)
  out = codec_model.model(
    jnp.asarray(api.pad_image(codec_model, image)), noise_key=jax.random.key(0), train=False
  )
  est_bits = sum(
    float(-np.log2(np.asarray(l, np.float64)).sum()) for l in out["likelihoods"].values()
  )
  _, streams = bitstream.unpack(data)
  header_bits = 8 * (len(data) - sum(len(s) for s in streams))
  coded_bits = 8 * len(data) - header_bits
  assert abs(coded_bits - est_bits) <= 0.02 * est_bits + 64, (coded_bits, est_bits)


def test_compress_is_deterministic(codec_model, astronaut):
  assert api.compress(codec_model, astronaut) == api.compress(codec_model, astronaut)


def test_decode_in_another_process_is_bit_identical(codec_model, tmp_path):
  """A file written here decodes bit-identically in a fresh process (same model, same CPU)."""
  image = load_photo("rocket.jpg")[:200, :300]
  data = api.compress(codec_model, np.ascontiguousarray(image))
  (tmp_path / "f.sodec").write_bytes(data)
  script = textwrap.dedent(f"""
      import numpy as np, sys
      sys.path.insert(0, {ROOT!r})
      from flax import nnx
      from sodec_jax import api
      from sodec_jax.pretrained import build_model
      from tests.codec.conftest import micro_codec_config
      c = micro_codec_config()
      m = api.prepare(c, build_model(c, nnx.Rngs(0)))
      data = open({str(tmp_path / "f.sodec")!r}, 'rb').read()
      np.save({str(tmp_path / "out.npy")!r}, api.decompress(m, data))
      open({str(tmp_path / "again.sodec")!r}, 'wb').write(api.compress(m, api.decompress(m, data) * 0 + np.load({str(tmp_path / "img.npy")!r})))
  """)
  np.save(tmp_path / "img.npy", image)
  subprocess.run(
    [sys.executable, "-c", script], check=True, cwd=ROOT, capture_output=True, timeout=300
  )
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), api.decompress(codec_model, data))
  assert (tmp_path / "again.sodec").read_bytes() == data  # and compresses to the same bytes


def test_wrong_model_is_a_clear_error(codec_model, astronaut):
  from flax import nnx

  from sodec_jax.pretrained import build_model
  from tests.codec.conftest import micro_codec_config

  other = api.prepare(micro_codec_config(), build_model(micro_codec_config(), nnx.Rngs(1)))
  data = api.compress(other, astronaut[:64, :64].copy())
  with pytest.raises(api.SodecError, match="different model"):
    api.decompress(codec_model, data)


def test_bad_image_inputs(codec_model):
  for bad in [
    np.zeros((4, 4), np.uint8),
    np.zeros((4, 4, 3), np.float32),
    np.zeros((0, 4, 3), np.uint8),
    np.zeros((4, 4, 4), np.uint8),
    [[1, 2, 3]],
  ]:
    with pytest.raises(api.SodecError):
      api.compress(codec_model, bad)


def test_winograd_decoder_same_bytes_close_image(monkeypatch, astronaut):
  """api.prepare(winograd=True) runs D_a's 3x3 convs as Winograd F(4x4, 3x3): the file is the same
  bytes (the entropy path is untouched), the decoded image within 1/255 of the direct convs, and
  the caller's model is left unchanged."""
  from flax import nnx

  from sodec_jax import layers
  from sodec_jax.pretrained import build_model
  from tests.codec.conftest import micro_codec_config

  monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 8)  # the micro codec is narrow
  c = micro_codec_config()
  model = build_model(c, nnx.Rngs(0))
  direct = api.prepare(c, model, winograd=False)
  fast = api.prepare(c, model, winograd=True)
  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Conv2d)]
  assert all(m.winograd is None for m in convs)
  changed = [
    m
    for _, m in nnx.iter_graph(api.decoding_model(model, True))
    if isinstance(m, layers.Conv2d) and m.winograd is not None
  ]
  assert len(changed) == 3  # D_a's conv_in and its one residual block's two convs
  image = astronaut[:96, :160]
  data = api.compress(fast, image)
  assert data == api.compress(direct, image)
  a, b = api.decompress(fast, data), api.decompress(direct, data)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  assert fast.fingerprint == direct.fingerprint

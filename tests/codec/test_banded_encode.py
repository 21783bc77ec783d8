"""Banded encoding on a memory budget (sodec_jax/banding.py, api.compress(max_memory=...)): the
halo is the measured receptive field, bands give the whole image's symbols and file, and the
budget picks the bands."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from sodec_jax import api, banding, tiling
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from tests.codec.conftest import micro_codec_config
from tests.conftest import load_photo


def _measured_halo(fn, x, fin: int, fout: int, base: int) -> int:
  """The halo (base rows each side) that output base row `base` of fn: x [1, R, W, K] -> [1,
  R fout / fin, W', K'] needs, measured: each input row perturbed in turn (one batch), the input
  rows that change any output row of `base` taken."""
  rows = np.arange(x.shape[1])
  batch = np.repeat(x, len(rows) + 1, axis=0)  # the last one unperturbed: the reference
  rng = np.random.default_rng(1)
  batch[rows, rows] += rng.normal(0, 3.0, batch[rows, rows].shape).astype(np.float32)
  out = np.asarray(jax.jit(fn)(batch))
  change = np.abs(out[:-1] - out[-1:])[:, base * fout : (base + 1) * fout].max(axis=(1, 2, 3))
  changed = change > 1e-4  # above float rounding (a read row moves outputs by ~1e-2 and more)
  reads = rows[changed]
  top = -((reads.min() - base * fin) // fin)
  bottom = -(-(reads.max() - (base + 1) * fin + 1) // fin)
  return max(top, bottom, 0)


def test_halo_is_the_measured_receptive_field(codec_model):
  m = nnx.merge(codec_model._graphdef, codec_model._state)  # the coding clone (sub-pixel kernels)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (1, 256, 32, 3)).astype(np.float32)
  assert _measured_halo(m.codec.encode, x, 16, 1, 8) == banding.halo(
    m.codec.encoder.conv_stack(), 16, 1
  )
  y = rng.normal(0, 1, (1, 64, 8, 16)).astype(np.float32)
  assert _measured_halo(m.codec.hyper_analysis, y, 4, 1, 8) == banding.halo(
    m.codec.hyper_analysis.conv_stack(), 4, 1
  )
  z = np.round(rng.normal(0, 3, (1, 16, 4, 8))).astype(np.float32)
  p = m.codec.prior
  measured = max(
    _measured_halo(stack, z, 1, 4, 8) for stack in (p.mean_synthesis, p.scale_synthesis)
  )
  assert measured == max(
    banding.halo(s.conv_stack(), 1, 4) for s in (p.mean_synthesis, p.scale_synthesis)
  )


@pytest.fixture(scope="module")
def hific_padded_model():
  c = micro_codec_config()
  c.model.padding = "hific"  # image to a multiple of 16, y to one of 4 (codec/padding.py)
  return api.prepare(c, build_model(c, nnx.Rngs(0)))


@pytest.mark.parametrize("kind, size", [("sodec", (256, 320)), ("hific", (300, 200))])
def test_bands_give_the_whole_image_symbols_and_file(codec_model, hific_padded_model, kind, size):
  """E, H_a and P each in >= 3 bands: the same y and z symbols and the same .sodec bytes as the
  whole image (sizes that are not multiples of 64 too; measured: no symbol differs, while y
  itself differs from the whole image's by float32 rounding, |dy| <= ~1e-6, because XLA:CPU
  sums a band's per-pixel ChannelNorm in another order than the whole image's)."""
  model = codec_model if kind == "sodec" else hific_padded_model
  image = load_photo("astronaut.png")[: size[0], : size[1]]
  whole = api.encode_latents(model, image)
  rows = {"E": 2, "H_a": 1, "P": 1}
  banded = api.encode_within(model, image, None, rows=rows)
  plan = model._plans[
    ("encode", api.pad_image(model, image).shape, None, tuple(sorted(rows.items())))
  ]
  assert all(len(s.spans()) >= 3 for s in plan.stages.values()), plan.describe()
  np.testing.assert_array_equal(banded.z_hat, whole.z_hat)
  np.testing.assert_array_equal(banded.y_symbols, whole.y_symbols)
  np.testing.assert_array_equal(banded.indexes, whole.indexes)
  assert np.abs(banded.mu - whole.mu).max() <= 1e-5
  assert api.pack(model, banded, *size) == api.compress(model, image)


def test_the_budget_picks_the_bands(codec_model):
  """The budget between E's program on the whole image and on its smallest band: E in bands,
  every program within the budget, the file unchanged; below the smallest band: one line naming
  what it needs."""
  image = load_photo("astronaut.png")[:200, :130]
  x = api.pad_image(codec_model, image)
  whole_bytes = tiling.program_bytes(codec_model._lower_analysis(x).compile())
  data = api.compress(codec_model, image)
  assert api.compress(codec_model, image, max_memory=whole_bytes) == data  # fits: one program
  assert codec_model._plans[("encode", x.shape, whole_bytes, ())].stages.keys() == {"P"}
  budget = whole_bytes // 2
  assert api.compress(codec_model, image, max_memory=budget) == data
  plan = codec_model._plans[("encode", x.shape, budget, ())]
  e = plan.stages["E"]
  assert e.rows < e.n and all(s.bytes <= budget for s in plan.stages.values())
  assert api.compress_batch(codec_model, [image, image], max_memory=budget) == [data, data]
  with pytest.raises(SodecError, match="smallest band") as err:
    api.compress(codec_model, image, max_memory="64KiB")
  assert "\n" not in str(err.value) and "raise --max-memory" in str(err.value)

"""The micro codec decoding within memory budgets (api.decompress(max_memory=...)): the whole
decoder when it fits, D_a in windows when it does not, an error below the smallest window."""

from __future__ import annotations

import numpy as np
import pytest

from sodec_jax import api, tiling
from sodec_jax.errors import SodecError
from tests.conftest import load_photo


def _psnr(a, b) -> float:
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def coded(codec_model):
  image = load_photo("astronaut.png")[:256, :256]
  return image, api.compress(codec_model, image)


def test_codec_decodes_within_budgets(codec_model, coded):
  image, data = coded
  whole = api.decompress(codec_model, data)
  # a generous budget: the whole decoder in one program
  roomy = api.decompress(codec_model, data, max_memory="64GiB")
  assert np.abs(roomy.astype(int) - whole).max() <= 1
  _, y_hat, z_hat = api.decode_latents(codec_model, data)
  whole_bytes = tiling.program_bytes(codec_model._lower_synthesis(y_hat, z_hat).compile())
  # one byte less than the whole program: D_a in windows, each program within the budget
  api.decompress(codec_model, data, max_memory=whole_bytes - 1)
  plan = codec_model._plans[(y_hat.shape, z_hat.shape, whole_bytes - 1, ())]
  assert isinstance(plan, tiling.Plan) and plan.stages["fidelity"].bytes < whole_bytes
  # below D_a's program on the whole latent: windows, the largest whose program fits
  budget = plan.stages["fidelity"].bytes - 1
  tiled = api.decompress(codec_model, data, max_memory=budget)
  stage = codec_model._plans[(y_hat.shape, z_hat.shape, budget, ())].stages["fidelity"]
  assert stage.bytes <= budget and stage.grid.tile < stage.grid.n
  assert _psnr(tiled, whole) >= 40.0
  with pytest.raises(SodecError, match="--max-memory"):
    api.decompress(codec_model, data, max_memory="1KiB")

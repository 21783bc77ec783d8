"""Fixtures for codec tests: a small random-weight codec (seed 0) and real photos."""

import pytest
from flax import nnx

from configs import tiny
from sodec_jax import api
from sodec_jax.pretrained import build_model
from tests.conftest import load_photo  # noqa: F401  (re-exported for the codec tests)


def micro_codec_config():
  c = tiny.get_config()
  c.model.latent_channels = 16
  c.model.encoder_filters = (4, 8, 8, 16, 16)
  c.model.hyper_channels = 8
  c.model.decoder_filters = (16, 16, 8, 8, 4)
  c.model.decoder_residual_blocks = 1
  # HiFiC's default image range, so upstream-parity tests compare the raw modules; the tiny
  # default's normalize_input_image=True has its own parity test (test_hific_parity.py)
  c.model.normalize_input_image = False
  return c


@pytest.fixture(scope="session")
def codec_model():
  """A coding-ready micro model with random weights (seed 0): every code path, no training."""
  c = micro_codec_config()
  return api.prepare(c, build_model(c, nnx.Rngs(0)))


@pytest.fixture(scope="session")
def astronaut():
  return load_photo("astronaut.png")

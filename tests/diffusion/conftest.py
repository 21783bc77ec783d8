"""Fixtures for the Stable Diffusion module tests: diffusers helpers on sys.path, seeded torch."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference"))


@pytest.fixture(autouse=True)
def _seed_torch():
  import torch

  torch.manual_seed(0)
  yield

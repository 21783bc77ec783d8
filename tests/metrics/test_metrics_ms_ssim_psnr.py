"""MS-SSIM vs pytorch_msssim (the package itself, pinned 1.0.0: an independent reference) on real
photos; PSNR vs its closed form."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as torch_ms_ssim

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _photos  # noqa: E402

from sodec_jax.metrics import ms_ssim, psnr  # noqa: E402


def _ref(x, y):
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  return torch_ms_ssim(t(x), t(y), data_range=1.0, size_average=False).numpy()


@pytest.mark.parametrize("size", [(192, 192), (161, 175)])  # odd sides exercise the pool padding
def test_ms_ssim_matches_pytorch_msssim(size):
  x = _photos.crops(size)
  y = _photos.degrade(x)
  want = _ref(x, y)
  got = np.asarray(jax.jit(ms_ssim)(x, y))
  err = np.abs(got - want).max()
  print(f"MS-SSIM {size}: ours {got} torch {want} abs err {err:.2e}")
  assert got.shape == (2,)
  assert err <= 1e-5
  np.testing.assert_allclose(np.asarray(ms_ssim(jnp.asarray(x), jnp.asarray(x))), 1.0, atol=1e-5)


def test_ms_ssim_strong_degradation_and_grad():
  x = _photos.crops((176, 176))
  rng = np.random.default_rng(3)
  y = np.clip(0.6 * x + 0.4 * rng.uniform(size=x.shape), 0, 1).astype(np.float32)
  want = _ref(x, y)
  got = np.asarray(ms_ssim(x, y))
  assert np.abs(got - want).max() <= 1e-5
  g = jax.jit(jax.grad(lambda a: jnp.sum(ms_ssim(a, jnp.asarray(y)))))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_ms_ssim_too_small():
  x = jnp.zeros((1, 160, 200, 3))
  with pytest.raises(ValueError, match="161"):
    ms_ssim(x, x)


def test_psnr_closed_form():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, size=(3, 16, 24, 3)).astype(np.float32)
  signs = rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
  deltas = np.array([0.1, 0.01, 0.05], np.float32)  # |error| constant per image -> MSE = delta^2
  y = x + signs * deltas[:, None, None, None]
  want = -20.0 * np.log10(deltas.astype(np.float64))  # 20, 40, 26.0206 dB
  got = np.asarray(jax.jit(psnr)(x, y))
  np.testing.assert_allclose(got, want, atol=1e-3)
  np.testing.assert_allclose(np.asarray(psnr(x * 255, y * 255, max_val=255.0)), want, atol=1e-3)
  assert np.isinf(np.asarray(psnr(x, x))).all()

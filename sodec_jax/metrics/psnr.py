"""PSNR per image."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0) -> jax.Array:
  """PSNR in dB per image, [B], for NHWC float images (in [0, max_val]).

  10 * log10(max_val^2 / MSE) with the MSE over H, W and C of each image (float32);
  identical images give +inf.
  """
  if x.shape != y.shape:
    raise ValueError(f"psnr inputs must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"psnr expects NHWC images [B, H, W, C], got shape {x.shape}")
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(d), axis=(1, 2, 3))
  return 10.0 * jnp.log10(jnp.float32(max_val) ** 2 / mse)

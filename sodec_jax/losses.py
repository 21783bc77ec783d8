"""Training losses: pure functions, one per term, and one function per stage that sums them.

Stage 1 (HiFiC, paper Eq. 2):  lambda * bpp + k_M * MSE(255 x, 255 x_f) + k_P * LPIPS(x, x_f)

with HiFiC's target-rate switching: the rate weight is lambda_A while the batch's bpp is above
the target rate and lambda_B at or below it; lambda_A, lambda_B are multiplied by the
piecewise-constant `loss.lambda_schedule_*` and the target by `loss.target_schedule_*`
(`values[i]` applies from `steps[i-1]` on, exactly HiFiC's `get_scheduled_params`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp


def piecewise_constant(step, boundaries: Sequence[int], values: Sequence[float]):
  """values[i] where i = number of boundaries <= step (so values[0] before boundaries[0])."""
  if len(values) != len(boundaries) + 1:
    raise ValueError(f"a schedule needs len(values) == len(steps) + 1, got {values} / {boundaries}")
  if not boundaries:
    return jnp.asarray(values[0], jnp.float32)
  idx = jnp.sum(jnp.asarray(step) >= jnp.asarray(boundaries, jnp.int32))
  return jnp.asarray(values, jnp.float32)[idx]


def rate_bits(likelihoods: Mapping[str, jax.Array]) -> jax.Array:
  """Total information content in bits: -sum(log2 p) over every latent (y and z)."""
  return sum(-jnp.sum(jnp.log2(p.astype(jnp.float32))) for p in likelihoods.values())


def bpp(likelihoods: Mapping[str, jax.Array], num_pixels) -> jax.Array:
  """Bits per pixel of the batch: rate_bits / (B * H * W)."""
  return rate_bits(likelihoods) / num_pixels


def mse_255(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean squared error on 0-255 pixels (inputs in [0, 1]), HiFiC's distortion term."""
  d = (x_hat.astype(jnp.float32) - x.astype(jnp.float32)) * 255.0
  return jnp.mean(jnp.square(d))


def lpips_loss(lpips: Callable, x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean LPIPS over the batch (NHWC in [0, 1])."""
  return jnp.mean(lpips(x_hat, x))


def rate_weight(batch_bpp, step, loss_config):
  """HiFiC's switching rate weight and the (scheduled) target: (lambda, target_bpp)."""
  c = loss_config
  mult = piecewise_constant(step, c.lambda_schedule_steps, c.lambda_schedule_values)
  target = c.target_rate * piecewise_constant(step, c.target_schedule_steps,
                                              c.target_schedule_values)
  lam = jnp.where(jax.lax.stop_gradient(batch_bpp) > target, c.lambda_A * mult, c.lambda_B * mult)
  return lam, target


def stage1_loss(outputs: Mapping, x: jax.Array, step, config, lpips: Callable | None = None):
  """Stage-1 loss of the codec outputs for images x [B, H, W, 3] in [0, 1].

  Returns (loss, terms): terms holds every summand and what it was built from (float32 scalars).
  """
  c = config.loss
  b, h, w = x.shape[:3]
  parts = {f"bpp_{k}": bpp({k: p}, b * h * w) for k, p in outputs["likelihoods"].items()}
  rate = sum(parts.values())
  lam, target = rate_weight(rate, step, c)
  mse = mse_255(x, outputs["x_hat"])
  terms = {
      "bpp": rate,
      **parts,
      "lambda": lam,
      "target_bpp": target,
      "rate_loss": lam * rate,
      "mse": mse,
      "mse_loss": c.k_M * mse,
  }
  loss = terms["rate_loss"] + terms["mse_loss"]
  if c.k_P > 0:
    if lpips is None:
      raise ValueError("config.loss.k_P > 0 needs an LPIPS function")
    terms["lpips"] = lpips_loss(lpips, x, outputs["x_hat"])
    terms["lpips_loss"] = c.k_P * terms["lpips"]
    loss = loss + terms["lpips_loss"]
  terms["loss"] = loss
  return loss, terms

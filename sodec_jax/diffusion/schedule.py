"""Stable Diffusion 2.1's noise schedule and the one-step x0 estimate (diffusers DDPMScheduler).

Scaled-linear betas: beta_t = (linspace(sqrt(0.00085), sqrt(0.012), 1000)_t)^2, abar_t = prod(1 - beta).
  noisy sample      y_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
  epsilon model     x0  = (y_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
  v model           x0  = sqrt(abar_t) y_t - sqrt(1 - abar_t) v_hat,  v = sqrt(abar) eps - sqrt(1-abar) x0

SD 2.1 (768, stabilityai/stable-diffusion-2-1) predicts 'v_prediction'; SD 2.1-base predicts
'epsilon'. Arrays broadcast NHWC: x [B,H,W,C], timesteps [B] (or a scalar).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sodec_jax.errors import SodecError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """diffusers scheduler_config keys that define the training schedule."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise SodecError(
        f"prediction_type {self.prediction_type!r} is not supported (use one of {PREDICTION_TYPES})"
      )
    if self.beta_schedule not in ("scaled_linear", "linear"):
      raise SodecError(
        f"beta_schedule {self.beta_schedule!r} is not supported (use 'scaled_linear' or 'linear')"
      )

  @classmethod
  def from_dict(cls, d: dict) -> "NoiseSchedule":
    """From a diffusers scheduler_config.json dict (other keys, e.g. steps_offset, are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @functools.cached_property
  def betas(self) -> np.ndarray:
    """[num_train_timesteps] float32, computed in float32 like diffusers."""
    n = self.num_train_timesteps
    if self.beta_schedule == "scaled_linear":
      return np.square(np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32))
    return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """abar_t, [num_train_timesteps] float32."""
    return np.cumprod(1.0 - self.betas, dtype=np.float32)

  def _coefficients(self, timesteps, ndim: int):
    abar = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
    abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

  def add_noise(self, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """y_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a, s = self._coefficients(timesteps, x0.ndim)
    return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)

  def velocity(self, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """The v-prediction target: sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    a, s = self._coefficients(timesteps, x0.ndim)
    return (a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)).astype(x0.dtype)

  def predict_x0(self, sample: jax.Array, model_output: jax.Array, timesteps) -> jax.Array:
    """One-step estimate of x0 from y_t and the UNet output (per prediction_type), in float32."""
    a, s = self._coefficients(timesteps, sample.ndim)
    y = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if self.prediction_type == "epsilon":
      return (y - s * out) / a
    return a * y - s * out


def sd21_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
  """SD 2.1's scaled-linear schedule (0.00085 .. 0.012, 1000 steps). SD 2.1-768 uses 'v_prediction'."""
  return NoiseSchedule(prediction_type=prediction_type)

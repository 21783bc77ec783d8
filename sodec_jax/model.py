"""SODEC assembly.

Today the model is the HiFiC-style codec of stage 1 (E, H_a, P, D_a); the diffusion decoder
(H_s, T_s, UNet + LoRA, D_m) and the fidelity guidance (F, F_p) attach here as further
attributes, named as in DESIGN.md.

Training forward (CompressAI convention):
  out = model(x, noise_key=key, train=True)
  x [B, H, W, 3] float32 in [0, 1], H and W multiples of 64
  out["x_hat"]        [B, H, W, 3]   the reconstruction the loss sees (stage 1: x_f)
  out["x_f"]          [B, H, W, 3]   D_a(y_hat), not clamped
  out["y_hat"]        [B, H/16, W/16, C]  round(y - mu) + mu (straight-through when training)
  out["z_hat"]        [B, H/64, W/64, N]  round(z); z + U(-1/2, 1/2) when training (HiFiC)
  out["likelihoods"]  {"y": like y_hat, "z": like z_hat}, floored at model.likelihood_bound
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.codec.entropy import add_uniform_noise, gaussian_likelihood, quantize_around
from sodec_jax.codec.hific import Codec

#: Spatial factor every input side must be a multiple of (z lives at H/64).
PAD_MULTIPLE = 64


class SODEC(nnx.Module):
  """The whole model; `codec` holds encoder, hyper_analysis, prior, fidelity_decoder."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.codec = Codec(config.model, rngs=rngs)
    self.likelihood_bound = float(config.model.likelihood_bound)

  # ---- pieces of the coding path (each is jitted by the caller) ------------------------------
  def analysis(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, 3] -> (y [B, H/16, W/16, C], z [B, H/64, W/64, N])."""
    y = self.codec.encoder(x)
    return y, self.codec.hyper_analysis(y)

  def prior_parameters(self, z_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z_hat -> (mu, sigma) of the conditional Gaussian of y."""
    return self.codec.prior(z_hat)

  def fidelity_reconstruction(self, y_hat: jax.Array) -> jax.Array:
    """y_hat -> x_f = D_a(y_hat) [B, H, W, 3] (unclamped)."""
    return self.codec.fidelity_decoder(y_hat)

  # ---- training forward -------------------------------------------------------------------------
  def __call__(self, x: jax.Array, *, noise_key: jax.Array, train: bool = True) -> dict:
    y, z = self.analysis(x)
    if train:  # as HiFiC: the hyper-synthesis sees noisy z while training, round(z) otherwise
      z_noisy = add_uniform_noise(z, jax.random.fold_in(noise_key, 0))
      z_hat = z_noisy
    else:
      z_noisy = z_hat = jnp.round(z)
    mu, sigma = self.prior_parameters(z_hat)
    y_hat = quantize_around(y, mu) if train else jnp.round(y - mu) + mu
    y_rate = add_uniform_noise(y, jax.random.fold_in(noise_key, 1)) if train else y_hat
    likelihoods = {
        "y": gaussian_likelihood(y_rate, mu, sigma, self.likelihood_bound),
        "z": self.codec.prior.hyperlatent.likelihood(z_noisy, self.likelihood_bound),
    }
    x_f = self.fidelity_reconstruction(y_hat)
    return {"x_hat": x_f, "x_f": x_f, "y_hat": y_hat, "z_hat": z_hat, "likelihoods": likelihoods}


def build_model(config, rngs: nnx.Rngs) -> SODEC:
  """Builds the model described by `config` (the whole experiment ConfigDict)."""
  return SODEC(config, rngs=rngs)

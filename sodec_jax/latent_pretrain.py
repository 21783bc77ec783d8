"""Stage 0 of the tiny pipeline: a stand-in for Stable Diffusion's own pretraining.

No SD 2.1 weights can be downloaded, so the tiny default first trains its small VAE (the latent
space D_m decodes) and its small UNet (a denoiser on those latents at random timesteps, with an
empty context) on the bundled photos. SODEC's later stages then start from these weights via
`init_from`, exactly as the paper's stages start from the pretrained SD 2.1. The attribute
names (`unet`, `vae_decoder`) match SODEC's so the transfer is by path. The UNet and VAE are
handed in (`sodec_jax.pretrained.build_latent_pretrain(config, rngs)` builds them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.diffusion.schedule import NoiseSchedule


class LatentPretrain(nnx.Module):
  """`__call__(x [B,H,W,3] in [0,1], noise_key) -> {x_rec, x_hat, kl, denoise}`."""

  def __init__(self, config, *, unet, vae, rngs: nnx.Rngs):
    del rngs  # nothing of its own is random; kept for the common constructor signature
    d = config.diffusion
    self.vae_decoder = vae  # the whole AutoencoderKL; SODEC keeps the decoder
    self.unet = unet
    self.schedule = NoiseSchedule(prediction_type=d.prediction_type)
    self.context_tokens = int(config.guidance.tokens)
    self.width = int(self.unet.config.per_block(self.unet.config.cross_attention_dim)[0])
    self.scaling_factor = float(self.vae_decoder.config.scaling_factor)

  def __call__(self, x: jax.Array, *, noise_key: jax.Array, train: bool = True) -> dict:
    k_sample, k_t, k_noise = jax.random.split(noise_key, 3)
    mean, logvar = self.vae_decoder.encode(x * 2.0 - 1.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_sample, mean.shape) if train else mean
    x_rec = (self.vae_decoder.decode(z).astype(jnp.float32) + 1.0) / 2.0
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    latents = jax.lax.stop_gradient(z) * self.scaling_factor
    b = x.shape[0]
    t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape)
    noisy = self.schedule.add_noise(latents, noise, t)
    context = jnp.zeros((b, self.context_tokens, self.width), jnp.float32)
    pred = self.unet(noisy, t, context).astype(jnp.float32)
    target = (
      noise
      if self.schedule.prediction_type == "epsilon"
      else self.schedule.velocity(latents, noise, t)
    )
    return {
      "x_rec": x_rec,
      "x_hat": x_rec,
      "kl": kl,
      "denoise": jnp.mean(jnp.square(pred - target)),
    }

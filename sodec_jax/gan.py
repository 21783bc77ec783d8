"""Non-saturating GAN losses of HiFiC (`src/loss/losses.py::_non_saturating_loss`), on logits.

  D loss = mean(softplus(-logits_real)) + mean(softplus(logits_fake))
         = mean(-log D(x, y)) + mean(-log(1 - D(x_hat, y)))
  G loss = mean(softplus(-logits_fake)) = mean(-log D(x_hat, y))

(HiFiC's `binary_cross_entropy_with_logits` with targets 1 / 0, mean reduction over every
output of the PatchGAN grid and the batch.) Stage 4 adds `beta * generator_loss` (HiFiC:
beta = 0.15) to the generator objective and trains the discriminator on `discriminator_loss`.

Discriminator inputs (`real_fake_logits`): real = (x, stop_grad(y_hat)), fake = (x_hat,
stop_grad(y_hat)); for the discriminator step x_hat is stop-grad as well (HiFiC's
`x_gen.detach()` when train_generator is False).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """-log D(x) - log(1 - D(x_hat)), each term averaged over its outputs; scalar float32."""
  real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
  return real + fake


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """Non-saturating -log D(x_hat), averaged over the outputs; scalar float32."""
  return jnp.mean(jax.nn.softplus(-logits_fake.astype(jnp.float32)))


def real_fake_logits(
  disc,
  x: jax.Array,
  x_hat: jax.Array,
  y_hat: jax.Array,
  *,
  update_stats: bool,
  train_generator: bool,
) -> tuple[jax.Array, jax.Array]:
  """One discriminator forward on [x; x_hat] (so one power iteration, as HiFiC) -> (real, fake).

  x, x_hat [B, H, W, 3] in [0, 1]; y_hat [B, H/16, W/16, C] (always stop-grad).
  train_generator=False stops the gradient into x_hat (discriminator step); True lets the
  generator loss reach x_hat (generator step). Each image is paired with its own y_hat (HiFiC's
  `repeat_interleave` pairing differs for batch > 1; see sodec_jax.discriminator).
  """
  y = jax.lax.stop_gradient(y_hat)
  if not train_generator:
    x_hat = jax.lax.stop_gradient(x_hat)
  b = x.shape[0]
  logits = disc(
    jnp.concatenate([x, x_hat.astype(x.dtype)], axis=0),
    jnp.concatenate([y, y], axis=0),
    update_stats=update_stats,
  )
  return logits[:b], logits[b:]

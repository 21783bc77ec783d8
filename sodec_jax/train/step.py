"""The update: `make_train_step` builds the pure, jitted, state-donating train step (stage 4's
GAN alternation inside it), `make_sample_fn` the model at inference for sample grids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sodec_jax import gan, losses
from sodec_jax.codec import bitstream
from sodec_jax.discriminator import SpectralState
from sodec_jax.metrics import psnr
from sodec_jax.train.parallel import shardings


def calibration_groups(calibration) -> list[tuple[np.ndarray, int]]:
  """The calibration photos (validation.CalibrationPhoto) stacked by (coded shape, own pixels):
  [(uint8 [n, H', W', 3], pixels)], one coded_bpp batch each."""
  groups = {}
  for photo in calibration or ():
    groups.setdefault((np.shape(photo.image), int(photo.pixels)), []).append(photo.image)
  return [(np.stack(images), pixels) for (_, pixels), images in groups.items()]


def calibration_bpp(coder, groups) -> jax.Array:
  """The mean over the calibration photos of the bpp of each one's .sodec file: the coded bits
  of the padded photo (SODEC.coded_bpp times its coded pixels) plus the container header
  (bitstream.HEADER_MIN bytes), over the photo's own pixels. float32 []."""
  total, count = 0.0, 0
  for images, pixels in groups:
    coded = images.shape[1] * images.shape[2]
    bpp = coder.coded_bpp(jnp.asarray(images).astype(jnp.float32) / 255.0)
    total = total + len(images) * (bpp * coded + 8 * bitstream.HEADER_MIN) / pixels
    count += len(images)
  return total / count


def make_train_step(
  graphdef,
  tx,
  lr_schedule,
  config,
  lpips_graphdef=None,
  disc_graphdef=None,
  disc_tx=None,
  mesh=None,
  state_sharding=None,
  consts_sharding=None,
  calibration=None,
):
  """The jitted update: (state, consts, batch, step) -> (state, metrics); `state` is donated.

  state = {'params': pure dict of the trainable nnx.Params, 'opt_state': optax state, and in
           stage 4 'disc': the discriminator's params, spectral-norm vectors and optax state}
  Stage 4 alternates within the step: the generator update uses the discriminator as it was
  (no power iteration), then the discriminator is updated on the new stop-gradient x_hat.
  With `optim.ema_decay` = d > 0 the state also holds 'ema': the exponential moving average of the
  trained params, ema <- d_s ema + (1 - d_s) params after each update, d_s = min(d, (1 + s) /
  (10 + s)) at step s (TF's ExponentialMovingAverage with num_updates); the loop publishes it
  (checkpoint params item, validation, samples) and keeps the online weights for training.
  With the dual rate controller (losses.uses_rate_multiplier) the state also holds
  'rate_control': {'integral': float32 []}, the PI controller's integral: each step first
  measures the mean bpp of the `calibration` photos' files (calibration_bpp: SODEC.coded_bpp
  with the parameters before the update, padding and header counted; the photos are constants
  of the program, those of one shape coded as one batch; or, when it is None, the coded bpp of
  the training batch), then
  losses.rate_control gives this step's multiplier m (the loss uses lambda(t) * m) and the
  next integral.
  consts = (the frozen nnx.Params, i.e. those outside config.train.trainable; the model's
            non-Param variables; the LPIPS state or None): never trained.
  batch: uint8 [B, H, W, 3]. The noise key of step s is fold_in(key(seed), s).
  A non-finite loss, gradient or updated parameter leaves the state unchanged
  (metrics['finite'] is False), so the state the step returns is always finite.
  mesh (make_mesh): explicit shardings, state/consts/step replicated (or state_sharding /
  consts_sharding, trees from param_sharding, with 'fsdp') and the batch split over the devices;
  the metrics come back replicated. None: plain jit on the default device.
  """

  dual = config.stage >= 2 and losses.uses_rate_multiplier(config.loss)
  ema_decay = float(config.optim.get("ema_decay", 0.0))
  groups = calibration_groups(calibration)

  def train_step(state, consts, batch, step):
    frozen, rest, lpips_state = consts
    lpips = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
    x = batch.astype(jnp.float32) / 255.0
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    log_m = None
    if dual:  # measured before the update, with the parameters the loss differentiates
      coder = nnx.merge(graphdef, state["params"], frozen, rest)
      if groups:
        measured = calibration_bpp(coder, groups)
      else:
        measured = coder.coded_bpp(batch.astype(jnp.float32) / 255.0)
      integral = state["rate_control"]["integral"]
      log_m, new_integral = losses.rate_control(integral, measured, config.loss)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, frozen, rest)
      out = model(x, noise_key=key, train=True)
      if config.stage == 0:
        loss, terms = losses.pretrain_loss(out, x, config)
      elif config.stage == 1:
        loss, terms = losses.stage1_loss(out, x, step, config, lpips)
      else:
        g_loss = None
        if disc_graphdef is not None:
          disc = nnx.merge(disc_graphdef, state["disc"]["params"], state["disc"]["spectral"])
          _, fake = gan.real_fake_logits(
            disc, x, out["x_hat"], out["y_hat"], update_stats=False, train_generator=True
          )
          g_loss = gan.generator_loss(fake)
        loss, terms = losses.sodec_loss(out, x, step, config, lpips, g_loss, log_m)
      x_hat = jnp.clip(jax.lax.stop_gradient(out["x_hat"]), 0.0, 1.0)
      terms["psnr"] = jnp.mean(psnr(x, x_hat))
      return loss, (
        terms,
        jax.lax.stop_gradient(out["x_hat"]),
        jax.lax.stop_gradient(out.get("y_hat")),
      )

    params, opt_state = state["params"], state["opt_state"]
    (loss, (terms, x_hat, y_hat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    # the updated params are checked too: a finite gradient may still overflow them, and a
    # non-finite state must never reach a checkpoint (the loop sees `finite` late, see loop.py)
    finite = (
      jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(new_params))
    )
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = {
      "params": jax.tree.map(keep, new_params, params),
      "opt_state": jax.tree.map(keep, new_opt_state, opt_state),
    }
    if ema_decay:  # the average of the updated weights, warmed up as TF's ExponentialMovingAverage
      d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
      average = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], new_params)
      new_state["ema"] = jax.tree.map(keep, average, state["ema"])
    if dual:
      new_state["rate_control"] = {"integral": keep(new_integral, integral)}
      terms = dict(terms, rate_multiplier=jnp.exp(log_m), controlled_bpp=measured)
    if disc_graphdef is not None:
      d = state["disc"]

      def disc_loss_fn(d_params):
        disc = nnx.merge(disc_graphdef, d_params, d["spectral"], copy=True)
        real, fake = gan.real_fake_logits(
          disc, x, x_hat, y_hat, update_stats=True, train_generator=False
        )
        return gan.discriminator_loss(real, fake), nnx.to_pure_dict(nnx.state(disc, SpectralState))

      (d_loss, spectral), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(d["params"])
      d_updates, d_opt = disc_tx.update(d_grads, d["opt_state"], d["params"])
      d_finite = finite & jnp.isfinite(d_loss)
      d_keep = lambda new, old: jnp.where(d_finite, new, old)
      new_state["disc"] = jax.tree.map(
        d_keep,
        {
          "params": optax.apply_updates(d["params"], d_updates),
          "spectral": spectral,
          "opt_state": d_opt,
        },
        d,
      )
      terms = dict(terms, gan_d=d_loss)
    metrics = dict(
      terms,
      grad_norm=grad_norm,
      param_norm=optax.global_norm(new_state["params"]),
      learning_rate=lr_schedule(step),
      finite=finite,
    )
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rep, batch = shardings(mesh)
  state_sh = rep if state_sharding is None else state_sharding
  consts_sh = rep if consts_sharding is None else consts_sharding
  return jax.jit(
    train_step,
    donate_argnums=0,
    in_shardings=(state_sh, consts_sh, batch, rep),
    out_shardings=(state_sh, rep),
  )


def make_sample_fn(graphdef, config):
  """jitted (params, consts, uint8 batch) -> (x_f, x_hat) as uint8, the model at inference
  (train=False; the pretraining stage has no x_f and shows its reconstruction twice)."""

  def sample(params, consts, batch):
    frozen, rest, _ = consts
    model = nnx.merge(graphdef, params, frozen, rest)
    x = batch.astype(jnp.float32) / 255.0
    out = model(x, noise_key=jax.random.key(config.seed), train=False)
    to_u8 = lambda v: jnp.round(jnp.clip(v, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return to_u8(out.get("x_f", out["x_hat"])), to_u8(out["x_hat"])

  return jax.jit(sample)

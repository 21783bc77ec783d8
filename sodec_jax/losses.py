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
  return jnp.mean(lpips(x_hat, x).astype(jnp.float32))  # float32 at any precision


def rate_weight(batch_bpp, step, loss_config):
  """HiFiC's switching rate weight and the (scheduled) target: (lambda, target_bpp)."""
  c = loss_config
  mult = piecewise_constant(step, c.lambda_schedule_steps, c.lambda_schedule_values)
  target = c.target_rate * piecewise_constant(
    step, c.target_schedule_steps, c.target_schedule_values
  )
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


# --- stages 2-4 (SODEC) ---------------------------------------------------------------------------

ANNEAL_SHAPES = ("linear", "cosine", "step", "none")
ALIGNMENTS = ("none", "mse", "mse+lpips", "merged")


def annealed_lambda(step, anneal) -> jax.Array:
  """Rate annealing (paper, 'Rate Annealing Training Strategy'): the rate weight goes from
  `anneal.start` (the stage-1 weight) to `anneal.end` over `anneal.steps` steps, with shape
  linear, cosine (half cosine), step (start until `steps`, then end) or none (end throughout)."""
  if anneal.shape not in ANNEAL_SHAPES:
    raise ValueError(f"loss.anneal.shape={anneal.shape!r} is not one of {ANNEAL_SHAPES}")
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(float(anneal.steps), 1.0), 0.0, 1.0)
  if anneal.shape == "linear":
    w = frac
  elif anneal.shape == "cosine":
    w = 0.5 * (1.0 - jnp.cos(jnp.pi * frac))
  elif anneal.shape == "step":
    w = (frac >= 1.0).astype(jnp.float32)
  else:
    w = jnp.float32(1.0)
  return jnp.asarray(anneal.start, jnp.float32) + (anneal.end - anneal.start) * w


RATE_CONTROLS = ("switch", "dual")


def targeted_lambda(batch_bpp, step, loss_config, log_multiplier=None):
  """Stage 3's rate weight: `annealed_lambda`, steered to `loss.anneal.target_rate` (bpp) when
  that is > 0, by `loss.rate_control.mode`:
  - "switch", HiFiC's target-rate rule: lambda(t) while the batch's bpp is above the target,
    lambda(t) * lambda_B / lambda_A at or below it. Which bpp: the one the loss differentiates
    (training mode: y and z with uniform noise), as stage 1's switch (HiFiC decides on the
    quantized rate).
  - "dual": lambda(t) * exp(log_multiplier), the multiplier the train step's controller sets
    from the measured rate (`rate_control`); batch_bpp plays no part.
  Returns (lambda, target) (target 0 when off)."""
  c = loss_config
  lam = annealed_lambda(step, c.anneal)
  target = float(c.anneal.get("target_rate", 0.0))
  if target <= 0:
    return lam, jnp.float32(0.0)
  if rate_control_mode(c) == "dual":
    if log_multiplier is None:
      raise ValueError("loss.rate_control.mode='dual' needs the train step's log_multiplier")
    return lam * jnp.exp(jnp.asarray(log_multiplier, jnp.float32)), jnp.float32(target)
  low = lam * (c.lambda_B / c.lambda_A)
  lam = jnp.where(jax.lax.stop_gradient(batch_bpp) > target, lam, low)
  return lam, jnp.float32(target)


def rate_control_mode(loss_config) -> str:
  """loss.rate_control.mode ("switch" when the group is absent, as in older configs)."""
  rc = loss_config.get("rate_control")
  mode = "switch" if rc is None else str(rc.get("mode", "switch"))
  if mode not in RATE_CONTROLS:
    raise ValueError(f"loss.rate_control.mode={mode!r} is not one of {RATE_CONTROLS}")
  return mode


def uses_rate_multiplier(loss_config) -> bool:
  """Whether the stage runs the dual rate controller: rate_mode 'anneal', a target rate > 0 and
  rate_control.mode 'dual'."""
  c = loss_config
  return (
    c.rate_mode == "anneal"
    and float(c.anneal.get("target_rate", 0.0)) > 0
    and rate_control_mode(c) == "dual"
  )


def rate_control(integral, measured_bpp, loss_config) -> tuple[jax.Array, jax.Array]:
  """One step of the dual controller, a PI controller on log lambda (the "PID Lagrangian" of
  Stooke, Achiam, Abbeel, ICML 2020, in log space): with e = log measured_bpp - log target,
    log m = clip(integral + proportional_gain * e, -max_log, max_log)   (this step's multiplier)
    integral' = clip(integral + integral_gain * e, -max_log, max_log)  (carried to the next)
  A rate above the target raises lambda at once (P) and more every step it stays above (I); at
  the target m settles at exp(integral). Returns (log m, integral')."""
  rc = loss_config.rate_control
  bound = float(rc.max_log)
  target = float(loss_config.anneal.target_rate)
  error = jnp.log(jnp.maximum(measured_bpp.astype(jnp.float32), 1e-9)) - jnp.log(target)
  integral = jnp.asarray(integral, jnp.float32)
  log_m = jnp.clip(integral + float(rc.proportional_gain) * error, -bound, bound)
  return log_m, jnp.clip(integral + float(rc.integral_gain) * error, -bound, bound)


def distortion(x, x_hat, config, lpips=None, prefix: str = "") -> dict:
  """d(x, x_hat) = k_M * MSE(0..255) + k_P * LPIPS (paper Eq. 3), as named terms."""
  c = config.loss
  terms = {f"{prefix}mse": mse_255(x, x_hat)}
  terms[f"{prefix}mse_loss"] = c.k_M * terms[f"{prefix}mse"]
  total = terms[f"{prefix}mse_loss"]
  if c.k_P > 0:
    if lpips is None:
      raise ValueError("config.loss.k_P > 0 needs an LPIPS function")
    terms[f"{prefix}lpips"] = lpips_loss(lpips, x, x_hat)
    terms[f"{prefix}lpips_loss"] = c.k_P * terms[f"{prefix}lpips"]
    total = total + terms[f"{prefix}lpips_loss"]
  terms[f"{prefix}distortion"] = total
  return terms


def alignment(x, x_f, config, lpips=None) -> jax.Array:
  """The separate L_align term (paper Eq. 10) in the distortion's units, by `loss.alignment`
  (Table 3): 'none' (i) and 'merged' (iii) 0; 'mse+lpips' (ii) k_M * MSE(x, x_f) + k_P *
  LPIPS(x, x_f); 'mse' (iv) k_M * MSE(x, x_f). 'merged' acts in the distortion instead
  (`merged_distortion`)."""
  c = config.loss
  if c.alignment not in ALIGNMENTS:
    raise ValueError(f"loss.alignment={c.alignment!r} is not one of {ALIGNMENTS}")
  if c.alignment in ("none", "merged"):
    return jnp.float32(0.0)
  value = c.k_M * mse_255(x, x_f)
  if c.alignment == "mse+lpips" and c.k_P > 0:
    value = value + c.k_P * lpips_loss(lpips, x, x_f)
  return value


def merged_distortion(x, x_hat, x_f, config, lpips=None) -> dict:
  """Table 3 (iii), 'merged into the main loss'. The paper: "(iii) no separate L_align term
  (L_align=0)" and "merging the constraint into the main loss (case iii) enhances fidelity but
  at the expense of perceptual quality". Our reading: the main distortion d (Eq. 3) is taken
  over both reconstructions as one batch, d([x, x], [x_hat, x_f]) = (d(x, x_hat) + d(x, x_f))
  / 2: one term whose weight (1) the two decoders share, so x_hat's own distortion weight halves
  (the perceptual price) while D_a is supervised by the full d, LPIPS included. (ii) instead
  keeps d(x, x_hat) whole and adds alpha * L_align; alpha plays no part here.
  Returns the distortion terms of x_hat, those of x_f (prefix 'f_'), and 'distortion'."""
  terms = distortion(x, x_hat, config, lpips)
  terms.update(distortion(x, x_f, config, lpips, prefix="f_"))
  terms["distortion"] = 0.5 * (terms["distortion"] + terms["f_distortion"])
  return terms


def gan_weight(step, loss_config) -> jax.Array:
  """The weight of L_g at `step` (stage 4): 0 for the first `gan_warmup_steps` (the
  discriminator trains alone on the stage-3 generator's outputs), then rising linearly to
  `beta` over `gan_ramp_steps` (at once when 0)."""
  c = loss_config
  warmup = float(c.get("gan_warmup_steps", 0))
  ramp = float(c.get("gan_ramp_steps", 0))
  t = jnp.asarray(step, jnp.float32) - warmup
  frac = jnp.clip((t + 1.0) / ramp, 0.0, 1.0) if ramp > 0 else jnp.float32(1.0)
  return jnp.float32(c.beta) * jnp.where(t >= 0, frac, 0.0)


def sodec_loss(
  outputs: Mapping,
  x: jax.Array,
  step,
  config,
  lpips: Callable | None = None,
  gan_generator_loss: jax.Array | None = None,
  log_rate_multiplier: jax.Array | None = None,
):
  """Stages 2-4 (paper Eq. 9, 11, 12): d(x, x_hat) + lambda * r + alpha * L_align + beta * L_g.

  The rate weight follows `loss.rate_mode`: "none" (stage 2), "anneal" (stage 3+: lambda(t)),
  "hific" (the stage-1 switching); with "anneal", `loss.anneal.target_rate` > 0 steers to that
  bpp (`targeted_lambda`; log_rate_multiplier: the dual controller's state, in that mode).
  'merged' alignment takes the distortion over x_hat and x_f together (`merged_distortion`).
  Returns (loss, terms).
  """
  c = config.loss
  b, h, w = x.shape[:3]
  parts = {f"bpp_{k}": bpp({k: p}, b * h * w) for k, p in outputs["likelihoods"].items()}
  rate = sum(parts.values())
  if c.alignment == "merged":
    d = merged_distortion(x, outputs["x_hat"], outputs["x_f"], config, lpips)
  else:
    d = distortion(x, outputs["x_hat"], config, lpips)
  terms = {"bpp": rate, **parts, **d}
  if c.rate_mode == "none":
    lam = jnp.float32(0.0)
  elif c.rate_mode == "anneal":
    lam, terms["target_bpp"] = targeted_lambda(rate, step, c, log_rate_multiplier)
  elif c.rate_mode == "hific":
    lam, terms["target_bpp"] = rate_weight(rate, step, c)
  else:
    raise ValueError(f"loss.rate_mode={c.rate_mode!r} is not one of none, anneal, hific")
  terms["lambda"] = lam
  terms["rate_loss"] = lam * rate
  terms["alignment"] = alignment(x, outputs["x_f"], config, lpips)
  terms["alignment_loss"] = c.alpha * terms["alignment"]
  loss = terms["distortion"] + terms["rate_loss"] + terms["alignment_loss"]
  if gan_generator_loss is not None:
    terms["gan_g"] = gan_generator_loss
    terms["beta"] = gan_weight(step, c)
    terms["gan_loss"] = terms["beta"] * gan_generator_loss
    loss = loss + terms["gan_loss"]
  terms["loss"] = loss
  return loss, terms


def pretrain_loss(outputs: Mapping, x: jax.Array, config) -> tuple[jax.Array, dict]:
  """The tiny pipeline's stand-in for Stable Diffusion's pretraining (stage 0): VAE
  reconstruction k_M * (MSE(0..255) + chroma_weight * MSE of the chroma, each pixel minus its
  mean over R, G, B) + kl_weight * KL, plus the UNet's denoising MSE."""
  terms = {"mse": mse_255(x, outputs["x_rec"])}
  mse_loss = terms["mse"]
  chroma_weight = float(config.pretrain.get("chroma_weight", 0.0))
  if chroma_weight:
    chroma = lambda v: v - jnp.mean(v, axis=-1, keepdims=True)
    terms["chroma_mse"] = mse_255(chroma(x), chroma(outputs["x_rec"]))
    mse_loss = mse_loss + chroma_weight * terms["chroma_mse"]
  terms["mse_loss"] = config.loss.k_M * mse_loss
  terms["kl"] = outputs["kl"]
  terms["denoise"] = outputs["denoise"]
  loss = terms["mse_loss"] + config.pretrain.kl_weight * terms["kl"] + terms["denoise"]
  terms["loss"] = loss
  return loss, terms

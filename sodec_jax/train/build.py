"""What a training run is built from: the checked config, the model, the trainable filter,
the optimizer, stage 4's discriminator and the frozen LPIPS network; the pure-dict plumbing
between checkpoints (all params) and the train state (trainable params apart from frozen ones).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sodec_jax import checkpoints, data, losses, pretrained, validation
from sodec_jax import precision as precision_lib
from sodec_jax import remat as remat_lib
from sodec_jax.discriminator import HIFIC_FILTERS, Discriminator, SpectralState
from sodec_jax.errors import SodecError
from sodec_jax.weights import converted


def _validate_rate_control(config) -> None:
  """loss.rate_control (configs/base.py): a known mode, a positive gain and bound, calibration
  photos that are not also the held-out photos (the controller would steer on what is measured)."""
  rc = config.loss.get("rate_control")
  if rc is None:
    return
  try:
    losses.rate_control_mode(config.loss)
  except ValueError as err:
    raise SodecError(f"config.{err}") from None
  gains = (float(rc.integral_gain), float(rc.proportional_gain))
  if not gains[0] > 0 or not gains[1] >= 0 or not float(rc.max_log) > 0:
    raise SodecError(
      f"config.loss.rate_control: integral_gain={rc.integral_gain} and max_log={rc.max_log} "
      f"must be > 0, proportional_gain={rc.proportional_gain} >= 0"
    )
  names = data.calibration_names(config)
  both = sorted(set(names) & set(config.data.get("holdout", ())))
  if both:
    raise SodecError(
      f"config.loss.rate_control.photos and config.data.holdout both name {', '.join(both)}: "
      "the controller would steer the rate on the photos it is measured on; name other photos"
    )
  if names and config.stage >= 2 and losses.uses_rate_multiplier(config.loss):
    validation.calibration_images(config)  # names, crop and sizes, before anything is written
  elif names:
    validation.named_paths(config, names, "config.loss.rate_control.photos")


def validate_config(config) -> None:
  """One-line SodecError for configs training cannot run with."""
  d, t, l = config.data, config.train, config.loss
  precision_lib.resolve(config.get("precision", "auto"))  # "fp32" | "bf16" | "auto"
  pretrained.remat_parts(config), pretrained.remat_policy(config)  # config.memory
  pretrained.check_paths(config)
  source = l.get("discriminator_init", "")
  if source and not os.path.isfile(os.path.join(source, "manifest.json")):
    raise SodecError(
      f"--config.loss.discriminator_init={source} is not a converted folder: make "
      "one with `python convert/from_torch.py hific --src CHECKPOINT.pt --out DIR`"
    )
  _validate_rate_control(config)
  if config.stage not in (0, 1, 2, 3, 4):
    raise SodecError(f"config.stage={config.stage} must be 0 (tiny SD pretraining), 1, 2, 3 or 4")
  if config.stage >= 2 and config.get("decoder", "codec") != "diffusion":
    raise SodecError(
      f"config.stage={config.stage} trains the diffusion decoder: set "
      "--config.decoder=diffusion (configs/stage2.py, stage3.py, finetune.py do)"
    )
  sodec = config.get("sodec", {})
  fix = sodec.get("color_fix", "none")
  through = sodec.get("color_fix_in_training", False)
  if fix != "none" and config.stage >= 2 and not through and l.alignment == "none":
    raise SodecError(
      f"config.sodec.color_fix={fix!r} takes x_hat's colours from x_f = D_a(y_hat), which "
      "nothing keeps an image here (no alignment loss; stage 2 trains D_a through the guidance "
      "alone): turn on loss.alignment (stages 3-4) or sodec.color_fix_in_training (the "
      "distortion then reaches x_f's low frequencies), or --config.sodec.color_fix=none"
    )
  if through and fix == "none":
    raise SodecError(
      "config.sodec.color_fix_in_training=True trains on the colour-corrected decode, but "
      "sodec.color_fix is 'none': set --config.sodec.color_fix=wavelet (or adain), or turn "
      "color_fix_in_training off"
    )
  if config.stage >= 2 and config.loss.beta > 0 and config.stage != 4:
    raise SodecError("config.loss.beta > 0 (GAN) belongs to stage 4 (configs/finetune.py)")
  if d.crop_size <= 0 or d.crop_size % 64:
    raise SodecError(f"config.data.crop_size={d.crop_size} must be a positive multiple of 64")
  for name in ("data.batch_size", "train.log_every", "train.checkpoint_every"):
    group, field = name.split(".")
    if config[group][field] < 1:
      raise SodecError(f"config.{name}={config[group][field]} must be >= 1")
  ema_decay = config.optim.get("ema_decay", 0.0)
  if not 0.0 <= ema_decay < 1.0:
    raise SodecError(f"config.optim.ema_decay={ema_decay} must be in [0, 1) (0 = no average)")
  if config.seed < 0:
    raise SodecError(f"config.seed={config.seed} must be >= 0")
  if t.num_steps < 0:
    raise SodecError(f"config.train.num_steps={t.num_steps} must be >= 0")
  for sched in ("lambda_schedule", "target_schedule"):
    vals, steps = l[f"{sched}_values"], l[f"{sched}_steps"]
    if len(vals) != len(steps) + 1:
      raise SodecError(
        f"config.loss.{sched}_values needs one more entry than "
        f"config.loss.{sched}_steps, got {tuple(vals)} and {tuple(steps)}"
      )
  if l.lambda_A < l.lambda_B:
    raise SodecError(
      f"config.loss.lambda_A={l.lambda_A} must be >= config.loss.lambda_B="
      f"{l.lambda_B} (lambda_A applies above the target rate)"
    )
  net = l.get("lpips_net", "vgg")
  if net not in ("vgg", "alex"):
    raise SodecError(f"config.loss.lpips_net={net!r}: use 'vgg' or 'alex'")
  if l.k_P > 0 and net == "vgg" and not config.lpips.vgg_weights:
    raise SodecError(
      f"config.loss.k_P={l.k_P} needs LPIPS VGG16 weights: pass "
      "--config.lpips.vgg_weights=/path/to/vgg16.pth (torchvision layout), or "
      "--config.loss.k_P=0 to train on MSE alone"
    )
  if l.k_P > 0 and net == "alex" and not config.lpips.get("alexnet_weights", ""):
    raise SodecError(
      f"config.loss.k_P={l.k_P} with loss.lpips_net='alex' needs AlexNet weights: pass "
      "--config.lpips.alexnet_weights=/path/to/alexnet.pth (torchvision layout)"
    )


def build_training_model(config):
  """The model a stage trains: stage 0 (tiny pipeline) the latent-space pretraining, else SODEC.
  The one place training constructs a model."""
  rngs = nnx.Rngs(config.seed)
  if config.stage == 0:
    model = pretrained.build_latent_pretrain(config, rngs)
  else:
    model = pretrained.build_model(config, rngs)
  pretrained.apply_remat(model, config)  # config.memory.remat (training memory)
  cast_frozen(model, config)
  return model


def build_initialised_model(config) -> tuple[nnx.Module, list[str]]:
  """`build_training_model` with its weights from config.init_from's workdirs -> (model, one
  report line per workdir). When those hold every weight of the model (stages 3 and 4 of a
  pipeline, which start from the stage before's model), nothing is initialised at random: the
  model is built abstract (pretrained.build_model_to_restore; on the CPU every random
  initialiser compiles a program per weight shape, ~15 s for the tiny stage 3) and filled. Else
  (stage 2: H_s, T_s, F_p and LoRA are new) it is built with random weights and the workdirs'
  weights are copied over them. The same weights either way."""
  if config.stage != 0:
    model = pretrained.build_model_to_restore(config)
    report = checkpoints.init_from(model, config.init_from)
    if pretrained.is_restored(model):
      pretrained.apply_remat(model, config)
      cast_frozen(model, config)
      return model, report
  model = build_training_model(config)
  return model, checkpoints.init_from(model, config.init_from)


#: The pretrained parts whose frozen weights `cast_frozen` stores in the compute dtype.
FROZEN_PARTS = ("unet", "vae_decoder", "guidance_extractor")


def cast_frozen(model, config) -> int:
  """Under bf16 precision, stores the frozen weights of the pretrained parts (UNet, D_m, F: every
  floating nnx.Param outside config.train.trainable and every FrozenWeight) in bfloat16, in
  place: half their memory in the train step's constants, and the same values the bf16 layers
  compute with (each casts its kernel to bfloat16 anyway). Trainable parameters (LoRA, codec,
  T_s, F_p) and the optimizer state stay float32, and so do the norms' scales and biases (they
  are applied in float32). fp32: nothing changes. Returns the number of arrays cast.

  Called once, in build_training_model: before init_from and a resume restore, which both
  convert what they read to the dtype of the model's arrays (checkpoints.init_from casts;
  orbax restores to the template's dtype)."""
  if precision_lib.config_precision(config) != "bf16":
    return 0
  keep = trainable_filter(config)
  n = 0
  for path, node in nnx.iter_graph(model):
    if not path or path[0] not in FROZEN_PARTS or not isinstance(node, nnx.Module):
      continue
    if _is_norm(node):
      continue
    for name, var in vars(node).items():
      if not isinstance(var, nnx.Variable) or keep((*path, name), var):
        continue
      value = var.get_value() if hasattr(var, "get_value") else var.value
      if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating):
        if value.dtype != jnp.bfloat16:
          var.value = value.astype(jnp.bfloat16)
          n += 1
  return n


def _is_norm(module) -> bool:
  """GroupNorm / LayerNorm / ChannelNorm-like modules (their statistics run in float32)."""
  return "norm" in type(module).__name__.lower()


def trainable_filter(config):
  """nnx filter: the nnx.Params whose '/'-joined path fully matches a regex of
  config.train.trainable."""
  patterns = [re.compile(p) for p in config.train.trainable]

  def keep(path, value):
    if not isinstance(value, nnx.Param):
      return False
    name = "/".join(str(p) for p in path)
    return any(p.fullmatch(name) for p in patterns)

  return keep


def count_params(tree) -> int:
  """Number of scalars in all the arrays of `tree`."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def merge_pure(a: dict, b: dict) -> dict:
  """Union of two nested pure dicts with disjoint leaves (trainable + frozen = all params)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_pure(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def split_pure(full: dict, like: dict) -> tuple[dict, dict]:
  """Splits `full` into (the leaves present in `like`, the rest), keeping the nesting."""
  inside, outside = {}, {}
  for k, v in full.items():
    if k in like and isinstance(v, dict) and isinstance(like[k], dict):
      i, o = split_pure(v, like[k])
      if i:
        inside[k] = i
      if o:
        outside[k] = o
    elif k in like:
      inside[k] = v
    else:
      outside[k] = v
  return inside, outside


def make_optimizer(config):
  """AdamW with the piecewise-constant lr schedule (and optional global-norm clipping)."""
  o = config.optim
  lr = optax.piecewise_constant_schedule(
    o.learning_rate, {int(s): o.lr_decay_factor for s in o.lr_decay_steps}
  )
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, lr


def make_discriminator(config):
  """Stage 4: HiFiC's conditional discriminator -> (graphdef, {'params', 'spectral', 'opt_state'},
  its optimizer). Its params and spectral-norm vectors are pure dicts in the train state."""
  source = config.loss.get("discriminator_init", "")
  if source:  # a `convert/from_torch.py hific` folder: HiFiC's trained discriminator
    disc = converted_discriminator(source, config.model.latent_channels)
  else:
    disc = Discriminator(
      config.model.latent_channels,
      filters=tuple(config.loss.get("discriminator_filters", HIFIC_FILTERS)),
      rngs=nnx.Rngs(config.seed + 1),
    )
  graphdef, params, spectral = nnx.split(disc, nnx.Param, SpectralState)
  params, spectral = nnx.to_pure_dict(params), nnx.to_pure_dict(spectral)
  tx = optax.adam(config.loss.disc_learning_rate, b1=config.optim.b1, b2=config.optim.b2)
  return graphdef, {"params": params, "spectral": spectral, "opt_state": tx.init(params)}, tx


def converted_discriminator(folder: str, latent_channels: int):
  """The Discriminator of a `convert/from_torch.py hific` folder (its widths read from the
  converted kernels), loaded strictly; SodecError naming the fix otherwise."""
  fix = (
    "--config.loss.discriminator_init takes a `python convert/from_torch.py hific --src "
    "CHECKPOINT.pt --out DIR` folder whose checkpoint held the discriminator"
  )
  if not os.path.isdir(folder):
    raise SodecError(f"discriminator_init {folder!r} does not exist; {fix}")
  if converted.read_manifest(folder).get("kind") != "hific":
    raise SodecError(f"discriminator_init {folder} is not a converted HiFiC folder; {fix}")
  arrays = converted.load_discriminator_arrays(folder)
  if arrays is None:
    raise SodecError(
      f"discriminator_init {folder} has no discriminator/ (the HiFiC checkpoint held none); {fix}"
    )
  try:
    context = arrays["context_conv"]["kernel"].shape  # [3, 3, C, context]
    filters = [arrays[f"conv{k}"]["kernel"].shape[-1] for k in range(1, 5)]
  except (KeyError, AttributeError, IndexError) as e:
    raise SodecError(
      f"discriminator_init {folder}: unexpected discriminator layout ({e}); {fix}"
    ) from None
  if context[2] != latent_channels:
    raise SodecError(
      f"discriminator_init {folder} was trained with y_hat of {context[2]} "
      f"channels, this model has {latent_channels} (model.latent_channels)"
    )
  disc = nnx.eval_shape(
    lambda: Discriminator(
      latent_channels, filters=filters, context_channels=context[3], rngs=nnx.Rngs(0)
    )
  )
  converted.load_discriminator(folder, disc)
  return disc


def load_lpips(config):
  """(graphdef, state) of the frozen LPIPS network (loss.lpips_net: VGG16 or AlexNet trunk), or
  (None, None) when k_P == 0."""
  if config.loss.k_P <= 0:
    return None, None
  from sodec_jax.weights import lpips as lw  # pylint: disable=import-outside-toplevel

  if config.loss.get("lpips_net", "vgg") == "alex":
    field, load = "alexnet_weights", lw.load_lpips_alex
  else:
    field, load = "vgg_weights", lw.load_lpips
  path = config.lpips[field]
  if not os.path.isfile(path):
    raise SodecError(f"config.lpips.{field}={path!r} is not a file")
  dtype = precision_lib.compute_dtype(config.get("precision", "auto"))  # bf16 on GPU/TPU
  lpips = load(path, dtype=dtype, precision="default")
  if "lpips" in pretrained.remat_parts(config):
    remat_lib.set_remat(lpips, pretrained.remat_policy(config))
  return nnx.split(lpips)

"""Building the frozen, pretrained parts of SODEC from a config: the SD UNet and VAE (D_m) and
the guidance extractor F; `build_model` hands them to `sodec_jax.model.SODEC` and
`build_latent_pretrain` to the tiny pipeline's stage 0.

Where the weights come from (config):
  diffusion.unet / diffusion.vae   "sd21" (Stable Diffusion 2.1 sizes), "tiny" (the tiny default's
                                   small members of the same families), or a diffusers config.json
  diffusion.weights                a folder with the pretrained UNet and VAE: either the output of
                                   `python convert/from_torch.py sd21 ...` or a diffusers SD 2.1
                                   folder (unet/, vae/); "" = random init (only for "tiny", whose
                                   weights come from the tiny pipeline's own pretraining stage)
  diffusion.tiny_latent_channels   channels of the "tiny" VAE's latent and the "tiny" UNet's input
                                   and output (SD's VAE has 4, SD3's 16; docs/ARCHITECTURE.md has
                                   what 16 does to the tiny default)
  guidance.extractor               "vit" | "swin";  guidance.extractor_config: "tiny" or ""
  guidance.extractor_weights       a transformers model folder (or converted `vit`/`swin` folder)

  diffusion.prediction_type        must match the prediction type the weights folder records
                                   (`check_prediction_type`: one line naming the fix)

A paper-size config started without its weights fails at once with one line naming the folder
it expected and the converter command that makes it.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax import remat as remat_lib
from sodec_jax.errors import SodecError
from sodec_jax.precision import apply_precision
from sodec_jax.weights.formats import read_json

SD21_HINT = (
  "python convert/from_torch.py sd21 --src /path/to/stable-diffusion-2-1-base "
  "--out /weights/sd21   (then --config.diffusion.weights=/weights/sd21)"
)
VIT_HINT = (
  "python convert/from_torch.py vit --src /path/to/vit-large-patch16-224-in21k "
  "--out /weights/vit   (then --config.guidance.extractor_weights=/weights/vit)"
)


def check_paths(config) -> None:
  """Fails at once (before anything is written) when a diffusion config lacks its weights."""
  if config.get("decoder", "codec") != "diffusion":
    return
  d, g = config.diffusion, config.guidance
  if d.weights and not os.path.isdir(d.weights):
    raise SodecError(
      f"config.diffusion.weights={d.weights!r} does not exist; make it with: {SD21_HINT}"
    )
  check_prediction_type(d)
  if not d.weights and (d.unet != "tiny" or d.vae != "tiny"):
    raise SodecError(
      f"config.diffusion.weights is empty but unet={d.unet!r} / vae={d.vae!r} need "
      f"pretrained SD 2.1 weights; make them with: {SD21_HINT}"
    )
  if g.mode == "fidelity":
    if g.extractor_weights and not os.path.isdir(g.extractor_weights):
      raise SodecError(
        f"config.guidance.extractor_weights={g.extractor_weights!r} does not exist; "
        f"make it with: {VIT_HINT}"
      )
    if not g.extractor_weights and g.extractor_config != "tiny":
      raise SodecError(
        "config.guidance.mode='fidelity' needs a pretrained extractor: "
        f"config.guidance.extractor_weights is empty; make it with: {VIT_HINT}"
      )


def check_prediction_type(d, warn: bool = False) -> None:
  """SodecError (one line, naming the fix) when the SD weights in `d.weights` were trained for
  another prediction type than `d.prediction_type`; a warning (`warn`) when they record none."""
  if not d.weights or not os.path.isdir(d.weights):
    return
  from sodec_jax.weights.converted import recorded_prediction_type

  found, where = recorded_prediction_type(d.weights)
  if found is None:
    if warn:
      warnings.warn(
        f"cannot check config.diffusion.prediction_type={d.prediction_type!r} "
        f"against the weights: {where}",
        stacklevel=3,
      )
    return
  if found != d.prediction_type:
    raise SodecError(
      f"config.diffusion.weights={d.weights!r} is a {found} model ({where}) but "
      f"config.diffusion.prediction_type={d.prediction_type!r}; set "
      f"--config.diffusion.prediction_type={found}"
    )


def unet_config(name: str, tiny_latent_channels: int = 4):
  """'sd21', 'tiny' (with `tiny_latent_channels` in and out), or a diffusers config.json."""
  import dataclasses

  from sodec_jax.diffusion.unet import UNetConfig, sd21_unet_config, tiny_unet_config

  if name == "sd21":
    return sd21_unet_config()
  if name == "tiny":
    n = int(tiny_latent_channels)
    return dataclasses.replace(tiny_unet_config(), in_channels=n, out_channels=n)
  return UNetConfig.from_dict(read_json(name))


def vae_config(name: str, tiny_latent_channels: int = 4):
  """'sd21', 'tiny' (4 levels, so 8x down like SD's VAE, narrow, `tiny_latent_channels`
  latent channels), or a diffusers config.json."""
  from sodec_jax.diffusion.autoencoder import VAEConfig, sd21_vae_config

  if name == "sd21":
    return sd21_vae_config()
  if name == "tiny":
    return VAEConfig(
      block_out_channels=(16, 16, 32, 32),
      down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4,
      layers_per_block=1,
      norm_num_groups=8,
      latent_channels=int(tiny_latent_channels),
    )
  return VAEConfig.from_dict(read_json(name))


def _component_folder(weights: str, name: str) -> str:
  if not os.path.isdir(weights):
    raise SodecError(
      f"config.diffusion.weights={weights!r} does not exist; make it with: {SD21_HINT}"
    )
  folder = os.path.join(weights, name)
  if not os.path.isdir(folder):
    raise SodecError(
      f"config.diffusion.weights={weights!r} has no {name}/ folder; make one with: {SD21_HINT}"
    )
  return folder


def _weights_config(weights: str, name: str) -> dict:
  """The diffusers-style config.json of a component inside a weights folder."""
  return read_json(os.path.join(_component_folder(weights, name), "config.json"))


def build_unet(d, rngs: nnx.Rngs, load: bool = True):
  """The UNet (eps_theta): pretrained from `d.weights` when `load`, else random with the right
  shapes (its weights then come from a checkpoint). LoRA is attached by the caller. With
  `d.weights`, their recorded prediction type must be `d.prediction_type`."""
  from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig

  dtype = jnp.dtype(d.dtype)
  if d.weights:
    _component_folder(d.weights, "unet")
    check_prediction_type(d, warn=True)
  if d.weights and load:
    return _load_component(d.weights, "unet", dtype, remat=bool(d.remat))
  if d.weights:
    cfg = UNetConfig.from_dict(_weights_config(d.weights, "unet"))
  elif d.unet == "tiny" or not load:
    cfg = unet_config(d.unet, d.get("tiny_latent_channels", 4))
  else:
    raise SodecError(
      f"config.diffusion.unet={d.unet!r} needs pretrained weights: "
      f"--config.diffusion.weights=DIR is empty; make DIR with: {SD21_HINT}"
    )
  return UNet2DConditionModel(cfg, dtype=dtype, remat=bool(d.remat), rngs=rngs)


def build_vae(d, rngs: nnx.Rngs, load: bool = True):
  """The SD VAE (D_m is its decoder); pretrained or random as `build_unet`."""
  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig

  dtype = jnp.dtype(d.dtype)
  if d.weights and load:
    return _load_component(d.weights, "vae", dtype)
  if d.weights:
    cfg = VAEConfig.from_dict(_weights_config(d.weights, "vae"))
  elif d.vae == "tiny" or not load:
    cfg = vae_config(d.vae, d.get("tiny_latent_channels", 4))
  else:
    raise SodecError(
      f"config.diffusion.vae={d.vae!r} needs pretrained weights: "
      f"--config.diffusion.weights=DIR is empty; make DIR with: {SD21_HINT}"
    )
  return AutoencoderKL(cfg, dtype=dtype, rngs=rngs)


def _load_component(weights: str, name: str, dtype, **kwargs):
  _component_folder(weights, name)
  if os.path.isfile(os.path.join(weights, "manifest.json")):
    from sodec_jax.weights import converted  # converted orbax folders (convert/from_torch.py)

    loader = converted.load_unet if name == "unet" else converted.load_vae
    return loader(weights, dtype=dtype, **kwargs)
  from sodec_jax.weights import diffusers

  folder = _component_folder(weights, name)
  loader = diffusers.load_unet if name == "unet" else diffusers.load_vae
  return loader(folder, dtype=dtype, **kwargs)


def build_extractor(g, dtype, seed: int):
  """F: a frozen ViT or Swin, from weights, or (extractor_config='tiny') a small random one.

  F is never trained and not saved in training checkpoints (it is not an nnx.Param): every model
  that uses it, inference included, loads it from `guidance.extractor_weights`.
  """
  if g.extractor not in ("vit", "swin"):
    raise SodecError(f"config.guidance.extractor={g.extractor!r}: use 'vit' or 'swin'")
  if g.extractor_weights:
    if not os.path.isdir(g.extractor_weights):
      raise SodecError(
        f"config.guidance.extractor_weights={g.extractor_weights!r} does not exist; "
        f"make it with: {VIT_HINT}"
      )
    if os.path.isfile(os.path.join(g.extractor_weights, "manifest.json")):
      from sodec_jax.weights import converted

      return converted.load_extractor(g.extractor_weights, dtype=dtype)
    from sodec_jax.weights import transformers as tw

    return (tw.load_vit if g.extractor == "vit" else tw.load_swin)(g.extractor_weights, dtype=dtype)
  if g.extractor_config != "tiny":
    raise SodecError(
      "config.guidance.mode='fidelity' needs a pretrained extractor: "
      f"--config.guidance.extractor_weights=DIR is empty; make DIR with: {VIT_HINT}"
    )
  return random_tiny_extractor(g.extractor, dtype, seed)


def random_tiny_extractor(kind: str, dtype, seed: int):
  """A small frozen extractor with random weights (the tiny default has no pretrained ViT)."""
  if kind == "vit":
    from sodec_jax.guidance.vit import ViT, ViTSpec

    module = ViT(
      ViTSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=(64, 64),
        patch_size=(8, 8),
      ),
      dtype=dtype,
    )
  else:
    from sodec_jax.guidance.swin import Swin, SwinSpec

    module = Swin(
      SwinSpec(
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        image_size=(64, 64),
        patch_size=(4, 4),
      ),
      dtype=dtype,
    )
  return randomize_extractor(module, seed)


def randomize_extractor(module, seed: int):
  """Fills a frozen extractor (ViT or Swin) with random weights in place: N(0, 0.02) matrices and
  embeddings, unit norm scales, zero biases; returns it."""
  from sodec_jax.layers import FrozenWeight

  flat = dict(nnx.to_flat_state(nnx.state(module, FrozenWeight)))
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0])))):
    names = "/".join(map(str, path)).lower()
    shape, dt = var.value.shape, var.value.dtype
    if "norm" in names and path[-1] in ("scale", "weight"):
      var.value = jnp.ones(shape, dt)
    elif path[-1] == "bias" or names.endswith("_bias"):
      var.value = jnp.zeros(shape, dt)
    else:
      var.value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dt)
  nnx.update(module, nnx.from_flat_state(flat))
  return module


def uses_extractor(config) -> bool:
  """Whether the model of `config` holds the frozen extractor F (diffusion decoder, fidelity
  guidance)."""
  return config.get("decoder", "codec") == "diffusion" and config.guidance.mode == "fidelity"


def build_config_extractor(config):
  """The extractor F of `config`'s model (see build_extractor)."""
  return build_extractor(config.guidance, jnp.dtype(config.diffusion.dtype), config.seed)


def build_model(config, rngs: nnx.Rngs, pretrained: bool = True, extractor=None):
  """The SODEC model described by `config` (the whole experiment ConfigDict), its frozen and
  pretrained parts built here and handed over: for a diffusion config the UNet and VAE (loaded
  from `config.diffusion.weights` when `pretrained`, else random with the right shapes: their
  weights then come from a checkpoint) and, with fidelity guidance, the extractor F (always
  loaded: it is frozen and not checkpointed; `extractor`: one already built for `config`)."""
  from sodec_jax.model import SODEC

  parts = {}
  if config.get("decoder", "codec") == "diffusion":
    d = config.diffusion
    parts = dict(unet=build_unet(d, rngs, pretrained), vae=build_vae(d, rngs, pretrained))
    if uses_extractor(config):
      parts["extractor"] = extractor if extractor is not None else build_config_extractor(config)
  model = SODEC(config, rngs=rngs, **parts)
  apply_precision(model, config.get("precision", "auto"))
  return model


def build_model_to_restore(config):
  """The model of `config` for a checkpoint to fill: its Params abstract (jax.ShapeDtypeStruct,
  no random initialisation: on the CPU every initialiser compiles a program per weight shape,
  ~40 s for the tiny model in a fresh process) and, with fidelity guidance, the frozen extractor
  F built for real as `build_model` builds it (F is not checkpointed). Restore every Param
  (checkpoints.restore_params) and call `check_restored` before use."""
  extractor = build_config_extractor(config) if uses_extractor(config) else None  # built once
  model = nnx.eval_shape(lambda f: build_model(config, nnx.Rngs(0), False, f), extractor)
  if extractor is not None:
    nnx.update(model.guidance_extractor, nnx.state(extractor))
  return model


def _abstract_paths(model) -> list[str]:
  return [
    "/".join(map(str, path))
    for path, var in nnx.to_flat_state(nnx.state(model))
    if isinstance(var.get_value(), jax.ShapeDtypeStruct)
  ]


def is_restored(model) -> bool:
  """Whether no variable of `model` (from `build_model_to_restore`) is still abstract."""
  return not _abstract_paths(model)


def check_restored(model, source: str) -> None:
  """Raises SodecError when a variable of `model` (from `build_model_to_restore`) is still
  abstract, i.e. `source` did not hold it."""
  missing = _abstract_paths(model)
  if missing:
    raise SodecError(
      f"{source} holds no value for {len(missing)} weight(s) of this model (e.g. {missing[0]}): "
      "a checkpoint of another model config?"
    )


def build_latent_pretrain(config, rngs: nnx.Rngs):
  """Stage 0 of the tiny pipeline (`sodec_jax.latent_pretrain.LatentPretrain`) with its UNet and
  VAE built from `config.diffusion` (random for the tiny sizes) and handed over."""
  from sodec_jax.latent_pretrain import LatentPretrain

  d = config.diffusion
  vae = build_vae(d, rngs)  # built first: the same random streams as before the split
  return LatentPretrain(config, unet=build_unet(d, rngs), vae=vae, rngs=rngs)


#: config.memory.remat names -> the model attribute path of the part (lpips: train/build.py).
REMAT_PARTS = {
  "unet": ("unet",),
  "vae_decoder": ("vae_decoder",),
  "extractor": ("guidance_extractor",),
  "fidelity_decoder": ("codec", "fidelity_decoder"),
  "lpips": None,
}


def remat_parts(config) -> tuple[str, ...]:
  """The checked config.memory.remat names (config.diffusion.remat=True adds "unet")."""
  memory = config.get("memory") or {}
  parts = tuple(memory.get("remat", ()) or ())
  unknown = [p for p in parts if p not in REMAT_PARTS]
  if unknown:
    raise SodecError(
      f"config.memory.remat names {unknown[0]!r}: use any of {', '.join(REMAT_PARTS)}"
    )
  if config.get("diffusion") is not None and config.diffusion.get("remat", False):
    parts = parts + ("unet",) if "unet" not in parts else parts
  return parts


def remat_policy(config) -> str:
  """The checked config.memory.remat_policy ("nothing" | "dots")."""
  policy = str((config.get("memory") or {}).get("remat_policy", "nothing"))
  if policy not in remat_lib.POLICIES:
    raise SodecError(
      f"config.memory.remat_policy={policy!r}: use one of {', '.join(remat_lib.POLICIES)}"
    )
  return policy


def apply_remat(model, config) -> tuple[str, ...]:
  """Switches rematerialisation of the model's parts to config.memory.remat (on with
  memory.remat_policy, the others off; parts the model lacks are skipped); returns the parts
  switched on. The weights are not touched. Training applies it (train/build.py
  build_training_model); inference models are built without (remat only matters for gradients).
  """
  parts, policy = remat_parts(config), remat_policy(config)
  on = []
  for name, path in REMAT_PARTS.items():
    node = model
    for attr in path or ():
      node = getattr(node, attr, None)
    if path is None or node is None:
      continue
    remat_lib.set_remat(node, policy if name in parts else False)
    if name in parts:
      on.append(name)
  return tuple(on)

"""Load diffusers model folders (UNet2DConditionModel, AutoencoderKL) into our flax.nnx modules.

    unet = load_unet("sd21/unet")            # folder with config.json + diffusion_pytorch_model.*
    vae = load_vae("sd21/vae", dtype=jnp.bfloat16)

Every parameter of our module names exactly one diffusers key, built from the module path with the
rename table below, and is converted by the transform of its layer type:

    Linear   kernel [in, out]          <- weight [out, in]             (transpose)
    Conv2d   kernel [kh, kw, in, out]  <- weight [out, in, kh, kw]     (transpose 2, 3, 1, 0)
    GroupNorm / LayerNorm   scale      <- weight                       (as is)
    all      bias                      <- bias                         (as is)

Strict (`sodec_jax.weights.strict`): missing, unexpected and mis-shaped keys are raised together
as one SodecError. Files are read by `sodec_jax.weights.formats` (safetensors without torch, a
`.bin` only through torch.load(weights_only=True)).
"""

from __future__ import annotations

import os
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.diffusion.blocks import Conv2d, GroupNorm, LayerNorm, Linear
from sodec_jax.errors import SodecError
from sodec_jax.weights import strict
from sodec_jax.weights.formats import TensorSource, looks_like, np_dtype, open_weights, read_json

# Our module path -> diffusers module path (regex on the dotted path, applied in order).
RENAMES: tuple[tuple[str, str], ...] = (
  (r"\.ff\.proj_in$", ".ff.net.0.proj"),  # FeedForward: GEGLU projection
  (r"\.ff\.proj_out$", ".ff.net.2"),  # FeedForward: output Linear
  (r"\.to_out$", ".to_out.0"),  # Attention output Linear lives in a ModuleList
)

# Old AutoencoderKL checkpoints (pre diffusers 0.14 attention blocks): accepted as aliases.
LEGACY_VAE_ATTENTION = (
  (r"\.to_q$", ".query"),
  (r"\.to_k$", ".key"),
  (r"\.to_v$", ".value"),
  (r"\.to_out\.0$", ".proj_attn"),
)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_module_path(path: str, renames=RENAMES) -> str:
  """Our dotted module path -> the diffusers one (e.g. '...ff.proj_in' -> '...ff.net.0.proj')."""
  dotted = "." + path
  for pattern, repl in renames:
    dotted = re.sub(pattern, repl, dotted)
  return dotted[1:]


def _linear_to_flax(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4 and w.shape[2:] == (1, 1):  # 1x1-conv-stored projection (old checkpoints)
    w = w[:, :, 0, 0]
  return w.T


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def expected_keys(model: nnx.Module, renames=RENAMES) -> dict[str, tuple]:
  """diffusers key -> (module, attribute, transform, expected flax shape) for every parameter."""
  table = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear):
      weight = ("kernel", _linear_to_flax)
    elif isinstance(module, Conv2d):
      weight = ("kernel", _conv_to_flax)
    elif isinstance(module, (GroupNorm, LayerNorm)):
      weight = ("scale", _identity)
    else:
      continue
    prefix = diffusers_module_path(".".join(str(p) for p in path), renames)
    table[f"{prefix}.weight"] = (module, *weight)
    if getattr(module, "bias", None) is not None:
      table[f"{prefix}.bias"] = (module, "bias", _identity)
  return {k: (m, attr, fn, tuple(getattr(m, attr).shape)) for k, (m, attr, fn) in table.items()}


def _rows(model: nnx.Module, aliases=()) -> list[tuple]:
  """strict.fill rows: (diffusers key + legacy aliases, (module, attribute), transform, shape)."""
  rows = []
  for key, (module, attr, transform, shape) in expected_keys(model).items():
    prefix, leaf = key.rsplit(".", 1)
    alts = [re.sub(pattern, repl, prefix) + "." + leaf for pattern, repl in aliases]
    rows.append(((key, *[a for a in alts if a != key]), (module, attr), transform, shape))
  return rows


def load_state_dict_into(
  model: nnx.Module, state_dict, *, what: str = "model", aliases=(), hint=None
) -> nnx.Module:
  """Copy a diffusers state dict (numpy arrays, or a `formats.TensorSource`) into `model`'s
  parameters, strictly (`sodec_jax.weights.strict`: one SodecError lists every missing,
  unexpected or mis-shaped key).

  `aliases`: extra (pattern, replacement) renames on diffusers keys, tried when a key is missing
  (legacy names).
  """
  arrays = strict.fill(_rows(model, aliases), state_dict, what=what, hint=hint or "")
  for (module, attr), value in arrays.items():
    var = getattr(module, attr)
    var.value = jnp.asarray(value, dtype=var.value.dtype)
  return model


def _unflatten(flat) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def diffusers_params(
  model: nnx.Module, source, *, what: str, dtype: str, aliases=(), hint=None
) -> dict:
  """The pure dict (`nnx.to_pure_dict` layout) of an abstract diffusers-family module filled from
  `source` (a TensorSource), strictly, through the same key map as `load_state_dict_into`; but
  tensors are converted one at a time into numpy arrays of `dtype` and nothing is materialised
  in the module (converting the full UNet needs little more than its converted size)."""
  npdt = np_dtype(dtype)
  paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model)}
  rows = [
    (
      names,
      (module, attr),
      (lambda t: lambda a: np.ascontiguousarray(t(a).astype(npdt, copy=False)))(transform),
      shape,
    )
    for names, (module, attr), transform, shape in _rows(model, aliases)
  ]
  arrays = strict.fill(rows, source, what=what, hint=hint or "")
  flat = {paths[id(module)] + (attr,): v for (module, attr), v in arrays.items()}
  variables = {tuple(k) for k, _ in nnx.to_flat_state(nnx.state(model))}
  left = sorted(".".join(map(str, p)) for p in variables - set(flat))
  if left:
    raise SodecError(f"{what}: the key map does not cover {left[:10]} (a bug in the key map)")
  return _unflatten(flat)


def read_folder(folder: str) -> tuple[dict, TensorSource]:
  """(config.json as a dict, its weights as a TensorSource) of a diffusers model folder."""
  config = read_json(os.path.join(folder, "config.json"), f"diffusers model folder {folder}")
  return config, open_weights(weight_file(folder, "model"))


def weight_file(folder: str, what: str) -> str:
  """The weights file of a diffusers model folder (config.json + diffusion_pytorch_model.*)."""
  if not os.path.isdir(folder):
    raise SodecError(
      f"{folder} is not a folder (expected a diffusers {what} folder with "
      "config.json and diffusion_pytorch_model.safetensors)"
    )
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise SodecError(f"{folder} is not a diffusers {what} folder: it has no config.json")
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  if any(n.endswith(".index.json") for n in os.listdir(folder)):
    raise SodecError(
      f"{folder} holds a sharded checkpoint, which is not supported; "
      "re-save it with save_pretrained(max_shard_size='20GB')"
    )
  raise SodecError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def hint_for(expected: str):
  """A strict.fill hint: names what the weights look like when they are not a `expected`."""

  def hint(missing, unexpected):
    if unexpected and missing:
      looks = looks_like(unexpected)
      if looks and expected not in looks:
        return f"these weights look like {looks}"
    return ""

  return hint


def abstract_module(build: Callable[[], nnx.Module]) -> nnx.Module:
  """build() with shapes only (no random init, nothing allocated): fill it with
  load_state_dict_into, which sets every parameter."""
  return nnx.eval_shape(build)


def load_unet(folder: str, dtype=jnp.float32, param_dtype=None, **kwargs):
  """UNet2DConditionModel from a diffusers folder (e.g. <sd-2-1>/unet).

  dtype: compute dtype; param_dtype: storage dtype (default: same as dtype). kwargs go to the
  module (remat=, query_chunk=). Returns the module: unet(sample, timesteps, context).
  """
  from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig

  config, state_dict = read_folder(folder)
  cfg = UNetConfig.from_dict(config)
  pdt = dtype if param_dtype is None else param_dtype
  model = abstract_module(
    lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=pdt, rngs=nnx.Rngs(0), **kwargs)
  )
  return load_state_dict_into(
    model, state_dict, what=f"UNet weights in {folder}", hint=hint_for("UNet")
  )


def load_vae(folder: str, dtype=jnp.float32, param_dtype=None, **kwargs):
  """AutoencoderKL from a diffusers folder (e.g. <sd-2-1>/vae): .encode(x) and .decode(z).

  dtype: compute dtype; param_dtype: storage dtype (default: same as dtype).
  """
  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig

  config, state_dict = read_folder(folder)
  cfg = VAEConfig.from_dict(config)
  pdt = dtype if param_dtype is None else param_dtype
  model = abstract_module(
    lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=pdt, rngs=nnx.Rngs(0), **kwargs)
  )
  return load_state_dict_into(
    model,
    state_dict,
    what=f"VAE weights in {folder}",
    aliases=LEGACY_VAE_ATTENTION,
    hint=hint_for("VAE"),
  )

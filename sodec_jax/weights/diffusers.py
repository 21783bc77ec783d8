"""Load diffusers model folders (UNet2DConditionModel, AutoencoderKL) into our flax.nnx modules.

    unet = load_unet("sd21/unet")            # folder with config.json + diffusion_pytorch_model.*
    vae = load_vae("sd21/vae", dtype=jnp.bfloat16)

Every parameter of our module names exactly one diffusers key, built from the module path with the
rename table below, and is converted by the transform of its layer type:

    Linear   kernel [in, out]          <- weight [out, in]             (transpose)
    Conv2d   kernel [kh, kw, in, out]  <- weight [out, in, kh, kw]     (transpose 2, 3, 1, 0)
    GroupNorm / LayerNorm   scale      <- weight                       (as is)
    all      bias                      <- bias                         (as is)

Strict: missing, unexpected and mis-shaped keys are collected and raised as one SodecError.
The safetensors path needs no torch; a `.bin` file is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.diffusion.blocks import Conv2d, GroupNorm, LayerNorm, Linear
from sodec_jax.errors import SodecError

# Our module path -> diffusers module path (regex on the dotted path, applied in order).
RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.ff\.proj_in$", ".ff.net.0.proj"),    # FeedForward: GEGLU projection
    (r"\.ff\.proj_out$", ".ff.net.2"),        # FeedForward: output Linear
    (r"\.to_out$", ".to_out.0"),              # Attention output Linear lives in a ModuleList
)

# Old AutoencoderKL checkpoints (pre diffusers 0.14 attention blocks): accepted as aliases.
LEGACY_VAE_ATTENTION = (
    (r"\.to_q$", ".query"), (r"\.to_k$", ".key"), (r"\.to_v$", ".value"),
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
  if w.ndim == 4 and w.shape[2:] == (1, 1):     # 1x1-conv-stored projection (old checkpoints)
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


def load_state_dict_into(model: nnx.Module, state_dict: dict[str, np.ndarray], *,
                         what: str = "model", aliases=()) -> nnx.Module:
  """Copy a diffusers state dict (numpy arrays) into `model`'s parameters, strictly.

  `aliases`: extra (pattern, replacement) renames on diffusers keys, tried when a key is missing
  (legacy names). Raises one SodecError listing every missing, unexpected or mis-shaped key.
  """
  table = expected_keys(model)
  used, missing, bad_shape = set(), [], []
  for key, (module, attr, transform, shape) in table.items():
    source = key
    if source not in state_dict:
      for pattern, repl in aliases:
        prefix, leaf = key.rsplit(".", 1)
        alt = re.sub(pattern, repl, prefix) + "." + leaf
        if alt in state_dict:
          source = alt
          break
    if source not in state_dict:
      missing.append(key)
      continue
    used.add(source)
    value = transform(np.asarray(state_dict[source]))
    if tuple(value.shape) != shape:
      bad_shape.append(f"{source}: {tuple(np.shape(state_dict[source]))} does not convert to {shape}")
      continue
    var = getattr(module, attr)
    var.value = jnp.asarray(value, dtype=var.value.dtype)
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or bad_shape:
    lines = [f"{what}: the weights do not match the configuration."]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", bad_shape)):
      if items:
        lines.append(f"{len(items)} {title}: " + ", ".join(sorted(items)))
    raise SodecError(" ".join(lines))
  return model


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (bfloat16 via ml_dtypes). No torch."""
  try:
    from safetensors.numpy import load_file
    return load_file(path)
  except TypeError:   # numpy cannot name bfloat16: parse the (simple) format ourselves
    pass
  import ml_dtypes
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    out[key] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
  """A PyTorch .bin state dict (torch.load(weights_only=True)) as float32/float16 numpy arrays."""
  try:
    import torch
  except ImportError as e:
    raise SodecError(f"{path} is a PyTorch .bin file: reading it needs torch "
                     "(or convert the folder to safetensors)") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}


def read_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, state dict) of a diffusers model folder."""
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise SodecError(f"{folder} is not a diffusers model folder: it has no config.json")
  with open(cfg_path) as f:
    config = json.load(f)
  for name in WEIGHT_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      reader: Callable = read_safetensors if name.endswith(".safetensors") else read_torch_bin
      return config, reader(path)
  raise SodecError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
                   "(sharded checkpoints are not supported)")


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
  model = abstract_module(lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=pdt,
                                                 rngs=nnx.Rngs(0), **kwargs))
  return load_state_dict_into(model, state_dict, what=f"UNet weights in {folder}")


def load_vae(folder: str, dtype=jnp.float32, param_dtype=None, **kwargs):
  """AutoencoderKL from a diffusers folder (e.g. <sd-2-1>/vae): .encode(x) and .decode(z).

  dtype: compute dtype; param_dtype: storage dtype (default: same as dtype).
  """
  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig
  config, state_dict = read_folder(folder)
  cfg = VAEConfig.from_dict(config)
  pdt = dtype if param_dtype is None else param_dtype
  model = abstract_module(lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=pdt, rngs=nnx.Rngs(0),
                                          **kwargs))
  return load_state_dict_into(model, state_dict, what=f"VAE weights in {folder}",
                              aliases=LEGACY_VAE_ATTENTION)

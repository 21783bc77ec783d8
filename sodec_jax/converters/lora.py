"""The UNet's LoRA adapters -> a peft / diffusers-style adapter that PyTorch users can load.

    export_lora(unet, "out/")        # out/adapter_model.safetensors + out/adapter_config.json

Key names are peft's, on the diffusers module path of each adapted layer (our path renamed by
`sodec_jax.weights.diffusers.diffusers_module_path`, e.g. `...attn1.to_out` -> `...attn1.to_out.0`):

    Linear  <path>.lora_A.weight [r, in]           <- our lora_a [in, r]          (transpose)
            <path>.lora_B.weight [out, r]          <- our lora_b [r, out]         (transpose)
    Conv2d  <path>.lora_A.weight [r, in, kh, kw]   <- our lora_a [kh, kw, in, r]
            <path>.lora_B.weight [out, r, 1, 1]    <- our lora_b [r, out]

adapter_config.json is a peft LoraConfig: r, lora_alpha (= our scale * r, so peft's
lora_alpha / r equals our scale), target_modules (the full diffusers names of the adapted
layers), rank_pattern / alpha_pattern when layers differ. In PyTorch:

    from peft import LoraConfig, set_peft_model_state_dict
    unet.add_adapter(LoraConfig(**json.load(open("out/adapter_config.json"))))
    set_peft_model_state_dict(unet, safetensors.torch.load_file("out/adapter_model.safetensors"))
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
from flax import nnx

from sodec_jax.converters.output import atomic_folder
from sodec_jax.errors import SodecError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_CONFIG_KEYS = (
  "peft_type",
  "r",
  "lora_alpha",
  "target_modules",
  "lora_dropout",
  "bias",
  "fan_in_fan_out",
  "use_rslora",
  "use_dora",
  "rank_pattern",
  "alpha_pattern",
  "init_lora_weights",
)


def lora_tensors(unet: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, float]]]:
  """({peft key: float32 array}, {diffusers module name: (rank, lora_alpha)}) of every adapter."""
  from sodec_jax.diffusion.blocks import Conv2d, Linear
  from sodec_jax.weights.diffusers import diffusers_module_path

  tensors, layers = {}, {}
  for path, module in nnx.iter_modules(unet):
    if not isinstance(module, (Linear, Conv2d)) or getattr(module, "lora", None) is None:
      continue
    name = diffusers_module_path(".".join(str(p) for p in path))
    a = np.asarray(module.lora.lora_a[...], np.float32)
    b = np.asarray(module.lora.lora_b[...], np.float32)
    rank = b.shape[0]
    if isinstance(module, Conv2d):
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
    else:
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    layers[name] = (rank, float(module.lora.scale) * rank)
  return tensors, layers


def peft_config(layers: dict[str, tuple[int, float]]) -> dict:
  """A peft LoraConfig dict for the adapted layers (the most common rank/alpha as defaults)."""
  r = Counter(v[0] for v in layers.values()).most_common(1)[0][0]
  alpha = Counter(v[1] for v in layers.values()).most_common(1)[0][0]
  return {
    "peft_type": "LORA",
    "r": int(r),
    "lora_alpha": alpha,
    "target_modules": sorted(layers),
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "rank_pattern": {k: int(v[0]) for k, v in layers.items() if v[0] != r},
    "alpha_pattern": {k: v[1] for k, v in layers.items() if v[1] != alpha},
  }


def export_lora(unet: nnx.Module, path: str, *, metadata: dict | None = None) -> str:
  """Writes PATH/adapter_model.safetensors and PATH/adapter_config.json (atomically: a temporary
  sibling folder renamed at the end). Raises SodecError when the module has no LoRA adapters."""
  from safetensors.numpy import save_file

  tensors, layers = lora_tensors(unet)
  if not tensors:
    raise SodecError(
      "the UNet has no LoRA adapters to export (apply_lora was never called on it, "
      "or they were merged)"
    )
  from sodec_jax.weights.formats import CONVERTER_VERSION

  with atomic_folder(path) as tmp:
    meta = {
      "format": "peft-lora",
      "converter": f"sodec-jax {CONVERTER_VERSION}",
      **{k: str(v) for k, v in (metadata or {}).items()},
    }
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=meta)
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(peft_config(layers), f, indent=2, sort_keys=True)
  return os.path.abspath(path)


def find_unet(model: nnx.Module):
  """The UNet2DConditionModel inside `model` (itself, or a submodule), or None."""
  from sodec_jax.diffusion.unet import UNet2DConditionModel

  for _, module in nnx.iter_modules(model):
    if isinstance(module, UNet2DConditionModel):
      return module
  return None


def export_lora_from_workdir(workdir: str, out: str, step: int | None = None) -> str:
  """The LoRA of the UNet in a training workdir's latest (or given) checkpoint -> `out`."""
  from sodec_jax import checkpoints
  from sodec_jax.pretrained import build_model

  if not os.path.isdir(workdir):
    raise SodecError(f"--src {workdir} is not a folder (expected a training workdir)")
  if not os.path.isfile(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    raise SodecError(
      f"--src {workdir} is not a sodec-jax training workdir (no {checkpoints.CONFIG_FILE})"
    )
  config = checkpoints.load_config(workdir)
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  unet = find_unet(model)
  if unet is None:
    raise SodecError(
      f"the model of {workdir} (config {config.get('name', '?')!r}, stage "
      f"{config.get('stage', '?')}) has no UNet, so there is no LoRA to export"
    )
  used = checkpoints.restore_params(workdir, model, step)
  return export_lora(unet, out, metadata={"workdir": os.path.abspath(workdir), "step": used})

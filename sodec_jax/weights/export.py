"""The key maps read backwards: our modules' weights -> PyTorch state dicts (numpy, float32).

Each function walks the SAME table its reading twin loads through, so a name mapped wrongly
on one side is mapped wrongly on the other, and a round trip (ours -> torch -> ours) is exact:

  diffusers_state_dict(unet | vae)  `weights.diffusers.expected_keys`: diffusers keys; a LoRA
                                    adapter is merged into its layer's weight on the way out
                                    (W + (alpha / rank) A B, in our layout, then transposed)
  hub_state_dict(vit | swin)        `weights.transformers.vit_table` / `swin_table`: the hub
                                    (transformers 4) names; `hub_name` maps transformers-5
                                    module names (`layers.0.attention.q_proj`) onto them

Transforms (inverse of the readers'): Linear kernel [in, out] -> weight [out, in]; Conv2d kernel
[kh, kw, in, out] -> weight [out, in, kh, kw]; norms and biases as they are. No torch is imported.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from sodec_jax.weights import transformers as tw
from sodec_jax.weights.diffusers import _conv_to_flax, _identity, _linear_to_flax, expected_keys


def _value(var) -> np.ndarray:
  return np.asarray(var[...], np.float32)


def _to_torch(arr: np.ndarray, transform) -> np.ndarray:
  """Inverse of the reader's transform (ours -> torch layout)."""
  if transform is _linear_to_flax:
    return np.ascontiguousarray(arr.T)
  if transform is _conv_to_flax:
    return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
  if transform is _identity:
    return np.ascontiguousarray(arr)
  raise ValueError(f"no inverse for the transform {transform!r}")


def diffusers_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
  """{diffusers key: float32 array} for every parameter of our UNet2DConditionModel or
  AutoencoderKL (a VAE whose encoder was dropped gives decoder.* and post_quant_conv.* only).
  LoRA adapters are merged: the kernel written is W + module.lora.delta()."""
  out = {}
  for key, (layer, attr, transform, _) in expected_keys(module).items():
    arr = _value(getattr(layer, attr))
    lora = getattr(layer, "lora", None)
    if attr == "kernel" and lora is not None:
      arr = arr + np.asarray(lora.delta(), np.float32)
    out[key] = _to_torch(arr, transform)
  return out


def _hub_inverse(fn, arr: np.ndarray) -> np.ndarray:
  if fn is tw._linear:
    return np.ascontiguousarray(arr.T)
  if fn is tw._conv:
    return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
  if fn is tw._same:
    return np.ascontiguousarray(arr)
  raise ValueError(f"no inverse for the transform {fn!r}")


def hub_state_dict(module) -> dict[str, np.ndarray]:
  """{hub key: float32 array} of our ViT or Swin extractor, through `vit_table` / `swin_table`."""
  from sodec_jax.guidance.vit import ViT

  table = tw.vit_table if isinstance(module, ViT) else tw.swin_table
  return {
    key: _hub_inverse(fn, _value(tw._get_variable(module, path)))
    for key, path, fn in table(module.spec)
  }


def hub_name(torch_key: str, kind: str) -> str:
  """A transformers ViTModel / SwinModel state-dict key (transformers 5 module names) -> the hub
  name `hub_state_dict` uses (the renames the reader applies, `weights.transformers`)."""
  for pattern, repl in tw._VIT_V5_NAMES if kind == "vit" else tw._SWIN_V5_NAMES:
    torch_key = re.sub(pattern, repl, torch_key)
  return torch_key


__all__ = ("diffusers_state_dict", "hub_state_dict", "hub_name")

"""The perceptual metrics' weights -> converted folders: `convert_lpips` (VGG16 trunk + the
LPIPS heads: OUT/{vgg16,lpips}/) and `convert_dists` (VGG16 + alpha/beta: OUT/{vgg16,dists}/).
Readers and checks: `sodec_jax.weights.lpips`, `sodec_jax.weights.dists`.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sodec_jax.converters.output import check_dtype, output
from sodec_jax.errors import SodecError
from sodec_jax.weights import dists as dw
from sodec_jax.weights import lpips as lw
from sodec_jax.weights.formats import np_dtype, open_weights


def _vgg_tree(vgg_state: Mapping) -> dict:
  """torchvision `features.{i}.{weight,bias}` -> {conv{i}_kernel (HWIO), conv{i}_bias}."""
  out = {}
  for k, v in vgg_state.items():
    _, idx, leaf = k.split(".")
    a = np.asarray(v, np.float32)
    if leaf == "weight":
      out[f"conv{idx}_kernel"] = np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    else:
      out[f"conv{idx}_bias"] = a
  return out


def convert_lpips(src: str, out: str, dtype: str = "float32", *, heads: str | None = None) -> str:
  """VGG16 (torchvision layout, .pth/.safetensors) + LPIPS heads -> OUT/{vgg16,lpips}/.

  heads: the lpips wheel's weights/v0.1/vgg.pth (or any file with lin{i}.model.1.weight);
  default: the heads shipped with sodec-jax (sodec_jax/metrics/lpips_heads.npz)."""
  check_dtype(dtype)
  vgg = lw.load_vgg16(src)
  if heads:
    head_arrays = lw.check_heads(_read_heads(heads), heads)
  else:
    head_arrays = lw.load_shipped_heads()
  npdt = np_dtype(dtype)
  with output(out, "lpips", dtype) as o:
    o.write_json(
      "vgg16",
      "config.json",
      {
        "layout": "torchvision vgg16 features, HWIO kernels",
        "convs": sorted(int(k.split(".")[1]) for k in vgg if k.endswith("weight")),
      },
    )
    o.save_params("vgg16", {k: v.astype(npdt) for k, v in _vgg_tree(vgg).items()})
    o.write_json(
      "lpips",
      "config.json",
      {"heads": list(lw.HEAD_KEYS), "source": os.path.abspath(heads) if heads else "shipped"},
    )
    o.save_params(
      "lpips",
      {
        f"lin{i}": np.asarray(head_arrays[k], np.float32).reshape(-1)
        for i, k in enumerate(lw.HEAD_KEYS)
      },
    )
    o.add_sources([src] + ([heads] if heads else []))
  return out


def _read_heads(path: str) -> dict:
  src = open_weights(path) if not path.endswith(".npz") else None
  if src is None:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  missing = [k for k in lw.HEAD_KEYS if k not in src]
  if missing:
    raise SodecError(f"{path} has no LPIPS heads (missing {', '.join(missing)})")
  return {k: src.get(k) for k in lw.HEAD_KEYS}


def convert_dists(src: str, out: str, dtype: str = "float32", *, vgg: str) -> str:
  """DISTS alpha/beta (`src`: the dists-pytorch weights.pt or .safetensors/.npz) + VGG16
  (`vgg`, torchvision layout) -> OUT/{vgg16,dists}/."""
  check_dtype(dtype)
  if not vgg:
    raise SodecError("dists needs --vgg PATH (the VGG16 ImageNet weights, torchvision layout)")
  alpha, beta = dw.load_dists_weights(src)
  vgg_state = lw.load_vgg16(vgg)
  npdt = np_dtype(dtype)
  with output(out, "dists", dtype) as o:
    o.write_json("vgg16", "config.json", {"layout": "torchvision vgg16 features, HWIO kernels"})
    o.save_params("vgg16", {k: v.astype(npdt) for k, v in _vgg_tree(vgg_state).items()})
    o.write_json("dists", "config.json", {"channels": int(alpha.size)})
    o.save_params("dists", {"alpha": alpha.astype(np.float32), "beta": beta.astype(np.float32)})
    o.add_sources([src, vgg])
  return out

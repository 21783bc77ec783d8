"""Weights for LPIPS-VGG and LPIPS-Alex: the ImageNet trunk (a user-given file in torchvision's
layout) and the 5 linear heads (shipped, per trunk).

* `load_vgg16(path)` reads a torchvision-layout VGG16 state dict from `.safetensors` (no torch
  needed) or a torch pickle (`.pth`/`.pt`/`.bin`, read with `torch.load(weights_only=True)`; a
  pickle that needs anything beyond tensors is refused, never executed) and returns the
  `features.*` arrays as float32 numpy, validated.
* `heads_from_lpips_wheel()` reads the heads from the `lpips` wheel's `weights/v0.1/vgg.pth`
  (needs torch; never imports `lpips`, which pulls torchvision). `write_heads_npz()` wrote the
  shipped `sodec_jax/metrics/lpips_heads.npz` once:

    python -m sodec_jax.weights.lpips [OUT.npz]

* `load_shipped_heads()` reads that npz (no torch).
* AlexNet the same way: `load_alexnet(path)` (torchvision's `alexnet()` state dict, e.g.
  alexnet-owt-7be5be79.pth), `heads_from_lpips_wheel(net="alex")` (the wheel's alex.pth),
  `sodec_jax/metrics/lpips_alex_heads.npz` (`python -m sodec_jax.weights.lpips alex`),
  `load_lpips_alex(path)`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.metrics.alexnet import ALEXNET_FEATURE_SHAPES, ALEXNET_TAP_CHANNELS
from sodec_jax.metrics.vgg16 import VGG16_FEATURE_SHAPES, VGG16_STAGE_CHANNELS
from sodec_jax.weights import strict
from sodec_jax.weights.formats import load_object, to_numpy, torch_load

HEAD_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(len(VGG16_STAGE_CHANNELS)))
HEAD_SHAPES = {k: (1, c, 1, 1) for k, c in zip(HEAD_KEYS, VGG16_STAGE_CHANNELS)}
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "metrics" / "lpips_heads.npz"
NETS = ("vgg", "alex")
NET_HEAD_SHAPES = {
  "vgg": HEAD_SHAPES,
  "alex": {k: (1, c, 1, 1) for k, c in zip(HEAD_KEYS, ALEXNET_TAP_CHANNELS)},
}
NET_SHIPPED_HEADS = {"vgg": SHIPPED_HEADS, "alex": SHIPPED_HEADS.with_name("lpips_alex_heads.npz")}

_NEED_ALEX = (
  "LPIPS-Alex needs AlexNet ImageNet weights in torchvision layout (a state dict with "
  "features.0.weight ... features.10.bias, e.g. torchvision's alexnet-owt-7be5be79.pth, or the "
  "same tensors as .safetensors); pass it with --alexnet-weights (evaluate) or "
  "--config.lpips.alexnet_weights (training)"
)

_NEED_VGG = (
  "LPIPS needs VGG16 ImageNet weights in torchvision layout (a state dict with "
  "features.0.weight ... features.28.bias, e.g. torchvision's vgg16-397923af.pth, or the "
  "same tensors as .safetensors); pass it with --config.lpips.vgg_weights=/path/vgg16.pth"
)


# ----------------------------------------------------------------------------- reading files


def _read(path: str):
  return load_object(path, hint=_NEED_VGG)


def _unwrap(obj, path: str, hint: str = _NEED_VGG) -> dict:
  """A state dict, possibly inside {'state_dict': ...} / {'model': ...}; `features` Sequential keys
  (`0.weight`) get the `features.` prefix; a DataParallel `module.` prefix is dropped."""
  if not isinstance(obj, Mapping):
    raise SodecError(f"{path} holds a {type(obj).__name__}, not a state dict. " + hint)
  if not any(str(k).startswith("features.") for k in obj):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  out = {}
  for k, v in obj.items():
    k = str(k)
    if k.startswith("module."):
      k = k[len("module.") :]
    if k[:1].isdigit():
      k = "features." + k
    out[k] = v
  return out


def check_vgg16_state(
  state: Mapping, source: str = "the VGG16 state dict"
) -> dict[str, np.ndarray]:
  """Validates and returns the `features.*` entries (float32 numpy, OIHW); ignores other keys
  (e.g. `classifier.*`). Missing or mis-shaped keys -> SodecError listing all of them."""
  return _check_features(state, VGG16_FEATURE_SHAPES, f"{source} (a torchvision VGG16 state dict)")


def check_alexnet_state(
  state: Mapping, source: str = "the AlexNet state dict"
) -> dict[str, np.ndarray]:
  """`check_vgg16_state` for torchvision's AlexNet (`features.{0,3,6,8,10}.*`)."""
  return _check_features(
    state, ALEXNET_FEATURE_SHAPES, f"{source} (a torchvision AlexNet state dict)", _NEED_ALEX
  )


def _check_features(state: Mapping, shapes: Mapping, source: str, hint: str = _NEED_VGG) -> dict:
  missing = [k for k in shapes if k not in state]
  bad = []
  out = {}
  for k, shape in shapes.items():
    if k in state:
      a = to_numpy(state[k])
      if tuple(a.shape) != shape:
        bad.append(f"{k}: {tuple(a.shape)} (expected {shape})")
      else:
        out[k] = np.asarray(a, dtype=np.float32)
  strict.check(source, missing, (), bad, hint=hint)
  return out


def load_alexnet(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and validates a torchvision-layout AlexNet state dict; returns `features.*` arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SodecError(f"AlexNet weights file not found: {path}. " + _NEED_ALEX)
  obj = load_object(path, hint=_NEED_ALEX)
  return check_alexnet_state(_unwrap(obj, path, _NEED_ALEX), source=path)


def load_vgg16(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and validates a torchvision-layout VGG16 state dict; returns the `features.*` arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SodecError(f"VGG16 weights file not found: {path}. " + _NEED_VGG)
  return check_vgg16_state(_unwrap(_read(path), path), source=path)


# ----------------------------------------------------------------------------- LPIPS heads


def lpips_wheel_heads_path(net: str = "vgg") -> Path:
  """`<site-packages>/lpips/weights/v0.1/<net>.pth`, found without importing lpips."""
  import importlib.util

  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise SodecError(
      "the `lpips` package is not installed (pip install --no-deps lpips==0.1.4); "
      "it is only needed to regenerate lpips_heads.npz"
    )
  return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"


def heads_from_lpips_wheel(
  path: Optional[str | os.PathLike] = None, net: str = "vgg"
) -> dict[str, np.ndarray]:
  """The 5 LPIPS linear heads of trunk `net` from the wheel's <net>.pth, keys
  `lin{i}.model.1.weight`, shapes [1, C, 1, 1], float32 numpy, bit-exact."""
  path = Path(path) if path is not None else lpips_wheel_heads_path(net)
  return check_heads(torch_load(str(path)), str(path), net=net)


def check_heads(heads: Mapping, source: str = "LPIPS heads", net: str = "vgg") -> dict:
  """The 5 heads `lin{i}.model.1.weight` [1, C, 1, 1] of trunk `net` as float32 numpy (other
  keys ignored); missing or mis-shaped -> the strict loader's SodecError."""
  out, missing, bad = {}, [], []
  for k, shape in NET_HEAD_SHAPES[net].items():
    if k not in heads:
      missing.append(k)
      continue
    a = np.asarray(to_numpy(heads[k]))
    if a.shape != shape:
      bad.append(f"{k}: {a.shape} (expected {shape})")
    out[k] = a.astype(np.float32)
  strict.check(f"{source} (LPIPS-{net} heads)", missing, (), bad)
  return out


def write_heads_npz(
  out: Optional[str | os.PathLike] = None,
  wheel_path: Optional[str | os.PathLike] = None,
  net: str = "vgg",
) -> Path:
  heads = heads_from_lpips_wheel(wheel_path, net=net)
  out = Path(out) if out else NET_SHIPPED_HEADS[net]
  np.savez(out, **heads)
  return out


def load_shipped_heads(net: str = "vgg") -> dict[str, np.ndarray]:
  path = NET_SHIPPED_HEADS[net]
  if not path.is_file():
    raise SodecError(
      f"{path} is missing from the installation; regenerate it with "
      f"`python -m sodec_jax.weights.lpips {net}`"
    )
  with np.load(path) as z:
    return check_heads({k: z[k] for k in z.files}, str(path), net=net)


def load_lpips(
  vgg_weights_path: str | os.PathLike,
  dtype=None,
  precision=None,
  *,
  heads: Optional[Mapping] = None,
):
  """LPIPS with the VGG16 ImageNet trunk read from `vgg_weights_path` (torchvision layout, `.pth`
  read with torch.load(weights_only=True), or `.safetensors` read without torch) and the shipped
  heads (or `heads`). Problems with the file -> SodecError saying what is wrong."""
  import jax.numpy as jnp

  from sodec_jax.metrics.lpips import LPIPS

  state = load_vgg16(vgg_weights_path)
  heads = load_shipped_heads() if heads is None else check_heads(heads)
  return LPIPS(state, heads, dtype=dtype or jnp.float32, precision=precision)


def load_lpips_alex(alexnet_weights_path: str | os.PathLike, dtype=None, precision=None):
  """LPIPS-Alex with the AlexNet ImageNet trunk read from `alexnet_weights_path` (torchvision
  layout, .pth or .safetensors) and the shipped alex heads; file problems -> SodecError."""
  import jax.numpy as jnp

  from sodec_jax.metrics.lpips import LPIPSAlex

  state = load_alexnet(alexnet_weights_path)
  heads = load_shipped_heads("alex")
  return LPIPSAlex(state, heads, dtype=dtype or jnp.float32, precision=precision)


if __name__ == "__main__":  # python -m sodec_jax.weights.lpips [vgg|alex] [OUT.npz]
  args = sys.argv[1:]
  chosen = args.pop(0) if args and args[0] in NETS else "vgg"
  print(write_heads_npz(args[0] if args else None, net=chosen))

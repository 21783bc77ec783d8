"""Weights for LPIPS-VGG: the VGG16 trunk (a user-given file) and the 5 linear heads (shipped).

* `load_vgg16(path)` reads a torchvision-layout VGG16 state dict from `.safetensors` (no torch
  needed) or a torch pickle (`.pth`/`.pt`/`.bin`, read with `torch.load(weights_only=True)`; a
  pickle that needs anything beyond tensors is refused, never executed) and returns the
  `features.*` arrays as float32 numpy, validated.
* `heads_from_lpips_wheel()` reads the heads from the `lpips` wheel's `weights/v0.1/vgg.pth`
  (needs torch; never imports `lpips`, which pulls torchvision). `write_heads_npz()` wrote the
  shipped `sodec_jax/metrics/lpips_heads.npz` once:

    python -m sodec_jax.weights.lpips [OUT.npz]

* `load_shipped_heads()` reads that npz (no torch).
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.metrics.vgg16 import VGG16_FEATURE_SHAPES, VGG16_STAGE_CHANNELS

HEAD_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(len(VGG16_STAGE_CHANNELS)))
HEAD_SHAPES = {k: (1, c, 1, 1) for k, c in zip(HEAD_KEYS, VGG16_STAGE_CHANNELS)}
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "metrics" / "lpips_heads.npz"

_NEED_VGG = ("LPIPS needs VGG16 ImageNet weights in torchvision layout (a state dict with "
             "features.0.weight ... features.28.bias, e.g. torchvision's vgg16-397923af.pth, or the "
             "same tensors as .safetensors); pass it with --config.lpips.vgg_weights=/path/vgg16.pth")


# ----------------------------------------------------------------------------- reading files


def _to_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):  # torch.Tensor
    import torch
    return v.detach().to(device="cpu", dtype=torch.float32).numpy()
  return np.asarray(v)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
    return dict(load_file(path))
  except Exception as e:  # noqa: BLE001 - any parse failure is a user file problem
    raise SodecError(f"could not read {path} as safetensors ({type(e).__name__}: {e}). "
                     + _NEED_VGG) from e


def _unpickler_reason(e: Exception) -> str:
  """The useful line of torch's weights_only error (e.g. 'unsupported GLOBAL posix.system'),
  without its advice to retry with weights_only=False."""
  for line in str(e).splitlines():
    line = line.split("WeightsUnpickler error:")[-1].strip()
    if "unsupported" in line.lower() and "weights_only" not in line:
      return line.rstrip(".")[:200]
  return "torch.load(weights_only=True) rejected it"


def _read_torch_pickle(path: str) -> dict:
  try:
    import torch
  except ImportError as e:
    raise SodecError(f"reading {path} needs torch (a .pth is a torch pickle); install torch or "
                     "convert the file to .safetensors. " + _NEED_VGG) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise SodecError(f"refused to load {path}: it is a pickle that needs more than tensors "
                     f"({_unpickler_reason(e)}), and loading it could run arbitrary code. Only plain "
                     "state dicts of tensors are accepted; " + _NEED_VGG) from e
  except Exception as e:  # noqa: BLE001
    raise SodecError(f"could not read {path} as a torch state dict ({type(e).__name__}: {e}). "
                     + _NEED_VGG) from e
  return obj


def _unwrap(obj, path: str) -> dict:
  """A state dict, possibly inside {'state_dict': ...} / {'model': ...}; `features` Sequential keys
  (`0.weight`) get the `features.` prefix; a DataParallel `module.` prefix is dropped."""
  if not isinstance(obj, Mapping):
    raise SodecError(f"{path} holds a {type(obj).__name__}, not a state dict. " + _NEED_VGG)
  if not any(str(k).startswith("features.") for k in obj):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  out = {}
  for k, v in obj.items():
    k = str(k)
    if k.startswith("module."):
      k = k[len("module."):]
    if k[:1].isdigit():
      k = "features." + k
    out[k] = v
  return out


def check_vgg16_state(state: Mapping, source: str = "the VGG16 state dict") -> dict[str, np.ndarray]:
  """Validates and returns the `features.*` entries (float32 numpy, OIHW); ignores other keys
  (e.g. `classifier.*`). Missing or mis-shaped keys -> SodecError listing all of them."""
  missing = [k for k in VGG16_FEATURE_SHAPES if k not in state]
  bad = []
  out = {}
  for k, shape in VGG16_FEATURE_SHAPES.items():
    if k in state:
      a = _to_numpy(state[k])
      if tuple(a.shape) != shape:
        bad.append(f"{k}: {tuple(a.shape)} (expected {shape})")
      else:
        out[k] = np.asarray(a, dtype=np.float32)
  if missing or bad:
    parts = []
    if missing:
      parts.append(f"missing keys: {', '.join(missing)}")
    if bad:
      parts.append(f"wrong shapes: {'; '.join(bad)}")
    raise SodecError(f"{source} is not a torchvision VGG16 state dict ({' | '.join(parts)}). "
                     + _NEED_VGG)
  return out


def load_vgg16(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and validates a torchvision-layout VGG16 state dict; returns the `features.*` arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SodecError(f"VGG16 weights file not found: {path}. " + _NEED_VGG)
  if path.endswith(".safetensors"):
    obj = _read_safetensors(path)
  else:
    obj = _read_torch_pickle(path)
  return check_vgg16_state(_unwrap(obj, path), source=path)


# ----------------------------------------------------------------------------- LPIPS heads


def lpips_wheel_heads_path() -> Path:
  """`<site-packages>/lpips/weights/v0.1/vgg.pth`, found without importing lpips."""
  import importlib.util
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise SodecError("the `lpips` package is not installed (pip install --no-deps lpips==0.1.4); "
                     "it is only needed to regenerate lpips_heads.npz")
  return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"


def heads_from_lpips_wheel(path: Optional[str | os.PathLike] = None) -> dict[str, np.ndarray]:
  """The 5 LPIPS-VGG linear heads from the wheel's vgg.pth, keys `lin{i}.model.1.weight`,
  shapes [1, C, 1, 1], float32 numpy, bit-exact."""
  import torch
  path = Path(path) if path is not None else lpips_wheel_heads_path()
  sd = torch.load(path, map_location="cpu", weights_only=True)
  heads = {k: sd[k].detach().cpu().numpy() for k in HEAD_KEYS}
  return check_heads(heads, str(path))


def check_heads(heads: Mapping, source: str = "LPIPS heads") -> dict[str, np.ndarray]:
  out, problems = {}, []
  for k, shape in HEAD_SHAPES.items():
    if k not in heads:
      problems.append(f"missing {k}")
      continue
    a = np.asarray(_to_numpy(heads[k]))
    if a.shape != shape:
      problems.append(f"{k}: {a.shape} (expected {shape})")
    out[k] = a.astype(np.float32)
  if problems:
    raise SodecError(f"{source}: bad LPIPS heads ({'; '.join(problems)})")
  return out


def write_heads_npz(out: str | os.PathLike = SHIPPED_HEADS,
                    wheel_path: Optional[str | os.PathLike] = None) -> Path:
  heads = heads_from_lpips_wheel(wheel_path)
  out = Path(out)
  np.savez(out, **heads)
  return out


def load_shipped_heads() -> dict[str, np.ndarray]:
  if not SHIPPED_HEADS.is_file():
    raise SodecError(f"{SHIPPED_HEADS} is missing from the installation; regenerate it with "
                     "`python -m sodec_jax.weights.lpips`")
  with np.load(SHIPPED_HEADS) as z:
    return check_heads({k: z[k] for k in z.files}, str(SHIPPED_HEADS))


if __name__ == "__main__":
  print(write_heads_npz(*sys.argv[1:2]))

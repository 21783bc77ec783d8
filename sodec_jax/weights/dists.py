"""Weights for DISTS: alpha and beta (a user-given file) + the VGG16 trunk (`weights.lpips.load_vgg16`).

`load_dists_weights(path)` reads `alpha` and `beta` (1475 values each, stored as [1, 1475, 1, 1]):
  * `.pt` / `.pth` (the `weights.pt` shipped inside the dists-pytorch wheel, at
    `<site-packages>/../../weights.pt` of that install, or anywhere you copied it) through
    `torch.load(weights_only=True)`: a pickle needing anything beyond tensors is refused
    (SodecError), never executed;
  * `.safetensors` or `.npz` with the same two keys (no torch needed).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.weights.formats import load_object, to_numpy

DISTS_TOTAL_CHANNELS = 1475  # 3 + 64 + 128 + 256 + 512 + 512

_NEED = (
  "DISTS needs its alpha/beta weights: the `weights.pt` file shipped in the dists-pytorch "
  "wheel (a dict with tensors `alpha` and `beta` of shape [1, 1475, 1, 1]), or the same two "
  "arrays as .safetensors/.npz; pass it with --dists-weights PATH"
)


def check_alpha_beta(
  obj: Mapping, source: str = "the DISTS weights"
) -> tuple[np.ndarray, np.ndarray]:
  """-> (alpha, beta) as float32 [1475]. Missing keys, wrong sizes or non-finite values -> SodecError."""
  if not isinstance(obj, Mapping):
    raise SodecError(f"{source} holds a {type(obj).__name__}, not a dict. " + _NEED)
  out, problems = [], []
  for key in ("alpha", "beta"):
    if key not in obj:
      problems.append(f"missing `{key}`")
      continue
    a = np.asarray(to_numpy(obj[key]), np.float32)
    if a.size != DISTS_TOTAL_CHANNELS:
      problems.append(
        f"`{key}` has shape {tuple(a.shape)} (expected [1, {DISTS_TOTAL_CHANNELS}, 1, 1])"
      )
    elif not np.all(np.isfinite(a)):
      problems.append(f"`{key}` has non-finite values")
    out.append(a.reshape(-1))
  if problems:
    raise SodecError(f"{source}: bad DISTS weights ({'; '.join(problems)}). " + _NEED)
  if float(out[0].sum() + out[1].sum()) == 0.0:
    raise SodecError(f"{source}: alpha and beta sum to 0, DISTS is undefined. " + _NEED)
  return out[0], out[1]


def load_dists_weights(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates DISTS's alpha and beta from `path` -> (alpha, beta) float32 [1475]."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SodecError(f"DISTS weights file not found: {path}. " + _NEED)
  obj = load_object(path, hint=_NEED)
  if isinstance(obj, Mapping) and "alpha" not in obj and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  return check_alpha_beta(obj, source=path)


def load_dists(
  vgg_weights_path: str | os.PathLike,
  dists_weights_path: str | os.PathLike,
  dtype=None,
  precision=None,
):
  """DISTS with the VGG16 ImageNet trunk from `vgg_weights_path` (torchvision layout, .pth or
  .safetensors) and alpha/beta from `dists_weights_path` (the dists-pytorch wheel's `weights.pt`,
  or .safetensors / .npz with `alpha` and `beta`). Problems with a file -> SodecError."""
  import jax.numpy as jnp

  from sodec_jax.metrics.dists import DISTS
  from sodec_jax.weights.lpips import load_vgg16

  vgg = load_vgg16(vgg_weights_path)
  alpha, beta = load_dists_weights(dists_weights_path)
  return DISTS(vgg, alpha, beta, dtype=dtype or jnp.float32, precision=precision)


__all__ = ["load_dists", "load_dists_weights", "check_alpha_beta", "DISTS_TOTAL_CHANNELS"]

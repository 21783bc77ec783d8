"""How an image of any size is padded before coding; a model's `model.padding` names the scheme.

  "sodec" (native, the default): the image is reflect-padded bottom/right to a multiple of 64,
           so y [H'/16, W'/16] needs no padding of its own.
  "hific": as the HiFiC PyTorch implementation codes (src/model.py Model.compress with
           src/helpers/utils.py pad_factor): the image reflect-padded bottom/right to a multiple
           of 16, then y reflect-padded bottom/right to a multiple of 4 before H_a.

Either way y is [4 ceil(H/64), 4 ceil(W/64)] and z [ceil(H/64), ceil(W/64)] (ceil(ceil(H/16)/4)
= ceil(H/64)), so a .sodec header's shapes are the same; what differs is what y holds past
ceil(H/16): reflected y ("hific") or the code of a reflected image ("sodec"). The decoder's
output is cropped to H x W. The field is optional in a config (absent = "sodec"), and a model's
fingerprint leaves it out at its default, so native models keep their fingerprints.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

FIELD = "padding"
DEFAULT = "sodec"


@dataclasses.dataclass(frozen=True)
class Padding:
  image_multiple: int  # the image is reflect-padded bottom/right to a multiple of this
  latent_multiple: int  # then y (at 1/16) to a multiple of this (1: y is not padded)


SCHEMES = {"sodec": Padding(64, 1), "hific": Padding(16, 4)}


def scheme(model_cfg) -> Padding:
  """The padding a codec `model` config section asks for (absent: the native one)."""
  name = model_cfg.get(FIELD, DEFAULT)
  if name not in SCHEMES:
    raise ValueError(f"model.padding={name!r}: expected one of {sorted(SCHEMES)}")
  return SCHEMES[name]


def _up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_pixels(image: np.ndarray, pad: Padding) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H', W', 3], reflect-padded bottom/right (what the coder codes)."""
  h, w = image.shape[:2]
  m = pad.image_multiple
  return np.pad(image, ((0, _up(h, m) - h), (0, _up(w, m) - w), (0, 0)), mode="reflect")


def pad_image(image: np.ndarray, pad: Padding) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [1, H', W', 3] in [0, 1], reflect-padded bottom/right."""
  return (pad_pixels(image, pad).astype(np.float32) / 255.0)[None]


def pad_latent(y, multiple: int):
  """y [B, h, w, C] -> reflect-padded bottom/right to multiples of `multiple` (1: unchanged)."""
  h, w = y.shape[1:3]
  if multiple <= 1 or (h % multiple == 0 and w % multiple == 0):
    return y
  return jnp.pad(
    y, ((0, 0), (0, _up(h, multiple) - h), (0, _up(w, multiple) - w), (0, 0)), mode="reflect"
  )

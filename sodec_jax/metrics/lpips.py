"""LPIPS (v0.1) in Flax NNX: VGG16 trunk (`LPIPS`) and AlexNet trunk (`LPIPSAlex`).

Same computation as `lpips.LPIPS(net='vgg', version='0.1')(x, y, normalize=True)`:
ScalingLayer on [-1, 1] inputs, VGG16 taps relu1_2 ... relu5_3, per-pixel unit-normalisation over
channels (eps 1e-10), squared difference, 1x1 linear heads (no bias), spatial mean, sum over the 5
layers. The heads ship with this package (`lpips_heads.npz`, `lpips_alex_heads.npz`, converted
from the lpips wheel); the ImageNet trunk comes from a file the user gives
(`sodec_jax.weights.lpips.load_lpips(path)`, `load_lpips_alex(path)`). LPIPSAlex is the same
computation with `lpips.LPIPS(net='alex')`'s trunk: AlexNet taps relu1 .. relu5 (the LPIPS of
HiFiC's code and of most compression papers' tables).

All weights are `FrozenWeight` variables (not `nnx.Param`): optimizers built with `wrt=nnx.Param`
and `nnx.grad` never touch them, and the forward pass stops their gradients. Gradients flow to the
images, so LPIPS can be used as a training loss.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.layers import FrozenWeight
from sodec_jax.metrics.alexnet import ALEXNET_MIN_SIDE, ALEXNET_TAP_CHANNELS, AlexNetFeatures
from sodec_jax.metrics.vgg16 import VGG16_STAGE_CHANNELS, VGG16Features, check_image_pair

# lpips.ScalingLayer constants (applied to inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def _normalize_channels(f: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """lpips.normalize_tensor on NHWC: f / (||f||_C + eps).

  Same value; the sqrt is guarded so an all-zero feature vector gives a finite gradient (torch gives
  NaN there: sqrt'(0) * 0).
  """
  s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  pos = s > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
  return f / (norm + eps)


class _Distance(nnx.Module):
  """The LPIPS formula over a trunk's 5 taps: subclasses set `lin{i}`, shift, scale, and
  `_trunk(x) -> [5 taps]`, `_check(x, y)`."""

  def _heads(self, heads: Mapping, channels) -> None:
    for i, c in enumerate(channels):
      w = np.asarray(heads[f"lin{i}.model.1.weight"], np.float32).reshape(c)
      setattr(self, f"lin{i}", FrozenWeight(jnp.asarray(w)))
    self.shift = FrozenWeight(jnp.asarray(LPIPS_SHIFT, jnp.float32))
    self.scale = FrozenWeight(jnp.asarray(LPIPS_SCALE, jnp.float32))

  def _features(self, x: jax.Array) -> list[jax.Array]:
    x = x.astype(jnp.float32) * 2.0 - 1.0
    x = (x - self.shift[...]) / self.scale[...]
    return self._trunk(x)

  def per_layer(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[5, B]: the contribution of each tap (their sum is `__call__`)."""
    self._check(x, y)
    b = x.shape[0]
    # One trunk pass over both images.
    feats = self._features(jnp.concatenate([x, y], axis=0))
    out = []
    for i, f in enumerate(feats):
      f = f.astype(jnp.float32)
      f0, f1 = _normalize_channels(f[:b]), _normalize_channels(f[b:])
      d = jnp.square(f0 - f1)
      w = jax.lax.stop_gradient(getattr(self, f"lin{i}")[...])
      lin = jnp.einsum("bhwc,c->bhw", d, w, precision=jax.lax.Precision.HIGHEST)
      out.append(jnp.mean(lin, axis=(1, 2)))
    return jnp.stack(out)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS distance per image, [B], for NHWC float images in [0, 1]."""
    return jnp.sum(self.per_layer(x, y), axis=0)


class LPIPS(_Distance):
  """LPIPS-VGG distance. `__call__(x, y) -> [B]` for NHWC images in [0, 1].

  Args:
    vgg_state: torchvision-layout VGG16 state dict (`features.{i}.weight|bias`, numpy/jax/torch
      arrays; `classifier.*` and other extra keys ignored), already validated (files are read
      and checked by `sodec_jax.weights.lpips`: `load_vgg16`, `load_lpips`).
    heads: `lin{i}.model.1.weight` arrays of shape [1, C, 1, 1] (the shipped ones:
      `sodec_jax.weights.lpips.load_shipped_heads()`).
    dtype: VGG compute/storage dtype (e.g. jnp.bfloat16 for a cheaper training loss); the
      normalisation, heads and reduction always run in float32.
    precision: conv precision; None -> HIGHEST for float32 (matches torch fp32 on GPUs too, where
      the default would use TF32), DEFAULT otherwise. Pass "default" for speed.
  """

  net = "vgg"

  def __init__(self, vgg_state: Mapping, heads: Mapping, *, dtype=jnp.float32, precision=None):
    self.vgg = VGG16Features(vgg_state, dtype=dtype, precision=precision)
    self.dtype = jnp.dtype(dtype)
    self._heads(heads, VGG16_STAGE_CHANNELS)

  def _trunk(self, x):
    return self.vgg(x)

  def _check(self, x, y):
    check_image_pair(x, y, "LPIPS")


class LPIPSAlex(_Distance):
  """LPIPS-AlexNet distance (`lpips.LPIPS(net='alex', version='0.1')`), [B] for NHWC in [0, 1].

  Args:
    alex_state: torchvision-layout AlexNet state dict (`features.{0,3,6,8,10}.weight|bias`),
      validated (`sodec_jax.weights.lpips.load_alexnet`).
    heads: `lin{i}.model.1.weight` [1, C, 1, 1], C = 64, 192, 384, 256, 256 (the shipped ones:
      `sodec_jax.weights.lpips.load_shipped_heads("alex")`).
    dtype, precision: as `LPIPS`.
  """

  net = "alex"

  def __init__(self, alex_state: Mapping, heads: Mapping, *, dtype=jnp.float32, precision=None):
    self.alex = AlexNetFeatures(alex_state, dtype=dtype, precision=precision)
    self.dtype = jnp.dtype(dtype)
    self._heads(heads, ALEXNET_TAP_CHANNELS)

  def _trunk(self, x):
    return self.alex(x)

  def _check(self, x, y):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        f"LPIPS-Alex needs two same-shape NHWC RGB batches, got {x.shape}, {y.shape}"
      )
    if min(x.shape[1:3]) < ALEXNET_MIN_SIDE:
      raise ValueError(
        f"LPIPS-Alex needs images of at least {ALEXNET_MIN_SIDE}x{ALEXNET_MIN_SIDE} pixels, "
        f"got {x.shape[1:3]}"
      )


__all__ = ["LPIPS", "LPIPSAlex", "LPIPS_SHIFT", "LPIPS_SCALE"]

"""LPIPS (v0.1, VGG16 trunk) in Flax NNX.

Same computation as `lpips.LPIPS(net='vgg', version='0.1')(x, y, normalize=True)`:
ScalingLayer on [-1, 1] inputs, VGG16 taps relu1_2 ... relu5_3, per-pixel unit-normalisation over
channels (eps 1e-10), squared difference, 1x1 linear heads (no bias), spatial mean, sum over the 5
layers. The heads ship with this package (`lpips_heads.npz`, converted from the lpips wheel); the
VGG16 ImageNet trunk comes from a file the user gives (`sodec_jax.weights.lpips.load_lpips(path)`).

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


class LPIPS(nnx.Module):
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

  def __init__(self, vgg_state: Mapping, heads: Mapping, *, dtype=jnp.float32, precision=None):
    self.vgg = VGG16Features(vgg_state, dtype=dtype, precision=precision)
    self.dtype = jnp.dtype(dtype)
    for i, c in enumerate(VGG16_STAGE_CHANNELS):
      w = np.asarray(heads[f"lin{i}.model.1.weight"], np.float32).reshape(c)
      setattr(self, f"lin{i}", FrozenWeight(jnp.asarray(w)))
    self.shift = FrozenWeight(jnp.asarray(LPIPS_SHIFT, jnp.float32))
    self.scale = FrozenWeight(jnp.asarray(LPIPS_SCALE, jnp.float32))

  def _features(self, x: jax.Array) -> list[jax.Array]:
    x = x.astype(jnp.float32) * 2.0 - 1.0
    x = (x - self.shift[...]) / self.scale[...]
    return self.vgg(x)

  def per_layer(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[5, B]: the contribution of each VGG tap (their sum is `__call__`)."""
    check_image_pair(x, y, "LPIPS")
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


__all__ = ["LPIPS", "LPIPS_SHIFT", "LPIPS_SCALE"]

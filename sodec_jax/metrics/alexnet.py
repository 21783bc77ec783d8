"""AlexNet convolutional feature stack (torchvision layout) in Flax NNX, NHWC, for LPIPS-Alex.

torchvision's `alexnet().features` (pytorch/vision, torchvision/models/alexnet.py):

  0 conv 3->64 k11 s4 p2, 1 relu, 2 maxpool 3/2,
  3 conv 64->192 k5 p2, 4 relu, 5 maxpool 3/2,
  6 conv 192->384 k3 p1, 7 relu, 8 conv 384->256 k3 p1, 9 relu, 10 conv 256->256 k3 p1, 11 relu

(12, the last maxpool, is not used by LPIPS). LPIPS taps relu1 .. relu5 = the outputs of
indices 1, 4, 7, 9, 11 (lpips/pretrained_networks.py's slices [0:2], [2:5], [5:8], [8:10],
[10:12]). Weights are `FrozenWeight` variables, as in vgg16.py.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.layers import FrozenWeight, resolve_precision

# features index -> (in channels, out channels, kernel, stride, padding)
ALEXNET_CONVS: dict[int, tuple[int, int, int, int, int]] = {
  0: (3, 64, 11, 4, 2),
  3: (64, 192, 5, 1, 2),
  6: (192, 384, 3, 1, 1),
  8: (384, 256, 3, 1, 1),
  10: (256, 256, 3, 1, 1),
}
ALEXNET_TAPS = ("relu1", "relu2", "relu3", "relu4", "relu5")
ALEXNET_TAP_CHANNELS = (64, 192, 384, 256, 256)
ALEXNET_FEATURE_SHAPES: dict[str, tuple[int, ...]] = {}
for _idx, (_ci, _co, _k, _s, _p) in ALEXNET_CONVS.items():
  ALEXNET_FEATURE_SHAPES[f"features.{_idx}.weight"] = (_co, _ci, _k, _k)
  ALEXNET_FEATURE_SHAPES[f"features.{_idx}.bias"] = (_co,)
del _idx, _ci, _co, _k, _s, _p
# Smallest side with every tap non-empty: conv1 (k11 s4 p2) must leave >= 7 so that the two
# 3/2 max pools leave >= 1: (31 + 4 - 11) // 4 + 1 = 7 -> 3 -> 1.
ALEXNET_MIN_SIDE = 31


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch `MaxPool2d(kernel_size=3, stride=2)` (no padding, floor mode) on NHWC."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class AlexNetFeatures(nnx.Module):
  """torchvision AlexNet `features` up to relu5 on NHWC inputs; returns the 5 LPIPS taps.

  Args:
    state: torchvision keys `features.{0,3,6,8,10}.weight` (OIHW) / `.bias` (numpy or jax;
      extra keys ignored), shapes already validated (`sodec_jax.weights.lpips.check_alexnet_state`).
    dtype: storage and compute dtype of the convolutions.
    precision: conv precision; None -> HIGHEST for float32, DEFAULT otherwise.
  """

  def __init__(self, state: Mapping[str, np.ndarray], *, dtype=jnp.float32, precision=None):
    self.dtype = jnp.dtype(dtype)
    self.precision = resolve_precision(precision, dtype)
    for idx in ALEXNET_CONVS:
      w = np.asarray(state[f"features.{idx}.weight"], np.float32).transpose(2, 3, 1, 0)  # HWIO
      b = np.asarray(state[f"features.{idx}.bias"], np.float32)
      setattr(self, f"conv{idx}_kernel", FrozenWeight(jnp.asarray(w, self.dtype)))
      setattr(self, f"conv{idx}_bias", FrozenWeight(jnp.asarray(b, self.dtype)))

  def conv(self, idx: int, x: jax.Array) -> jax.Array:
    _, _, _, stride, pad = ALEXNET_CONVS[idx]
    k = jax.lax.stop_gradient(getattr(self, f"conv{idx}_kernel")[...])
    b = jax.lax.stop_gradient(getattr(self, f"conv{idx}_bias")[...])
    y = jax.lax.conv_general_dilated(
      x,
      k,
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )
    return y + b

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x [B, H, W, 3] (already LPIPS-scaled) -> [relu1 .. relu5], each [B, h_i, w_i, C_i]."""
    relu1 = jax.nn.relu(self.conv(0, x.astype(self.dtype)))
    relu2 = jax.nn.relu(self.conv(3, max_pool_3x3_s2(relu1)))
    relu3 = jax.nn.relu(self.conv(6, max_pool_3x3_s2(relu2)))
    relu4 = jax.nn.relu(self.conv(8, relu3))
    relu5 = jax.nn.relu(self.conv(10, relu4))
    return [relu1, relu2, relu3, relu4, relu5]


__all__: Sequence[str] = (
  "AlexNetFeatures",
  "ALEXNET_CONVS",
  "ALEXNET_FEATURE_SHAPES",
  "ALEXNET_MIN_SIDE",
  "ALEXNET_TAPS",
  "ALEXNET_TAP_CHANNELS",
  "max_pool_3x3_s2",
)

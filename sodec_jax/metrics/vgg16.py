"""VGG16 convolutional feature stack (torchvision layout) in Flax NNX, NHWC.

Used by LPIPS (and reusable by DISTS): 13 3x3 convolutions in 5 stages, each stage after the first
preceded by a 2x2 pooling; the output of each stage is the ReLU tap LPIPS uses
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).

Weights are stored as `FrozenWeight` variables (an `nnx.Variable` that is not an `nnx.Param`), so
`nnx.Optimizer(..., wrt=nnx.Param)` and `nnx.grad` (which differentiates `nnx.Param` by default)
never update them; the forward pass also applies `stop_gradient` to them.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.layers import FrozenWeight, resolve_precision
from sodec_jax.remat import call

# torchvision `vgg16().features` indices of the convolutions, grouped by stage (pool between stages).
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
  (0, 2),
  (5, 7),
  (10, 12, 14),
  (17, 19, 21),
  (24, 26, 28),
)
VGG16_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
VGG16_STAGE_CHANNELS = (64, 128, 256, 512, 512)


def _conv_channels() -> dict[int, tuple[int, int]]:
  chans, c_in = {}, 3
  for stage, c_out in zip(VGG16_STAGES, VGG16_STAGE_CHANNELS):
    for idx in stage:
      chans[idx] = (c_in, c_out)
      c_in = c_out
  return chans


VGG16_CONV_CHANNELS = _conv_channels()

# Expected torch (OIHW) shapes of the `features.*` keys of a torchvision VGG16 state dict.
VGG16_FEATURE_SHAPES: dict[str, tuple[int, ...]] = {}
for _idx, (_ci, _co) in VGG16_CONV_CHANNELS.items():
  VGG16_FEATURE_SHAPES[f"features.{_idx}.weight"] = (_co, _ci, 3, 3)
  VGG16_FEATURE_SHAPES[f"features.{_idx}.bias"] = (_co,)
del _idx, _ci, _co


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """torch `MaxPool2d(2, 2)` (floor mode) on NHWC."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
  """torchvision VGG16 `features` (up to relu5_3) on NHWC inputs.

  Args:
    state: mapping with torchvision keys `features.{i}.weight` (OIHW) / `features.{i}.bias`
      (numpy or jax arrays; extra keys are ignored). Shapes must already be validated
      (see `sodec_jax.weights.lpips.check_vgg16_state`).
    dtype: storage and compute dtype of the convolutions.
    precision: conv precision; None -> HIGHEST for float32, DEFAULT otherwise.
  """

  def __init__(self, state: Mapping[str, np.ndarray], *, dtype=jnp.float32, precision=None):
    self.dtype = jnp.dtype(dtype)
    self.precision = resolve_precision(precision, dtype)
    self.remat = False  # per stage (sodec_jax/remat.py)
    for idx in VGG16_CONV_CHANNELS:
      w = np.asarray(state[f"features.{idx}.weight"], dtype=np.float32)
      b = np.asarray(state[f"features.{idx}.bias"], dtype=np.float32)
      # OIHW -> HWIO
      setattr(
        self, f"conv{idx}_kernel", FrozenWeight(jnp.asarray(w.transpose(2, 3, 1, 0), self.dtype))
      )
      setattr(self, f"conv{idx}_bias", FrozenWeight(jnp.asarray(b, self.dtype)))

  def weights(self, idx: int) -> tuple[jax.Array, jax.Array]:
    """(kernel HWIO, bias) of conv `idx` (constants: no gradient)."""
    k = jax.lax.stop_gradient(getattr(self, f"conv{idx}_kernel")[...])
    b = jax.lax.stop_gradient(getattr(self, f"conv{idx}_bias")[...])
    return k, b

  def conv(self, idx: int, x: jax.Array) -> jax.Array:
    return _conv(x, *self.weights(idx), self.precision)

  def __call__(
    self,
    x: jax.Array,
    *,
    num_stages: int = 5,
    pool: Callable[[jax.Array], jax.Array] = max_pool_2x2,
  ) -> list[jax.Array]:
    """Returns the ReLU outputs of the first `num_stages` stages (relu1_2 ... relu5_3).

    `x` is NHWC, already normalised as the caller's metric wants (LPIPS: its ScalingLayer;
    DISTS: ImageNet mean/std). `pool` replaces the 2x2 max pool between stages (DISTS: L2 pool).
    """
    h = x.astype(self.dtype)
    outs = []
    for s, stage in enumerate(VGG16_STAGES[:num_stages]):
      if s > 0:
        h = pool(h)
      # the weights go in as arrays: a module merged outside the loss's trace (the train step's
      # LPIPS) cannot enter nnx.remat
      weights = [self.weights(idx) for idx in stage]
      h = call(functools.partial(_stage, self.precision), self.remat, weights, h)
      outs.append(h)
    return outs

  def to_state_dict(self) -> dict[str, np.ndarray]:
    """Back to a torchvision-layout `features.*` state dict (float32 numpy, OIHW)."""
    out = {}
    for idx in VGG16_CONV_CHANNELS:
      k = np.asarray(getattr(self, f"conv{idx}_kernel")[...], np.float32)
      out[f"features.{idx}.weight"] = k.transpose(3, 2, 0, 1)
      out[f"features.{idx}.bias"] = np.asarray(getattr(self, f"conv{idx}_bias")[...], np.float32)
    return out


def _conv(x: jax.Array, k: jax.Array, b: jax.Array, precision) -> jax.Array:
  """torch Conv2d(3x3, padding 1) on NHWC with an HWIO kernel."""
  y = jax.lax.conv_general_dilated(
    x,
    k,
    window_strides=(1, 1),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=precision,
  )
  return y + b


def _stage(precision, weights, h: jax.Array) -> jax.Array:
  """One VGG stage's 3x3 convs + ReLU, weights [(kernel, bias)] (the pool is the caller's)."""
  for k, b in weights:
    h = jax.nn.relu(_conv(h, k, b, precision))
  return h


def min_side_for_stages(num_stages: int = 5) -> int:
  """Smallest input side that leaves at least 1 pixel after `num_stages - 1` 2x2 poolings."""
  return 2 ** (num_stages - 1)


def check_image_pair(x, y, metric: str) -> None:
  """ValueError unless x and y are same-shape NHWC RGB batches big enough for all 5 VGG stages."""
  if x.shape != y.shape:
    raise ValueError(f"{metric} inputs must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{metric} expects NHWC RGB images [B, H, W, 3], got shape {x.shape}")
  m = min_side_for_stages(5)
  if min(x.shape[1:3]) < m:
    raise ValueError(f"{metric} needs images of at least {m}x{m} pixels, got {x.shape[1:3]}")


__all__: Sequence[str] = (
  "VGG16Features",
  "VGG16_FEATURE_SHAPES",
  "VGG16_STAGES",
  "VGG16_TAPS",
  "VGG16_STAGE_CHANNELS",
  "check_image_pair",
  "max_pool_2x2",
  "min_side_for_stages",
)

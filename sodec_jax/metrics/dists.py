"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity")
in Flax NNX.

Same computation as `DISTS_pytorch.DISTS()(x, y)` (the `dists-pytorch` package) for NCHW inputs
in [0, 1]:

  h = (x - ImageNet mean) / ImageNet std
  features: [x (the [0,1] input itself, 3 ch), relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] of
            VGG16 where every 2x2 max pool is replaced by L2 pooling:
            sqrt(conv_depthwise(h^2, g, stride 2, padding 1) + 1e-12), g = outer(w, w) / sum,
            w = hanning(5)[1:-1] = (0.5, 1, 0.5)
  per stage k and channel c (spatial statistics over H, W):
    S1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)                       (texture: the paper's l)
    S2 = (2 cov_xy + c2) / (var_x + var_y + c2)                            (structure: the paper's s)
    var = mean((f - mu)^2), cov = mean(f_x f_y) - mu_x mu_y, c1 = c2 = 1e-6
  alpha, beta [1, 1475, 1, 1] are divided by (sum(alpha) + sum(beta)) and split per stage
  (3, 64, 128, 256, 512, 512 channels)
  DISTS = 1 - sum_k sum_c (alpha_kc S1_kc + beta_kc S2_kc)

Note the first "stage" is the raw input in [0, 1], not the normalised one (as in the reference).
The reference's demo script resizes images to a short side of 256 before scoring; the metric itself
does not, and neither do we (we score images at the size given).

alpha/beta come from a user-given file (`sodec_jax.weights.dists.load_dists_weights`, e.g. the
`weights.pt` inside the dists-pytorch wheel) and the VGG16 trunk from the same torchvision-layout
file LPIPS uses. All weights are `FrozenWeight` (never trained); gradients flow to the images.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.layers import FrozenWeight
from sodec_jax.metrics.vgg16 import VGG16_STAGE_CHANNELS, VGG16Features, check_image_pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DISTS_CHANNELS = (3,) + tuple(VGG16_STAGE_CHANNELS)  # 3, 64, 128, 256, 512, 512
DISTS_TOTAL_CHANNELS = sum(DISTS_CHANNELS)  # 1475
C1 = 1e-6
C2 = 1e-6
L2POOL_EPS = 1e-12


def hanning_filter() -> np.ndarray:
  """The 3x3 L2-pooling filter of DISTS: outer(hanning(5)[1:-1]) normalised to sum 1 (float32)."""
  a = np.hanning(5)[1:-1]
  g = a[:, None] * a[None, :]
  return (g / g.sum()).astype(np.float32)


def l2_pool(x: jax.Array) -> jax.Array:
  """DISTS's L2pooling on NHWC: sqrt(depthwise_conv(x^2, hanning 3x3, stride 2, pad 1) + 1e-12)."""
  c = x.shape[-1]
  g = jnp.asarray(hanning_filter(), x.dtype)
  k = jnp.tile(g[:, :, None, None], (1, 1, 1, c))  # HWIO with feature_group_count = C
  prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  out = jax.lax.conv_general_dilated(
    jnp.square(x),
    k,
    window_strides=(2, 2),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
    precision=prec,
  )
  return jnp.sqrt(out + L2POOL_EPS)


class DISTS(nnx.Module):
  """DISTS distance. `__call__(x, y) -> [B]` for NHWC images in [0, 1] (0 = identical).

  Args:
    vgg_state: torchvision-layout VGG16 state dict (`features.{i}.weight|bias`), already
      validated (`sodec_jax.weights.dists.load_dists` reads and checks the files).
    alpha, beta: arrays with 1475 entries (any shape that flattens to that, e.g. [1, 1475, 1, 1]).
    dtype: VGG compute dtype; the statistics and the score are always computed in float32.
    precision: conv precision; None -> HIGHEST for float32 (matches torch fp32), else DEFAULT.
  """

  def __init__(self, vgg_state: Mapping, alpha, beta, *, dtype=jnp.float32, precision=None):
    alpha, beta = np.asarray(alpha, np.float32), np.asarray(beta, np.float32)
    self.vgg = VGG16Features(vgg_state, dtype=dtype, precision=precision)
    self.alpha = FrozenWeight(jnp.asarray(alpha.reshape(-1), jnp.float32))
    self.beta = FrozenWeight(jnp.asarray(beta.reshape(-1), jnp.float32))
    self.mean = FrozenWeight(jnp.asarray(IMAGENET_MEAN, jnp.float32))
    self.std = FrozenWeight(jnp.asarray(IMAGENET_STD, jnp.float32))

  def _features(self, x: jax.Array) -> list[jax.Array]:
    h = (x - self.mean[...]) / self.std[...]
    return [x] + self.vgg(h, pool=l2_pool)

  def per_stage(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[6, B]: each stage's weighted similarity sum_c (alpha S1 + beta S2); DISTS = 1 - their sum."""
    check_image_pair(x, y, "DISTS")
    b = x.shape[0]
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    feats = self._features(jnp.concatenate([x, y], axis=0))  # one trunk pass over both
    alpha = jax.lax.stop_gradient(self.alpha[...])
    beta = jax.lax.stop_gradient(self.beta[...])
    w_sum = jnp.sum(alpha) + jnp.sum(beta)
    alpha, beta = alpha / w_sum, beta / w_sum
    out, start = [], 0
    for f, c in zip(feats, DISTS_CHANNELS):
      f = f.astype(jnp.float32)
      fx, fy = f[:b], f[b:]
      a_k, b_k = alpha[start : start + c], beta[start : start + c]
      start += c
      mx = jnp.mean(fx, axis=(1, 2))  # [B, C]
      my = jnp.mean(fy, axis=(1, 2))
      s1 = (2 * mx * my + C1) / (mx**2 + my**2 + C1)
      vx = jnp.mean(jnp.square(fx - mx[:, None, None]), axis=(1, 2))
      vy = jnp.mean(jnp.square(fy - my[:, None, None]), axis=(1, 2))
      cov = jnp.mean(fx * fy, axis=(1, 2)) - mx * my
      s2 = (2 * cov + C2) / (vx + vy + C2)
      out.append(jnp.sum(a_k * s1 + b_k * s2, axis=1))
    return jnp.stack(out)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """DISTS per image, [B], for NHWC float images in [0, 1]."""
    return 1.0 - jnp.sum(self.per_stage(x, y), axis=0)


__all__ = ["DISTS", "l2_pool", "hanning_filter", "DISTS_CHANNELS", "IMAGENET_MEAN", "IMAGENET_STD"]

"""MS-SSIM in JAX, matching `pytorch_msssim.ms_ssim(X, Y, data_range, size_average=False)`.

Defaults as pytorch_msssim: 11-tap Gaussian window (sigma 1.5) applied separably without padding
(first along H, then W), K = (0.01, 0.03), 5 scales with weights
[0.0448, 0.2856, 0.3001, 0.2363, 0.1333], between scales a 2x2 average pool with padding `side % 2`
on each side of an odd side (zeros counted in the average, floor mode), relu on the per-channel
contrast-structure terms and on the last-scale SSIM, product of powers, mean over channels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# pytorch_msssim._fspecial_gauss_1d(11, 1.5) bit for bit (float32 bits as computed by torch). Numpy's
# float32 exp and sum land 1-2 ulp away, and because sigma^2 = E[x^2] - mu^2 cancels, that shifts
# the per-scale cs by ~3e-5 on smooth photos.
_TORCH_WINDOW_11_1_5 = np.array(
  [
    981912248,
    1006173953,
    1024685452,
    1038088319,
    1046093343,
    1049113264,
    1046093343,
    1038088319,
    1024685452,
    1006173953,
    981912248,
  ],
  dtype=np.uint32,
).view(np.float32)


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """pytorch_msssim._fspecial_gauss_1d in float32 (exact for the default 11 / 1.5; other sizes are
  computed with numpy and may differ from torch's by an ulp)."""
  if size == 11 and sigma == 1.5:
    return _TORCH_WINDOW_11_1_5.copy()
  coords = np.arange(size, dtype=np.float32) - np.float32(size // 2)
  g = np.exp(-(coords**2) / np.float32(2 * sigma**2)).astype(np.float32)
  return (g / g.sum()).astype(np.float32)


def _gaussian_filter(x: jax.Array, win: np.ndarray) -> jax.Array:
  """Depthwise 'valid' separable blur of NHWC `x` (H pass, then W pass)."""
  c = x.shape[-1]
  n = win.shape[0]
  hi = jax.lax.Precision.HIGHEST
  kh = jnp.asarray(np.tile(win.reshape(n, 1, 1, 1), (1, 1, 1, c)), x.dtype)  # HWIO, I=1 (depthwise)
  kw = jnp.asarray(np.tile(win.reshape(1, n, 1, 1), (1, 1, 1, c)), x.dtype)
  dn = ("NHWC", "HWIO", "NHWC")
  if x.shape[1] >= n:
    x = jax.lax.conv_general_dilated(
      x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi
    )
  if x.shape[2] >= n:
    x = jax.lax.conv_general_dilated(
      x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi
    )
  return x


def _mean_hw(m: jax.Array) -> jax.Array:
  """Mean over H and W in two stages (rows, then columns): a flat float32 sum over ~30k values
  close to 1 loses ~1e-5, which torch's cascaded sums do not."""
  return jnp.mean(jnp.mean(m, axis=2), axis=1)


def _ssim_cs(x, y, win, data_range, k):
  """Per-(image, channel) SSIM and contrast-structure means, each [B, C]."""
  k1, k2 = k
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  b = x.shape[0]
  # One blur pass over the 5 maps.
  f = _gaussian_filter(jnp.concatenate([x, y, x * x, y * y, x * y], axis=0), win)
  mu1, mu2, xx, yy, xy = (f[i * b : (i + 1) * b] for i in range(5))
  mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
  sigma1_sq = xx - mu1_sq
  sigma2_sq = yy - mu2_sq
  sigma12 = xy - mu1_mu2
  cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
  ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
  return _mean_hw(ssim_map), _mean_hw(cs_map)


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  """torch avg_pool2d(kernel 2, padding=[H % 2, W % 2]) with count_include_pad, floor mode; NHWC."""
  ph, pw = x.shape[1] % 2, x.shape[2] % 2
  x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h2, w2 = x.shape[1] // 2, x.shape[2] // 2
  x = x[:, : 2 * h2, : 2 * w2]
  return x.reshape(x.shape[0], h2, 2, w2, 2, x.shape[3]).mean(axis=(2, 4))


def ms_ssim(
  x: jax.Array,
  y: jax.Array,
  max_val: float = 1.0,
  *,
  win_size: int = 11,
  win_sigma: float = 1.5,
  weights: Sequence[float] = MS_SSIM_WEIGHTS,
  k: tuple[float, float] = (0.01, 0.03),
) -> jax.Array:
  """MS-SSIM per image, [B], for NHWC float images in [0, max_val]. Jittable, differentiable.

  Images need more than (win_size - 1) * 2**(levels - 1) pixels per side (161 with the defaults),
  as in pytorch_msssim; smaller ones raise ValueError.
  """
  if x.shape != y.shape:
    raise ValueError(f"ms_ssim inputs must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"ms_ssim expects NHWC images [B, H, W, C], got shape {x.shape}")
  if win_size % 2 != 1:
    raise ValueError(f"ms_ssim window size must be odd, got {win_size}")
  levels = len(weights)
  need = (win_size - 1) * 2 ** (levels - 1)
  if min(x.shape[1:3]) <= need:
    raise ValueError(
      f"ms_ssim needs images larger than {need} pixels per side (at least {need + 1}, "
      f"because of its {levels - 1} downsamplings), got {x.shape[1]}x{x.shape[2]}"
    )
  win = gaussian_window_1d(win_size, win_sigma)
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  mcs = []
  ssim_pc = None
  for i in range(levels):
    ssim_pc, cs = _ssim_cs(x, y, win, float(max_val), k)
    if i < levels - 1:
      mcs.append(jax.nn.relu(cs))
      x, y = _avg_pool_2x2(x), _avg_pool_2x2(y)
  ssim_pc = jax.nn.relu(ssim_pc)
  stack = jnp.stack(mcs + [ssim_pc], axis=0)  # [levels, B, C]
  w = jnp.asarray(weights, jnp.float32).reshape(-1, 1, 1)
  val = jnp.prod(stack**w, axis=0)  # [B, C]
  return jnp.mean(val, axis=1)

"""A plain NumPy/SciPy NIQE (float64, one block at a time) to test sodec_jax.metrics.niqe against.

Written from the MATLAB niqe_release's algorithm (computequality.m, estimateaggdparam.m,
computefeature.m) and MATLAB imresize's documented bicubic kernel, in the loop-per-block form of
those scripts, sharing no code with the package: filtering by scipy.ndimage.correlate, shape
estimation per block by boolean indexing, imresize by per-output-pixel contributions.
"""

import math

import numpy as np
from scipy import ndimage
from scipy.special import gamma


def rgb_to_y(rgb_u8):
  """MATLAB rgb2ycbcr on uint8 RGB: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, as uint8."""
  r, g, b = (rgb_u8[..., i].astype(np.float64) / 255.0 for i in range(3))
  return np.round(16.0 + 65.481 * r + 128.553 * g + 24.966 * b)


def fspecial_gaussian(n=7, sigma=7 / 6):
  h = np.zeros((n, n))
  c = (n - 1) / 2
  for i in range(n):
    for j in range(n):
      h[i, j] = math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma * sigma))
  return h / h.sum()


def _cubic(x):
  ax = abs(x)
  if ax <= 1:
    return 1.5 * ax**3 - 2.5 * ax**2 + 1
  if ax <= 2:
    return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2
  return 0.0


def _contributions(n_in, scale):
  """MATLAB imresize contributions(): per output pixel, (source indices, weights)."""
  n_out = int(math.ceil(n_in * scale))
  width = 4.0 / scale if scale < 1 else 4.0
  out = []
  for x in range(1, n_out + 1):
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = math.floor(u - width / 2)
    idx, wts = [], []
    for p in range(int(math.ceil(width)) + 2):
      j = left + p
      w = scale * _cubic(scale * (u - j)) if scale < 1 else _cubic(u - j)
      # symmetric padding: ... 2 1 | 1 2 ... n | n n-1 ...
      k = j - 1
      period = 2 * n_in
      k = k % period
      if k >= n_in:
        k = period - 1 - k
      idx.append(k)
      wts.append(w)
    s = sum(wts)
    out.append((idx, [w / s for w in wts]))
  return out


def imresize(img, scale):
  """MATLAB imresize(img, scale) for a 2-D double image (bicubic, antialiasing on)."""
  tmp = np.zeros((int(math.ceil(img.shape[0] * scale)), img.shape[1]))
  for i, (idx, wts) in enumerate(_contributions(img.shape[0], scale)):
    tmp[i] = sum(w * img[k] for k, w in zip(idx, wts))
  out = np.zeros((tmp.shape[0], int(math.ceil(img.shape[1] * scale))))
  for j, (idx, wts) in enumerate(_contributions(img.shape[1], scale)):
    out[:, j] = sum(w * tmp[:, k] for k, w in zip(idx, wts))
  return out


GAM = np.arange(0.2, 10.001, 0.001)
R_GAM = gamma(2 / GAM) ** 2 / (gamma(1 / GAM) * gamma(3 / GAM))


def estimate_aggd(v):
  v = v.ravel()
  left = math.sqrt(np.mean(v[v < 0] ** 2))
  right = math.sqrt(np.mean(v[v > 0] ** 2))
  g = left / right
  r_hat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
  r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
  alpha = GAM[np.argmin((R_GAM - r_norm) ** 2)]
  c = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
  return alpha, left * c, right * c


def compute_feature(block):
  alpha, bl, br = estimate_aggd(block)
  feat = [alpha, (bl + br) / 2]
  for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
    alpha, bl, br = estimate_aggd(block * np.roll(block, shift, axis=(0, 1)))
    feat += [alpha, (br - bl) * gamma(2 / alpha) / gamma(1 / alpha), bl, br]
  return feat


def niqe_features(y, block=96):
  """Y/gray image (0-255 float) -> block features [P, 36]."""
  nh, nw = y.shape[0] // block, y.shape[1] // block
  img = y[: nh * block, : nw * block].astype(np.float64)
  window = fspecial_gaussian()
  per_scale = []
  for scale in (1, 2):
    mu = ndimage.correlate(img, window, mode="nearest")
    sigma = np.sqrt(np.abs(ndimage.correlate(img * img, window, mode="nearest") - mu * mu))
    mscn = (img - mu) / (sigma + 1)
    b = block // scale
    feats = []
    for i in range(nh):
      for j in range(nw):
        feats.append(compute_feature(mscn[i * b : (i + 1) * b, j * b : (j + 1) * b]))
    per_scale.append(np.array(feats))
    img = imresize(img / 255.0, 0.5) * 255.0
  return np.concatenate(per_scale, 1)


def niqe(y, mu_p, cov_p, block=96):
  f = niqe_features(y, block)
  mu_d = np.nanmean(f, 0)
  cov_d = np.cov(f[~np.isnan(f).any(1)], rowvar=False)
  d = mu_p - mu_d
  return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov_d) / 2) @ d))

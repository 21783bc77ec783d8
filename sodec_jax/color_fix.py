"""Colour correction of the diffusion decoder's output against the fidelity decoder's x_f.

A one-step diffusion decoder shifts colours: the image comes out of D_m, whose latent the UNet
predicts from T_s's output ~15x magnified (1 / sqrt(abar_999)), and a small error in that latent
tints the whole picture. The one-step restorers SODEC builds on correct this at test time
against their input (StableSR's `scripts/wavelet_color_fix.py`, OSEDiff's `--align_method`,
adain by default, wavelet as the alternative). SODEC's decoder has the natural reference at no
cost: x_f = D_a(y_hat), which it computes anyway for the guidance and which holds the coded
image's colours. `sodec.color_fix` chooses (docs/ARCHITECTURE.md, "Choices"):

  "none"     x_hat as D_m gives it (the paper; the default of every paper-size config)
  "wavelet"  the high frequencies of x_hat + the low frequencies of x_f, split by `levels`
             dilated 3x3 binomial blurs (dilations 1, 2, ..., 2^(levels-1); with 5 levels the
             low part holds structure wider than ~32 px)
  "adain"    x_hat's per-image, per-channel mean and standard deviation set to x_f's

Applied at decode (`SODEC.reconstruction`, the coding API, tiled decoding), as upstream, and
in the training forward only with `sodec.color_fix_in_training` (the distortion loss then sees
the corrected decode; docs/ARCHITECTURE.md, "Choices"). Every function is written with array
methods and `xp.pad` only, so it runs on jax arrays inside the jitted decoder and on the host
numpy arrays of tiled decoding (the whole image at once: the wavelet's support is
2^levels - 1 px either side, adain's statistics are the whole image's).

Arrays are NHWC float [B, H, W, 3] (any channel count works).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sodec_jax.errors import SodecError

KINDS = ("none", "wavelet", "adain")
#: StableSR's and OSEDiff's number of wavelet levels
DEFAULT_LEVELS = 5
_TAPS = (0.25, 0.5, 0.25)  # the 3x3 kernel [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16, separably


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def wavelet_blur(x, dilation: int):
  """The 3x3 binomial blur with taps `dilation` apart, edges replicated: [B, H, W, C] -> same."""
  xp = _xp(x)
  d = int(dilation)
  h, w = x.shape[1], x.shape[2]
  x = xp.pad(x, ((0, 0), (d, d), (0, 0), (0, 0)), mode="edge")
  x = sum(t * x[:, i * d : i * d + h] for i, t in enumerate(_TAPS))
  x = xp.pad(x, ((0, 0), (0, 0), (d, d), (0, 0)), mode="edge")
  return sum(t * x[:, :, i * d : i * d + w] for i, t in enumerate(_TAPS))


def wavelet_decomposition(x, levels: int = DEFAULT_LEVELS):
  """x -> (high, low): `levels` blurs of dilation 1, 2, 4, ...; low is the last blur and high the
  sum of what each level removed, so high + low = x."""
  high = 0.0
  for i in range(int(levels)):
    low = wavelet_blur(x, 2**i)
    high = high + (x - low)
    x = low
  return high, x


def wavelet_color_fix(content, reference, levels: int = DEFAULT_LEVELS):
  """content's high frequencies + reference's low frequencies (same shapes)."""
  return wavelet_decomposition(content, levels)[0] + wavelet_decomposition(reference, levels)[1]


def adain_color_fix(content, reference, eps: float = 1e-5):
  """content with each image's channel means and standard deviations (over H, W; unbiased
  variance + eps, as upstream) replaced by reference's."""
  xp = _xp(content)

  def mean_std(v):
    n = v.shape[1] * v.shape[2]
    mean = v.mean(axis=(1, 2), keepdims=True)
    var = ((v - mean) ** 2).sum(axis=(1, 2), keepdims=True) / max(n - 1, 1)
    return mean, xp.sqrt(var + eps)

  c_mean, c_std = mean_std(content)
  r_mean, r_std = mean_std(reference)
  return (content - c_mean) / c_std * r_std + r_mean


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise SodecError(f"config.sodec.color_fix={kind!r} is not one of {KINDS}")
  return kind


def color_fix(kind: str, content, reference, levels: int = DEFAULT_LEVELS):
  """The correction `kind` (KINDS) of content (x_hat) against reference (x_f)."""
  if check_kind(kind) == "none":
    return content
  if kind == "wavelet":
    return wavelet_color_fix(content, reference, levels)
  return adain_color_fix(content, reference)

"""Shared building blocks of the codec (NHWC throughout).

The convolutions follow PyTorch's semantics exactly (padding modes, transposed-convolution
output size), so weights converted from the HiFiC PyTorch implementation reproduce its
outputs. Kernels are stored HWIO: a torch Conv2d weight [O, I, kh, kw] maps to
`kernel = w.transpose(2, 3, 1, 0)`, a ConvTranspose2d weight [I, O, kh, kw] to
`kernel = w.transpose(2, 3, 0, 1)`.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DIMS = ("NHWC", "HWIO", "NHWC")


def _torch_uniform(key, shape, fan_in, dtype):
  """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _pad(x: jax.Array, pad: Sequence[int], mode: str) -> jax.Array:
  """Pads H and W of an NHWC tensor. `pad` = (top, bottom, left, right)."""
  top, bottom, left, right = pad
  if not any(pad):
    return x
  widths = ((0, 0), (top, bottom), (left, right), (0, 0))
  return jnp.pad(x, widths, mode="reflect" if mode == "reflect" else "constant")


class Conv2d(nnx.Module):
  """2-D convolution with PyTorch padding semantics.

  x [B, H, W, in_ch] -> [B, H', W', out_ch] with H' = (H + top + bottom - k) // stride + 1.

  Args:
    padding: int (same on all sides) or (top, bottom, left, right).
    padding_mode: "zeros" or "reflect" (ReflectionPad2d before the conv).
  """

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               padding: int | Sequence[int] = 0, padding_mode: str = "zeros",
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if padding_mode not in ("zeros", "reflect"):
      raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    k = kernel_size
    fan_in = in_ch * k * k
    self.kernel = nnx.Param(_torch_uniform(rngs.params(), (k, k, in_ch, out_ch), fan_in, param_dtype))
    self.bias = nnx.Param(_torch_uniform(rngs.params(), (out_ch,), fan_in, param_dtype)) if use_bias else None
    self.stride = stride
    self.padding = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    self.padding_mode = padding_mode
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    s = self.stride
    if self.padding_mode == "reflect":
      x = _pad(x, self.padding, "reflect")
      if jax.default_backend() == "cpu":
        return self._add_bias(_valid_conv_cpu(x, kernel, s))
      conv_pad = ((0, 0), (0, 0))
    else:
      top, bottom, left, right = self.padding
      conv_pad = ((top, bottom), (left, right))
    y = jax.lax.conv_general_dilated(x, kernel, (s, s), conv_pad, dimension_numbers=_DIMS)
    return self._add_bias(y)

  def _add_bias(self, y: jax.Array) -> jax.Array:
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _valid_conv_cpu(x: jax.Array, kernel: jax.Array, s: int) -> jax.Array:
  """A VALID convolution computed as a padded one and cropped: XLA:CPU runs unpadded ("VALID")
  convolutions on a much slower path (measured 35x for a 7x7 conv at 512x512, 4x for a 3x3
  960-channel conv; docs/PERFORMANCE.md). Padding by a multiple of the stride keeps every
  output of the VALID window at a fixed offset, so the result is the same function."""
  k = kernel.shape[0]
  m = max(1, -(-(k // 2) // s))          # margin, in output positions
  h_out = (x.shape[1] - k) // s + 1
  w_out = (x.shape[2] - k) // s + 1
  y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((m * s, m * s), (m * s, m * s)),
                                   dimension_numbers=_DIMS)
  return y[:, m:m + h_out, m:m + w_out]


class ConvTranspose2d(nnx.Module):
  """Transposed convolution with PyTorch's ConvTranspose2d semantics.

  x [B, H, W, in_ch] -> [B, H', W', out_ch],
  H' = (H - 1) * stride - 2 * padding + kernel_size + output_padding.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, output_padding: int = 0, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    k = kernel_size
    fan_in = out_ch * k * k  # torch computes fan_in from weight.shape[1] for transposed convs
    self.kernel = nnx.Param(_torch_uniform(rngs.params(), (k, k, in_ch, out_ch), fan_in, param_dtype))
    self.bias = nnx.Param(_torch_uniform(rngs.params(), (out_ch,), fan_in, param_dtype)) if use_bias else None
    self.stride, self.padding, self.output_padding = stride, padding, output_padding
    self.kernel_size = k
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    k, p, op, s = self.kernel_size, self.padding, self.output_padding, self.stride
    x = x.astype(self.dtype)
    if s > 1 and k - 2 * p + op == s:  # output is exactly s x the input: sub-pixel form
      y = _subpixel_conv_transpose(x, self.kernel[...].astype(self.dtype), s, p)
    else:
      lo, hi = k - 1 - p, k - 1 - p + op
      kernel = jnp.flip(self.kernel[...], axis=(0, 1)).astype(self.dtype)
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((lo, hi), (lo, hi)),
                                       lhs_dilation=(s, s), dimension_numbers=_DIMS)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _subpixel_conv_transpose(x: jax.Array, kernel: jax.Array, s: int, p: int) -> jax.Array:
  """A stride-s transposed conv whose output is s x its input, as one stride-1 conv to s*s*O
  channels plus a depth-to-space: no multiplications by the zeros a dilated input would hold.

  Output phase r (0 <= r < s) of y[s*m + r] = sum_k w[k] x[m + (r + p - k) / s] over the taps k
  with (r + p - k) divisible by s; all phases share one kernel of the offsets' span.
  x [B, H, W, I], kernel [k, k, I, O] -> [B, s*H, s*W, O].
  """
  k, _, cin, cout = kernel.shape
  taps = [[(kk, (r + p - kk) // s) for kk in range(k) if (r + p - kk) % s == 0] for r in range(s)]
  offsets = [d for phase in taps for _, d in phase]
  lo, hi = min(offsets), max(offsets)
  span = hi - lo + 1
  # Per axis: a [span, s, k] 0/1 matrix selecting which tap of w feeds (offset, phase).
  sel = np.zeros((span, s, k), np.float32)
  for r, phase in enumerate(taps):
    for kk, d in phase:
      sel[d - lo, r, kk] = 1.0
  sel = jnp.asarray(sel, kernel.dtype)
  # big[a, b, i, ra, rb, o] = sum_{kh, kw} sel[a, ra, kh] sel[b, rb, kw] w[kh, kw, i, o]
  big = jnp.einsum("arh,bsw,hwio->abirso", sel, sel, kernel).reshape(span, span, cin, s * s * cout)
  y = jax.lax.conv_general_dilated(x, big, (1, 1), ((-lo, hi), (-lo, hi)), dimension_numbers=_DIMS)
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h * s, w * s, cout)


class ChannelNorm(nnx.Module):
  """HiFiC's ChannelNorm2D: per-pixel normalisation over channels with learned affine.

  x [..., C] -> (x - mean_C) / sqrt(var_C + eps) * gamma + beta, with the *unbiased*
  variance (torch.var's default), as the reference implementation.
  """

  def __init__(self, channels: int, *, eps: float = 1e-3, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.ones((channels,), param_dtype))
    self.beta = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)  # statistics in float32 even when computing in bf16
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.var(x32, axis=-1, keepdims=True, ddof=1)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.gamma[...].astype(jnp.float32) + self.beta[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResidualBlock(nnx.Module):
  """HiFiC residual block: x + CN(conv(relu(CN(conv(x))))) with reflect-padded 3x3 convs.

  x [B, H, W, C] -> [B, H, W, C].
  """

  def __init__(self, channels: int, *, eps: float = 1e-3, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(padding=1, padding_mode="reflect", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = Conv2d(channels, channels, 3, **kw)
    self.norm1 = ChannelNorm(channels, eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.conv2 = Conv2d(channels, channels, 3, **kw)
    self.norm2 = ChannelNorm(channels, eps=eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(self.conv1(x)))
    return x + self.norm2(self.conv2(h))

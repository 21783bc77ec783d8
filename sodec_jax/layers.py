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


class FrozenWeight(nnx.Variable):
  """A fixed (pretrained) weight: a variable that is not an `nnx.Param`, hence never trained
  (optimizers built with `wrt=nnx.Param` and `nnx.grad` never touch it)."""


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

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    padding_mode: str = "zeros",
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if padding_mode not in ("zeros", "reflect"):
      raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    k = kernel_size
    fan_in = in_ch * k * k
    self.kernel = nnx.Param(
      _torch_uniform(rngs.params(), (k, k, in_ch, out_ch), fan_in, param_dtype)
    )
    self.bias = (
      nnx.Param(_torch_uniform(rngs.params(), (out_ch,), fan_in, param_dtype)) if use_bias else None
    )
    self.stride = stride
    self.padding = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    self.padding_mode = padding_mode
    self.dtype = dtype
    self.winograd: WinogradKernel | None = None  # set by use_winograd (inference only)

  def winograd_eligible(self, min_channels: int) -> bool:
    """3x3, stride 1, float32 compute, >= min_channels in and out (any padding mode)."""
    k, _, cin, cout = self.kernel.shape
    return (
      k == 3
      and self.stride == 1
      and jnp.dtype(self.dtype) == jnp.float32
      and min(cin, cout) >= min_channels
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.winograd is not None:
      x = _pad(x, self.padding, self.padding_mode)
      return self._add_bias(winograd_conv3x3(x, self.winograd[...].astype(self.dtype)))
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
  m = max(1, -(-(k // 2) // s))  # margin, in output positions
  h_out = (x.shape[1] - k) // s + 1
  w_out = (x.shape[2] - k) // s + 1
  y = jax.lax.conv_general_dilated(
    x, kernel, (s, s), ((m * s, m * s), (m * s, m * s)), dimension_numbers=_DIMS
  )
  return y[:, m : m + h_out, m : m + w_out]


# ----------------------------------------------------------------------------- Winograd F(4x4, 3x3)
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): a 3x3 stride-1
# convolution computed on 6x6 input tiles (stride 4) as 36 independent [tiles, I] x [I, O]
# matrix products in a transformed domain: 36 / (16 * 9) = 1/4 of the direct method's
# multiplications. Y = A^T [(G g G^T) * (B^T d B)] A per tile, with these matrices
# (interpolation points 0, +-1, +-2, infinity).
_WINOGRAD_BT = np.array(
  [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
  ],
  np.float64,
)
_WINOGRAD_G = np.array(
  [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
  ],
  np.float64,
)
_WINOGRAD_AT = np.array(
  [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64
)
WINOGRAD_TILE = 4
# Below this many input or output channels the transforms cost more than the saved products
# (measured on CPU: 3x3, 128 -> 128 at 128x128 is 1.7x slower; 220 -> 960 at 32x32 2.2x faster).
WINOGRAD_MIN_CHANNELS = 192


class WinogradKernel(nnx.Variable):
  """A Conv2d kernel in the Winograd F(4x4, 3x3) domain, [36, I, O]: an inference-time copy made
  by `use_winograd` (not an nnx.Param: not trained, not checkpointed, not fingerprinted)."""


def use_winograd(module: nnx.Module, *, min_channels: int | None = None) -> int:
  """Gives every eligible Conv2d under `module` a precomputed Winograd kernel, so that its calls
  run `winograd_conv3x3` instead of a direct convolution; returns how many convs changed.

  Eligible: convolutions (this module's Conv2d and sodec_jax.diffusion.blocks.Conv2d) whose
  `winograd_eligible(min_channels)` holds: 3x3, stride 1, float32 compute, at least
  `min_channels` (default WINOGRAD_MIN_CHANNELS) input and output channels.
  For inference (the decoders on CPU, see api.decoding_model): the copy is not updated if the
  kernel changes afterwards. Costs 4x those kernels' memory (36 / 9 coefficients per filter).
  """
  min_channels = WINOGRAD_MIN_CHANNELS if min_channels is None else min_channels
  changed = 0
  for _, conv in nnx.iter_graph(module):
    if not (
      isinstance(conv, nnx.Module)
      and hasattr(conv, "winograd_eligible")
      and conv.winograd_eligible(min_channels)
    ):
      continue
    conv.winograd = nnx.data(WinogradKernel(winograd_kernel(conv.kernel[...])))
    changed += 1
  return changed


@jax.jit
def winograd_kernel(kernel: jax.Array) -> jax.Array:
  """A 3x3 kernel [3, 3, I, O] in the Winograd F(4x4, 3x3) domain: U [36, I, O], row 6a + b of
  G g G^T, i.e. kron(G, G) [36, 9] @ kernel [9, I*O] (one float32 GEMM at full precision)."""
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"Winograd F(4x4, 3x3) needs a 3x3 kernel, got {kernel.shape}")
  _, _, cin, cout = kernel.shape
  transform = jnp.asarray(np.kron(_WINOGRAD_G, _WINOGRAD_G), jnp.float32)  # [36, 9]
  u = jnp.matmul(
    transform,
    kernel.astype(jnp.float32).reshape(9, cin * cout),
    precision=jax.lax.Precision.HIGHEST,
  )
  return u.reshape(36, cin, cout).astype(kernel.dtype)


def _combine(parts: Sequence[jax.Array], matrix: np.ndarray) -> list[jax.Array]:
  """[sum_i matrix[a, i] * parts[i] for each row a], skipping zero coefficients (XLA fuses the
  slices and the weighted sums into one elementwise loop)."""
  out = []
  for row in matrix:
    terms = [
      float(c) * parts[i] if c not in (1.0, -1.0) else (parts[i] if c == 1.0 else -parts[i])
      for i, c in enumerate(row)
      if c != 0.0
    ]
    acc = terms[0]
    for t in terms[1:]:
      acc = acc + t
    out.append(acc)
  return out


def winograd_conv3x3(x: jax.Array, u: jax.Array) -> jax.Array:
  """A VALID 3x3 stride-1 convolution by Winograd F(4x4, 3x3).

  x [B, H + 2, W + 2, I] (already padded), u [36, I, O] = winograd_kernel(kernel)
  -> [B, H, W, O], the same function as conv_general_dilated(x, kernel, VALID) (float32
  relative error ~1e-6). H and W need not be multiples of 4 (the last tiles are zero-padded and
  cropped).
  """
  t = WINOGRAD_TILE
  b, hp, wp, cin = x.shape
  h, w = hp - 2, wp - 2
  th, tw = -(-h // t), -(-w // t)
  x = jnp.pad(x, ((0, 0), (0, t * th + 2 - hp), (0, t * tw + 2 - wp), (0, 0)))
  rows = _combine(
    [x[:, i : i + t * th : t] for i in range(t + 2)], _WINOGRAD_BT
  )  # 6 x [B, th, Wp, I]
  v = [
    c
    for r in rows
    for c in _combine([r[:, :, j : j + t * tw : t] for j in range(t + 2)], _WINOGRAD_BT)
  ]  # 36 x [B, th, tw, I]
  v = jnp.stack(v).reshape(36, b * th * tw, cin)
  m = jnp.einsum("kni,kio->kno", v, u.astype(x.dtype))  # 36 GEMMs
  m = m.reshape(t + 2, t + 2, b, th, tw, -1)
  rows = _combine([m[i] for i in range(t + 2)], _WINOGRAD_AT)  # 4 x [6, B, th, tw, O]
  y = jnp.stack([jnp.stack(_combine([r[j] for j in range(t + 2)], _WINOGRAD_AT)) for r in rows])
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, t * th, t * tw, -1)  # [B, 4th, 4tw, O]
  return y[:, :h, :w]


class ConvTranspose2d(nnx.Module):
  """Transposed convolution with PyTorch's ConvTranspose2d semantics.

  x [B, H, W, in_ch] -> [B, H', W', out_ch],
  H' = (H - 1) * stride - 2 * padding + kernel_size + output_padding.
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    k = kernel_size
    fan_in = out_ch * k * k  # torch computes fan_in from weight.shape[1] for transposed convs
    self.kernel = nnx.Param(
      _torch_uniform(rngs.params(), (k, k, in_ch, out_ch), fan_in, param_dtype)
    )
    self.bias = (
      nnx.Param(_torch_uniform(rngs.params(), (out_ch,), fan_in, param_dtype)) if use_bias else None
    )
    self.stride, self.padding, self.output_padding = stride, padding, output_padding
    self.kernel_size = k
    self.dtype = dtype
    self.subpixel: SubpixelKernel | None = None  # set by use_subpixel_kernels (inference only)

  @property
  def is_subpixel(self) -> bool:
    """Output exactly stride x the input: computed as a sub-pixel convolution."""
    k, p, op, s = self.kernel_size, self.padding, self.output_padding, self.stride
    return s > 1 and k - 2 * p + op == s

  def __call__(self, x: jax.Array) -> jax.Array:
    k, p, op, s = self.kernel_size, self.padding, self.output_padding, self.stride
    x = x.astype(self.dtype)
    if self.subpixel is not None:
      y = _subpixel_conv(x, self.subpixel[...].astype(self.dtype), s, p, k)
    elif self.is_subpixel:
      y = _subpixel_conv(x, subpixel_kernel(self.kernel[...].astype(self.dtype), s, p), s, p, k)
    else:
      lo, hi = k - 1 - p, k - 1 - p + op
      kernel = jnp.flip(self.kernel[...], axis=(0, 1)).astype(self.dtype)
      y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((lo, hi), (lo, hi)), lhs_dilation=(s, s), dimension_numbers=_DIMS
      )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class SubpixelKernel(nnx.Variable):
  """A ConvTranspose2d kernel rearranged for the sub-pixel form, [span, span, I, s*s*O]: an
  inference-time copy made by `use_subpixel_kernels` (not an nnx.Param)."""


def _subpixel_taps(k: int, s: int, p: int) -> tuple[np.ndarray, int, int]:
  """Output phase r (0 <= r < s) of y[s*m + r] = sum_k w[k] x[m + (r + p - k) / s] over the taps k
  with (r + p - k) divisible by s. Returns tap [span, s] (which tap of w feeds input offset
  lo + a in phase r, or k where none does), lo and hi (the offsets' range)."""
  taps = [[(kk, (r + p - kk) // s) for kk in range(k) if (r + p - kk) % s == 0] for r in range(s)]
  offsets = [d for phase in taps for _, d in phase]
  lo, hi = min(offsets), max(offsets)
  tap = np.full((hi - lo + 1, s), k)
  for r, phase in enumerate(taps):
    for kk, d in phase:
      tap[d - lo, r] = kk
  return tap, lo, hi


def subpixel_kernel(kernel: jax.Array, s: int, p: int) -> jax.Array:
  """A transposed-conv kernel [k, k, I, O] as one stride-1 conv kernel [span, span, I, s*s*O]:
  big[a, b, i, ra, rb, o] = w[tap[a, ra], tap[b, rb], i, o] (0 where no tap): a gather, no
  arithmetic (an einsum with 0/1 selection matrices gave the same bits 30x slower on CPU)."""
  k, _, cin, cout = kernel.shape
  tap, lo, hi = _subpixel_taps(k, s, p)
  span = hi - lo + 1
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  big = padded[tap[:, :, None, None], tap[None, None, :, :]]  # [a, ra, b, rb, I, O]
  return big.transpose(0, 2, 4, 1, 3, 5).reshape(span, span, cin, s * s * cout)


def _subpixel_conv(x: jax.Array, big: jax.Array, s: int, p: int, k: int) -> jax.Array:
  """A stride-s transposed conv whose output is s x its input, as one stride-1 conv to s*s*O
  channels plus a depth-to-space: no multiplications by the zeros a dilated input would hold.

  x [B, H, W, I], big = subpixel_kernel(w, s, p) [span, span, I, s*s*O] -> [B, s*H, s*W, O].
  """
  _, lo, hi = _subpixel_taps(k, s, p)
  cout = big.shape[-1] // (s * s)
  y = jax.lax.conv_general_dilated(x, big, (1, 1), ((-lo, hi), (-lo, hi)), dimension_numbers=_DIMS)
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h * s, w * s, cout)


def use_subpixel_kernels(module: nnx.Module) -> int:
  """Gives every sub-pixel ConvTranspose2d under `module` its rearranged kernel, computed once
  (the same values the call would build, so the same outputs); returns how many. Inference only:
  the copy is not updated if the kernel changes afterwards."""
  changed = 0
  for _, conv in nnx.iter_graph(module):
    if isinstance(conv, ConvTranspose2d) and conv.is_subpixel:
      big = jax.jit(subpixel_kernel, static_argnums=(1, 2))(
        conv.kernel[...], conv.stride, conv.padding
      )
      conv.subpixel = nnx.data(SubpixelKernel(big))
      changed += 1
  return changed


class ChannelNorm(nnx.Module):
  """HiFiC's ChannelNorm2D: per-pixel normalisation over channels with learned affine.

  x [..., C] -> (x - mean_C) / sqrt(var_C + eps) * gamma + beta, with the *unbiased*
  variance (torch.var's default), as the reference implementation.
  """

  def __init__(
    self, channels: int, *, eps: float = 1e-3, dtype=jnp.float32, param_dtype=jnp.float32
  ):
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

  def __init__(
    self,
    channels: int,
    *,
    eps: float = 1e-3,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(padding=1, padding_mode="reflect", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = Conv2d(channels, channels, 3, **kw)
    self.norm1 = ChannelNorm(channels, eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.conv2 = Conv2d(channels, channels, 3, **kw)
    self.norm2 = ChannelNorm(channels, eps=eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(self.conv1(x)))
    return x + self.norm2(self.conv2(h))


def resolve_precision(precision, dtype) -> jax.lax.Precision | None:
  """`None` -> HIGHEST for float32 (no TF32 on GPUs, so results match torch fp32), else DEFAULT."""
  if precision is None:
    return (
      jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    )
  if isinstance(precision, str):
    return jax.lax.Precision[precision.upper()]
  return precision

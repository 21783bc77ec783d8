"""Exact scale indexes: an integer twin of P's scale synthesis, run on the host.

Why: the range coder picks each y symbol's Gaussian by its scale index. Read off a float32
sigma, an index flips wherever two platforms (CPU / GPU, TF32, batch sizes, XLA versions)
round sigma differently near a table boundary (adjacent scales differ by ~13%), and one flipped
index desynchronises the stream. Here the index is a function of the integers z_hat computed
with integer arithmetic only, so every machine gets the same indexes by construction (in the
spirit of Balle, Johnston, Minnen, "Integer Networks for Data Compression with Latent-Variable
Models", ICLR 2019). The float synthesis still trains; this network is derived from its float32
parameters when a model is prepared for coding.

The integer network (same layers as `hific.HyperSynthesisStack`: convT5 s2, convT5 s2, convT3 s1)
  a_0 = clip(z_hat, -A_0, A_0)                                 (integers)
  acc = sum_{taps, i} W_l[tap, i, o] * a_{l-1}[i] + B_l[o]        (exact integers)
  a_l = clip(rounding_div(acc, D_l[o]), 0, A_l)                 (ReLU layers and the last one)
  index = max(#{j : T_j <= a_3}, #{j : table_j < lower_bound}), clipped to the table
with a_l ~ float activation * S_l (S_0 = 1, hidden S = 2^12, output S = 2^16), per output
channel integer divisors D_l[o] and W_l = round(w * D_l[o] * S_l / S_{l-1}),
B_l = round(b * D_l[o] * S_l). T_j = floor(table_j * S_3) + 1 is the smallest output with
table_j < output / S_3, computed with Python's decimal module (correctly rounded software
arithmetic, 80 digits) from the exact table formula scale_min * (max / min)^(j / (L - 1)).

Exactness: every derivation step is an exactly rounded float64 operation on the stored float32
bits (products by powers of two and by integers < 2^29, one division, floor/round) or decimal
arithmetic, so every machine derives the same integers. At run time each convolution is a
float64 GEMM of integer-valued arrays (every input pixel times every tap's weights) whose
products are added into a float64 canvas at their output positions (IntegerLayer.__call__;
entries outside the cropped output are discarded). Every value formed on the way for an output
(a GEMM partial sum in any order: BLAS blocking, threads, FMA; its canvas entry after any of
its additions) is a sum of a subset of that output's terms W * a, and `derive`
asserts that for every output the sum of |W| * A_{l-1} over the taps that reach it, plus |B|,
is below 2^53, so each of them is an exactly represented integer. The bias, rounding division
and clip are int64 numpy ops.
"""

from __future__ import annotations

import dataclasses
import decimal
import math

import numpy as np

from sodec_jax.codec import host_blas

W_MAX = 1 << 15  # target largest |integer weight| per output channel
HIDDEN_SCALE = 1 << 12  # S of the hidden activations (resolution 2^-12)
OUTPUT_SCALE = 1 << 16  # S of the last layer's output (the pre-lower-bound sigma)
EXACT_LIMIT = 1 << 53  # float64 represents every integer below this exactly
_MAX_DIVISOR = 1 << 28  # w (24-bit mantissa) * D stays exact in float64
_BLOCK_BYTES = 1 << 25  # GEMM output per block of input rows at run time (32 MiB)
_POST_ELEMENTS = 1 << 16  # outputs per chunk of bias + rounding division + clip
_SPARE_CPUS = 2  # CPUs the indexer's GEMMs leave to XLA (P runs meanwhile; see host_blas)


def rounding_div(acc: np.ndarray, d: np.ndarray) -> np.ndarray:
  """round(acc / d) for int64 acc (|acc| < 2^53) and positive int64 d, halves rounded up
  (towards +inf): floor((2 acc + d) / (2 d)), exact for negatives too."""
  acc = np.asarray(acc, np.int64)
  d = np.asarray(d, np.int64)
  return (2 * acc + d) // (2 * d)


def _exact_table(scale_min: float, scale_max: float, levels: int) -> list[decimal.Decimal]:
  """table_j = scale_min * (scale_max / scale_min)^(j / (levels - 1)) at 80 significant digits
  (the exact values the float64 `entropy.scale_table` approximates)."""
  ctx = decimal.Context(prec=80)
  lo, hi = decimal.Decimal(scale_min), decimal.Decimal(scale_max)
  if levels == 1:
    return [lo]
  ratio = ctx.divide(ctx.ln(hi) - ctx.ln(lo), decimal.Decimal(levels - 1))
  mid = [
    ctx.exp(ctx.add(ctx.ln(lo), ctx.multiply(ratio, decimal.Decimal(j))))
    for j in range(1, levels - 1)
  ]
  return [lo] + mid + [hi]


def thresholds(
  scale_min: float, scale_max: float, levels: int, output_scale: int, lower_bound: float
) -> tuple[np.ndarray, int]:
  """(T int64 [levels], floor_index): output v (sigma ~ v / output_scale) has table_j < v /
  output_scale exactly when v >= T_j; floor_index = #{j : table_j < lower_bound}."""
  table = _exact_table(scale_min, scale_max, levels)
  ctx = decimal.Context(prec=80, rounding=decimal.ROUND_FLOOR)
  t = [
    int(
      ctx.multiply(s, decimal.Decimal(output_scale)).to_integral_value(rounding=decimal.ROUND_FLOOR)
    )
    + 1
    for s in table
  ]
  lb = decimal.Decimal(lower_bound)
  return np.asarray(t, np.int64), sum(1 for s in table if s < lb)


@dataclasses.dataclass(frozen=True)
class IntegerLayer:
  """One integer transposed convolution (PyTorch ConvTranspose2d geometry).

  weight float64 [k, k, I, O] (integer values), bias / divisor int64 [O], out_max: the clip of
  the output (A_l); stride, padding, output_padding as the float layer's."""

  weight: np.ndarray
  bias: np.ndarray
  divisor: np.ndarray
  out_max: int
  stride: int
  padding: int
  output_padding: int
  # float64 [I, k * k * O]: every tap's weights side by side (the GEMM's right-hand side)
  taps: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    k, _, cin, cout = self.weight.shape
    wall = np.ascontiguousarray(
      np.asarray(self.weight, np.float64).transpose(2, 0, 1, 3).reshape(cin, k * k * cout)
    )
    object.__setattr__(self, "taps", wall)

  def __call__(self, a: np.ndarray) -> np.ndarray:
    """a int64 or float64 (integer values) [B, H, W, I] -> int64 [B, H', W', O],
    H' = (H - 1) s - 2 p + k + op.

    Scatter form: one GEMM per block of input rows gives every input pixel's contribution to
    each of its k x k taps ([B rows W, I] @ [I, k k O]); each tap's plane is added into a
    float64 canvas at its stride-s offset (canvas[s i + kh, s j + kw] += x[i, j] @ W[kh, kw]),
    and the canvas, cropped by the padding, is the sum. Blocks hold ~_BLOCK_BYTES of GEMM
    output."""
    a = np.asarray(a)
    b, h, w, cin = a.shape
    k, s, p, op = self.weight.shape[0], self.stride, self.padding, self.output_padding
    cout = self.weight.shape[3]
    ho, wo = (h - 1) * s - 2 * p + k + op, (w - 1) * s - 2 * p + k + op
    canvas = np.zeros((b, max((h - 1) * s + k, p + ho), max((w - 1) * s + k, p + wo), cout))
    x = a.astype(np.float64, copy=False)
    rows = max(1, _BLOCK_BYTES // (8 * b * w * k * k * cout))
    for i0 in range(0, h, rows):
      i1 = min(h, i0 + rows)
      y = (x[:, i0:i1].reshape(-1, cin) @ self.taps).reshape(b, i1 - i0, w, k, k, cout)
      for kh in range(k):
        for kw in range(k):
          canvas[:, s * i0 + kh : s * (i1 - 1) + kh + 1 : s, kw : s * (w - 1) + kw + 1 : s] += y[
            :, :, :, kh, kw
          ]
    out = np.empty((b, ho, wo, cout), np.int64)
    rows = max(1, _POST_ELEMENTS // (b * wo * cout))  # bias, division, clip: cache-sized
    for i0 in range(0, ho, rows):
      acc = canvas[:, p + i0 : p + min(ho, i0 + rows), p : p + wo].astype(np.int64) + self.bias
      out[:, i0 : i0 + rows] = np.clip(rounding_div(acc, self.divisor), 0, self.out_max)
    return out


@dataclasses.dataclass(frozen=True)
class IntegerScaleIndexer:
  """z_hat -> scale indexes with integer arithmetic only (see the module docstring)."""

  layers: tuple
  in_max: int
  thresholds: np.ndarray  # int64 [L]
  floor_index: int
  output_scale: int

  def outputs(self, z_hat) -> np.ndarray:
    """z_hat [B, h, w, N] (integer values) -> the last layer's int64 output [B, 4h, 4w, C]."""
    z = np.asarray(z_hat)
    if z.ndim != 4:
      raise ValueError(f"z_hat must be [B, h, w, N], got shape {z.shape}")
    a = np.clip(np.round(z.astype(np.float64)), -self.in_max, self.in_max).astype(np.int64)
    with host_blas.limited(host_blas.cpu_count() - _SPARE_CPUS):
      for layer in self.layers:
        a = layer(a)
    return a

  def __call__(self, z_hat) -> np.ndarray:
    """z_hat [B, h, w, N] -> uint8/16 indexes [B, 4h, 4w, C] into the scale table."""
    v = self.outputs(z_hat)
    idx = np.maximum(np.searchsorted(self.thresholds, v.ravel(), side="right"), self.floor_index)
    idx = np.minimum(idx, len(self.thresholds) - 1)
    dtype = np.uint8 if len(self.thresholds) <= 256 else np.uint16
    return idx.astype(dtype).reshape(v.shape)


def _quantize_layer(
  kernel: np.ndarray,
  bias: np.ndarray,
  ratio: float,
  out_scale: float,
  in_max: int,
  out_max: int,
  geometry: tuple,
) -> IntegerLayer:
  """Integer weights / bias / divisors for one layer whose input is scaled by S_in and output by
  S_out (ratio = S_out / S_in, powers of two) and the 2^53 bound check."""
  w = np.asarray(kernel, np.float64)  # float32 bits, exact in float64
  bvec = np.asarray(bias, np.float64)
  peak = np.abs(w).max(axis=(0, 1, 2)) * ratio  # exact: ratio is a power of two
  with np.errstate(divide="ignore"):
    d = np.where(peak > 0, np.floor(W_MAX / np.where(peak > 0, peak, 1.0)), 1.0)
  d = np.clip(d, 1, _MAX_DIVISOR)
  w_int = np.round(w * (d * ratio))  # |w| * d < 2^53: exact
  b_int = np.round(bvec * (d * out_scale))
  k, s = w.shape[0], geometry[0]
  # An output sums the taps of one phase class (kh = kw = const mod s) over all inputs:
  per_tap = np.abs(w_int).sum(axis=2)  # [k, k, O], exact integers < 2^53
  colsum = [
    int(v)
    for v in np.max(
      [
        per_tap[rh::s, rw::s].sum(axis=(0, 1)) for rh in range(min(s, k)) for rw in range(min(s, k))
      ],
      axis=0,
    )
  ]
  d_int = [int(v) for v in d]
  bias_out = []
  for o, b_o in enumerate(b_int):
    # A bias beyond every possible |sum W a| + D (A + 1) saturates the output either way: cap it
    cap = colsum[o] * in_max + d_int[o] * (out_max + 1)
    b_o = max(-cap, min(cap, int(b_o)))
    assert colsum[o] * in_max + abs(b_o) < EXACT_LIMIT, (
      f"integer prior: output channel {o} can reach {colsum[o] * in_max + abs(b_o)} >= 2^53"
    )
    bias_out.append(b_o)
  return IntegerLayer(
    w_int, np.asarray(bias_out, np.int64), np.asarray(d_int, np.int64), out_max, *geometry
  )


def derive(
  stack_params: list[tuple], scale_min: float, scale_max: float, levels: int, lower_bound: float
) -> IntegerScaleIndexer:
  """The integer scale indexer of a float scale synthesis.

  stack_params: [(kernel [k, k, I, O], bias [O], stride, padding, output_padding)] per layer,
  float32 arrays of `hific.HyperSynthesisStack` (see `stack_params_of`), ReLU between layers.
  The activation clip A (hidden and input) is the largest power of two with
  max_l(k_l^2 / s_l^2 taps * I_l) * W_MAX * A <= 2^52, leaving headroom for the bias."""
  taps = max(math.ceil(p[0].shape[0] / p[2]) ** 2 * p[0].shape[2] for p in stack_params)
  a_bits = int(math.floor(math.log2((1 << 52) / (2 * taps * W_MAX))))
  a_max = 1 << a_bits
  t, floor_index = thresholds(scale_min, scale_max, levels, OUTPUT_SCALE, lower_bound)
  layers, in_scale, in_max = [], 1, a_max
  for n, (kernel, bias, stride, padding, output_padding) in enumerate(stack_params):
    last = n == len(stack_params) - 1
    out_scale = OUTPUT_SCALE if last else HIDDEN_SCALE
    out_max = int(t[-1]) if last else a_max  # beyond the table's last threshold
    layers.append(
      _quantize_layer(
        kernel,
        bias,
        out_scale / in_scale,
        out_scale,
        in_max,
        out_max,
        (stride, padding, output_padding),
      )
    )
    in_scale, in_max = out_scale, out_max
  return IntegerScaleIndexer(tuple(layers), a_max, t, floor_index, OUTPUT_SCALE)


def stack_params_of(stack) -> list[tuple]:
  """A `hific.HyperSynthesisStack`'s layers as derive() takes them (host float32 copies)."""
  out = []
  for conv in (stack.conv1, stack.conv2, stack.conv3):
    out.append(
      (
        np.asarray(conv.kernel[...], np.float32),
        np.asarray(conv.bias[...], np.float32),
        conv.stride,
        conv.padding,
        conv.output_padding,
      )
    )
  return out

"""Entropy models: the factorized prior of z and the conditional Gaussian of y.

Two halves live here:
- *training* (jax): quantization proxies (additive uniform noise, straight-through rounding)
  and likelihoods floored at `likelihood_bound`, so log-rates never produce inf/NaN;
- *coding* (numpy, float64): the discrete probability tables the range coder uses. They are
  computed on the host in float64 from constants (the scale table) or from the parameters
  (the factorized density), so encoder and decoder build bit-identical tables.

Layouts follow CompressAI / the HiFiC PyTorch implementation: the factorized density keeps
per-channel matrices H_k [C, d_{k+1}, d_k], biases b_k and gates a_k [C, d_{k+1}, 1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import ndtr, ndtri


# --------------------------------------------------------------------------- quantization proxies
def add_uniform_noise(x: jax.Array, key: jax.Array) -> jax.Array:
  """x + U(-0.5, 0.5): the training-time stand-in for rounding, used for the rate term."""
  return x + jax.random.uniform(key, x.shape, x.dtype, -0.5, 0.5)


def ste_round(x: jax.Array) -> jax.Array:
  """round(x) forward, identity gradient backward (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize_around(y: jax.Array, mean: jax.Array) -> jax.Array:
  """y_hat = round(y - mean) + mean with a straight-through gradient (HiFiC's decoder input)."""
  return ste_round(y - mean) + mean


@jax.custom_vjp
def lower_bound(x: jax.Array, bound: float) -> jax.Array:
  """max(x, bound) whose gradient still flows when it pushes x up towards the valid region."""
  return jnp.maximum(x, bound)


def _lower_bound_fwd(x, bound):
  return jnp.maximum(x, bound), (x, bound)


def _lower_bound_bwd(res, g):
  x, bound = res
  pass_through = (x >= bound) | (g < 0)
  return (jnp.where(pass_through, g, 0.0).astype(x.dtype), None)


lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)


# --------------------------------------------------------------------------- conditional Gaussian
def _std_normal_cdf(x):
  return 0.5 * jax.scipy.special.erfc(-(2**-0.5) * x)


def gaussian_likelihood(
  y: jax.Array, mean: jax.Array, scale: jax.Array, likelihood_bound: float = 1e-9
) -> jax.Array:
  """P(round(y) bin) under N(mean, scale^2) integrated over [y - 0.5, y + 0.5].

  Evaluated on |y - mean| so both tails use the accurate side of the CDF. All inputs broadcast;
  output has the broadcast shape and lies in [likelihood_bound, 1].
  """
  v = jnp.abs(y - mean).astype(jnp.float32)
  scale = scale.astype(jnp.float32)
  p = _std_normal_cdf((0.5 - v) / scale) - _std_normal_cdf((-0.5 - v) / scale)
  return lower_bound(p, likelihood_bound)


# --------------------------------------------------------------------------- factorized prior of z
class FactorizedPrior(nnx.Module):
  """Non-parametric factorized density of Balle et al. 2018 (App. 6.1), one per channel.

  `likelihood(z)`: z [..., C] -> [..., C], the probability mass of the unit bin around z.
  Gates tanh(a_k) * tanh(.) follow every layer but the last (Balle, CompressAI); `gate_last`
  adds one after the last layer too, as the HiFiC PyTorch implementation's HyperpriorDensity.
  """

  def __init__(
    self,
    channels: int,
    *,
    filters: Sequence[int] = (3, 3, 3),
    init_scale: float = 10.0,
    gate_last: bool = False,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    dims = (1,) + tuple(filters) + (1,)
    scale = init_scale ** (1.0 / (len(filters) + 1))
    self.channels = channels
    self.num_layers = len(dims) - 1
    self.matrices = nnx.List()
    self.biases = nnx.List()
    self.factors = nnx.List()
    for k in range(self.num_layers):
      init = math.log(math.expm1(1.0 / scale / dims[k + 1]))
      self.matrices.append(nnx.Param(jnp.full((channels, dims[k + 1], dims[k]), init, param_dtype)))
      self.biases.append(
        nnx.Param(
          jax.random.uniform(rngs.params(), (channels, dims[k + 1], 1), param_dtype, -0.5, 0.5)
        )
      )
      if k < self.num_layers - 1 or gate_last:
        self.factors.append(nnx.Param(jnp.zeros((channels, dims[k + 1], 1), param_dtype)))

  def numpy_params(self) -> dict:
    """The parameters as float64 numpy arrays (for building coding tables on the host)."""
    return {
      "matrices": [np.asarray(m[...], np.float64) for m in self.matrices],
      "biases": [np.asarray(b[...], np.float64) for b in self.biases],
      "factors": [np.asarray(a[...], np.float64) for a in self.factors],
    }

  def _params(self):
    return {
      "matrices": [m[...] for m in self.matrices],
      "biases": [b[...] for b in self.biases],
      "factors": [a[...] for a in self.factors],
    }

  def likelihood(self, z: jax.Array, likelihood_bound: float = 1e-9) -> jax.Array:
    shape = z.shape
    x = jnp.moveaxis(z.astype(jnp.float32), -1, 0).reshape(self.channels, 1, -1)  # [C, 1, M]
    params = self._params()
    lower = logits_cumulative(jnp, params, x - 0.5)
    upper = logits_cumulative(jnp, params, x + 0.5)
    sign = jax.lax.stop_gradient(-jnp.sign(lower + upper))
    p = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
    p = lower_bound(p, likelihood_bound)
    p = p.reshape((self.channels,) + shape[:-1])
    return jnp.moveaxis(p, 0, -1)


def logits_cumulative(xp, params: dict, x):
  """Cumulative logits of the factorized density; x [C, 1, M] -> [C, 1, M]. xp = jnp or np."""
  softplus = (lambda v: jax.nn.softplus(v)) if xp is jnp else (lambda v: np.logaddexp(0.0, v))
  logits = x
  n = len(params["matrices"])
  for k in range(n):
    logits = xp.matmul(softplus(params["matrices"][k]), logits) + params["biases"][k]
    if k < len(params["factors"]):  # every layer but the last, or all (gate_last)
      logits = logits + xp.tanh(params["factors"][k]) * xp.tanh(logits)
  return logits


# --------------------------------------------------------------------------- coding tables
@dataclasses.dataclass(frozen=True)
class CodingTable:
  """Discrete pmfs for the range coder, one row per model (a scale level, or a z channel).

  Row i codes integer symbols s in [offsets[i], offsets[i] + sizes[i] - 1] as s - offsets[i];
  index sizes[i] is the escape symbol for values outside (coded losslessly in a side stream).
  `pmfs[i]` has sizes[i] + 1 entries (the last one is the escape probability).
  """

  offsets: np.ndarray  # int64 [R]
  sizes: np.ndarray  # int64 [R]
  pmfs: tuple  # R float64 arrays

  def __len__(self):
    return len(self.sizes)


def scale_table(scale_min: float, scale_max: float, levels: int) -> np.ndarray:
  """Log-spaced Gaussian scales (float64) used for coding: exp(linspace(log min, log max, L))."""
  return np.exp(np.linspace(math.log(scale_min), math.log(scale_max), levels))


def scale_indexes(scales: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Index of the smallest table scale >= each scale (the last one for larger scales); uint8/16.

  Compared in float32, the dtype the model produces scales in, so the result depends on how the
  platform rounded that output: the indexes of .sodec version 1 files only. Version 2 computes
  them from z_hat with integers (codec/integer_prior.py), the same on every machine.
  """
  t32 = table.astype(np.float32)
  idx = np.searchsorted(t32, np.asarray(scales, np.float32).ravel(), side="left")
  idx = np.minimum(idx, len(table) - 1)
  return idx.astype(np.uint8 if len(table) <= 256 else np.uint16).reshape(np.shape(scales))


def gaussian_coding_table(table: np.ndarray, tail_mass: float) -> CodingTable:
  """Zero-mean quantized Gaussian pmfs for each scale, support [-B, B], B = ceil(s * q)."""
  multiplier = -float(ndtri(tail_mass / 2))
  offsets, sizes, pmfs = [], [], []
  for s in table:
    half = int(math.ceil(s * multiplier))
    v = np.abs(np.arange(-half, half + 1, dtype=np.float64))
    pmf = ndtr((0.5 - v) / s) - ndtr((-0.5 - v) / s)
    tail = max(2.0 * float(ndtr((-half - 0.5) / s)), 1e-12)
    offsets.append(-half)
    sizes.append(2 * half + 1)
    pmfs.append(np.append(pmf, tail))
  return CodingTable(np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), tuple(pmfs))


def factorized_coding_table(
  params: dict, tail_mass: float, search_radius: int = 2048
) -> CodingTable:
  """Per-channel pmfs of the factorized prior over the integers where it has mass.

  The support of channel c is the smallest integer range [lo, hi] whose outside mass is at most
  `tail_mass`; it is searched on [-search_radius, search_radius] (float64, on the host).
  """
  channels = params["matrices"][0].shape[0]
  grid = np.arange(-search_radius, search_radius + 1, dtype=np.float64)
  edges = np.concatenate([grid - 0.5, grid[-1:] + 0.5])  # 2R+2 bin edges
  x = np.broadcast_to(edges, (channels, 1, edges.size)).copy()
  logits = logits_cumulative(np, params, x)[:, 0, :]  # [C, E]
  with np.errstate(over="ignore"):  # exp(-logits) = inf far left: cdf 0 there, as it should be
    cdf = 1.0 / (1.0 + np.exp(-logits))  # this formula, bit for bit: files depend on the tables
  offsets, sizes, pmfs = [], [], []
  for c in range(channels):
    lo = int(np.searchsorted(cdf[c], tail_mass / 2, side="right")) - 1
    hi = int(np.searchsorted(cdf[c], 1.0 - tail_mass / 2, side="left"))
    lo, hi = max(lo, 0), min(max(hi, lo + 1), edges.size - 1)  # edge indexes, lo < hi
    pmf = np.clip(np.diff(cdf[c, lo : hi + 1]), 0.0, None)
    tail = max(cdf[c, lo] + (1.0 - cdf[c, hi]), 1e-12)
    offsets.append(int(grid[lo]))
    sizes.append(hi - lo)
    pmfs.append(np.append(pmf, tail))
  return CodingTable(np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), tuple(pmfs))

"""What a window of the tiled decoder cannot see alone, supplied from the whole image.

Two kinds of layers look beyond a window: GroupNorm (statistics over every position) and
self-attention (every query attends to every position's key and value). Inside a window program
(sodec_jax/tiling.py) each GroupNorm gets a `TileNorm` hook and each self-attention an
`TileAttention` hook. A pass over the windows records, per window, what the whole image needs:
  GroupNorm        count, mean and centred sum of squares per group, weighted by the window's
                   share of each position (so every position counts once) -> `StatsAccumulator`
                   (float64, Chan et al.'s parallel variance) -> whole-image mean and variance;
  self-attention   the window's keys and values times its blending weights -> `KVAccumulator`
                   adds them into whole-image maps (the blended keys and values), average-pooled
                   by `pool` (1: exact) to a bounded number of tokens.
The next pass normalises with the recorded statistics and lets each window's queries attend to
the recorded whole-image keys and values (`use_global` true); the first pass uses the window's
own (`use_global` false). Passes are repeated until the output stops changing
(tiling._run_normalised): the recorded quantities converge to the whole image's, away from the
receptive-field cut at window borders that the blending weights hide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.diffusion.attention import (
  Attention,
  blocked_attention,
  cudnn_eligible,
  dot_product_attention,
)
from sodec_jax.diffusion.blocks import GroupNorm


def resize_weights(w: jax.Array, hw) -> jax.Array:
  """Base-resolution window weights [th, tw] -> [h, w] (nearest up by an integer factor, or the
  mean over factor x factor blocks down)."""
  (th, tw), (h, wd) = w.shape, hw
  if h >= th:
    if h % th or wd % tw or h // th != wd // tw:
      raise ValueError(f"layer input {hw} is not an integer multiple of the window {w.shape}")
    f = h // th
    return jnp.repeat(jnp.repeat(w, f, axis=0), f, axis=1)
  if th % h or tw % wd or th // h != tw // wd:
    raise ValueError(f"layer input {hw} does not divide the window {w.shape}")
  f = th // h
  return w.reshape(h, f, wd, f).mean(axis=(1, 3))


# --------------------------------------------------------------------------- GroupNorm
class TileNorm:
  """The hook GroupNorm.tile_norm calls in a window: records this window's weighted statistics
  (count, mean, centred sum of squares per group) and returns either the window's own statistics
  (pass 1) or the whole image's (later passes, `use_global` true), shaped [1, 1, G, 1]."""

  def __init__(self, weights: jax.Array, stats, use_global: jax.Array):
    self.weights, self.stats, self.use_global = weights, stats, use_global
    self.recorded = []

  def __call__(self, norm: GroupNorm, xg: jax.Array, hw):
    if xg.shape[0] != 1:
      raise ValueError("tiled GroupNorm statistics are for batch 1")
    w = resize_weights(self.weights, hw).reshape(1, -1, 1, 1)
    count = jnp.sum(w) * xg.shape[3]
    mean_w = jnp.sum(w * xg, axis=(1, 3), keepdims=True) / jnp.maximum(count, 1e-12)
    m2 = jnp.sum(w * jnp.square(xg - mean_w), axis=(1, 3))
    if self.recorded:
      raise ValueError("a GroupNorm ran twice in one window; tiled statistics need one call")
    self.recorded.append((count, mean_w.reshape(-1), m2.reshape(-1)))
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    g = xg.shape[2]
    gmean, gvar = (s.reshape(1, 1, g, 1) for s in self.stats)
    return jnp.where(self.use_global, gmean, mean), jnp.where(self.use_global, gvar, var)


def group_norms(module) -> list[GroupNorm]:
  """The GroupNorms of `module`, in a fixed (graph) order."""
  return [m for _, m in nnx.iter_modules(module) if isinstance(m, GroupNorm)]


class StatsAccumulator:
  """Combines the windows' (count, mean, M2) per GroupNorm and group in float64 (Chan et al.'s
  parallel variance) -> [(mean [G], var [G]) float32] in group_norms order."""

  def __init__(self, groups: list[int]):
    self.n = [np.zeros(()) for _ in groups]
    self.mean = [np.zeros(g) for g in groups]
    self.m2 = [np.zeros(g) for g in groups]

  def add(self, recorded) -> None:
    for k, (count, mean, m2) in enumerate(recorded):
      count, mean, m2 = float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
      if count <= 0:
        continue
      total = self.n[k] + count
      delta = mean - self.mean[k]
      self.m2[k] = self.m2[k] + m2 + delta**2 * self.n[k] * count / total
      self.mean[k] = self.mean[k] + delta * count / total
      self.n[k] = total

  def stats(self):
    return [
      (m.astype(np.float32), (m2 / max(float(n), 1e-12)).astype(np.float32))
      for n, m, m2 in zip(self.n, self.mean, self.m2)
    ]


# --------------------------------------------------------------------------- self-attention
def attentions(module) -> list[Attention]:
  """The attention layers of `module` (self- and cross-), in a fixed (graph) order."""
  return [m for _, m in nnx.iter_modules(module) if isinstance(m, Attention)]


class TileAttention:
  """The hook Attention.tile_kv calls for self-attention in a window: q, k, v [1, t, heads, d]
  of the window's t = h * w tokens (h, w: the window's base size times this layer's scale).
  Records the window's keys and values times its weights ([h, w, heads * d] each) and attends
  the queries to the window's own keys and values (pass 1) or to the whole image's `kv` (from
  the previous pass; `use_global` true): (k, v) [S, heads * d] each, every position's key as it
  is, or (k, v, bias [S]) pooled (pool_tokens): then the queries attend to the window's own t
  keys as they are together with the pooled ones, each pooled key's logit raised by the log of
  how many positions outside the window it stands for (near_far_bias; those inside are the
  window's own). The keys go in blocks (blocked_attention: the logits do not grow with S)
  unless cuDNN's kernel applies (unpooled keys only). `kv` None: shape probing (only the
  window's own)."""

  def __init__(self, weights: jax.Array, kv, use_global: jax.Array):
    self.weights, self.kv, self.use_global = weights, kv, use_global
    self.recorded = []

  def __call__(self, attn: Attention, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, t, n, d = q.shape
    th, tw = self.weights.shape
    h = int(round(th * (t / (th * tw)) ** 0.5))
    if b != 1 or h * (t // h) != t or h * tw != th * (t // h):
      raise ValueError(f"tiled self-attention needs batch 1 on the window's grid, got {q.shape}")
    if self.recorded:
      raise ValueError("a self-attention ran twice in one window; tiled keys need one call")
    w = resize_weights(self.weights, (h, t // h)).reshape(1, t, 1, 1)
    self.recorded.append(
      tuple((x.astype(jnp.float32) * w).reshape(h, t // h, n * d) for x in (k, v))
    )

    def own():
      return dot_product_attention(q, k, v, query_chunk=attn.query_chunk)

    if self.kv is None:
      return own()
    kg, vg = (x.reshape(1, -1, n, d).astype(k.dtype) for x in self.kv[:2])

    def whole():  # cuDNN's fused kernel where it applies; else keys in blocks (bounded logits)
      if len(self.kv) == 3:  # pooled: the window's own keys exact, the rest pooled (near_far_bias)
        bias = jnp.concatenate([jnp.zeros((t,), jnp.float32), self.kv[2].astype(jnp.float32)])
        kk, vv = (jnp.concatenate([a, b], axis=1) for a, b in ((k, kg), (v, vg)))
        return blocked_attention(q, kk, vv, bias=bias)
      if cudnn_eligible(jax.default_backend(), q.dtype, d):
        return dot_product_attention(q, kg, vg, query_chunk=attn.query_chunk)
      return blocked_attention(q, kg, vg)

    return jax.lax.cond(self.use_global, whole, own)


def pool_tokens(x: np.ndarray, pool: int) -> np.ndarray:
  """[H, W, C] -> [ceil(H / pool) * ceil(W / pool), C]: means over pool x pool blocks (the last
  ones over what the map holds)."""
  h, w, c = x.shape
  if pool == 1:
    return x.reshape(h * w, c)
  ph, pw = -(-h // pool), -(-w // pool)
  padded = np.pad(x, ((0, ph * pool - h), (0, pw * pool - w), (0, 0)))
  ones = np.pad(np.ones((h, w, 1), x.dtype), ((0, ph * pool - h), (0, pw * pool - w), (0, 0)))
  total = padded.reshape(ph, pool, pw, pool, c).sum(axis=(1, 3))
  count = ones.reshape(ph, pool, pw, pool, 1).sum(axis=(1, 3))
  return (total / count).reshape(ph * pw, c)


def near_far_bias(whole: tuple[int, int], pool: int, origin: tuple[int, int], size) -> np.ndarray:
  """The logit bias [ceil(H / pool) * ceil(W / pool)] float32 of a window's pooled keys (a
  self-attention's whole-image keys [H, W] = `whole`, pooled by `pool` > 1 as pool_tokens does;
  the window covers rows and columns [origin, origin + size) at that resolution): log of the
  number of each block's positions outside the window (a pooled key stands for that many keys,
  the first-order estimate of their softmax weight, exp(q.k_mean) x n); -1e9 for a block wholly
  inside the window, whose positions the window's own keys give as they are."""
  edges = [np.minimum(np.arange(-(-n // pool) + 1) * pool, n) for n in whole]
  inside = [
    np.clip(np.minimum(e[1:], o + s) - np.maximum(e[:-1], o), 0, None)
    for e, o, s in zip(edges, origin, size)
  ]
  count = np.outer(np.diff(edges[0]), np.diff(edges[1])) - np.outer(*inside)
  return np.where(count > 0, np.log(np.maximum(count, 1)), -1e9).astype(np.float32).reshape(-1)


class KVAccumulator:
  """Adds the windows' weighted keys and values into whole-image maps, one per self-attention
  layer (`layers`: (H, W, C, pool) at that layer's resolution, or None for a layer that is not a
  self-attention) -> `kv()`: [(k, v) [S, C] float32 pooled, or None]."""

  def __init__(self, layers):
    self.layers = layers
    self.maps = [None if s is None else np.zeros((2, *s[:3]), np.float32) for s in layers]

  def add(self, r: int, c: int, th: int, recorded) -> None:
    """The window at base (r, c) of base height th: its records as TileAttention made them."""
    for acc, rec in zip(self.maps, recorded):
      if acc is None:
        continue
      k, v = (np.asarray(x, np.float32) for x in rec)
      h, w = k.shape[:2]
      r0, c0 = r * h // th, c * h // th
      acc[0, r0 : r0 + h, c0 : c0 + w] += k
      acc[1, r0 : r0 + h, c0 : c0 + w] += v

  def kv(self):
    return [
      None if acc is None else tuple(pool_tokens(x, s[3]) for x in acc)
      for acc, s in zip(self.maps, self.layers)
    ]

"""Attention and transformer blocks of the SD UNet and VAE (diffusers semantics, NHWC).

All attention goes through `jax.nn.dot_product_attention` (layout [B, T, heads, head_dim]), so a
GPU can use cuDNN's fused kernel; `attention_plan` decides per call between that kernel and
query-chunked XLA attention whose logits buffer stays under LOGITS_BUDGET_BYTES on any backend. Logits and softmax are computed in float32 even for bfloat16
inputs (this is what diffusers' `upcast_attention` / `upcast_softmax` ask for).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.diffusion.blocks import Conv2d, GroupNorm, LayerNorm, Linear

#: query_chunk value meaning "let `attention_plan` decide at trace time" (the default).
AUTO = -1
#: Largest float32 logits buffer [B, heads, chunk, Tk] a planned attention call asks for
#: (off the CPU; 512 MiB: a 2048x2048 decode through D_m's mid block, B=1, Tk=65,536, gets
#: chunks of 2,048 queries instead of one 16 GiB buffer).
LOGITS_BUDGET_BYTES = 1 << 29
#: The CPU's chunk (cache-resident logits: also the fastest there); its results do not move.
CPU_QUERY_CHUNK = 256


class AttentionPlan(NamedTuple):
  """How one attention call runs: "cudnn" (the fused kernel on the whole problem) or "xla"
  with `query_chunk` queries at a time (0: all at once)."""

  implementation: str
  query_chunk: int


def cudnn_eligible(backend: str, dtype, head_dim: int) -> bool:
  """cuDNN's fused attention applies: GPU, 16-bit inputs, head_dim a multiple of 8 up to 128."""
  return (
    backend == "gpu"
    and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    and head_dim % 8 == 0
    and head_dim <= 128
  )


def attention_plan(
  backend: str,
  dtype,
  head_dim: int,
  *,
  batch: int,
  heads: int,
  q_tokens: int,
  kv_tokens: int,
  budget_bytes: int = LOGITS_BUDGET_BYTES,
  allow_cudnn: bool = True,
) -> AttentionPlan:
  """Pure decision (no device needed) for q [batch, q_tokens, heads, head_dim] against
  kv_tokens keys on `backend` ("cpu" | "gpu" | "tpu"):

  - cuDNN's fused kernel where eligible (`cudnn_eligible`); it never builds the logits;
  - else XLA's attention, query-chunked so the float32 logits buffer [B, N, chunk, Tk] stays
    bounded: on the CPU chunks of CPU_QUERY_CHUNK (256) as always; elsewhere the fewest equal
    chunks (multiples of 8) of at most max(256, budget_bytes // (B * N * Tk * 4)) queries, so
    memory grows linearly with the pixels (float32 on GPU, D_m's 512-wide head anywhere).
  query_chunk 0 = the whole sequence at once (it fits the budget).
  """
  if allow_cudnn and cudnn_eligible(backend, dtype, head_dim):
    return AttentionPlan("cudnn", 0)
  if backend == "cpu":
    return AttentionPlan("xla", CPU_QUERY_CHUNK if q_tokens > CPU_QUERY_CHUNK else 0)
  per_query = max(1, batch * heads * kv_tokens * 4)  # float32 logits bytes of one query row
  limit = max(CPU_QUERY_CHUNK, budget_bytes // per_query // 8 * 8)
  if q_tokens <= limit:
    return AttentionPlan("xla", 0)
  chunks = -(-q_tokens // limit)
  chunk = -(-q_tokens // chunks)
  return AttentionPlan("xla", min(limit, -(-chunk // 8) * 8))


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, query_chunk: int = AUTO
) -> jax.Array:
  """Softmax(q k^T / sqrt(head_dim)) v. q: [B, Tq, N, D], k and v: [B, Tk, N, D] -> [B, Tq, N, D].

  query_chunk AUTO (default): `attention_plan` for the default backend decides (cuDNN where
  eligible, else chunked XLA attention with a bounded logits buffer). `query_chunk` > 0 splits
  the queries into chunks of that many tokens, processed one after the other (`lax.map`): the
  same result with a logits buffer of [B, N, chunk, Tk] instead of [B, N, Tq, Tk]. When Tq is not
  a multiple of the chunk the queries are zero-padded to one and the extra rows dropped (so any
  image size keeps the small buffer: a 1472x1472 image's 33,856 latent tokens would otherwise
  need 4.6 GB of logits per head). 0: the whole sequence in one call.
  """
  b, tq, n, d = q.shape
  if query_chunk < 0:
    plan = attention_plan(
      jax.default_backend(), q.dtype, d, batch=b, heads=n, q_tokens=tq, kv_tokens=k.shape[1]
    )
    if plan.implementation == "cudnn":
      out = _cudnn(q, k, v)
      if out is not None:
        return out
      plan = attention_plan(
        jax.default_backend(),
        q.dtype,
        d,
        batch=b,
        heads=n,
        q_tokens=tq,
        kv_tokens=k.shape[1],
        allow_cudnn=False,
      )
    query_chunk = plan.query_chunk
  if query_chunk <= 0 or tq <= query_chunk:
    return _attend(q, k, v)
  return _in_query_chunks(q, query_chunk, lambda qc: _attend(qc, k, v))


def _in_query_chunks(q: jax.Array, query_chunk: int, attend) -> jax.Array:
  """attend(q chunk [B, query_chunk, N, D]) over the queries q [B, Tq, N, D] one chunk after
  the other (`lax.map`), the last chunk zero-padded and the extra rows dropped."""
  b, tq, n, d = q.shape
  chunks = -(-tq // query_chunk)
  if chunks * query_chunk != tq:
    q = jnp.pad(q, ((0, 0), (0, chunks * query_chunk - tq), (0, 0), (0, 0)))
  q = q.reshape(b, chunks, query_chunk, n, d).swapaxes(0, 1)
  out = jax.lax.map(attend, q)
  return out.swapaxes(0, 1).reshape(b, chunks * query_chunk, n, d)[:, :tq]


def _cudnn(q, k, v):
  """cuDNN's fused kernel, or None when it refuses at trace time (shape, version)."""
  try:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  except (ValueError, NotImplementedError, RuntimeError):
    return None


def _attend(q, k, v):
  """jax.nn.dot_product_attention; cuDNN's fused kernel where it applies (`cudnn_eligible`),
  XLA's otherwise (or when cuDNN refuses at trace time)."""
  if cudnn_eligible(jax.default_backend(), q.dtype, q.shape[-1]):
    out = _cudnn(q, k, v)
    if out is not None:
      return out
  return jax.nn.dot_product_attention(q, k, v)


def blocked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  bias: jax.Array | None = None,
  key_block: int = 1024,
  query_chunk: int = 256,
) -> jax.Array:
  """Softmax(q k^T / sqrt(head_dim) + bias) v without the whole logits matrix: the keys in blocks of
  `key_block` (a `lax.scan` with the running maximum, normaliser and weighted sum of the online
  softmax, as in FlashAttention), the queries in chunks of `query_chunk` (`lax.map`); so the
  float32 logits buffer is [B, N, query_chunk, key_block] whatever the sequence lengths.
  q [B, Tq, N, D], k and v [B, Tk, N, D] -> [B, Tq, N, D] (q's dtype; arithmetic in float32);
  `bias` [Tk] float32 (None: 0) is added to every query's logit of each key (a key that stands for
  n keys: log n; a key left out: a large negative number). Used where a program's memory must
  not grow with the keys (the tiled decoder's windows attending to the whole image's keys,
  sodec_jax/tile_context.py)."""
  b, tq, n, d = q.shape
  tk = k.shape[1]
  kb = min(key_block, tk)
  blocks = -(-tk // kb)
  scale = 1.0 / math.sqrt(d)

  def attend(qc):  # [B, c, N, D] float32
    c = qc.shape[1]

    def step(carry, i):
      m, l, acc = carry  # [B, N, c], [B, N, c], [B, c, N, D]
      # block i, slid back to end at the last key (no padded copy of the keys); keys an earlier
      # block covered are masked
      start = jnp.minimum(i * kb, tk - kb)
      kk, vv = (jax.lax.dynamic_slice_in_dim(x, start, kb, axis=1) for x in (k, v))
      ok = start + jnp.arange(kb) >= i * kb
      s = jnp.einsum("bqnd,bknd->bnqk", qc, kk.astype(jnp.float32)) * scale
      if bias is not None:
        s = s + jax.lax.dynamic_slice_in_dim(bias, start, kb)[None, None, None, :]
      s = jnp.where(ok[None, None, None, :], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bnqk,bknd->bqnd", p, vv.astype(jnp.float32))
      acc = acc * corr.transpose(0, 2, 1)[..., None] + pv
      return (m_new, l, acc), None

    init = (
      jnp.full((b, n, c), -jnp.inf, jnp.float32),
      jnp.zeros((b, n, c), jnp.float32),
      jnp.zeros((b, c, n, d), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(blocks))
    return acc / l.transpose(0, 2, 1)[..., None]

  qf = q.astype(jnp.float32)
  if tq <= query_chunk:
    return attend(qf).astype(q.dtype)
  return _in_query_chunks(qf, query_chunk, attend).astype(q.dtype)


def default_query_chunk() -> int:
  """The modules' default query chunk: AUTO (`attention_plan` decides per call: 256 tokens on
  the CPU as before, cuDNN or a logits budget on GPU/TPU)."""
  return AUTO


class Attention(nnx.Module):
  """diffusers Attention (processor AttnProcessor2_0, no norms inside).

  x: [B, T, query_dim], context: [B, S, cross_attention_dim] or None (self-attention)
  -> [B, T, query_dim].
  `tile_kv` (None: the plain attention) is set only by tiled decoding (sodec_jax.tiling) on a
  merged copy of the model inside its jitted window program: for self-attention it is called as
  tile_kv(self, q, k, v) -> o instead of attending (a TileAttention that records the window's
  keys and values and/or attends to the whole image's).
  """

  def __init__(
    self,
    query_dim: int,
    *,
    heads: int,
    dim_head: int,
    cross_attention_dim: int | None = None,
    bias: bool = False,
    out_bias: bool = True,
    query_chunk: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    context_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.dim_head = dim_head
    self.query_chunk = query_chunk
    self.to_q = Linear(query_dim, inner, use_bias=bias, **kw)
    self.to_k = Linear(context_dim, inner, use_bias=bias, **kw)
    self.to_v = Linear(context_dim, inner, use_bias=bias, **kw)
    self.to_out = Linear(inner, query_dim, use_bias=out_bias, **kw)
    self.tile_kv = None

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    ctx = x if context is None else context
    b, t, _ = x.shape
    s = ctx.shape[1]
    q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
    k = self.to_k(ctx).reshape(b, s, self.heads, self.dim_head)
    v = self.to_v(ctx).reshape(b, s, self.heads, self.dim_head)
    if self.tile_kv is not None and context is None:
      o = self.tile_kv(self, q, k, v)
    else:
      o = dot_product_attention(q, k, v, query_chunk=self.query_chunk)
    return self.to_out(o.reshape(b, t, self.heads * self.dim_head))


class FeedForward(nnx.Module):
  """diffusers FeedForward with GEGLU: proj_out(h * gelu(gate)), [h, gate] = proj_in(x).

  x: [B, T, dim] -> [B, T, dim]; inner width 4 * dim. (diffusers names: ff.net.0.proj, ff.net.2.)
  """

  def __init__(
    self, dim: int, *, mult: int = 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = dim * mult
    self.proj_in = Linear(dim, 2 * inner, **kw)
    self.proj_out = Linear(inner, dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """diffusers BasicTransformerBlock (layer_norm): self-attn, cross-attn, GEGLU feed-forward.

  x: [B, T, dim], context: [B, S, cross_attention_dim] -> [B, T, dim].
  """

  def __init__(
    self,
    dim: int,
    *,
    heads: int,
    dim_head: int,
    cross_attention_dim: int,
    only_cross_attention: bool = False,
    eps: float = 1e-5,
    query_chunk: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    akw = dict(heads=heads, dim_head=dim_head, query_chunk=query_chunk, rngs=rngs, **kw)
    self.only_cross_attention = only_cross_attention
    self.norm1 = LayerNorm(dim, eps=eps, **kw)
    self.attn1 = Attention(
      dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **akw
    )
    self.norm2 = LayerNorm(dim, eps=eps, **kw)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **akw)
    self.norm3 = LayerNorm(dim, eps=eps, **kw)
    self.ff = FeedForward(dim, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """diffusers Transformer2DModel on continuous input.

  x: [B, H, W, C], context: [B, S, cross_attention_dim] -> [B, H, W, C].
  GroupNorm (eps 1e-6), proj_in (Linear if use_linear_projection else 1x1 conv), `num_layers`
  transformer blocks over the H*W tokens, proj_out, plus the residual.
  """

  def __init__(
    self,
    channels: int,
    *,
    heads: int,
    cross_attention_dim: int,
    num_layers: int = 1,
    groups: int = 32,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    query_chunk: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.use_linear_projection = use_linear_projection
    self.norm = GroupNorm(groups, channels, eps=1e-6, **kw)
    if use_linear_projection:
      self.proj_in = Linear(channels, channels, rngs=rngs, **kw)
      self.proj_out = Linear(channels, channels, rngs=rngs, **kw)
    else:
      self.proj_in = Conv2d(channels, channels, 1, padding=0, rngs=rngs, **kw)
      self.proj_out = Conv2d(channels, channels, 1, padding=0, rngs=rngs, **kw)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(
          channels,
          heads=heads,
          dim_head=channels // heads,
          cross_attention_dim=cross_attention_dim,
          only_cross_attention=only_cross_attention,
          query_chunk=query_chunk,
          rngs=rngs,
          **kw,
        )
        for _ in range(num_layers)
      ]
    )

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    # Both projections are per-pixel channel maps, so conv-1x1 and Linear act the same on NHWC.
    tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    return self.proj_out(tokens.reshape(b, h, w, c)) + x.astype(tokens.dtype)


class SpatialSelfAttention(Attention):
  """The VAE mid-block attention (diffusers Attention with group_norm and residual_connection).

  x: [B, H, W, C] -> [B, H, W, C]: x + to_out(attn(group_norm(x))) over the H*W tokens,
  `C // dim_head` heads, biases on q/k/v/out.
  """

  def __init__(
    self,
    channels: int,
    *,
    dim_head: int,
    groups: int = 32,
    eps: float = 1e-6,
    query_chunk: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      channels,
      heads=channels // dim_head,
      dim_head=dim_head,
      bias=True,
      query_chunk=query_chunk,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.group_norm = GroupNorm(groups, channels, eps=eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
    return y.reshape(b, h, w, c) + x.astype(y.dtype)

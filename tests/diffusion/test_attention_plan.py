"""attention_plan: cuDNN where eligible, else query-chunked XLA attention with a bounded logits
buffer on every backend (a pure decision: tested without a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sodec_jax.diffusion.attention import (
  AUTO,
  CPU_QUERY_CHUNK,
  LOGITS_BUDGET_BYTES,
  attention_plan,
  blocked_attention,
  dot_product_attention,
)

F32, BF16 = jnp.float32, jnp.bfloat16


def _plan(backend, dtype, head_dim, b, n, tq, tk=None, **kw):
  return attention_plan(
    backend, dtype, head_dim, batch=b, heads=n, q_tokens=tq, kv_tokens=tk or tq, **kw
  )


def test_cpu_keeps_its_256_chunk_whatever_the_dtype():
  assert _plan("cpu", F32, 64, 2, 5, 4096) == ("xla", CPU_QUERY_CHUNK)
  assert _plan("cpu", BF16, 64, 2, 5, 4096) == ("xla", CPU_QUERY_CHUNK)  # no cuDNN on the CPU
  assert _plan("cpu", F32, 512, 1, 1, 65536) == ("xla", CPU_QUERY_CHUNK)
  assert _plan("cpu", F32, 64, 2, 5, 256) == ("xla", 0)  # short sequences: one call


@pytest.mark.parametrize("dtype", [BF16, jnp.float16])
def test_gpu_16bit_small_heads_use_cudnn(dtype):
  assert _plan("gpu", dtype, 64, 2, 5, 4096) == ("cudnn", 0)
  assert _plan("gpu", dtype, 128, 1, 1, 65536) == ("cudnn", 0)


@pytest.mark.parametrize(
  "backend, dtype, head_dim",
  [
    ("gpu", F32, 64),  # float32 on GPU: cuDNN's fused kernel wants 16-bit inputs
    ("gpu", BF16, 512),  # D_m's mid block: one head of 512 > 128
    ("gpu", BF16, 60),  # not a multiple of 8
    ("tpu", BF16, 64),
    ("gpu", BF16, 64),  # cuDNN refused at trace time (allow_cudnn=False below)
  ],
)
def test_otherwise_the_logits_stay_under_the_budget(backend, dtype, head_dim):
  """2048x2048 decode through D_m (B=1, 1 head, 65,536 tokens): chunks of 2,048 queries, one
  512 MiB buffer instead of 16 GiB; the chunk covers the sequence in equal multiples of 8."""
  for b, n, tq in [(1, 1, 65536), (2, 5, 4096), (2, 1, 147456), (1, 1, 33856)]:
    impl, chunk = _plan(backend, dtype, head_dim, b, n, tq, allow_cudnn=False)
    assert impl == "xla"
    if chunk == 0:
      assert b * n * tq * tq * 4 <= LOGITS_BUDGET_BYTES
      continue
    assert chunk % 8 == 0 and chunk < tq
    assert b * n * chunk * tq * 4 <= max(LOGITS_BUDGET_BYTES, b * n * 256 * tq * 4)
    chunks = -(-tq // chunk)
    assert chunks * chunk - tq < 8 * chunks  # equal chunks: padding below 8 rows per chunk
  assert _plan("gpu", F32, 512, 1, 1, 65536)[1] == 2048


def test_memory_grows_linearly_with_the_pixels():
  """The logits buffer of a planned call (B * N * chunk * Tk * 4) is bounded by the budget, so
  a 4x larger image asks for 4x the chunk count, not 16x the buffer."""
  small = _plan("gpu", F32, 512, 1, 1, 65536)
  big = _plan("gpu", F32, 512, 1, 1, 4 * 65536)
  assert small.query_chunk * 65536 * 4 <= LOGITS_BUDGET_BYTES
  assert big.query_chunk * 4 * 65536 * 4 <= LOGITS_BUDGET_BYTES
  assert big.query_chunk >= CPU_QUERY_CHUNK


def test_a_planned_chunk_gives_the_unchunked_result():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 600, 2, 8)), F32) for _ in range(3))
  whole = dot_product_attention(q, k, v, query_chunk=0)
  # a small budget forces a GPU-style plan on these shapes: 3 chunks of 200 queries
  plan = _plan("gpu", F32, 8, 1, 2, 600, budget_bytes=2 * 300 * 600 * 4)
  assert plan == ("xla", 200)
  np.testing.assert_allclose(
    dot_product_attention(q, k, v, query_chunk=plan.query_chunk), whole, atol=1e-6
  )
  np.testing.assert_allclose(dot_product_attention(q, k, v, query_chunk=AUTO), whole, atol=1e-6)


def test_auto_on_the_cpu_is_the_256_chunk_exactly():
  """The default (AUTO) computes what query_chunk=256 computed before, bit for bit."""
  assert jax.default_backend() == "cpu"
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 600, 1, 16)), F32) for _ in range(3))
  np.testing.assert_array_equal(
    dot_product_attention(q, k, v), dot_product_attention(q, k, v, query_chunk=256)
  )


@pytest.mark.parametrize(
  "tq, tk, heads, dim",
  [(300, 2500, 2, 16), (64, 100, 1, 32), (1000, 1024, 4, 8), (256, 3000, 2, 64)],
)
def test_blocked_attention_is_jax_attention(tq, tk, heads, dim):
  """Keys in blocks (online softmax), queries in chunks, partial last block and chunk: the same
  result as jax.nn.dot_product_attention (float32 rounding)."""
  k = jax.random.split(jax.random.key(tq + tk), 3)
  q = 2.0 * jax.random.normal(k[0], (1, tq, heads, dim))
  keys = 2.0 * jax.random.normal(k[1], (1, tk, heads, dim))
  v = jax.random.normal(k[2], (1, tk, heads, dim))
  want = np.asarray(jax.nn.dot_product_attention(q, keys, v))
  got = np.asarray(blocked_attention(q, keys, v, key_block=1024, query_chunk=256))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_blocked_attention_logits_do_not_grow_with_the_keys():
  """The compiled program's temporaries stay about the same when the keys grow 8x (the plain
  attention's grow with them): what lets a tiled window attend to the whole image's keys."""

  def temp(fn, tk):
    q = jax.ShapeDtypeStruct((1, 1024, 2, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, tk, 2, 32), jnp.float32)
    return jax.jit(fn).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

  blocked = lambda q, k, v: blocked_attention(q, k, v)
  plain = lambda q, k, v: dot_product_attention(q, k, v, query_chunk=256)
  small, large = temp(blocked, 2048), temp(blocked, 16384)
  print("temporaries, blocked: 2048 keys", small, "16384 keys", large)
  print("plain:", temp(plain, 2048), temp(plain, 16384))
  assert large <= 1.25 * small + (1 << 20)
  assert temp(plain, 16384) > 4 * temp(plain, 2048) - (1 << 20)

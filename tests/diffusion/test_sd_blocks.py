"""Per-block equality with diffusers (float32, same random weights): relative error <= 1e-5."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TBasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding as TTimestepEmbedding
from diffusers.models.embeddings import Timesteps as TTimesteps
from diffusers.models.resnet import ResnetBlock2D as TResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TTransformer2DModel
from diffusers.models.unets import unet_2d_blocks as tblocks
from diffusers_reference import assert_close, nchw, nhwc, randomize_, state_dict_np
from flax import nnx

from sodec_jax.diffusion.attention import (
  BasicTransformerBlock,
  Transformer2DModel,
  dot_product_attention,
)
from sodec_jax.diffusion.blocks import ResnetBlock2D, TimestepEmbedding, timestep_embedding
from sodec_jax.diffusion.unet import DownBlock, MidBlock, UpBlock
from sodec_jax.weights.diffusers import abstract_module, load_state_dict_into

TOL = 1e-5
RNG = np.random.default_rng(0)


def _copy(build, theirs, seed=1):
  """Our module (built without random init) holding the randomized diffusers module's weights."""
  randomize_(theirs, seed)
  return load_state_dict_into(abstract_module(build), state_dict_np(theirs.eval()))


def _x(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("cin,cout", [(32, 32), (32, 64)])
def test_resnet_block(cin, cout):
  theirs = TResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=48, groups=8, eps=1e-5)
  ours = _copy(
    lambda: ResnetBlock2D(cin, cout, temb_channels=48, groups=8, eps=1e-5, rngs=nnx.Rngs(0)), theirs
  )
  x, temb = _x(2, 8, 6, cin), _x(2, 48)
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(temb)))
  assert_close(ours(jnp.asarray(x), jnp.asarray(temb)), ref, tol=TOL)


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_time_embedding(flip, shift):
  t = np.array([0, 1, 250, 999], np.int64)
  with torch.no_grad():
    ref_proj = TTimesteps(32, flip_sin_to_cos=flip, downscale_freq_shift=shift)(torch.from_numpy(t))
  proj = timestep_embedding(jnp.asarray(t), 32, flip_sin_to_cos=flip, freq_shift=shift)
  assert_close(proj, ref_proj.numpy(), tol=TOL)
  theirs = TTimestepEmbedding(32, 128)
  ours = _copy(lambda: TimestepEmbedding(32, 128, rngs=nnx.Rngs(0)), theirs)
  with torch.no_grad():
    ref = theirs(ref_proj).numpy()
  assert_close(ours(proj), ref, tol=TOL)


def test_basic_transformer_block():
  theirs = TBasicTransformerBlock(64, 4, 16, cross_attention_dim=24, activation_fn="geglu")
  ours = _copy(
    lambda: BasicTransformerBlock(
      64, heads=4, dim_head=16, cross_attention_dim=24, rngs=nnx.Rngs(0)
    ),
    theirs,
  )
  x, ctx = _x(2, 20, 64), _x(2, 7, 24)
  with torch.no_grad():
    ref = theirs(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
  assert_close(ours(jnp.asarray(x), jnp.asarray(ctx)), ref, tol=TOL)


@pytest.mark.parametrize("linear,chunk", [(True, 0), (False, 0), (True, 16)])
def test_transformer_2d(linear, chunk):
  theirs = TTransformer2DModel(
    num_attention_heads=4,
    attention_head_dim=8,
    in_channels=32,
    norm_num_groups=8,
    cross_attention_dim=24,
    use_linear_projection=linear,
  )
  ours = _copy(
    lambda: Transformer2DModel(
      32,
      heads=4,
      cross_attention_dim=24,
      groups=8,
      use_linear_projection=linear,
      query_chunk=chunk,
      rngs=nnx.Rngs(0),
    ),
    theirs,
  )
  x, ctx = _x(2, 8, 8, 32), _x(2, 5, 24)
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), encoder_hidden_states=torch.from_numpy(ctx)).sample)
  assert_close(ours(jnp.asarray(x), jnp.asarray(ctx)), ref, tol=TOL)


def test_chunked_attention_equals_whole():
  q, k, v = (jnp.asarray(_x(2, 64, 3, 8)) for _ in range(3))
  whole = dot_product_attention(q, k, v)
  assert_close(dot_product_attention(q, k, v, query_chunk=16), whole, tol=1e-6)
  # a chunk that does not divide the sequence: the last chunk is zero-padded, the result the same
  assert_close(dot_product_attention(q, k, v, query_chunk=48), whole, tol=1e-6)
  assert dot_product_attention(q, k, v, query_chunk=48).shape == whole.shape


def test_chunked_attention_memory_at_any_length():
  """The logits buffer stays [chunk, Tk] when Tq is not a multiple of the chunk (1000 = 3.9 x 256):
  XLA's temporaries for the chunked call are a fraction of the whole [Tq, Tk] logits."""
  import jax

  q = k = v = jax.ShapeDtypeStruct((1, 1000, 1, 8), jnp.float32)

  def temp(chunk):
    c = (
      jax.jit(lambda q, k, v: dot_product_attention(q, k, v, query_chunk=chunk))
      .lower(q, k, v)
      .compile()
    )
    return c.memory_analysis().temp_size_in_bytes

  whole = temp(0)
  assert whole >= 1000 * 1000 * 4  # the whole [Tq, Tk] float32 logits
  assert 3 * temp(256) < whole  # measured 2.1 MB vs 8.0 MB


_BLOCK = dict(
  groups=8,
  eps=1e-5,
  use_linear_projection=True,
  query_chunk=0,
  remat=False,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
)


@pytest.mark.parametrize("attention,downsample", [(True, True), (False, False)])
def test_down_block(attention, downsample):
  kw = dict(
    num_layers=2,
    in_channels=16,
    out_channels=32,
    temb_channels=48,
    resnet_eps=1e-5,
    resnet_groups=8,
    add_downsample=downsample,
    downsample_padding=1,
  )
  if attention:
    theirs = tblocks.CrossAttnDownBlock2D(
      num_attention_heads=2, cross_attention_dim=24, use_linear_projection=True, **kw
    )
  else:
    theirs = tblocks.DownBlock2D(**kw)
  ours = _copy(
    lambda: DownBlock(
      16,
      32,
      temb_channels=48,
      num_layers=2,
      with_attention=attention,
      add_downsample=downsample,
      heads=2,
      cross_attention_dim=24,
      transformer_layers=1,
      downsample_padding=1,
      rngs=nnx.Rngs(0),
      **_BLOCK,
    ),
    theirs,
  )
  x, temb, ctx = _x(2, 8, 8, 16), _x(2, 48), _x(2, 5, 24)
  with torch.no_grad():
    args = (nchw(x), torch.from_numpy(temb))
    if attention:
      ref, ref_skips = theirs(*args, encoder_hidden_states=torch.from_numpy(ctx))
    else:
      ref, ref_skips = theirs(*args)
  out, skips = ours(jnp.asarray(x), jnp.asarray(temb), jnp.asarray(ctx))
  assert_close(out, nhwc(ref), tol=TOL)
  assert len(skips) == len(ref_skips)
  for a, b in zip(skips, ref_skips):
    assert_close(a, nhwc(b), tol=TOL)


@pytest.mark.parametrize("attention,upsample", [(True, True), (False, True), (True, False)])
def test_up_block(attention, upsample):
  kw = dict(
    num_layers=3,
    in_channels=16,
    prev_output_channel=32,
    out_channels=32,
    temb_channels=48,
    resnet_eps=1e-5,
    resnet_groups=8,
    add_upsample=upsample,
  )
  if attention:
    theirs = tblocks.CrossAttnUpBlock2D(
      num_attention_heads=2, cross_attention_dim=24, use_linear_projection=True, **kw
    )
  else:
    theirs = tblocks.UpBlock2D(**kw)
  ours = _copy(
    lambda: UpBlock(
      16,
      32,
      32,
      temb_channels=48,
      num_layers=3,
      with_attention=attention,
      add_upsample=upsample,
      heads=2,
      cross_attention_dim=24,
      transformer_layers=1,
      rngs=nnx.Rngs(0),
      **_BLOCK,
    ),
    theirs,
  )
  x, temb, ctx = _x(2, 4, 4, 32), _x(2, 48), _x(2, 5, 24)
  skips = [_x(2, 4, 4, 16), _x(2, 4, 4, 32), _x(2, 4, 4, 32)]
  with torch.no_grad():
    extra = dict(encoder_hidden_states=torch.from_numpy(ctx)) if attention else {}
    ref = theirs(nchw(x), tuple(nchw(s) for s in skips), torch.from_numpy(temb), **extra)
  out = ours(jnp.asarray(x), [jnp.asarray(s) for s in skips], jnp.asarray(temb), jnp.asarray(ctx))
  assert_close(out, nhwc(ref), tol=TOL)


def test_mid_block():
  theirs = tblocks.UNetMidBlock2DCrossAttn(
    in_channels=32,
    temb_channels=48,
    resnet_eps=1e-5,
    resnet_groups=8,
    num_attention_heads=4,
    cross_attention_dim=24,
    use_linear_projection=True,
  )
  ours = _copy(
    lambda: MidBlock(
      32,
      temb_channels=48,
      heads=4,
      cross_attention_dim=24,
      transformer_layers=1,
      output_scale_factor=1.0,
      rngs=nnx.Rngs(0),
      **_BLOCK,
    ),
    theirs,
  )
  x, temb, ctx = _x(2, 4, 4, 32), _x(2, 48), _x(2, 5, 24)
  with torch.no_grad():
    ref = theirs(nchw(x), torch.from_numpy(temb), encoder_hidden_states=torch.from_numpy(ctx))
  assert_close(ours(jnp.asarray(x), jnp.asarray(temb), jnp.asarray(ctx)), nhwc(ref), tol=TOL)

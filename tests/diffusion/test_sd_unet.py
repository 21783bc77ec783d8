"""Whole small-configuration UNet against diffusers (float32, same random weights)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import assert_close, nchw, nhwc, randomize_, state_dict_np
from flax import nnx

from sodec_jax.diffusion.unet import (
  DownBlock,
  UNet2DConditionModel,
  UNetConfig,
  count_params,
  sd21_unet_config,
  tiny_unet_config,
)
from sodec_jax.errors import SodecError
from sodec_jax.weights.diffusers import abstract_module, load_state_dict_into

SD21_PARAMS = 865_910_724  # diffusers UNet2DConditionModel(**SD 2.1 config), see test_sd_full.py


def _pair(cfg: UNetConfig, **kwargs):
  theirs = randomize_(TUNet(**cfg.to_dict()), seed=2).eval()
  ours = abstract_module(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), **kwargs))
  load_state_dict_into(ours, state_dict_np(theirs))
  return ours, theirs


def _run_both(ours, theirs, shape, ctx_dim, t=(999, 10), ctx_len=7):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  ctx = rng.standard_normal((shape[0], ctx_len, ctx_dim)).astype(np.float32)
  t = np.asarray(t)
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  out = nnx.jit(lambda m, *a: m(*a))(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  return out, ref


@pytest.mark.parametrize("variant", ["tiny", "conv_proj_3_levels", "odd_size"])
def test_small_unet_matches_diffusers(variant):
  cfg = tiny_unet_config()
  shape = (2, 16, 16, 4)
  if variant == "conv_proj_3_levels":
    cfg = dataclasses.replace(
      cfg,
      block_out_channels=(16, 32, 32),
      use_linear_projection=False,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=(2, 4, 4),
      layers_per_block=(1, 2, 1),
      transformer_layers_per_block=2,
      flip_sin_to_cos=False,
      freq_shift=1,
      cross_attention_dim=(32, 32, 32),
    )
  elif variant == "odd_size":
    shape = (1, 13, 10, 4)  # not a multiple of the down factor: upsampling follows the skips
  ours, theirs = _pair(cfg)
  out, ref = _run_both(ours, theirs, shape, 32, t=(999,) * shape[0])
  assert out.shape == ref.shape
  assert_close(out, ref, tol=1e-5, what=variant)
  assert count_params(ours) == sum(p.numel() for p in theirs.parameters())
  if variant == "odd_size":  # the decoder's CPU path: 3x3 convs as Winograd F(4x4, 3x3)
    from sodec_jax.layers import use_winograd

    assert use_winograd(ours, min_channels=16) > 0
    out_w, _ = _run_both(ours, theirs, shape, 32, t=(999,) * shape[0])
    assert_close(out_w, ref, tol=2e-5, what=f"{variant}, winograd")
    assert not np.array_equal(np.asarray(out_w), np.asarray(out))


def test_jit_bfloat16_close_to_float32():
  cfg = tiny_unet_config()
  ours, theirs = _pair(cfg)
  out32, ref = _run_both(ours, theirs, (2, 16, 16, 4), 32)
  graphdef, state = nnx.split(ours)
  bf = abstract_module(
    lambda: UNet2DConditionModel(
      cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
  )
  nnx.update(bf, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
  out_bf = nnx.jit(lambda m, *a: m(*a))(bf, jnp.asarray(x), jnp.array([999, 10]), jnp.asarray(ctx))
  assert out_bf.dtype == jnp.bfloat16
  assert_close(out_bf, ref, tol=3e-2, what="bfloat16 vs diffusers float32")


def test_remat_same_gradients():
  """remat=True (nnx.remat around resnets and transformers) changes memory, not gradients."""

  def build(remat):
    return DownBlock(
      16,
      16,
      temb_channels=32,
      num_layers=1,
      with_attention=True,
      add_downsample=True,
      heads=2,
      cross_attention_dim=8,
      transformer_layers=1,
      groups=8,
      eps=1e-5,
      use_linear_projection=True,
      downsample_padding=1,
      query_chunk=0,
      remat=remat,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs=nnx.Rngs(0),
    )

  plain = build(False)
  remat = abstract_module(lambda: build(True))
  nnx.update(remat, nnx.state(plain))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)).astype(np.float32))
  temb = jnp.asarray(rng.standard_normal((1, 32)).astype(np.float32))
  ctx = jnp.asarray(rng.standard_normal((1, 3, 8)).astype(np.float32))
  loss = lambda m: jnp.mean(m(x, temb, ctx)[0] ** 2)
  g1 = jax.tree.leaves(nnx.jit(nnx.grad(loss))(plain))
  g2 = jax.tree.leaves(nnx.jit(nnx.grad(loss))(remat))
  assert len(g1) == len(g2) > 0
  assert_close(
    np.concatenate([np.ravel(a) for a in g2]),
    np.concatenate([np.ravel(a) for a in g1]),
    tol=1e-6,
    what="remat gradients",
  )


def test_sd21_parameter_count_without_allocating():
  model = nnx.eval_shape(lambda: UNet2DConditionModel(sd21_unet_config(), rngs=nnx.Rngs(0)))
  assert count_params(model) == SD21_PARAMS


def test_config_from_diffusers_dict():
  d = sd21_unet_config().to_dict()
  d.update(
    _class_name="UNet2DConditionModel",
    _diffusers_version="0.10.0",
    act_fn="silu",
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    mid_block_type="UNetMidBlock2DCrossAttn",
    resnet_time_scale_shift="default",
    dropout=0.0,
  )
  assert UNetConfig.from_dict(d) == sd21_unet_config()
  with pytest.raises(SodecError, match="class_embed_type"):
    UNetConfig.from_dict({**d, "class_embed_type": "timestep"})
  with pytest.raises(SodecError, match="unknown key"):
    UNetConfig.from_dict({**d, "no_such_key": 1})
  with pytest.raises(SodecError, match="not supported"):
    UNetConfig.from_dict({**d, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})

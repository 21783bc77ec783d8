"""LoRA on the UNet: zero-B equals base, merge equals unmerged, gradients reach only LoRA params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import assert_close, randomize_, state_dict_np
from flax import nnx

from sodec_jax.diffusion.lora import LoRAAdapter, LoRAParam, apply_lora, lora_state, merge_lora
from sodec_jax.diffusion.unet import UNet2DConditionModel, count_params, tiny_unet_config
from sodec_jax.errors import SodecError
from sodec_jax.weights.diffusers import abstract_module, load_state_dict_into

ALL = ("to_q", "to_k", "to_v", "to_out", "ff", "conv")


def _unet():
  # one level of the family (a cross-attention down block, mid block, up block): quick to compile
  cfg = dataclasses.replace(
    tiny_unet_config(),
    block_out_channels=(32,),
    attention_head_dim=(2,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
  )
  theirs = randomize_(TUNet(**cfg.to_dict()), seed=12).eval()
  return load_state_dict_into(
    abstract_module(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))), state_dict_np(theirs)
  )


def _inputs():
  rng = np.random.default_rng(13)
  return (
    jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32)),
    jnp.array([999, 999]),
    jnp.asarray(rng.standard_normal((2, 5, 32)).astype(np.float32)),
  )


def _call(m, *a):
  return nnx.jit(lambda mm, *aa: mm(*aa))(m, *a)


def _randomize_b(model, seed):
  key = jax.random.key(seed)
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, LoRAAdapter):
      m.lora_b.value = 0.05 * jax.random.normal(jax.random.fold_in(key, i), m.lora_b.shape)


def test_zero_b_equals_base_then_merge_equals_unmerged():
  unet = _unet()
  args = _inputs()
  base = _call(unet, *args)
  n_base = count_params(unet)
  paths = apply_lora(unet, rank=4, alpha=8, targets=ALL, rngs=nnx.Rngs(1))
  assert any(p.endswith("attn2.to_k") for p in paths) and "conv_in" in paths
  assert any(p.endswith("ff.proj_in") for p in paths)
  assert count_params(unet, LoRAParam) > 0
  assert count_params(unet) == n_base + count_params(unet, LoRAParam)
  assert np.array_equal(np.asarray(_call(unet, *args)), np.asarray(base))  # B = 0: exactly base
  _randomize_b(unet, 0)
  unmerged = _call(unet, *args)
  assert float(jnp.linalg.norm(unmerged - base) / jnp.linalg.norm(base)) > 1e-2
  merge_lora(unet)
  assert count_params(unet, LoRAParam) == 0 and count_params(unet) == n_base
  assert_close(_call(unet, *args), unmerged, tol=1e-5, what="merged vs unmerged")


def test_only_lora_params_get_gradients_and_updates():
  unet = _unet()
  apply_lora(unet, rank=2, alpha=2, rngs=nnx.Rngs(2))  # default targets: attention q/k/v/out
  _randomize_b(unet, 1)
  x, t, ctx = _inputs()
  base_before = jax.tree.map(np.asarray, nnx.state(unet, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  lora_before = jax.tree.map(np.asarray, lora_state(unet))

  def loss(model):
    return jnp.mean(model(x, t, ctx) ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam)))(unet)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(lora_before)) > 0
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0

  opt = nnx.Optimizer(unet, optax.sgd(1e-2), wrt=LoRAParam)

  @nnx.jit
  def step(model, opt):
    g = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
    opt.update(model, g)

  step(unet, opt)
  base_after = nnx.state(unet, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    assert np.array_equal(a, np.asarray(b))
  changed = [
    not np.array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora_state(unet)))
  ]
  assert any(changed)


def test_target_errors():
  unet = _unet()
  with pytest.raises(SodecError, match="match no"):
    apply_lora(unet, rank=2, alpha=2, targets=("to_qq",), rngs=nnx.Rngs(0))
  apply_lora(unet, rank=2, alpha=2, targets=("to_q",), rngs=nnx.Rngs(0))
  with pytest.raises(SodecError, match="already has"):
    apply_lora(unet, rank=2, alpha=2, targets=("to_q",), rngs=nnx.Rngs(0))

"""Rematerialisation (config.memory.remat, sodec_jax/remat.py) never changes values: forward
and gradients with and without remat, per part, on tiny shapes; and build.cast_frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax import remat as remat_lib
from sodec_jax.codec.hific import FidelityDecoder
from sodec_jax.diffusion.autoencoder import AutoencoderKL
from sodec_jax.diffusion.unet import UNet2DConditionModel, tiny_unet_config
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import random_tiny_extractor, remat_parts, vae_config

RNG = np.random.default_rng(0)


def _x(*shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _unet():
  m = UNet2DConditionModel(tiny_unet_config(), rngs=nnx.Rngs(0))
  ctx = _x(2, 3, 32)
  return m, _x(2, 8, 8, 4), lambda m, x: m(x, jnp.array([999, 999]), ctx)


def _vae():
  m = AutoencoderKL(vae_config("tiny"), rngs=nnx.Rngs(0))
  return m, _x(2, 4, 4, 4), lambda m, z: m.decode(z)


def _fidelity():
  m = FidelityDecoder(8, filters=(16, 12, 8, 8, 4), residual_blocks=2, rngs=nnx.Rngs(0))
  return m, _x(1, 2, 2, 8), lambda m, y: m(y)


def _extractor(kind):
  def make():
    m = random_tiny_extractor(kind, jnp.float32, 0)
    return m, _x(1, 64, 64, 3), lambda m, x: m(x)

  return make


def _lpips():
  from sodec_jax.metrics.lpips import LPIPS
  from sodec_jax.metrics.vgg16 import VGG16_FEATURE_SHAPES
  from sodec_jax.weights.lpips import load_shipped_heads

  state = {
    k: 0.05 * RNG.standard_normal(s).astype(np.float32) for k, s in VGG16_FEATURE_SHAPES.items()
  }
  m = LPIPS(state, load_shipped_heads("vgg"))
  y = jax.nn.sigmoid(_x(1, 32, 32, 3))
  return m, jax.nn.sigmoid(_x(1, 32, 32, 3)), lambda m, x: m(x, y)


PARTS = {
  "unet": _unet,
  "vae_decoder": _vae,
  "fidelity_decoder": _fidelity,
  "extractor_vit": _extractor("vit"),
  "extractor_swin": _extractor("swin"),
  "lpips": _lpips,
}


def _value_and_grads(module, x, fn):
  """(forward output, d sum(out^2) / d (the module's Params, x)), jitted."""

  @nnx.jit
  def run(m, x):
    def loss(m, x):
      out = fn(m, x)
      return jnp.sum(jnp.square(out.astype(jnp.float32))), out

    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
    return out, grads

  return run(module, x)


# the ViT is the fast representative of the default suite; the others compile larger graphs
# (20-40 s each on 2 cores): -m slow. LPIPS is also covered by the trace test below.
@pytest.mark.parametrize(
  "part",
  [p if p == "extractor_vit" else pytest.param(p, marks=pytest.mark.slow) for p in sorted(PARTS)],
)
def test_remat_keeps_forward_and_gradients(part):
  module, x, fn = PARTS[part]()
  ref = _value_and_grads(module, x, fn)
  # "dots" keeps matmul outputs: the attention-heavy UNet is where it differs from "nothing"
  for policy in ("nothing", "dots") if part == "unet" else ("nothing",):
    assert remat_lib.set_remat(module, policy) > 0
    got = _value_and_grads(module, x, fn)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      a, b = np.asarray(a), np.asarray(b)  # float rounding of recomputed, refused ops
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))
  remat_lib.set_remat(module, False)


def test_remat_parts_are_checked():
  from configs import base

  c = base.get_config()
  assert remat_parts(c) == ()
  c.diffusion.remat = True  # the older spelling
  assert remat_parts(c) == ("unet",)
  c.memory.remat = ("vae",)
  with pytest.raises(SodecError, match="vae_decoder"):
    remat_parts(c)


def test_cast_frozen_halves_the_frozen_pretrained_weights_only():
  """bf16: the frozen UNet / D_m / F weights become bfloat16 (norms excepted); the trainable
  LoRA, T_s, codec stay float32. fp32: nothing changes."""
  from configs import tiny
  from sodec_jax.train import build, pipeline

  c = pipeline.stage_config(tiny.get_config(), "stage3")
  c.precision = "bf16"
  again = []

  def make():  # abstract (nnx.eval_shape): the dtypes are what matters, nothing is allocated
    model = build.build_training_model(c)  # calls cast_frozen
    again.append(build.cast_frozen(model, c))
    return model

  model = nnx.eval_shape(make)
  assert again == [0]  # once is all: nothing left to cast
  keep = build.trainable_filter(c)
  dtypes = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and jnp.issubdtype(var.value.dtype, jnp.floating):
      dtypes["/".join(map(str, path))] = (var.value.dtype, keep(path, var))
  frozen_bf16 = [k for k, (d, t) in dtypes.items() if d == jnp.bfloat16]
  assert frozen_bf16 and all(not dtypes[k][1] for k in frozen_bf16)
  assert all(k.split("/")[0] in build.FROZEN_PARTS for k in frozen_bf16)
  assert all(d == jnp.float32 for d, t in dtypes.values() if t)  # trainable: float32
  assert any("lora" in k for k, (d, t) in dtypes.items() if t)
  assert "unet/conv_in/kernel" in frozen_bf16
  assert any(k.startswith("guidance_extractor/") for k in frozen_bf16)
  assert all("norm" not in k.rsplit("/", 2)[-2] for k in frozen_bf16)


def test_lpips_remat_inside_the_train_steps_trace():
  """The train step merges LPIPS outside the loss's grad trace (train/step.py): remat of its VGG
  stages must work there too, with the gradient unchanged."""
  module, x, _ = _lpips()

  def grad(module, p, x):  # a new jitted function per graphdef (remat lives in the graphdef)
    graphdef, state = nnx.split(module)

    def step(state, p, x):
      lpips = nnx.merge(graphdef, state)  # outside value_and_grad, like the step's consts
      return jax.value_and_grad(lambda p: jnp.mean(lpips(x * p, x)))(p)  # p: the params

    return jax.jit(step)(state, p, x)

  p = jnp.float32(0.9)
  ref = grad(module, p, x)
  remat_lib.set_remat(module, "nothing")
  np.testing.assert_allclose(grad(module, p, x), ref, rtol=1e-4, atol=1e-7)

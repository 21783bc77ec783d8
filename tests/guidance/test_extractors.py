"""Our Flax ViT / Swin against transformers' ViTModel / SwinModel (float32, real photo crops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.guidance.vit import preprocess, torch_bicubic_matrix
from sodec_jax.layers import FrozenWeight
from sodec_jax.weights.transformers import load_swin, load_vit
from tests.guidance._tiny_hf import photo_batch, rel_err, tiny_swin, tiny_vit, torch_forward

TOL = 1e-5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
  ref = tiny_vit()
  folder = tmp_path_factory.mktemp("vit")
  ref.save_pretrained(folder)
  return ref, load_vit(folder)


def test_vit_matches_transformers(vit_pair):
  ref, ours = vit_pair
  x = photo_batch(32, 32)
  out = np.asarray(ours(jnp.asarray(x)))
  assert out.shape == (2, 17, 64)
  err = rel_err(out, torch_forward(ref, x))
  print(f"vit 32x32 rel err {err:.2e}")
  assert err <= TOL


def test_vit_interpolated_positions_match_transformers(vit_pair):
  ref, ours = vit_pair
  x = photo_batch(48, 40)  # 6x5 patch grid from the 4x4 table: torch bicubic, align_corners=False
  out = np.asarray(ours(jnp.asarray(x), interpolate_pos_encoding=True))
  assert out.shape == (2, 31, 64)
  err = rel_err(out, torch_forward(ref, x, interpolate_pos_encoding=True))
  print(f"vit 48x40 interpolated rel err {err:.2e}")
  assert err <= TOL


def test_vit_other_size_needs_interpolation(vit_pair):
  with pytest.raises(SodecError, match="interpolate_pos_encoding"):
    vit_pair[1](jnp.zeros((1, 48, 48, 3)))


def test_torch_bicubic_matrix_matches_interpolate():
  import torch

  rng = np.random.RandomState(0)
  for n_in, n_out in ((4, 6), (5, 3), (14, 16), (7, 7)):
    v = rng.randn(1, 2, n_in, 1).astype(np.float32)
    want = torch.nn.functional.interpolate(
      torch.from_numpy(v), size=(n_out, 1), mode="bicubic", align_corners=False
    ).numpy()[0, :, :, 0]
    got = np.einsum("oi,ci->co", torch_bicubic_matrix(n_in, n_out), v[0, :, :, 0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
  "name,overrides,hw,kw",
  [
    # 16x16 then 8x8 patch grids, window 4: both stages shifted (masks), patch merging
    ("2 stages", {}, (32, 32), {}),
    # 3rd stage is 4x4 == window: transformers drops the shift there
    ("3 stages", dict(depths=[2, 2, 2], num_heads=[2, 4, 8]), (32, 32), {}),
    # 18x22 grid: padding to the window grid, odd-sized patch merging
    ("3 stages odd size", dict(depths=[2, 2, 2], num_heads=[2, 4, 8]), (36, 44), {}),
    # absolute position embeddings, resized bicubically to a 20x24 grid
    (
      "abs pos interpolated",
      dict(use_absolute_embeddings=True),
      (40, 48),
      dict(interpolate_pos_encoding=True),
    ),
  ],
)
def test_swin_matches_transformers(tmp_path, name, overrides, hw, kw):
  ref = tiny_swin(**overrides)
  ref.save_pretrained(tmp_path)
  ours = load_swin(tmp_path)
  x = photo_batch(*hw, IMAGENET_MEAN, IMAGENET_STD)
  out = np.asarray(ours(jnp.asarray(x), **kw))
  want = torch_forward(ref, x, **kw)
  assert out.shape == want.shape
  err = rel_err(out, want)
  print(f"swin {name} {hw} rel err {err:.2e}")
  assert err <= TOL


def test_extractor_is_frozen_and_passes_gradients_to_the_image(vit_pair):
  ours = vit_pair[1]
  assert not jax.tree_util.tree_leaves(nnx.state(ours, nnx.Param))
  assert jax.tree_util.tree_leaves(nnx.state(ours, FrozenWeight))
  graphdef, state = nnx.split(ours)

  @jax.jit
  def loss(state, x):
    return jnp.mean(jnp.square(nnx.merge(graphdef, state)(x)))

  x = jnp.asarray(photo_batch(32, 32))
  g_x = jax.grad(loss, argnums=1)(state, x)
  assert float(jnp.abs(g_x).sum()) > 0
  g_w = jax.grad(loss, argnums=0)(state, x)  # stop_gradient on every weight read
  assert all(float(jnp.abs(l).sum()) == 0 for l in jax.tree_util.tree_leaves(g_w))


def test_bfloat16_compute_runs(vit_pair, tmp_path):
  ref = vit_pair[0]
  ref.save_pretrained(tmp_path)
  ours = load_vit(tmp_path, dtype=jnp.bfloat16)
  x = photo_batch(32, 32)
  out = ours(jnp.asarray(x))
  assert out.dtype == jnp.bfloat16
  assert rel_err(np.asarray(out, np.float32), torch_forward(ref, x)) < 5e-2


def test_preprocess_resizes_and_normalises(vit_pair):
  ours = vit_pair[1]
  x01 = jnp.asarray(photo_batch(48, 40, (0, 0, 0), (1, 1, 1)))
  y = ours.preprocess(x01)
  assert y.shape == (2, 32, 32, 3)
  assert float(y.min()) >= -1.0 - 1e-4 and float(y.max()) <= 1.0 + 1e-4
  same = preprocess(x01, IMAGENET_MEAN, IMAGENET_STD, (48, 40))  # no resize at the same size
  np.testing.assert_allclose(
    np.asarray(same), (np.asarray(x01) - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6, atol=1e-6
  )
  with pytest.raises(SodecError):
    preprocess(jnp.zeros((32, 32, 3)), IMAGENET_MEAN, IMAGENET_STD, 32)


@pytest.mark.parametrize("kind,expected", [("vit-l16", (1, 197, 1024)), ("swin-b", (1, 49, 1024))])
def test_paper_size_token_shapes(kind, expected):
  """The checkpoints a user converts (abstract shapes only): google/vit-large-patch16-224-in21k
  and microsoft/swin-base-patch4-window7-224 both give D = 1024, SD 2.1's cross-attention width."""
  from sodec_jax.guidance.swin import Swin, SwinSpec
  from sodec_jax.guidance.vit import ViT, ViTSpec

  if kind == "vit-l16":
    build = lambda: ViT(
      ViTSpec(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
      )
    )
  else:
    build = lambda: Swin(SwinSpec(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)))
  graphdef, state = nnx.split(nnx.eval_shape(build))
  out = jax.eval_shape(
    lambda s, x: nnx.merge(graphdef, s)(x),
    state,
    jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
  )
  assert out.shape == expected

"""F_p (GuidanceProjection): shapes, closed-form initial values, and what each mode depends on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.guidance.projection import GuidanceProjection, pooling_matrix


def test_pooling_matrix_is_adaptive_average_pooling():
  m = pooling_matrix(3, 7)
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
  x = np.arange(7, dtype=np.float32)
  # torch.nn.AdaptiveAvgPool1d(3) on 0..6: windows [0,3), [2,5), [4,7)
  np.testing.assert_allclose(m @ x, [1.0, 3.0, 5.0], rtol=1e-6)


def test_fidelity_mode_shape_and_initial_value():
  proj = GuidanceProjection(
    "fidelity", width=16, tokens=5, in_tokens=12, in_features=8, rngs=nnx.Rngs(0)
  )
  feats = jax.random.normal(jax.random.key(0), (2, 12, 8))
  c = proj(feats)
  assert c.shape == (2, 5, 16)
  expect = np.einsum(
    "ot,btd->bod", pooling_matrix(5, 12), np.asarray(feats) @ np.asarray(proj.kernel[...])
  )
  np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-6)
  # c_g depends on the image features: different features, different guidance
  assert not np.allclose(proj(feats + 1.0), c)


def test_hyperprior_mode_depends_on_z_hat():
  proj = GuidanceProjection("hyperprior", width=16, tokens=77, in_features=6, rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(1), (2, 4, 6, 6))
  c = proj(z)
  assert c.shape == (2, 77, 16)
  assert not np.allclose(c[0], c[1])
  with pytest.raises(SodecError, match="77"):
    GuidanceProjection("hyperprior", width=16, tokens=10, in_features=6, rngs=nnx.Rngs(0))


def test_text_mode_is_the_given_embedding(tmp_path):
  emb = np.random.default_rng(0).normal(size=(77, 16)).astype(np.float32)
  np.save(tmp_path / "prompt.npy", emb)
  proj = GuidanceProjection(
    "text", width=16, text_embedding=str(tmp_path / "prompt.npy"), rngs=nnx.Rngs(0)
  )
  c = proj(jnp.zeros((3, 1)))
  np.testing.assert_array_equal(c, np.broadcast_to(emb, (3, 77, 16)))
  assert not jax.tree.leaves(nnx.state(proj, nnx.Param))  # nothing to train
  for bad, msg in [
    ("", "needs guidance.text_embedding"),
    (str(tmp_path / "nope.npy"), "no such file"),
  ]:
    with pytest.raises(SodecError, match=msg):
      GuidanceProjection("text", width=16, text_embedding=bad, rngs=nnx.Rngs(0))
  np.save(tmp_path / "wrong.npy", emb[:10])
  with pytest.raises(SodecError, match="shape"):
    GuidanceProjection(
      "text", width=16, text_embedding=str(tmp_path / "wrong.npy"), rngs=nnx.Rngs(0)
    )


def test_none_mode_is_one_learned_context():
  proj = GuidanceProjection("none", width=16, rngs=nnx.Rngs(0))
  c = proj(jnp.zeros((2, 5)))
  assert c.shape == (2, 77, 16) and not np.any(c)
  assert len(jax.tree.leaves(nnx.state(proj, nnx.Param))) == 1


def test_unknown_mode():
  with pytest.raises(SodecError, match="not one of"):
    GuidanceProjection("clip", rngs=nnx.Rngs(0))

"""config.precision: the reconstruction path's compute dtype, never the entropy path's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax import api, precision
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from tests.conftest import load_photo, make_micro_config, make_micro_sodec_config


def test_resolve():
  assert precision.resolve("auto", "cpu") == "fp32"
  assert precision.resolve("auto", "gpu") == precision.resolve("auto", "tpu") == "bf16"
  assert precision.resolve("bfloat16") == "bf16" and precision.resolve("float32") == "fp32"
  assert precision.compute_dtype("bf16") == jnp.bfloat16
  with pytest.raises(SodecError, match="use one of auto, fp32, bf16"):
    precision.resolve("fp16")


@pytest.fixture(scope="module")
def micro():
  config = make_micro_sodec_config(3)
  return config, build_model(config, nnx.Rngs(0))


def _dtypes(module):
  """The compute dtypes of the layers under `module` (modules with a dtype attribute)."""
  return {
    jnp.dtype(n.dtype)
    for _, n in nnx.iter_graph(module)
    if isinstance(n, nnx.Module) and hasattr(n, "dtype")
  }


def test_bf16_build_keeps_the_entropy_path_float32(micro):
  config, model = micro
  codec_config = make_micro_config(precision="bf16")  # build_model applies config.precision
  codec = build_model(codec_config, nnx.Rngs(0)).codec
  assert _dtypes(codec.fidelity_decoder) == {jnp.dtype(jnp.bfloat16)}
  assert jnp.dtype(jnp.bfloat16) not in _dtypes(codec.encoder)
  model = nnx.clone(model)
  assert precision.apply_precision(model, "bf16") == "bf16"
  for part in (model.unet, model.vae_decoder, model.transform, model.codec.fidelity_decoder):
    assert _dtypes(part) == {jnp.dtype(jnp.bfloat16)}
  for part in (model.codec.encoder, model.codec.hyper_analysis, model.codec.prior):
    assert jnp.dtype(jnp.bfloat16) not in _dtypes(part)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)  # master weights stay float32
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(  # traced, not run: the output dtypes of the training forward
    lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 64, 64, 3)), noise_key=jax.random.key(0)),
    state,
  )
  assert out["x_hat"].dtype == out["x_f"].dtype == jnp.float32


def test_same_bytes_at_every_precision_and_auto_is_fp32_on_cpu(micro):
  config, model = micro
  image = np.ascontiguousarray(load_photo("chelsea.png")[:64, :128])
  auto, fp32, bf16 = (api.prepare(config, model, dtype=d) for d in (None, "fp32", "bf16"))
  assert auto.precision == fp32.precision == "fp32" and bf16.precision == "bf16"
  assert auto.fingerprint == fp32.fingerprint == bf16.fingerprint
  data = api.compress(fp32, image)
  assert api.compress(bf16, image) == data == api.compress(auto, image)
  a, f, b = (api.decompress(m, data).astype(int) for m in (auto, fp32, bf16))
  np.testing.assert_array_equal(a, f)
  assert 0 < np.abs(b - f).max() <= 32 and np.abs(b - f).mean() < 2.0
  # the model prepared for bf16 holds bf16 decoder weights; the caller's model is untouched
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

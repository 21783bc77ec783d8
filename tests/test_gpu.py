"""Properties that only a GPU can show (`pytest -m gpu`; skipped without a GPU). The same
properties are measured by `python -m sodec_jax.bench --what gpu-check` at paper size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import load_photo, make_micro_sodec_config

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


def test_bf16_attention_compiles_to_cudnn_fused_attention():
  """The UNet's attention shape (64 dims per head) in bf16 compiles to cuDNN's fused kernel."""
  from sodec_jax.diffusion.attention import dot_product_attention

  q = jnp.ones((1, 4096, 5, 64), jnp.bfloat16)
  kv = jnp.ones((1, 77, 5, 64), jnp.bfloat16)
  for k in (q, kv):
    text = jax.jit(dot_product_attention).lower(q, k, k).compile().as_text()
    assert "__cudnn$fmha" in text


@pytest.fixture(scope="module")
def models():
  """The micro SODEC (tiny diffusion decoder) prepared on the GPU (bf16) and, from the same
  arrays copied to the host, on the CPU (float32)."""
  from sodec_jax import api
  from sodec_jax.pretrained import build_model

  config = make_micro_sodec_config(3)
  model = build_model(config, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cpu = jax.devices("cpu")[0]
  on_cpu = api.prepare(
    config, nnx.merge(graphdef, jax.device_put(state, cpu)), winograd=False, dtype="fp32"
  )
  return on_cpu, api.prepare(config, model, dtype="bf16"), api.prepare(config, model, dtype="fp32")


def test_a_file_encoded_on_the_cpu_decodes_on_the_gpu(models):
  from sodec_jax import api

  on_cpu, gpu_bf16, gpu_fp32 = models
  assert on_cpu.fingerprint == gpu_bf16.fingerprint
  image = np.ascontiguousarray(load_photo("coffee.png")[:128, :192])
  with jax.default_device(jax.devices("cpu")[0]):
    lat = api.encode_latents(on_cpu, image)
  data = api.pack(on_cpu, lat, 128, 192)
  _, y_sym, z_hat = api.decode_symbols(gpu_bf16, data)
  np.testing.assert_array_equal(y_sym, lat.y_symbols)
  np.testing.assert_array_equal(z_hat, lat.z_hat)
  bf16 = api.decompress(gpu_bf16, data).astype(int)
  fp32 = api.decompress(gpu_fp32, data).astype(int)
  assert bf16.shape == (128, 192, 3)
  assert np.abs(bf16 - fp32).mean() < 2.0


def test_a_file_encoded_on_the_gpu_range_decodes_on_the_cpu(models):
  from sodec_jax import api

  on_cpu, gpu_bf16, _ = models
  image = np.ascontiguousarray(load_photo("astronaut.png")[:128, :128])
  lat = api.encode_latents(gpu_bf16, image)
  _, y_sym, _ = api.decode_symbols(on_cpu, api.pack(gpu_bf16, lat, 128, 128))
  np.testing.assert_array_equal(y_sym, lat.y_symbols)


def test_gpu_check_runs_at_tiny_size(tmp_path):
  """The prepared check's program (tiny widths, 64x64) passes on this GPU."""
  from sodec_jax.benchmarks import gpu_check

  report = gpu_check.run_gpu_check(str(tmp_path / "r.json"), 64, 1, paper_size=False)
  assert not report["errors"], report["errors"]
  assert report["cross"]["ok"]

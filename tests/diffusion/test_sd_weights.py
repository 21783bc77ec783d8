"""diffusers folder loaders: round trip through save_pretrained, strictness, bf16, torch-free path."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TVAE
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import assert_close, nchw, nhwc, randomize_
from flax import nnx

from sodec_jax.diffusion.autoencoder import tiny_vae_config
from sodec_jax.diffusion.unet import tiny_unet_config
from sodec_jax.errors import SodecError
from sodec_jax.weights.diffusers import diffusers_module_path, load_unet, load_vae
from sodec_jax.weights.formats import open_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("unet")
  model = randomize_(TUNet(**tiny_unet_config().to_dict()), seed=6).eval()
  model.save_pretrained(folder)
  return str(folder), model


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("vae")
  model = randomize_(TVAE(**tiny_vae_config().to_dict()), seed=7).eval()
  model.save_pretrained(folder)
  return str(folder), model


def _unet_inputs():
  rng = np.random.default_rng(8)
  return (
    rng.standard_normal((1, 16, 16, 4)).astype(np.float32),
    np.array([999]),
    rng.standard_normal((1, 5, 32)).astype(np.float32),
  )


def test_rename_table():
  assert (
    diffusers_module_path("up_blocks.1.attentions.0.transformer_blocks.0.ff.proj_in")
    == "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
  )
  assert (
    diffusers_module_path("mid_block.attentions.0.transformer_blocks.0.attn2.to_out")
    == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
  )
  assert diffusers_module_path("down_blocks.0.resnets.1.conv1") == "down_blocks.0.resnets.1.conv1"


def test_load_unet_safetensors(unet_folder):
  folder, theirs = unet_folder
  assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  unet = load_unet(folder)
  x, t, ctx = _unet_inputs()
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  out = nnx.jit(lambda m, *a: m(*a))(unet, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  assert_close(out, ref, tol=1e-5, what="load_unet")


def test_load_vae_bin_and_legacy_attention_names(vae_folder, tmp_path):
  folder, theirs = vae_folder
  sd = {k: v.clone() for k, v in theirs.state_dict().items()}
  legacy = {}
  for k, v in sd.items():  # pre-0.14 names: query/key/value/proj_attn
    for new, old in (
      (".to_q.", ".query."),
      (".to_k.", ".key."),
      (".to_v.", ".value."),
      (".to_out.0.", ".proj_attn."),
    ):
      k = k.replace(new, old)
    legacy[k] = v
  assert any(".proj_attn." in k for k in legacy)
  torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  vae = load_vae(str(tmp_path))
  z = np.random.default_rng(9).standard_normal((1, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(theirs.decode(nchw(z)).sample)
  assert_close(
    nnx.jit(lambda m, a: m.decode(a))(vae, jnp.asarray(z)),
    ref,
    tol=1e-5,
    what="load_vae .bin legacy names",
  )


def test_strict_errors_list_every_problem(unet_folder, tmp_path):
  folder, _ = unet_folder
  sd = open_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors")).to_dict()
  sd = dict(sd)
  del sd["conv_in.weight"]
  del sd["mid_block.resnets.0.norm1.bias"]
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["conv_out.bias"] = np.zeros(5, np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  with pytest.raises(SodecError) as e:
    load_unet(str(tmp_path))
  msg = str(e.value)
  for needle in (
    "missing 2",
    "conv_in.weight",
    "mid_block.resnets.0.norm1.bias",
    "unexpected 1",
    "extra.weight",
    "mis-shaped 1",
    "conv_out.bias",
  ):
    assert needle in msg, msg


def test_folder_errors(tmp_path):
  with pytest.raises(SodecError, match="config.json"):
    load_vae(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(tiny_vae_config().to_dict()))
  with pytest.raises(SodecError, match="no weights"):
    load_vae(str(tmp_path))


def test_bfloat16_safetensors_and_param_dtype(vae_folder, tmp_path):
  folder, theirs = vae_folder
  theirs_bf = TVAE(**tiny_vae_config().to_dict())
  theirs_bf.load_state_dict(theirs.state_dict())
  theirs_bf.to(torch.bfloat16).save_pretrained(tmp_path)
  with open(tmp_path / "diffusion_pytorch_model.safetensors", "rb") as f:  # stored as bfloat16
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["decoder.conv_in.weight"]["dtype"] == "BF16"
  vae = load_vae(str(tmp_path), dtype=jnp.bfloat16)
  assert vae.decoder.conv_in.kernel.value.dtype == jnp.bfloat16
  z = np.random.default_rng(10).standard_normal((1, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(theirs.decode(nchw(z)).sample)
  out = nnx.jit(lambda m, a: m.decode(a))(vae, jnp.asarray(z))
  assert out.dtype == jnp.bfloat16
  assert_close(out, ref, tol=3e-2, what="bf16 VAE vs f32 diffusers")


def test_safetensors_path_needs_no_torch(unet_folder):
  folder, _ = unet_folder
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "from sodec_jax.weights.diffusers import load_unet\n"
    f"u = load_unet({folder!r}); print(type(u).__name__)\n"
    "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
  )
  env = dict(
    os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "UNet2DConditionModel" in out.stdout

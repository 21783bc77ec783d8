"""Full-size Stable Diffusion 2.1 UNet and VAE decoder against diffusers (slow: python -m pytest
-m slow tests/diffusion/test_sd_full.py; about 12 GB of RAM and a few minutes on 2 CPU cores).

Random weights, saved as real diffusers folders with save_pretrained, read back with our loaders.
"""

import gc

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers_reference import assert_close, nchw, nhwc
from flax import nnx

from sodec_jax.diffusion.autoencoder import sd21_vae_config
from sodec_jax.diffusion.unet import count_params, sd21_unet_config
from sodec_jax.weights.diffusers import load_unet, load_vae

pytestmark = pytest.mark.slow


def test_sd21_unet_full_size(tmp_path):
  from diffusers import UNet2DConditionModel as TUNet

  theirs = TUNet(**sd21_unet_config().to_dict()).eval()
  n_params = sum(p.numel() for p in theirs.parameters())
  assert n_params == 865_910_724
  theirs.save_pretrained(tmp_path)
  rng = np.random.default_rng(20)
  x = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
  ctx = rng.standard_normal((1, 77, 1024)).astype(np.float32)
  t = np.array([999])
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  del theirs
  gc.collect()
  unet = load_unet(str(tmp_path))
  assert count_params(unet) == n_params
  out = nnx.jit(lambda m, *a: m(*a))(unet, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  assert_close(out, ref, tol=1e-4, what="SD 2.1 UNet 64x64x4, 77x1024, t=999")


def test_sd21_vae_decoder_full_size(tmp_path):
  from diffusers import AutoencoderKL as TVAE

  theirs = TVAE(**sd21_vae_config().to_dict()).eval()
  n_params = sum(p.numel() for p in theirs.parameters())
  assert n_params == 83_653_863
  theirs.save_pretrained(tmp_path)
  z = np.random.default_rng(21).standard_normal((1, 32, 32, 4)).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(theirs.decode(nchw(z)).sample)
  del theirs
  gc.collect()
  vae = load_vae(str(tmp_path))
  assert count_params(vae) == n_params
  out = nnx.jit(lambda m, a: m.decode(a))(vae, jnp.asarray(z))
  assert out.shape == (1, 256, 256, 3)
  assert_close(out, ref, tol=1e-4, what="SD VAE decoder 32x32x4 -> 256x256x3")

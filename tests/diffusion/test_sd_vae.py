"""Small-configuration AutoencoderKL against diffusers (float32, same random weights)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TVAE
from diffusers_reference import assert_close, nchw, nhwc, randomize_, state_dict_np
from flax import nnx

from sodec_jax.diffusion.autoencoder import (
  AutoencoderKL,
  VAEConfig,
  sd21_vae_config,
  tiny_vae_config,
)
from sodec_jax.diffusion.unet import count_params
from sodec_jax.errors import SodecError
from sodec_jax.weights.diffusers import abstract_module, load_state_dict_into


def _pair(cfg):
  theirs = randomize_(TVAE(**cfg.to_dict()), seed=4).eval()
  ours = load_state_dict_into(
    abstract_module(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))), state_dict_np(theirs)
  )
  return ours, theirs


@pytest.mark.parametrize("levels", [2, 3])
def test_small_vae_matches_diffusers(levels):
  cfg = tiny_vae_config()
  if levels == 3:
    cfg = dataclasses.replace(
      cfg,
      block_out_channels=(16, 16, 32),
      layers_per_block=2,
      down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3,
    )
  ours, theirs = _pair(cfg)
  f = 2 ** (levels - 1)
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, (2, 8 * f, 6 * f, 3)).astype(np.float32)
  z = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
  with torch.no_grad():
    dist = theirs.encode(nchw(x)).latent_dist
    ref_dec = nhwc(theirs.decode(nchw(z)).sample)
  mean, logvar = nnx.jit(lambda m, a: m.encode(a))(ours, jnp.asarray(x))
  dec = nnx.jit(lambda m, a: m.decode(a))(ours, jnp.asarray(z))
  assert_close(mean, nhwc(dist.mean), tol=1e-5, what="encode mean")
  assert_close(logvar, nhwc(dist.logvar), tol=1e-5, what="encode logvar")
  assert_close(dec, ref_dec, tol=1e-5, what="decode")
  if levels == 3:  # the decoder's CPU path: 3x3 convs as Winograd F(4x4, 3x3)
    from sodec_jax.layers import use_winograd

    assert use_winograd(ours.decoder, min_channels=16) > 0
    dec_w = nnx.jit(lambda m, a: m.decode(a))(ours, jnp.asarray(z))
    assert_close(dec_w, ref_dec, tol=2e-5, what="decode, winograd")
    assert not np.array_equal(np.asarray(dec_w), np.asarray(dec))
  assert count_params(ours) == sum(p.numel() for p in theirs.parameters())


def test_sd21_vae_parameter_count():
  model = nnx.eval_shape(lambda: AutoencoderKL(sd21_vae_config(), rngs=nnx.Rngs(0)))
  assert count_params(model) == 83_653_863  # diffusers AutoencoderKL(**SD 2.1 vae config)


def test_vae_config_from_diffusers_dict():
  d = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
  }
  cfg = VAEConfig.from_dict(d)
  assert cfg == sd21_vae_config() and cfg.scaling_factor == 0.18215
  with pytest.raises(SodecError, match="use_quant_conv"):
    VAEConfig.from_dict({**d, "use_quant_conv": False})

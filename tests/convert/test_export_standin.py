"""export-standin: the tiny pipeline's stand-in SD (stage 0's UNet + VAE) -> a diffusers-layout
folder. diffusers itself loads it (UNet2DConditionModel / AutoencoderKL / DDPMScheduler
.from_pretrained) and computes what ours computes; `--config.diffusion.weights` reads it back
exactly; the folder the repository ships (weights/tiny_sd) loads and reconstructs the held-out
photos in colour."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TVAE
from diffusers import DDPMScheduler
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import nchw, nhwc
from flax import nnx

from sodec_jax.converters.standin import export_standin, export_standin_from_workdir
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_latent_pretrain
from sodec_jax.weights import diffusers as dw
from tests.conftest import load_photo, make_micro_sodec_config
from tests.convert.conftest import ROOT, assert_out_clean, errors

SHIPPED = os.path.join(ROOT, "weights", "tiny_sd")


def _random_standin(seed: int = 3):
  """The micro config's stage-0 model with every Param random (norm affines included, so a
  mapping mistake between two parameters of the same shape shows)."""
  model = build_latent_pretrain(make_micro_sodec_config(0), nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  noise = lambda v: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
  nnx.update(model, jax.tree.map(noise, params))
  return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(the random stand-in, the folder export_standin wrote), built once for this file."""
  model = _random_standin()
  out = str(tmp_path_factory.mktemp("standin") / "sd")
  return model, export_standin(model.unet, model.vae_decoder, model.schedule, out)


def test_diffusers_loads_the_export_and_computes_what_ours_does(exported):
  model, out = exported
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
  t = np.array([999])
  ctx = rng.standard_normal((1, 5, model.unet.config.cross_attention_dim)).astype(np.float32)
  theirs = TUNet.from_pretrained(out, subfolder="unet").eval()
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  rel, _ = errors(nnx.jit(lambda m, *a: m(*a))(model.unet, x, t, ctx), ref)
  assert rel <= 1e-5

  vae = TVAE.from_pretrained(out, subfolder="vae").eval()
  image = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    dist = vae.encode(nchw(image)).latent_dist
    ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
    ref_dec = nhwc(vae.decode(dist.mean).sample)
  mean, logvar = model.vae_decoder.encode(jnp.asarray(image))
  assert errors(mean, ref_mean)[0] <= 1e-5 and errors(logvar, ref_logvar)[0] <= 1e-5
  assert errors(model.vae_decoder.decode(jnp.asarray(ref_mean)), ref_dec)[0] <= 1e-5
  assert vae.config.scaling_factor == model.vae_decoder.config.scaling_factor

  sched = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
  assert sched.config.prediction_type == model.schedule.prediction_type
  np.testing.assert_allclose(sched.alphas_cumprod.numpy(), model.schedule.alphas_cumprod, rtol=1e-5)


def test_config_weights_read_the_export_back_exactly(exported):
  model, out = exported
  for ours, loaded in (
    (model.unet, dw.load_unet(os.path.join(out, "unet"))),
    (model.vae_decoder, dw.load_vae(os.path.join(out, "vae"))),
  ):
    a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
    b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    assert len(a) == len(b)
    for u, v in zip(a, b):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_only_a_stage0_workdir_exports(tmp_path, capsys):
  from convert.from_torch import main

  assert (
    main(["export-standin", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
  )
  assert "not a sodec-jax training workdir" in capsys.readouterr().err
  from sodec_jax import checkpoints

  workdir = str(tmp_path / "stage2")
  checkpoints.save_config(workdir, make_micro_sodec_config(2))
  with pytest.raises(SodecError, match="export-standin takes the tiny pipeline's stage 0"):
    export_standin_from_workdir(workdir, str(tmp_path / "o"))
  assert_out_clean(str(tmp_path / "o"))


def test_shipped_standin_loads_and_reconstructs_the_held_out_photos_in_colour():
  """weights/tiny_sd (what configs/tiny.py starts from): diffusers-layout, 8x down to 4
  channels; its VAE on the two photos the tiny default never trains on (full size)."""
  assert os.path.isfile(os.path.join(SHIPPED, "standin.json")), "weights/tiny_sd is missing"
  vae = dw.load_vae(os.path.join(SHIPPED, "vae"))
  assert vae.config.latent_channels == 4
  encode_decode = jax.jit(lambda x: vae.decode(vae.encode(x * 2 - 1)[0]))
  for name, floor in (("astronaut.png", 20.0), ("coffee.png", 20.5)):
    im = load_photo(name)
    im = im[: im.shape[0] // 8 * 8, : im.shape[1] // 8 * 8]
    rec = np.asarray(encode_decode(jnp.asarray(im, jnp.float32)[None] / 255.0))[0]
    rec = np.round(np.clip((rec + 1) / 2, 0, 1) * 255)
    mse = np.mean(np.square(rec - im.astype(np.float64)))
    psnr = 10 * np.log10(255**2 / mse)
    drift = np.abs(rec.reshape(-1, 3).mean(0) - im.reshape(-1, 3).mean(0)).max()
    print(f"{name}: PSNR {psnr:.2f} dB, channel means off by up to {drift:.1f}")
    assert psnr >= floor and drift <= 20.0

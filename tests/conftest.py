"""Shared test helpers: real photos from scikit-image and a micro config that trains in seconds."""

import os
import sys

import numpy as np
import pytest

# XLA's CPU backend without LLVM's optimisation passes, for this process and the subprocesses
# the tests start (set before jax is imported): the suite compiles thousands of small programs,
# and each jax.random initialiser of a new shape took ~0.4 s to compile at the default level
# (~0.02 s here), which made a cold run of the default suite ~35 min on 2 cores (27 min now).
# Results can differ in the last bit from the default level (random initialisers do: the micro
# codec's seed-0 weights and so its fingerprint); every test compares values computed in its own
# process, and the one stored file carries the weights that wrote it (tests/data). The tests
# that compare XLA settings set XLA_FLAGS themselves. SODEC_TEST_XLA_OPT=1 keeps the default.
if os.environ.get("SODEC_TEST_XLA_OPT", "0") != "1":
  _flag = "--xla_backend_optimization_level=0"
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` is a top-level package of the repository
  sys.path.insert(0, ROOT)


def load_photo(name: str = "astronaut.png") -> np.ndarray:
  """uint8 [H, W, 3] of a photo bundled with scikit-image (grayscale ones as RGB)."""
  from sodec_jax import data, images

  return images.read_image(os.path.join(data.skimage_photo_dir(), name))[0]


def make_micro_config(**overrides):
  """configs/tiny.py shrunk further (tiny widths, 64x64 crops, batch 2, a few steps, no bar).

  overrides: {"optim.learning_rate": 1e-3, ...}
  """
  from configs import tiny

  c = tiny.get_config()
  c.name = "micro"
  c.pipeline.stages = ()  # one stage (stage 1), not the tiny pipeline
  c.pipeline.first_index = 0  # a test's pipeline folders count from 0 (0_pretrain, 1_stage1, ...)
  c.model.latent_channels = 8
  c.model.encoder_filters = (4, 4, 8, 8, 8)
  c.model.hyper_channels = 4
  c.model.decoder_filters = (8, 8, 8, 4, 4)
  c.model.decoder_residual_blocks = 1
  c.diffusion.tiny_latent_channels = 4  # SD's, as configs/tiny.py
  c.diffusion.weights = ""  # random tiny UNet / VAE, not the shipped stand-in (weights/tiny_sd)
  # LoRA on the attention projections (base.py's default), not on every layer as configs/tiny.py
  # (measured: this alone did not change the suite's time); LoRA on every layer is tested in
  # tests/diffusion/test_sd_lora.py and tests/convert/test_lora_export.py
  c.diffusion.lora_targets = ("to_q", "to_k", "to_v", "to_out")
  c.data.crop_size = 64
  c.data.batch_size = 2
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.progress = False
  c.train.sample_every = 0  # no sample grids unless a test asks
  c.train.validate_every = 0  # no held-out validation unless a test asks
  c.train.validate_size = 64
  c.pipeline.summary = False  # no held-out summary unless a test asks
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def photo():
  return load_photo


@pytest.fixture
def micro_config():
  return make_micro_config


def make_micro_sodec_config(stage: int = 2, **overrides):
  """The micro codec with the tiny diffusion decoder (tiny UNet / VAE / random ViT) at `stage`."""
  import importlib

  c = make_micro_config()
  c.diffusion.unet = c.diffusion.vae = "tiny"
  c.diffusion.lora_rank, c.diffusion.lora_alpha = 2, 2.0
  c.guidance.extractor_config = "tiny"
  c.sodec.hyper_synthesis_channels = c.sodec.transform_channels = 8
  c.sodec.transform_blocks = 1
  if stage == 0:
    c.stage, c.train.trainable = 0, (".*",)
  elif stage >= 2:
    importlib.import_module(
      {2: "configs.stage2", 3: "configs.stage3", 4: "configs.finetune"}[stage]
    ).apply(c)
    c.data.crop_size, c.data.batch_size = 64, 2
  return _apply(c, overrides)


def _apply(c, overrides):
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory):
  """A real micro training workdir (stage 1, 2 steps), shared by the tests that only read it
  (evaluation, benchmarks)."""
  from sodec_jax.train import train

  wd = str(tmp_path_factory.mktemp("micro_run"))
  train(make_micro_config(**{"train.num_steps": 2}), wd)
  return wd

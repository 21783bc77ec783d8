"""Tiny default: the whole SODEC pipeline at small widths on the photos bundled with
scikit-image, in well under 15 minutes on 2 CPU cores (the README's main command):

  python -m sodec_jax.train --config configs/tiny.py --workdir runs/tiny

Stages, each in runs/tiny/<i>_<stage>/ and each starting from the ones before:
  pretrain  stand-in for SD's own pretraining (no SD weights offline): a small VAE (8x down, like
            SD's) and a small UNet denoiser on its latents
  stage1    the HiFiC-style codec (E, H_a, P, D_a), MSE only (LPIPS needs VGG16 weights)
  stage2    diffusion path warm-up (configs/stage2.py) with a small random frozen ViT as F
  stage3    joint training with rate annealing + alignment (configs/stage3.py)
  finetune  + the conditional GAN (configs/finetune.py)
astronaut and coffee are held out of training (data.holdout): measure any stage on them with
sodec_jax.validation (real .sodec files). `sodec compress/decompress --checkpoint runs/tiny`
then use the final stage (the diffusion decoder). `--config.pipeline.stages="('stage1',)"`
trains the codec alone.
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  c.stage = 1
  # the codec at small widths
  c.model.latent_channels = 32
  c.model.encoder_filters = (12, 24, 32, 48, 64)
  c.model.hyper_channels = 24
  c.model.decoder_filters = (64, 48, 32, 24, 12)
  c.model.decoder_residual_blocks = 2
  # E sees 2x - 1, D_a ends in tanh (HiFiC's normalize_input_image): with [0, 1] inputs the tiny
  # codec sits near a flat image for hundreds of steps (ChannelNorm over 12 channels)
  c.model.normalize_input_image = True
  c.data.crop_size = 128
  c.data.batch_size = 4
  c.data.holdout = ("astronaut", "coffee")  # validation photos, never trained on
  c.loss.k_P = 0.0  # MSE only: LPIPS needs VGG16 weights
  c.loss.target_rate = 1.0
  c.loss.lambda_A = 0.25
  c.loss.lambda_B = 2.0**-6
  c.loss.lambda_schedule_steps = (10_000,)
  c.loss.target_schedule_steps = (10_000,)
  c.optim.learning_rate = 5e-4
  c.optim.lr_decay_steps = (850,)
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.sample_every = 250  # samples/step_<n>.png: original | x_f | x_hat
  c.train.validate_every = 250  # held-out astronaut + coffee, 256 px crops
  # the diffusion decoder at small widths (used from stage 2 on)
  c.diffusion.unet = "tiny"
  c.diffusion.vae = "tiny"
  # SD's 4 latent channels. 16 (as SD3's VAE) lifts the stand-in VAE itself from ~18.7 dB sepia
  # to ~21.3 dB in colour on the held-out photos, but after this pipeline's 150 stage-2 steps the
  # whole quickstart decoded them at 12.6 dB with a blue-orange grid (4 channels: 15.3 dB);
  # docs/ARCHITECTURE.md, "Choices"
  c.diffusion.tiny_latent_channels = 4
  c.diffusion.lora_rank = 4
  c.diffusion.lora_alpha = 4.0
  c.guidance.extractor_config = "tiny"
  c.sodec.hyper_synthesis_channels = 32
  c.sodec.transform_channels = 32
  c.sodec.transform_blocks = 1
  # the pipeline: stage order and what each stage changes beyond its stage config
  c.pipeline.stages = ("pretrain", "stage1", "stage2", "stage3", "finetune")
  c.pipeline.pretrain = ml_collections.ConfigDict(
    {
      "train": {"num_steps": 1200, "checkpoint_every": 600},
      "data": {"crop_size": 64, "batch_size": 8},
      "optim": {"learning_rate": 2e-3, "lr_decay_steps": (1000,)},
    }
  )
  small = {
    "data": {"crop_size": 128, "batch_size": 4},
    "optim": {"learning_rate": 5e-4, "lr_decay_steps": (10_000,)},
  }
  c.pipeline.stage2 = ml_collections.ConfigDict(
    {**small, "train": {"num_steps": 150, "checkpoint_every": 150}}
  )
  c.pipeline.stage3 = ml_collections.ConfigDict(
    {
      "data": small["data"],
      "optim": {"learning_rate": 3e-4, "lr_decay_steps": (10_000,)},
      "train": {"num_steps": 150, "checkpoint_every": 150},
      "loss": {"anneal": {"start": 0.25, "end": 1.0, "steps": 150}},
    }
  )
  c.pipeline.finetune = ml_collections.ConfigDict(
    {
      "data": small["data"],
      "train": {"num_steps": 100, "checkpoint_every": 100},
      "optim": {"learning_rate": 1e-4, "lr_decay_steps": (10_000,), "grad_clip_norm": 0.0},
      "loss": {
        "anneal": {"start": 1.0, "end": 1.0},
        "beta": 0.15,
        "gan_warmup_steps": 20,
        "gan_ramp_steps": 40,
        "disc_learning_rate": 1e-4,
      },
    }
  )
  return c

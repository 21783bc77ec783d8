"""Tiny default: the whole SODEC pipeline at small widths on the photos bundled with
scikit-image, in well under 15 minutes on 2 CPU cores (the README's main command):

  python -m sodec_jax.train --config configs/tiny.py --workdir runs/tiny

It starts, as the paper starts from Stable Diffusion 2.1, from a pretrained stand-in for SD that
the repository ships (weights/tiny_sd: a small VAE, 8x down to 4 channels like SD's, and a small
UNet denoiser on its latents, trained by this config's `pretrain` stage on the same photos; no
SD weights can be downloaded here). Stages, each in runs/tiny/<i>_<stage>/ and each starting
from the ones before:
  stage1    the HiFiC-style codec (E, H_a, P, D_a), MSE only (LPIPS needs VGG16 weights)
  stage2    diffusion path warm-up (configs/stage2.py) with a small random frozen ViT as F
  stage3    joint training with rate annealing + alignment (configs/stage3.py)
  finetune  + the conditional GAN (configs/finetune.py)
astronaut and coffee are held out of training (data.holdout): measure any stage on them with
sodec_jax.validation (real .sodec files). `sodec compress/decompress --checkpoint runs/tiny`
then use the final stage (the diffusion decoder). `--config.pipeline.stages="('stage1',)"`
trains the codec alone. To retrain the stand-in too (docs/ARCHITECTURE.md, "The tiny stand-in
for SD"): --config.diffusion.weights= --config.pipeline.first_index=0
--config.pipeline.stages="('pretrain', 'stage1', 'stage2', 'stage3', 'finetune')".
"""

import os

import ml_collections

from configs import base

# The stand-in SD (diffusers layout), made by: python convert/from_torch.py export-standin
# --src <a pretrain stage's workdir> --out weights/tiny_sd
STANDIN = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "tiny_sd"
)


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
  c.diffusion.weights = STANDIN  # "": random tiny UNet / VAE (then run the pretrain stage first)
  # SD's 4 latent channels (the shipped stand-in's; this setting applies to a retrained one). 16
  # (as SD3's VAE) lifted a 1200-step stand-in VAE from ~18.7 dB sepia to ~21.3 dB in colour on
  # the held-out photos, but after this pipeline's 150 stage-2 steps the whole quickstart decoded
  # them at 12.6 dB with a blue-orange grid (4 channels: 15.3 dB); docs/ARCHITECTURE.md, "Choices"
  c.diffusion.tiny_latent_channels = 4
  c.diffusion.lora_rank = 4
  c.diffusion.lora_alpha = 4.0
  # LoRA on every conv, attention projection, proj_in/out and feed-forward of the UNet, as the
  # one-step restorers OSEDiff and img2img-turbo do (their l_grep lists), not only on to_q/k/v/out:
  # stage 2 alone from the same stage 1, held-out 256 px crops at steps 100 / 200 / 300:
  # attention only 12.4-12.8 / 14.0-14.2 / 14.4-14.9 dB, all of these 14.03 / 15.38 / 15.84 dB
  # (docs/ARCHITECTURE.md, "Choices")
  c.diffusion.lora_targets = ("to_q", "to_k", "to_v", "to_out", "conv", "proj_in", "proj_out", "ff")
  c.guidance.extractor_config = "tiny"
  c.sodec.hyper_synthesis_channels = 32
  c.sodec.transform_channels = 32
  c.sodec.transform_blocks = 1
  # 4x4 transposed conv: the 3x3 one left a 16 px plaid in every diffusion decode (same held-out
  # PSNR after 300 stage-2 steps: 14.88 vs 14.84 dB); docs/ARCHITECTURE.md, "Choices"
  c.sodec.transform_upsample = "transposed4"
  # the pipeline: stage order and what each stage changes beyond its stage config
  c.pipeline.stages = ("stage1", "stage2", "stage3", "finetune")
  c.pipeline.first_index = 1  # folders 1_stage1 ... 4_finetune: stage 0 (the stand-in) ships
  # the stand-in's pretraining (weights/tiny_sd was made with exactly this stage; it runs only when
  # asked: --config.diffusion.weights= --config.pipeline.first_index=0
  # --config.pipeline.stages="('pretrain', ...)")
  c.pipeline.pretrain = ml_collections.ConfigDict(
    {
      # chroma weight 4: with plain MSE the narrow 4-channel stand-in VAE spent its latent on
      # luminance and decoded every photo in one sepia tint (held-out channel means off by up
      # to 20 grey levels; with 4: within 6 after 1200 steps); docs/ARCHITECTURE.md, "Choices"
      "pretrain": {"chroma_weight": 4.0},
      "train": {"num_steps": 6000, "checkpoint_every": 1000},
      "data": {"crop_size": 64, "batch_size": 8},
      "optim": {"learning_rate": 2e-3, "lr_decay_steps": (4500,)},
    }
  )
  small = {
    "data": {"crop_size": 128, "batch_size": 4},
    "optim": {"learning_rate": 5e-4, "lr_decay_steps": (10_000,)},
  }
  # the decoder's colours from x_f (sodec_jax/color_fix.py), and trained through: the distortion
  # loss sees the corrected decode, which keeps x_f's low frequencies an image in stage 2 too
  # (where no alignment loss does). Stages 3-4 through the fix, from the same stage 2: 19.69 dB /
  # MS-SSIM 0.722 held out against 19.15 / 0.667, and no dot grid in the decodes; stage 2 through
  # it as well, from the same stage 1: stage 2 19.14 dB against 17.12, final 0.212 bpp / 19.74 dB
  # against 0.228 / 19.63; docs/ARCHITECTURE.md, "Choices"
  fix = {"color_fix": "wavelet", "color_fix_in_training": True}
  # stage 2 from the same stage 1, held-out 256 px crops: 150 steps at 5e-4 13.91 dB; 300 steps
  # with lr / 10 at 225: 13.10, 13.91, 14.61, 14.84 dB at steps 75-300 (the time the shipped
  # stand-in saved; without the colour fix)
  c.pipeline.stage2 = ml_collections.ConfigDict(
    {
      "data": small["data"],
      "optim": {"learning_rate": 5e-4, "lr_decay_steps": (225,)},
      "train": {"num_steps": 300, "checkpoint_every": 150},
      "sodec": dict(fix),
    }
  )
  # stage 3 anneals the rate weight from 0.25 (lambda_A) to 4.0 and the finetune keeps 4.0, so
  # that the final model codes below stage 1's rate: trained through the colour fix, ending at
  # 2.0 left it at 0.258 bpp, at 3.0 at 0.245 (stage 1: 0.243); docs/EXPERIMENTS.md. Stage 1
  # itself never trains at lambda_A: its batches code at 0.15-0.35 bpp, under HiFiC's 1 bpp
  # target (x 1/0.7 in its first phase), so HiFiC's switch keeps it at lambda_B x 2 = 1/32; 0.25
  # is where stage 3 starts, 8x stage 1's weight, not stage 1's weight
  end = 4.0
  c.pipeline.stage3 = ml_collections.ConfigDict(
    {
      "data": small["data"],
      "optim": {"learning_rate": 3e-4, "lr_decay_steps": (10_000,)},
      "train": {"num_steps": 150, "checkpoint_every": 150},
      "loss": {"anneal": {"start": 0.25, "end": end, "steps": 150}},
      "sodec": dict(fix),
    }
  )
  c.pipeline.finetune = ml_collections.ConfigDict(
    {
      "data": small["data"],
      "train": {"num_steps": 100, "checkpoint_every": 100},
      "optim": {"learning_rate": 1e-4, "lr_decay_steps": (10_000,), "grad_clip_norm": 0.0},
      "loss": {
        "anneal": {"start": end, "end": end},
        "beta": 0.15,
        "gan_warmup_steps": 20,
        "gan_ramp_steps": 40,
        "disc_learning_rate": 1e-4,
        # a quarter of HiFiC's widths: from the same stage 3, 0.240 bpp / 18.48 dB held out
        # against 18.49 with HiFiC's, at 0.65 instead of 1.21 s per step on 2 CPU cores
        "discriminator_filters": (16, 32, 64, 128),
      },
      "sodec": dict(fix),
    }
  )
  return c

"""Stage 2: diffusion path warm-up (paper Eq. 8-9).

E, H_a, P are frozen (stop-gradient on y_hat and z_hat); H_s, T_s, D_a, F_p train fully and the
UNet through LoRA only; the extractor F and the VAE decoder D_m are frozen. Loss: d(x, x_hat)
only (no rate, no alignment). Start from a stage-1 workdir:
  python -m sodec_jax.train --config configs/stage2.py --workdir runs/stage2 \\
      --config.init_from=runs/stage1 --config.diffusion.weights=/weights/sd21 \\
      --config.guidance.extractor_weights=/weights/vit --config.lpips.vgg_weights=/weights/vgg16.pth
"""

from configs import stage1

DIFFUSION_PATH = (
  "hyper_synthesis/.*",
  "transform/.*",
  "guidance_projection/.*",
  r"unet/.*/lora/lora_[ab]",
)


def apply(c):
  """Turns any config into its stage-2 form (used by the tiny pipeline too)."""
  c.name = f"{c.name.split('/')[0]}/stage2"
  c.stage = 2
  c.decoder = "diffusion"
  c.sodec.stop_gradient_latents = True
  c.train.trainable = ("codec/fidelity_decoder/.*",) + DIFFUSION_PATH
  c.loss.rate_mode = "none"
  c.loss.alignment = "none"
  c.loss.beta = 0.0
  c.optim.learning_rate = 5e-5  # OSEDiff / OSCAR
  c.data.crop_size = 512  # the paper: "random 512x512 patches" (64x64 latents, as at test)
  c.data.batch_size = 2  # the paper's batch size
  return c


def get_config():
  return apply(stage1.get_config())

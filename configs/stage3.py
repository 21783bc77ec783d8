"""Stage 3: joint training with rate annealing (paper Eq. 10-11).

Everything but F, D_m and the UNet's base weights trains (UNet through LoRA); the rate weight
is annealed from the stage-1 value up to the final, larger lambda; alignment alpha * MSE(x, x_f)
keeps D_a faithful. Start from the stage-2 workdir (--config.init_from=runs/stage2).
"""

from configs import stage2


def apply(c):
  stage2.apply(c)
  c.name = f"{c.name.split('/')[0]}/stage3"
  c.stage = 3
  c.sodec.stop_gradient_latents = False
  c.train.trainable = ("codec/.*",) + stage2.DIFFUSION_PATH
  c.loss.rate_mode = "anneal"
  c.loss.anneal.start = c.loss.lambda_A  # from the stage-1 weight ...
  c.loss.anneal.end = 4.0 * c.loss.lambda_A  # ... up to a larger one (lower bitrate)
  c.loss.alignment = "mse"
  c.loss.alpha = 1.0
  return c


def get_config():
  return apply(stage2.get_config())

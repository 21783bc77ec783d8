"""Stage 3: joint training with rate annealing (paper Eq. 10-11).

Everything but F, D_m and the UNet's base weights trains (UNet through LoRA); the rate weight
is annealed from the stage-1 value up to the final, larger lambda; alignment alpha * MSE(x, x_f)
keeps D_a faithful. Start from the stage-2 workdir (--config.init_from=runs/stage2).

The final rate: `loss.anneal.target_rate` (bpp, default 0.03, Table 1's 0.031) steers the anneal
with HiFiC's target-rate rule (losses.targeted_lambda); `--config.loss.anneal.target_rate=0.045`
or configs/paper.py:0.045 picks another operating point. Crop 512 and batch 2 (stage2.apply).
"""

from configs import stage2

DEFAULT_TARGET_BPP = 0.03  # Table 1's model sits at 0.031 bpp


def stage1_final_lambda(c) -> float:
  """lambda_A times HiFiC's lambda multiplier at stage 1's last step (c: the stage-1 config, whose
  train.num_steps and loss.lambda_schedule_* say which phase stage 1 ended in)."""
  last = c.train.num_steps - 1
  phase = sum(last >= s for s in c.loss.lambda_schedule_steps)
  return float(c.loss.lambda_A * c.loss.lambda_schedule_values[phase])


def apply(c):
  """Turns a stage-1 config (before its stage-2 form) into its stage-3 form."""
  stage2.apply(c)
  c.name = f"{c.name.split('/')[0]}/stage3"
  c.stage = 3
  c.sodec.stop_gradient_latents = False
  c.train.trainable = ("codec/.*",) + stage2.DIFFUSION_PATH
  c.loss.rate_mode = "anneal"
  c.loss.anneal.start = stage1_final_lambda(c)  # from the weight stage 1 ended at ...
  c.loss.anneal.end = 4.0 * c.loss.anneal.start  # ... up to a larger one (lower bitrate)
  c.loss.alignment = "mse"
  c.loss.alpha = 1.0
  return c


def get_config():
  c = apply(stage2.get_config())
  c.loss.anneal.target_rate = DEFAULT_TARGET_BPP  # apply() keeps the one given (paper.py, tiny)
  return c

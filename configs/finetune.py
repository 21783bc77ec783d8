"""Stage 4: the final GAN finetune (paper Eq. 12): stage 3 plus beta * L_g with HiFiC's
conditional discriminator (conditioned on y_hat), trained in alternation with the generator.
Start from the stage-3 workdir (--config.init_from=runs/stage3).

The balance. beta = 0.15 is HiFiC's GAN weight for HiFiC's own distortion
d = k_M * MSE(0..255) + k_P * LPIPS with k_M = 0.075 * 2^-5, k_P = 1, which this config keeps
(configs/base.py), so HiFiC's balance carries over unchanged at paper size. What we add is the
start: the discriminator begins from random weights while the generator is already trained, so
for its first steps L_g's gradient is noise (and, once D separates real from fake, large). The
generator therefore does not see L_g for `gan_warmup_steps` (D trains alone on the stage-3
outputs), and beta then rises linearly over `gan_ramp_steps`. A config without LPIPS (the tiny
default) must lower beta itself: see configs/tiny.py for the measured value.
"""
from configs import stage3


def apply(c):
  stage3.apply(c)
  c.name = f"{c.name.split('/')[0]}/finetune"
  c.stage = 4
  c.loss.anneal.start = c.loss.anneal.end             # the final rate weight throughout
  c.loss.anneal.shape = "none"
  c.loss.beta = 0.15                                  # HiFiC's GAN weight (with HiFiC's k_M, k_P)
  c.loss.gan_warmup_steps = 1_000                     # discriminator-only steps first (our choice)
  c.loss.gan_ramp_steps = 4_000                       # then beta rises linearly (our choice)
  return c


def get_config():
  return apply(stage3.get_config())

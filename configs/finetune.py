"""Stage 4: the final GAN finetune (paper Eq. 12): stage 3 plus beta * L_g with HiFiC's
conditional discriminator (conditioned on y_hat), trained in alternation with the generator.
Start from the stage-3 workdir (--config.init_from=runs/stage3)."""
from configs import stage3


def apply(c):
  stage3.apply(c)
  c.name = f"{c.name.split('/')[0]}/finetune"
  c.stage = 4
  c.loss.anneal.start = c.loss.anneal.end             # the final rate weight throughout
  c.loss.anneal.shape = "none"
  c.loss.beta = 0.15                                  # HiFiC's GAN weight
  return c


def get_config():
  return apply(stage3.get_config())

"""Table 2 (iii): semantic guidance from the hyperprior z_hat, as DiffEIC."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/guidance_hyperprior"
  c.guidance.mode = "hyperprior"
  return c

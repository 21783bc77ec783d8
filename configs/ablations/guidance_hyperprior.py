"""Table 2 (iii): semantic guidance from the hyperprior z_hat, as DiffEIC. Its own stage 2 trains
its F_p (z_hat's N channels -> D, not the extractor's width) from the 50K stage 1, which holds no
F_p, so init_from copies nothing of another guidance's projection."""

from configs import ablations


def get_config():
  c = ablations.row("guidance_hyperprior", 2)
  c.guidance.mode = "hyperprior"
  return c

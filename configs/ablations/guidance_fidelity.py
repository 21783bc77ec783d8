"""Table 2 (iv): the paper's fidelity guidance F_p(F(D_a(y_hat))), stage 2 -> stage 3 from the
50K stage 1 (configs/ablations/__init__.py)."""

from configs import ablations


def get_config():
  c = ablations.row("guidance_fidelity", 2)
  c.guidance.mode = "fidelity"
  return c

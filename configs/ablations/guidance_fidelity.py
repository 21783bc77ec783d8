"""Table 2 (iv): the paper's fidelity guidance F_p(F(D_a(y_hat))) (= configs/stage3.py)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/guidance_fidelity"
  c.guidance.mode = "fidelity"
  return c

"""Table 3 (iv): the paper's MSE-only alignment loss (= configs/stage3.py)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/alignment_mse"
  c.loss.alignment = "mse"
  return c

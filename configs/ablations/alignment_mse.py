"""Table 3 (iv): the paper's MSE-only alignment loss (= configs/stage3.py's)."""

from configs import ablations


def get_config():
  return ablations.row("alignment_mse", 3, {"loss": {"alignment": "mse"}})

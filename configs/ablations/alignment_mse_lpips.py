"""Table 3 (ii): alignment loss k_M * MSE + k_P * LPIPS between x and x_f."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/alignment_mse_lpips"
  c.loss.alignment = "mse+lpips"
  return c

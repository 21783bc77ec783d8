"""Table 3 (ii): alignment loss k_M * MSE + k_P * LPIPS between x and x_f, weighted alpha."""

from configs import ablations


def get_config():
  return ablations.row("alignment_mse_lpips", 3, {"loss": {"alignment": "mse+lpips"}})

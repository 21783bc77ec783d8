"""Table 4 (iv): the paper's high-to-low bpp rate annealing (= configs/stage3.py's), to 0.06."""

from configs import ablations


def get_config():
  return ablations.row("strategy_rate_annealing", 4)

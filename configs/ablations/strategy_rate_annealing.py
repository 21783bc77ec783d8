"""Table 4 (iv): the paper's high-to-low bpp rate annealing (= configs/stage3.py)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/strategy_rate_annealing"
  return c

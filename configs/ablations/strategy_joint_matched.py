"""Table 4 (ii): joint training without annealing: the final rate weight from the first step
(tune --config.loss.anneal.end so the final bpp matches the annealed run's)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/strategy_joint_matched"
  c.loss.anneal.shape = "none"
  return c

"""Table 4 (iii): a low-to-high bpp curriculum: the rate penalty is progressively relaxed
(lambda goes from the large final value down to the stage-1 value)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/strategy_low_to_high"
  c.loss.anneal.start, c.loss.anneal.end = c.loss.anneal.end, c.loss.anneal.start
  return c

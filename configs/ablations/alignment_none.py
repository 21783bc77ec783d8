"""Table 3 (i): no alignment loss: D_a gets no direct supervision in stage 3."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/alignment_none"
  c.loss.alignment = "none"
  return c

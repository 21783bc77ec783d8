"""Table 3 (iii): no separate L_align; d(x, x_f) merged into the main distortion term."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/alignment_merged"
  c.loss.alignment = "merged"
  c.loss.alpha = 1.0
  return c

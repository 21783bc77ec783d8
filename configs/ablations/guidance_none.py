"""Table 2 (i): no explicit guidance: one learned context for every image (stage 3)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/guidance_none"
  c.guidance.mode = "none"
  return c

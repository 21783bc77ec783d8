"""Table 2 (i): no explicit guidance: one learned context for every image (stages 2 and 3)."""

from configs import ablations


def get_config():
  c = ablations.row("guidance_none", 2)
  c.guidance.mode = "none"
  return c

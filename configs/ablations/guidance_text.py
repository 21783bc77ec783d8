"""Table 2 (ii): text-prompt guidance as PerCo: a fixed prompt embedding [77, 1024] given as a
.npy file (--config.guidance.text_embedding=prompt.npy, e.g. the SD 2.1 text encoder's output)."""

from configs import stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/guidance_text"
  c.guidance.mode = "text"
  return c

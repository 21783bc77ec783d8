"""Table 2 (ii): text-prompt guidance as PerCo: a fixed prompt embedding [77, 1024] given as a
.npy file (--config.guidance.text_embedding=prompt.npy, e.g. the SD 2.1 text encoder's output),
in stages 2 and 3."""

from configs import ablations


def get_config():
  c = ablations.row("guidance_text", 2)
  c.guidance.mode = "text"
  return c

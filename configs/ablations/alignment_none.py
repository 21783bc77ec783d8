"""Table 3 (i): no alignment loss: D_a gets no direct supervision in stage 3."""

from configs import ablations


def get_config():
  return ablations.row("alignment_none", 3, {"loss": {"alignment": "none"}})

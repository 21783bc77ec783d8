"""Table 3 (iii): no separate L_align; the main distortion taken over x_hat and x_f together
(losses.merged_distortion quotes the paper and gives the reading)."""

from configs import ablations


def get_config():
  return ablations.row("alignment_merged", 3, {"loss": {"alignment": "merged"}})

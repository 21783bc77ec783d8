"""Table 4 (ii): joint training without annealing, "we manually tune the Lagrange multiplier
lambda to ensure the final bitrate is close to the original values": the final weight from the
first step, with the rate target at stage 1's rate (configs/stage1.py) instead of a hand-tuned
lambda."""

from configs import ablations, stage1


def get_config():
  return ablations.row(
    "strategy_joint_matched",
    4,
    {"loss": {"anneal": {"shape": "none", "target_rate": stage1.STAGE1_TARGET_BPP}}},
  )

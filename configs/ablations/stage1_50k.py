"""The ablations' shared stage 1: configs/stage1.py in the paper's 50K ablation steps (HiFiC's
schedule and the lr decay scaled; configs/ablations/__init__.py)."""

from configs import ablations


def get_config():
  return ablations.short_stage1()

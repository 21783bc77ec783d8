"""Stage 1: high-bitrate HiFiC pre-training of E, H_a, P, D_a (paper Eq. 2).

The paper pre-trains at a *higher* bitrate than the final target (smaller rate weight); the
target rate here is HiFiC's 0.30 bpp setting with lambda_A = 1.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "stage1"
  c.stage = 1
  c.loss.target_rate = 0.30
  c.loss.lambda_A = 1.0
  return c

"""Stage 1: high-bitrate HiFiC pre-training of E, H_a, P, D_a (paper Eq. 2).

The paper pre-trains at a *higher* bitrate than the final target (a smaller rate weight); its
stage-1 rate is about 0.07 bpp (Table 4 (i), the frozen VAE: 0.0695 bpp). HiFiC's
target-rate switching steers there: target 0.07 bpp (x 0.20/0.14 for the first 50k steps, as
HiFiC), lambda_A = 4 (HiFiC's settings double lambda_A for each halving of the target: 0.45 ->
2^-1, 0.30 -> 2^0, 0.14 -> 2^1; 0.07 -> 2^2, our extrapolation), lambda_B = 2^-4 (HiFiC).

Crop 256 (base.py), batch 8: the paper hands stage 1 to HiFiC ("This pre-training phase is
conducted on the HiFiC") and HiFiC trains on 256x256 crops; the codec is fully convolutional,
so the crop changes what one step sees, not the model. Stages 2-4 train on the paper's 512.
"""

from configs import base

STAGE1_TARGET_BPP = 0.07  # paper Table 4 (i): 0.0695
STAGE1_LAMBDA_A = 4.0


def get_config():
  c = base.get_config()
  c.name = "stage1"
  c.stage = 1
  c.loss.target_rate = STAGE1_TARGET_BPP
  c.loss.lambda_A = STAGE1_LAMBDA_A
  return c

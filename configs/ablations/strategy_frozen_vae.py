"""Table 4 (i): the whole VAE compression module (E, H_a, P) stays frozen in stage 3: no rate
term can act, so the bitrate stays at the stage-1 (high) value."""

from configs import stage2, stage3


def get_config():
  c = stage3.get_config()
  c.name = "ablation/strategy_frozen_vae"
  c.sodec.stop_gradient_latents = True
  c.train.trainable = ("codec/fidelity_decoder/.*",) + stage2.DIFFUSION_PATH
  c.loss.rate_mode = "none"
  return c

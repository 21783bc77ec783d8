"""Table 4 (i): the whole VAE compression module (E, H_a, P) stays frozen in stage 3: no rate
term can act, so the bitrate stays at the stage-1 (high) value."""

from configs import ablations, stage2


def get_config():
  return ablations.row(
    "strategy_frozen_vae",
    4,
    {
      "sodec": {"stop_gradient_latents": True},
      "train": {"trainable": ("codec/fidelity_decoder/.*",) + stage2.DIFFUSION_PATH},
      "loss": {"rate_mode": "none"},
    },
  )

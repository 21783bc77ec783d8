"""Tiny default: the same codec family with small widths, trained on the photos bundled with
scikit-image. Trains in a few minutes on 2 CPU cores; MSE only (no VGG16 weights offline)."""
from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  c.stage = 1
  c.model.latent_channels = 32
  c.model.encoder_filters = (8, 16, 24, 32, 48)
  c.model.hyper_channels = 24
  c.model.decoder_filters = (48, 32, 24, 16, 8)
  c.model.decoder_residual_blocks = 2
  c.data.crop_size = 128
  c.data.batch_size = 4
  c.loss.k_P = 0.0                                   # MSE only: LPIPS needs VGG16 weights
  c.loss.k_M = 0.075 * 2 ** -5
  c.loss.target_rate = 0.5
  c.loss.lambda_A = 1.0
  c.loss.lambda_B = 2.0 ** -4
  c.loss.lambda_schedule_steps = (10_000,)
  c.loss.target_schedule_steps = (10_000,)
  c.optim.learning_rate = 1e-3
  c.optim.lr_decay_steps = (10_000,)
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  return c

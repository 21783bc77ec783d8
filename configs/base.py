"""Paper-size defaults shared by every experiment (HiFiC codec at C=220, N=320).

Each experiment file (stage1.py, tiny.py, ...) starts from `get_config()` here and changes
only what differs. Any field can be overridden on the command line:
    python -m sodec_jax.train --config configs/stage1.py --config.optim.learning_rate=5e-5
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.stage = 1
  c.seed = 0

  # --- the HiFiC-style codec: E, H_a, P, D_a ------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.latent_channels = 220                      # C: channels of y (H/16 x W/16)
  c.model.encoder_filters = (60, 120, 240, 480, 960)  # E: 7x7 conv, then 4 stride-2 3x3 convs
  c.model.hyper_channels = 320                       # N: channels of z (H/64 x W/64)
  c.model.decoder_filters = (960, 480, 240, 120, 60)  # D_a: residual width, then 4 stride-2 transposed convs
  c.model.decoder_residual_blocks = 9
  c.model.channel_norm_eps = 1e-3
  c.model.factorized_filters = (3, 3, 3)             # density model of z
  c.model.factorized_init_scale = 10.0
  c.model.scale_lower_bound = 0.11
  c.model.likelihood_bound = 1e-9
  c.model.dtype = "float32"                          # compute dtype of the conv stacks
  c.model.param_dtype = "float32"

  # --- entropy coding (range coder tables) ----------------------------------------------------
  c.entropy = ml_collections.ConfigDict()
  c.entropy.scale_min = 0.11
  c.entropy.scale_max = 256.0
  c.entropy.scale_levels = 64                        # log-spaced scale table
  c.entropy.tail_mass = 1e-9                         # support of each coded pmf
  c.entropy.max_pixels = 1 << 28                     # largest image a .sodec file may claim

  # --- data -----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.train_dir = ""                              # "" = the photos bundled with scikit-image
  c.data.crop_size = 256
  c.data.batch_size = 8                              # global batch
  c.data.hflip = True
  c.data.worker_count = 0                            # grain worker processes (0 = threads)
  c.data.cache_mb = 1024                             # keep decoded images in RAM if they fit

  # --- loss: lambda * r + k_M * MSE(0..255) + k_P * LPIPS (HiFiC defaults) --------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.k_M = 0.075 * 2 ** -5
  c.loss.k_P = 1.0
  c.loss.lambda_A = 2.0 ** 1                          # rate weight while bpp > target
  c.loss.lambda_B = 2.0 ** -4                         # rate weight while bpp <= target
  c.loss.target_rate = 0.14                          # bpp
  c.loss.lambda_schedule_values = (2.0, 1.0)          # multiplier on lambda_A / lambda_B
  c.loss.lambda_schedule_steps = (50_000,)
  c.loss.target_schedule_values = (0.20 / 0.14, 1.0)  # multiplier on the target rate
  c.loss.target_schedule_steps = (50_000,)

  # LPIPS needs ImageNet VGG16 weights from a local file (torchvision layout, .pth or .safetensors).
  c.lpips = ml_collections.ConfigDict()
  c.lpips.vgg_weights = ""

  # --- optimisation -----------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 0.0                       # 0 = off
  c.optim.lr_decay_steps = (500_000,)                # lr x lr_decay_factor at each
  c.optim.lr_decay_factor = 0.1

  # --- the loop -----------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.keep_checkpoints = 3
  c.train.progress = True
  c.train.max_nonfinite_steps = 3                    # stop after this many in a row
  c.train.allow_config_change = False                # resume a workdir with a different config
  return c

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
  # Compute precision of the reconstruction path (D_a, H_s, T_s, UNet, D_m, F, F_p, LPIPS):
  # "auto" = bf16 on GPU/TPU, fp32 on the CPU; "fp32" | "bf16" to choose. Parameters, optimizer
  # state, norms, softmax and losses stay float32, and the entropy path (E, H_a, P) is never
  # affected (sodec_jax/precision.py).
  c.precision = "auto"

  # Training memory (sodec_jax/remat.py; docs/ARCHITECTURE.md "Memory"): the parts whose blocks
  # are rematerialised in the backward pass (their activations recomputed instead of kept; the
  # values do not change): any of "unet" (resnets, transformers), "vae_decoder" (D_m's mid and up
  # blocks' resnets, attention, upsamplers), "extractor" (F: each ViT layer / Swin block),
  # "fidelity_decoder" (D_a: residual blocks, up stages), "lpips" (each VGG stage); () = off.
  # remat_policy: "nothing" (keep block inputs only: fewest bytes) | "dots" (keep matmul outputs
  # too: less recomputation). `python -m sodec_jax.bench --what memory` measures a config.
  c.memory = ml_collections.ConfigDict()
  c.memory.remat = ()
  c.memory.remat_policy = "nothing"

  # --- the HiFiC-style codec: E, H_a, P, D_a ------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.latent_channels = 220  # C: channels of y (H/16 x W/16)
  c.model.encoder_filters = (60, 120, 240, 480, 960)  # E: 7x7 conv, then 4 stride-2 3x3 convs
  c.model.hyper_channels = 320  # N: channels of z (H/64 x W/64)
  c.model.decoder_filters = (
    960,
    480,
    240,
    120,
    60,
  )  # D_a: residual width, then 4 stride-2 transposed convs
  c.model.decoder_residual_blocks = 9
  c.model.channel_norm_eps = 1e-3
  c.model.factorized_filters = (3, 3, 3)  # density model of z
  c.model.factorized_init_scale = 10.0
  c.model.scale_lower_bound = 0.11
  c.model.likelihood_bound = 1e-9
  # HiFiC's flag: False = E sees x in [0, 1] and D_a's raw output is the image (HiFiC's default);
  # True = E sees 2x - 1 and the image is (tanh(D_a) + 1) / 2 (the tiny default: codec/hific.py)
  c.model.normalize_input_image = False
  # Construction dtypes of the codec's conv stacks: E, H_a, P keep model.dtype whatever the
  # precision (keep float32: the files depend on it); D_a follows `precision` at run time.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  # Optional, absent here (= native): model.padding ("sodec" | "hific", codec/padding.py) and
  # model.factorized_last_gate; `convert/from_torch.py hific` sets them for HiFiC checkpoints.

  # --- which decoder x_hat comes from: "codec" (D_a, stage 1) or "diffusion" (SODEC) ---------
  c.decoder = "codec"

  # --- SODEC's one-step diffusion decoder (stages 2-4) ---------------------------------------
  c.sodec = ml_collections.ConfigDict()
  c.sodec.hyper_synthesis_channels = 320  # H_s: z_hat -> w at H/16 (our choice)
  c.sodec.transform_channels = 256  # T_s width (our choice)
  c.sodec.transform_blocks = 3  # T_s residual blocks (our choice)
  # T_s's 2x up: "transposed" (stride-2 3x3 transposed conv), "transposed4" (4x4: no 16 px
  # plaid in the tiny default's decodes), "transposed4_blur" (4x4 + a fixed binomial blur: no
  # 16 px stripes either) or "resize" (nearest 2x + conv3: no plaid, slower to learn);
  # sodec_jax/model.py Transform, docs/ARCHITECTURE.md "Choices"
  c.sodec.transform_upsample = "transposed"
  c.sodec.timestep = 999  # the one step (paper)
  c.sodec.stop_gradient_latents = False  # stage 2: sg on y_hat and z_hat (Eq. 8)
  # the z H_s and the hyperprior guidance see in training: "noisy" (z + U(-1/2, 1/2), as P sees it,
  # HiFiC) or "round" (straight-through round(z), what they see at test); docs/ARCHITECTURE.md
  c.sodec.diffusion_z = "noisy"
  # at decode: correct x_hat's colours against x_f = D_a(y_hat): "none" (the paper), "wavelet"
  # (x_hat's high + x_f's low frequencies, `color_fix_levels` levels) or "adain" (channel mean
  # and std), as the one-step restorers StableSR and OSEDiff do against their input;
  # sodec_jax/color_fix.py, docs/ARCHITECTURE.md "Choices"
  c.sodec.color_fix = "none"
  c.sodec.color_fix_levels = 5
  # the training forward corrects x_hat as decoding does, so the distortion loss sees the decode
  c.sodec.color_fix_in_training = False

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.unet = "sd21"  # "sd21" | "tiny" | a diffusers config.json
  c.diffusion.vae = "sd21"
  c.diffusion.weights = ""  # convert/from_torch.py sd21 output, or a diffusers folder
  c.diffusion.prediction_type = "epsilon"  # SD 2.1-base: epsilon; SD 2.1 (768): v_prediction
  c.diffusion.dtype = "float32"  # storage dtype of loaded UNet / VAE / extractor weights
  c.diffusion.tiny_latent_channels = 4  # only for unet/vae "tiny" (sodec_jax.pretrained)
  c.diffusion.remat = False  # older spelling of "unet" in memory.remat (kept: True adds it)
  c.diffusion.lora_rank = 16  # OSCAR's rank
  c.diffusion.lora_alpha = 16.0
  c.diffusion.lora_targets = ("to_q", "to_k", "to_v", "to_out")

  c.guidance = ml_collections.ConfigDict()
  c.guidance.mode = "fidelity"  # fidelity | hyperprior | text | none (Table 2)
  c.guidance.extractor = "vit"  # vit | swin
  c.guidance.extractor_weights = ""  # a transformers ViT/Swin folder
  c.guidance.extractor_config = ""  # "tiny": a small random ViT (tiny default only)
  c.guidance.tokens = 77  # L (paper); D = the UNet's cross-attention width
  c.guidance.text_embedding = ""  # text mode: a [77, D] .npy prompt embedding

  # --- entropy coding (range coder tables) ----------------------------------------------------
  c.entropy = ml_collections.ConfigDict()
  c.entropy.scale_min = 0.11
  c.entropy.scale_max = 256.0
  c.entropy.scale_levels = 64  # log-spaced scale table
  c.entropy.tail_mass = 1e-9  # support of each coded pmf
  c.entropy.max_pixels = 1 << 28  # largest image a .sodec file may claim

  # --- data -----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.train_dir = ""  # "" = the photos bundled with scikit-image
  c.data.crop_size = 256  # stage 1 (HiFiC's own crop); stages 2-4 use the paper's 512
  c.data.batch_size = 8  # global batch
  c.data.hflip = True
  c.data.channel_shuffle = False  # each crop's R, G, B in a random order (data.random_crop)
  c.data.scale = (1.0, 1.0)  # each photo resized by a factor in [low, high] before the crop
  # grain worker processes decoding and cropping in parallel (0 = 2 threads in this process);
  # `python -m sodec_jax.bench --what data --config ...` says whether the loader keeps up
  c.data.worker_count = 0
  c.data.prefetch = 2  # batches on their way to the devices ahead of the step (train/feed.py)
  c.data.cache_mb = 1024  # keep decoded images in RAM if they fit
  c.data.holdout = ()  # file names (no extension) kept out of training
  c.data.exclude = ()  # file names (no extension) left out of training, not validated on

  # --- loss: lambda * r + k_M * MSE(0..255) + k_P * LPIPS (HiFiC defaults) --------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.k_M = 0.075 * 2**-5
  c.loss.k_P = 1.0
  c.loss.lambda_A = 2.0**1  # rate weight while bpp > target
  c.loss.lambda_B = 2.0**-4  # rate weight while bpp <= target
  c.loss.target_rate = 0.14  # bpp
  c.loss.lambda_schedule_values = (2.0, 1.0)  # multiplier on lambda_A / lambda_B
  c.loss.lambda_schedule_steps = (50_000,)
  c.loss.target_schedule_values = (0.20 / 0.14, 1.0)  # multiplier on the target rate
  c.loss.target_schedule_steps = (50_000,)

  # How the rate enters the loss: "hific" (stage 1: lambda_A/lambda_B switching around the
  # target), "anneal" (stage 3+: lambda(t) from anneal.start to anneal.end), "none" (stage 2).
  c.loss.rate_mode = "hific"
  c.loss.anneal = ml_collections.ConfigDict()
  c.loss.anneal.start = 2.0  # the stage-1 rate weight (lambda_A)
  c.loss.anneal.end = 8.0  # the larger target weight (low bitrate)
  c.loss.anneal.steps = 20_000  # steps to go from start to end
  c.loss.anneal.shape = "linear"  # linear | cosine | step | none (end at once)
  # Final rate (bpp) the anneal steers to; 0 = off. When > 0, HiFiC's target-rate rule on top of
  # lambda(t): lambda(t) while the (noisy, training-mode) batch bpp is above it, lambda(t) *
  # lambda_B / lambda_A at or below (losses.targeted_lambda). configs/paper.py:BPP sets it.
  c.loss.anneal.target_rate = 0.0
  # How the target is reached (losses.targeted_lambda): "switch" is HiFiC's rule above; "dual"
  # multiplies lambda(t) by m, set every step by a PI controller on log lambda
  # (losses.rate_control): e = log r - log target, log m = integral + proportional_gain * e,
  # integral += integral_gain * e (both within +-max_log). r is the mean bpp of the calibration
  # photos' .sodec files (`photos`, kept out of training; with crop 0 each whole photo padded as
  # the coder pads it, its coded bits plus the header over its own pixels; else their central
  # `crop` squares), or the coded rate of the training batch when `photos` is empty. The
  # integral carries over from stage to stage and across resumes (checkpoint meta
  # "rate_control_integral"). Name photos like the ones you will code.
  c.loss.rate_control = ml_collections.ConfigDict()
  c.loss.rate_control.mode = "switch"  # switch | dual
  c.loss.rate_control.photos = ()  # file names (no extension) in data.train_dir
  c.loss.rate_control.crop = 0  # whole photos (edges to a multiple of 64)
  c.loss.rate_control.integral_gain = 0.05  # tuned on the tiny pipeline (docs/EXPERIMENTS.md)
  c.loss.rate_control.proportional_gain = 5.0
  c.loss.rate_control.max_log = 4.0
  # Alignment loss alpha * L_align(x, x_f) (Eq. 10), Table 3; "merged" takes no separate term but
  # the distortion over x_hat and x_f as one batch (losses.merged_distortion says why).
  c.loss.alignment = "none"  # none | mse | mse+lpips | merged
  c.loss.alpha = 1.0
  c.loss.beta = 0.0  # GAN weight (stage 4: HiFiC's 0.15)
  c.loss.disc_learning_rate = 1e-4
  c.loss.gan_warmup_steps = 0  # stage 4: discriminator-only steps first
  c.loss.gan_ramp_steps = 0  # then beta rises linearly over these
  c.loss.discriminator_init = ""  # stage 4: a `convert/from_torch.py hific` folder's discriminator
  # widths of its four spectral-norm convs (HiFiC's; a discriminator_init folder brings its own)
  c.loss.discriminator_filters = (64, 128, 256, 512)

  # The LPIPS trunk of the loss: "vgg" (ours by default) or "alex" (HiFiC's default, and the
  # LPIPS of most compression papers' tables). Either needs its ImageNet weights from a local file
  # (torchvision layout, .pth or .safetensors): lpips.vgg_weights / lpips.alexnet_weights.
  c.loss.lpips_net = "vgg"
  c.lpips = ml_collections.ConfigDict()
  c.lpips.vgg_weights = ""
  c.lpips.alexnet_weights = ""

  # --- optimisation -----------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 0.0  # 0 = off
  c.optim.lr_decay_steps = (500_000,)  # lr x lr_decay_factor at each
  c.optim.lr_decay_factor = 0.1
  # > 0: checkpoints, validation and samples use the exponential moving average of the trained
  # weights at this decay (train/step.py); 0 = the weights as trained (HiFiC and the paper: none)
  c.optim.ema_decay = 0.0

  # --- the loop -----------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.keep_checkpoints = 3
  c.train.progress = True
  c.train.max_nonfinite_steps = 3  # stop after this many in a row
  c.train.sample_every = 0  # WORKDIR/samples/step_<n>.png (0 = off)
  # Held-out validation and the guard (sodec_jax/train/guard.py): every validate_every steps
  # (0 = off), at a stage's start and end, data.holdout's photos centre-cropped to validate_size
  # go through real .sodec files -> val_psnr / val_bpp / val_ms_ssim rows in metrics.jsonl; the
  # latest step within guard_db of the stage's start is kept and written to best.json (what
  # --checkpoint and init_from load).
  c.train.validate_every = 0
  c.train.validate_size = 256  # crop side (MS-SSIM needs >= 161)
  c.train.guard_db = 3.0  # drop (dB) below the stage start reported (and not taken as output)
  c.train.guard_action = "continue"  # continue | stop (SodecError naming the stage)
  c.train.fsdp = 1  # >1: shard params + optimizer state over that many devices
  c.train.allow_config_change = False  # resume a workdir with a different config
  # Which parameters train: regexes over '/'-joined nnx paths of the model's nnx.Params (the
  # stage table of DESIGN.md is data here). Everything else is frozen and not in the optimizer.
  c.train.trainable = ("codec/.*",)

  # Multi-host training: jax.distributed.initialize(coordinator_address, num_processes,
  # process_id); "" = from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  # JAX_PROCESS_ID), and one process when that is unset too.
  c.distributed = ml_collections.ConfigDict(
    {"coordinator_address": "", "num_processes": 0, "process_id": -1}
  )

  # Start from earlier stages: comma-separated workdirs whose params are copied where the path
  # and shape match (later dirs win). The frozen SD/extractor weights come from their own paths.
  c.init_from = ""

  # The tiny default's latent-space pretraining (stage 0) and multi-stage pipeline; empty here.
  # chroma_weight: extra weight on the chroma error (each pixel minus its RGB mean) in stage 0
  c.pretrain = ml_collections.ConfigDict({"kl_weight": 1e-4, "chroma_weight": 0.0})
  # summary: at the end, each coding stage on data.holdout (full size, real files) ->
  # a printed table, WORKDIR/summary.json and WORKDIR/summary.png (train/pipeline.py summary)
  # first_index: the number of the first stage's folder (WORKDIR/<i>_<stage>/)
  c.pipeline = ml_collections.ConfigDict({"stages": (), "summary": True, "first_index": 0})
  return c

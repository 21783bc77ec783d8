"""SODEC assembly from the modules it is handed.

The model always holds the HiFiC-style codec (E, H_a, P, D_a: `config.decoder == "codec"`, the
stage-1 model). With `config.decoder == "diffusion"` it also holds the one-step diffusion decoder
(H_s, T_s, the SD UNet with LoRA adapters, D_m) and the guidance (F, F_p). The pretrained parts
(UNet, VAE, extractor F) are built or loaded elsewhere and handed in:
`sodec_jax.pretrained.build_model(config, rngs)` does both.

Training forward (CompressAI convention):
  out = model(x, noise_key=key, train=True)
  x [B, H, W, 3] float32 in [0, 1], H and W multiples of 64
  out["x_hat"]        [B, H, W, 3]   the reconstruction the loss sees (stage 1: x_f)
  out["x_f"]          [B, H, W, 3]   D_a(y_hat), not clamped
  out["y_hat"]        [B, H/16, W/16, C]  round(y - mu) + mu (straight-through when training)
  out["z_hat"]        [B, H/64, W/64, N]  round(z); z + U(-1/2, 1/2) when training (HiFiC)
                      (what P sees; with config.sodec.diffusion_z = "round", H_s and the
                      hyperprior guidance see the straight-through round(z) instead)
  out["likelihoods"]  {"y": like y_hat, "z": like z_hat}, floored at model.likelihood_bound
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.codec.entropy import (
  add_uniform_noise,
  gaussian_likelihood,
  quantize_around,
  ste_round,
)
from sodec_jax.codec.hific import Codec
from sodec_jax.codec.padding import pad_latent
from sodec_jax.color_fix import DEFAULT_LEVELS, color_fix, wavelet_blur
from sodec_jax.color_fix import check_kind as check_color_fix
from sodec_jax.diffusion.lora import LoRAConfig, apply_lora
from sodec_jax.diffusion.schedule import NoiseSchedule
from sodec_jax.errors import SodecError
from sodec_jax.guidance.projection import GuidanceProjection
from sodec_jax.layers import ChannelNorm, Conv2d, ConvTranspose2d, ResidualBlock

#: Spatial factor every input side must be a multiple of (z lives at H/64).
PAD_MULTIPLE = 64


class HyperSynthesis(nnx.Module):
  """H_s: global information w from the hyper-latent (paper Eq. 8). Our layers (the paper is
  silent): convT5 s2, convT5 s2, conv3, ReLU between, like P's synthesis stacks.

  z_hat [B, h, w, N] -> w [B, 4h, 4w, channels] (at the resolution of y).
  """

  def __init__(
    self,
    hyper_channels: int,
    channels: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up1 = ConvTranspose2d(
      hyper_channels, channels, 5, stride=2, padding=2, output_padding=1, **kw
    )
    self.up2 = ConvTranspose2d(channels, channels, 5, stride=2, padding=2, output_padding=1, **kw)
    self.conv = Conv2d(channels, channels, 3, padding=1, **kw)

  def __call__(self, z_hat: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.up1(z_hat))
    h = jax.nn.relu(self.up2(h))
    return self.conv(h)


class Transform(nnx.Module):
  """T_s: merges y_hat and w into the content variable y_t at H/8 (paper Eq. 4). Our layers:
  concat -> conv3 -> ChannelNorm -> residual blocks -> 2x up (ChannelNorm, ReLU) -> conv3 to
  the diffusion latent's channels. The 2x up (`upsample`, config.sodec.transform_upsample):
  "transposed" (the default, and the layer of workdirs made before the option), a stride-2 3x3
  transposed conv (`up`); "transposed4", a stride-2 4x4 transposed conv (`up`; the tiny
  default); "transposed4_blur", the same followed by a fixed [1, 2, 1] x [1, 2, 1] / 16 blur
  (no component left at the H/8 grid's Nyquist frequency, where the two output phases of a
  stride-2 up differ); or "resize", nearest-neighbour 2x then a reflect-padded conv3
  (`up_conv`). A 3x3 kernel at stride 2 covers the two output phases unevenly, and
  x0 = (y_t - sqrt(1 - abar) eps) / sqrt(abar) magnifies what the UNet does not cancel ~15x at
  t = 999: the tiny default decoded under a 16-pixel plaid (one y pixel) with "transposed"; a
  4x4 kernel covers both phases alike and learned as fast without the plaid (it still leaves
  16 px stripes, which the blur removes); "resize" has no plaid but learns much less in the
  same steps (docs/ARCHITECTURE.md, "Choices").

  y_hat [B, h, w, C], w [B, h, w, Cw] -> y_t [B, 2h, 2w, latent_channels] (64x64x4 for 512x512).
  """

  def __init__(
    self,
    latent_channels_in: int,
    w_channels: int,
    channels: int,
    blocks: int,
    out_channels: int = 4,
    *,
    upsample: str = "transposed",
    eps: float = 1e-3,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.conv_in = Conv2d(
      latent_channels_in + w_channels, channels, 3, padding=1, padding_mode="reflect", **kw
    )
    self.norm_in = ChannelNorm(channels, **norm)
    self.blocks = nnx.List([ResidualBlock(channels, eps=eps, **kw) for _ in range(blocks)])
    if upsample == "resize":
      self.up_conv = Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", **kw)
    elif upsample == "transposed":
      self.up = ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, **kw)
    elif upsample in ("transposed4", "transposed4_blur"):
      self.up = ConvTranspose2d(channels, channels, 4, stride=2, padding=1, **kw)
    else:
      raise SodecError(
        f"config.sodec.transform_upsample={upsample!r}: use 'transposed', 'transposed4', "
        "'transposed4_blur' or 'resize'"
      )
    self.upsample = upsample
    self.norm_up = ChannelNorm(channels, **norm)
    self.conv_out = Conv2d(channels, out_channels, 3, padding=1, padding_mode="reflect", **kw)

  def __call__(self, y_hat: jax.Array, w: jax.Array) -> jax.Array:
    h = self.norm_in(self.conv_in(jnp.concatenate([y_hat, w.astype(y_hat.dtype)], axis=-1)))
    for block in self.blocks:
      h = block(h)
    if self.upsample == "resize":
      h = self.up_conv(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
    else:
      h = self.up(h)
    if self.upsample == "transposed4_blur":  # no component at the H/8 grid's Nyquist frequency
      h = wavelet_blur(h, 1)
    h = jax.nn.relu(self.norm_up(h))
    return self.conv_out(h).astype(jnp.float32)


class SODEC(nnx.Module):
  """The whole model. Always: `codec` (encoder E, hyper_analysis H_a, prior P, fidelity_decoder
  D_a). With `config.decoder == "diffusion"` also: `hyper_synthesis` (H_s), `transform` (T_s),
  `unet` (eps_theta, LoRA adapters attached), `vae_decoder` (D_m: the SD VAE, decoder used),
  `guidance_extractor` (F, frozen; fidelity mode only) and `guidance_projection` (F_p).

  Args:
    config: the experiment ConfigDict.
    unet, vae: the SD UNet2DConditionModel and AutoencoderKL (diffusion configs only; LoRA is
      attached here and the VAE's encoder dropped). `sodec_jax.pretrained.build_unet/build_vae`
      make them, pretrained or random with the right shapes.
    extractor: the frozen guidance extractor F (fidelity guidance only;
      `sodec_jax.pretrained.build_extractor`).
  """

  def __init__(self, config, *, rngs: nnx.Rngs, unet=None, vae=None, extractor=None):
    self.codec = Codec(config.model, rngs=rngs)
    self.likelihood_bound = float(config.model.likelihood_bound)
    self.decoder_kind = str(config.get("decoder", "codec"))
    if self.decoder_kind not in ("codec", "diffusion"):
      raise SodecError(f"config.decoder={self.decoder_kind!r}: use 'codec' or 'diffusion'")
    if self.decoder_kind == "diffusion":
      self._build_diffusion_decoder(config, rngs, unet, vae, extractor)

  def _build_diffusion_decoder(self, config, rngs, unet, vae, extractor):
    s, d, g, m = config.sodec, config.diffusion, config.guidance, config.model
    if unet is None or vae is None:
      raise SodecError(
        "config.decoder='diffusion' needs the SD UNet and VAE: build the model "
        "with sodec_jax.pretrained.build_model(config, rngs)"
      )
    if g.mode == "fidelity" and extractor is None:
      raise SodecError(
        "config.guidance.mode='fidelity' needs the extractor F: build the model "
        "with sodec_jax.pretrained.build_model(config, rngs)"
      )
    dtype = jnp.dtype(d.dtype)
    kw = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
    apply_lora(
      unet,
      LoRAConfig(rank=int(d.lora_rank), alpha=float(d.lora_alpha), targets=tuple(d.lora_targets)),
      rngs=rngs,
    )
    vae.encoder = None  # D_m is the decoder; the encoder is not part of SODEC
    vae.quant_conv = None
    self.unet, self.vae_decoder = unet, vae
    latent = unet.config.in_channels
    self.hyper_synthesis = HyperSynthesis(m.hyper_channels, s.hyper_synthesis_channels, **kw)
    self.transform = Transform(
      m.latent_channels,
      s.hyper_synthesis_channels,
      s.transform_channels,
      s.transform_blocks,
      latent,
      # workdirs made before the option hold the transposed conv
      upsample=s.get("transform_upsample", "transposed"),
      eps=m.channel_norm_eps,
      **kw,
    )
    width = unet.config.per_block(unet.config.cross_attention_dim)[0]
    extra = {}
    if g.mode == "fidelity":
      self.guidance_extractor = extractor
      extra = dict(zip(("in_tokens", "in_features"), extractor_tokens(extractor)))
    elif g.mode == "hyperprior":
      extra = dict(in_features=m.hyper_channels)
    self.guidance_projection = GuidanceProjection(
      g.mode,
      width=width,
      tokens=g.tokens,
      text_embedding=g.text_embedding,
      dtype=dtype,
      rngs=rngs,
      **extra,
    )
    self.guidance_mode = g.mode
    self.schedule = NoiseSchedule(prediction_type=d.prediction_type)
    self.timestep = int(s.timestep)
    self.scaling_factor = float(vae.config.scaling_factor)
    self.stop_gradient_latents = bool(s.stop_gradient_latents)
    self.diffusion_z = str(s.get("diffusion_z", "noisy"))
    if self.diffusion_z not in DIFFUSION_Z:
      raise SodecError(f"config.sodec.diffusion_z={self.diffusion_z!r} is not one of {DIFFUSION_Z}")
    # workdirs made before the option decode without it
    self.color_fix = check_color_fix(str(s.get("color_fix", "none")))
    self.color_fix_levels = int(s.get("color_fix_levels", DEFAULT_LEVELS))
    self.color_fix_in_training = bool(s.get("color_fix_in_training", False))

  # ---- pieces of the coding path (each is jitted by the caller) ------------------------------
  def analysis(self, x: jax.Array, latent_multiple: int = 1) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, 3] -> (y [B, H/16, W/16, C], z [B, H/64, W/64, N]); y reflect-padded
    bottom/right to a multiple of `latent_multiple` first (codec/padding.py)."""
    y = pad_latent(self.codec.encode(x), latent_multiple)
    return y, self.codec.hyper_analysis(y)

  def prior_parameters(self, z_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z_hat -> (mu, sigma) of the conditional Gaussian of y."""
    return self.codec.prior(z_hat)

  def fidelity_reconstruction(self, y_hat: jax.Array) -> jax.Array:
    """y_hat -> x_f = D_a(y_hat) float32 [B, H, W, 3] (unclamped)."""
    return self.codec.decode(y_hat).astype(jnp.float32)

  def guidance(self, x_f: jax.Array, z_hat: jax.Array) -> jax.Array:
    """c_g [B, 77, width]: F_p(F(x_f)) in fidelity mode (see guidance/projection.py)."""
    if self.guidance_mode == "fidelity":
      f = self.guidance_extractor
      tokens = f(f.preprocess(jnp.clip(x_f, 0.0, 1.0)))
      return self.guidance_projection(tokens)
    return self.guidance_projection(z_hat)

  def content_variable(self, y_hat: jax.Array, z_hat: jax.Array) -> jax.Array:
    """y_t = T_s(y_hat, H_s(z_hat)) [B, H/8, W/8, 4]."""
    return self.transform(y_hat, self.hyper_synthesis(z_hat))

  def diffusion_reconstruction(
    self, y_hat: jax.Array, z_hat: jax.Array, x_f: jax.Array
  ) -> jax.Array:
    """The one-step decoder: y_t -> eps = UNet(y_t, t, c_g) -> x0 (Eq. 5) -> D_m(x0 / s) in [0, 1]
    (unclamped). y_hat [B, h, w, C], z_hat [B, h/4, w/4, N], x_f [B, 16h, 16w, 3]."""
    y_t = self.content_variable(y_hat, z_hat)
    c_g = self.guidance(x_f, z_hat)
    t = jnp.full((y_t.shape[0],), self.timestep, jnp.int32)
    eps = self.unet(y_t, t, c_g).astype(jnp.float32)  # x0 (Eq. 5) in float32 at any precision
    x0 = self.schedule.predict_x0(y_t, eps, t)
    image = self.vae_decoder.decode(x0 / self.scaling_factor)
    return (image.astype(jnp.float32) + 1.0) / 2.0

  def reconstruction(
    self, y_hat: jax.Array, z_hat: jax.Array, *, decode: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    """(x_hat, x_f) from the decoded latents: the whole decoder after range decoding. `decode`
    (False in the training forward, unless `sodec.color_fix_in_training`) applies
    `sodec.color_fix` to the diffusion output."""
    x_f = self.fidelity_reconstruction(y_hat)
    if self.decoder_kind == "codec":
      return x_f, x_f
    x_hat = self.diffusion_reconstruction(y_hat, z_hat, x_f)
    if decode:
      x_hat = self.fix_colors(x_hat, x_f)
    return x_hat, x_f

  def fix_colors(self, x_hat, x_f):
    """x_hat corrected against x_f as `sodec.color_fix` says (sodec_jax/color_fix.py); jax
    arrays or host numpy arrays (tiled decoding), [B, H, W, 3]."""
    return color_fix(self.color_fix, x_hat, x_f, self.color_fix_levels)

  def coded_bpp(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, 3] in [0, 1] (H, W multiples of 64) -> float32 scalar: the bits per pixel of
    the rounded latents under the model's own likelihoods, -sum(log2 p(y_hat) + log2 p(z_hat))
    / (B H W), as at test time (round(z), round(y - mu) + mu). This is the rate that x's .sodec
    file carries, apart from the header and the range coder's quantized tables and overhead
    (the dual rate controller measures the calibration photos with it)."""
    y, z = self.analysis(x)
    z_hat = jnp.round(z)
    mu, sigma = self.prior_parameters(z_hat)
    y_hat = jnp.round(y - mu) + mu
    p_y = gaussian_likelihood(y_hat, mu, sigma, self.likelihood_bound)
    p_z = self.codec.prior.hyperlatent.likelihood(z_hat, self.likelihood_bound)
    bits = -jnp.sum(jnp.log2(p_y.astype(jnp.float32))) - jnp.sum(jnp.log2(p_z.astype(jnp.float32)))
    return bits / (x.shape[0] * x.shape[1] * x.shape[2])

  # ---- training forward -------------------------------------------------------------------------
  def __call__(self, x: jax.Array, *, noise_key: jax.Array, train: bool = True) -> dict:
    y, z = self.analysis(x)
    if train:  # as HiFiC: the hyper-synthesis sees noisy z while training, round(z) otherwise
      z_noisy = add_uniform_noise(z, jax.random.fold_in(noise_key, 0))
      z_hat = z_noisy
    else:
      z_noisy = z_hat = jnp.round(z)
    mu, sigma = self.prior_parameters(z_hat)
    y_hat = quantize_around(y, mu) if train else jnp.round(y - mu) + mu
    y_rate = add_uniform_noise(y, jax.random.fold_in(noise_key, 1)) if train else y_hat
    likelihoods = {
      "y": gaussian_likelihood(y_rate, mu, sigma, self.likelihood_bound),
      "z": self.codec.prior.hyperlatent.likelihood(z_noisy, self.likelihood_bound),
    }
    if train and self.decoder_kind == "diffusion" and self.diffusion_z == "round":
      z_hat = ste_round(z)  # H_s / guidance see what they see at test (P keeps the noisy z)
    if self.decoder_kind == "diffusion" and self.stop_gradient_latents:  # stage 2 (Eq. 8)
      y_hat, z_hat = jax.lax.stop_gradient(y_hat), jax.lax.stop_gradient(z_hat)
    # sodec.color_fix_in_training: the distortion loss sees the corrected decode
    fix = self.decoder_kind == "diffusion" and self.color_fix_in_training
    x_hat, x_f = self.reconstruction(y_hat, z_hat, decode=not train or fix)
    return {"x_hat": x_hat, "x_f": x_f, "y_hat": y_hat, "z_hat": z_hat, "likelihoods": likelihoods}


DIFFUSION_Z = ("noisy", "round")  # what H_s and the hyperprior guidance see in training


def extractor_tokens(module) -> tuple[int, int]:
  """(tokens, feature width) of the extractor's last_hidden_state at its native input size."""
  size = module.spec.image_size
  graphdef, state = nnx.split(module)
  x = jax.ShapeDtypeStruct((1, size[0], size[1], 3), jnp.float32)
  out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
  return int(out.shape[1]), int(out.shape[2])

"""The HiFiC-style VAE codec: E, H_a, P and D_a (paper Fig. 2a; Mentzer et al. 2020).

Shapes for an image x [B, H, W, 3] in [0, 1], H and W multiples of 64:
  y   = encoder(x)                 [B, H/16, W/16, C]      (C = latent_channels, 220)
  z   = hyper_analysis(y)          [B, H/64, W/64, N]      (N = hyper_channels, 320)
  mu, sigma = prior(z_hat)         [B, H/16, W/16, C] each (sigma >= scale_lower_bound)
  x_f = fidelity_decoder(y_hat)    [B, H, W, 3]

Layer-for-layer the HiFiC PyTorch implementation (reflect paddings included), so its
checkpoints convert by renaming keys (see docs/ARCHITECTURE.md for the key map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.codec import padding
from sodec_jax.codec.entropy import FactorizedPrior, lower_bound
from sodec_jax.layers import ChannelNorm, Conv2d, ConvTranspose2d, ResidualBlock
from sodec_jax.remat import call, call_module

# Codec config fields a `model` section may omit, with the value absence means. They are set
# for checkpoints converted from the HiFiC PyTorch implementation (its padding, codec/padding.py,
# and its density's gate after the last layer); a fingerprint leaves them out at these values.
# normalize_input_image is upstream's flag of the same name (its default False: E sees [0, 1]).
OPTIONAL_FIELDS = {
  padding.FIELD: padding.DEFAULT,
  "factorized_last_gate": False,
  "normalize_input_image": False,
}


class Encoder(nnx.Module):
  """E: 7x7 conv, four stride-2 3x3 convs (ChannelNorm + ReLU), 3x3 conv to C channels.

  x [B, H, W, 3] -> y [B, H/16, W/16, C].
  """

  def __init__(
    self,
    latent_channels: int,
    filters=(60, 120, 240, 480, 960),
    *,
    eps=1e-3,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.conv_in = Conv2d(3, filters[0], 7, padding=3, padding_mode="reflect", **kw)
    self.norm_in = ChannelNorm(filters[0], **norm)
    # HiFiC's asymmetric ReflectionPad2d((0, 1, 1, 0)): (top, bottom, left, right) = (1, 0, 0, 1)
    self.down = nnx.List(
      [
        Conv2d(
          filters[i],
          filters[i + 1],
          3,
          stride=2,
          padding=(1, 0, 0, 1),
          padding_mode="reflect",
          **kw,
        )
        for i in range(4)
      ]
    )
    self.down_norms = nnx.List([ChannelNorm(filters[i + 1], **norm) for i in range(4)])
    self.conv_out = Conv2d(filters[4], latent_channels, 3, padding=1, padding_mode="reflect", **kw)

  def conv_stack(self) -> list:
    """The convolutions in the order __call__ applies them (everything else is per pixel):
    what a banded run's halo is computed from (sodec_jax/banding.py)."""
    return [self.conv_in, *self.down, self.conv_out]

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm_in(self.conv_in(x)))
    for conv, norm in zip(self.down, self.down_norms):
      h = jax.nn.relu(norm(conv(h)))
    return self.conv_out(h).astype(jnp.float32)


class HyperAnalysis(nnx.Module):
  """H_a: conv3 s1 (zero pad), conv5 s2, conv5 s2 (reflect pad), ReLU between.

  y [B, h, w, C] -> z [B, h/4, w/4, N].
  """

  def __init__(
    self,
    latent_channels: int,
    hyper_channels: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n = hyper_channels
    self.conv1 = Conv2d(latent_channels, n, 3, padding=1, **kw)
    self.conv2 = Conv2d(n, n, 5, stride=2, padding=2, padding_mode="reflect", **kw)
    self.conv3 = Conv2d(n, n, 5, stride=2, padding=2, padding_mode="reflect", **kw)

  def conv_stack(self) -> list:
    """The convolutions in the order __call__ applies them (ReLUs between)."""
    return [self.conv1, self.conv2, self.conv3]

  def __call__(self, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.conv1(y))
    h = jax.nn.relu(self.conv2(h))
    return self.conv3(h).astype(jnp.float32)


class HyperSynthesisStack(nnx.Module):
  """One of P's two synthesis stacks: convT5 s2, convT5 s2, convT3 s1, ReLU between.

  z_hat [B, h, w, N] -> [B, 4h, 4w, C].
  """

  def __init__(
    self,
    hyper_channels: int,
    latent_channels: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n = hyper_channels
    self.conv1 = ConvTranspose2d(n, n, 5, stride=2, padding=2, output_padding=1, **kw)
    self.conv2 = ConvTranspose2d(n, n, 5, stride=2, padding=2, output_padding=1, **kw)
    self.conv3 = ConvTranspose2d(n, latent_channels, 3, stride=1, padding=1, **kw)

  def conv_stack(self) -> list:
    """The (transposed) convolutions in the order __call__ applies them (ReLUs between)."""
    return [self.conv1, self.conv2, self.conv3]

  def __call__(self, z: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.conv1(z))
    h = jax.nn.relu(self.conv2(h))
    return self.conv3(h).astype(jnp.float32)


class HyperPrior(nnx.Module):
  """P: the mean-scale hyperprior (separate mean and scale synthesis) plus the factorized
  density of z. `__call__(z_hat) -> (mu, sigma)`, sigma lower-bounded at `scale_lower_bound`.
  """

  def __init__(
    self,
    latent_channels: int,
    hyper_channels: int,
    *,
    filters=(3, 3, 3),
    init_scale: float = 10.0,
    gate_last: bool = False,
    scale_lower_bound: float = 0.11,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mean_synthesis = HyperSynthesisStack(hyper_channels, latent_channels, **kw)
    self.scale_synthesis = HyperSynthesisStack(hyper_channels, latent_channels, **kw)
    self.hyperlatent = FactorizedPrior(
      hyper_channels,
      filters=filters,
      init_scale=init_scale,
      gate_last=gate_last,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.scale_lower_bound = scale_lower_bound

  def __call__(self, z_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    mu = self.mean_synthesis(z_hat)
    sigma = lower_bound(self.scale_synthesis(z_hat), self.scale_lower_bound)
    return mu, sigma


class FidelityDecoder(nnx.Module):
  """D_a, HiFiC's generator: CN, conv3 to F0, CN, residual blocks with a global skip, four
  stride-2 transposed convs (CN + ReLU), reflect-padded 7x7 conv to RGB.

  y_hat [B, h, w, C] -> x_f [B, 16h, 16w, 3] (not clamped: training sees the raw output).
  """

  def __init__(
    self,
    latent_channels: int,
    filters=(960, 480, 240, 120, 60),
    residual_blocks: int = 9,
    *,
    eps=1e-3,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.norm_in = ChannelNorm(latent_channels, **norm)
    self.conv_in = Conv2d(latent_channels, filters[0], 3, padding=1, padding_mode="reflect", **kw)
    self.norm_head = ChannelNorm(filters[0], **norm)
    self.residual_blocks = nnx.List(
      [ResidualBlock(filters[0], eps=eps, **kw) for _ in range(residual_blocks)]
    )
    self.up = nnx.List(
      [
        ConvTranspose2d(filters[i], filters[i + 1], 3, stride=2, padding=1, output_padding=1, **kw)
        for i in range(4)
      ]
    )
    self.up_norms = nnx.List([ChannelNorm(filters[i + 1], **norm) for i in range(4)])
    self.conv_out = Conv2d(filters[4], 3, 7, padding=3, padding_mode="reflect", **kw)
    self.remat = False  # per residual block and up stage (sodec_jax/remat.py)

  def __call__(self, y_hat: jax.Array) -> jax.Array:
    head = self.norm_head(self.conv_in(self.norm_in(y_hat)))
    h = head
    for block in self.residual_blocks:
      h = call_module(block, self.remat, h)
    h = h + head
    for conv, norm in zip(self.up, self.up_norms):
      h = call(_up_stage, self.remat, conv, norm, h)
    return self.conv_out(h).astype(jnp.float32)


def _up_stage(conv, norm, h):
  return jax.nn.relu(norm(conv(h)))


class Codec(nnx.Module):
  """The four trainable parts of the VAE codec, named as in DESIGN.md: `encoder` (E),
  `hyper_analysis` (H_a), `prior` (P) and `fidelity_decoder` (D_a).

  `encode(x [0, 1])` and `decode(y_hat) -> [0, 1]` are E and D_a with the image range of
  `model.normalize_input_image` (HiFiC's flag of that name): False (HiFiC's default) feeds E
  with x in [0, 1] and takes D_a's raw output as the image; True feeds E with 2x - 1 and maps
  D_a's output through (tanh + 1) / 2, as HiFiC does with the flag set. The tiny default sets
  it: with [0, 1] inputs, the per-pixel ChannelNorm after E's first conv (12 channels there)
  largely cancels brightness, and the tiny codec stalls near a flat image for hundreds of steps
  (docs/ARCHITECTURE.md, "Choices").
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c, n = cfg.latent_channels, cfg.hyper_channels
    if len(cfg.encoder_filters) != 5 or len(cfg.decoder_filters) != 5:
      raise ValueError(
        "model.encoder_filters and model.decoder_filters need 5 widths each "
        f"(got {tuple(cfg.encoder_filters)} and {tuple(cfg.decoder_filters)})"
      )
    self.encoder = Encoder(c, tuple(cfg.encoder_filters), eps=cfg.channel_norm_eps, **kw)
    self.hyper_analysis = HyperAnalysis(c, n, **kw)
    self.prior = HyperPrior(
      c,
      n,
      filters=tuple(cfg.factorized_filters),
      init_scale=cfg.factorized_init_scale,
      gate_last=bool(cfg.get("factorized_last_gate", False)),
      scale_lower_bound=cfg.scale_lower_bound,
      **kw,
    )
    self.fidelity_decoder = FidelityDecoder(
      c, tuple(cfg.decoder_filters), cfg.decoder_residual_blocks, eps=cfg.channel_norm_eps, **kw
    )
    self.normalize_input_image = bool(cfg.get("normalize_input_image", False))

  def encode(self, x: jax.Array) -> jax.Array:
    """E on an image x [B, H, W, 3] in [0, 1] -> y [B, H/16, W/16, C]."""
    return self.encoder(2.0 * x - 1.0 if self.normalize_input_image else x)

  def decode(self, y_hat: jax.Array) -> jax.Array:
    """D_a: y_hat [B, h, w, C] -> x_f [B, 16h, 16w, 3] in [0, 1] units (unclamped when
    normalize_input_image is False, within (0, 1) when True)."""
    x = self.fidelity_decoder(y_hat)
    return (jnp.tanh(x) + 1.0) / 2.0 if self.normalize_input_image else x

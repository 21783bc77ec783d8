"""The HiFiC PyTorch implementation's model in plain torch: the one torch reference of the HiFiC
layout (the codec benchmark and the tests import it; torch is imported only here).

Written from github.com/Justin-Tan/high-fidelity-generative-compression at commit
7d4e9e785932c039df7fb436159600ed8b474a83 (master): src/network/encoder.py, generator.py,
hyper.py, discriminator.py, src/hyperprior.py (Hyperprior), src/compression/hyperprior_model.py
(HyperpriorDensity), src/normalisation/channel.py (ChannelNorm2D), src/helpers/utils.py
(pad_factor) and src/model.py (Model.compress / decompress). Module and attribute names are
upstream's, so `HiFiC(...).state_dict()` has the keys of upstream's `model_state_dict` (checked
against tests/data/hific_upstream_keys.json). Widths are arguments (upstream hard-codes the
paper's) so tests can build small models.

Evaluation path (`HiFiC.code`, upstream's Model in evaluation mode): x [B, 3, H, W] in [0, 1]
reflect-padded bottom/right to a multiple of 16 -> y = Encoder(x) reflect-padded bottom/right to
a multiple of 4 -> z = analysis_net(y), z_hat = floor(z + 0.5) -> (mu, sigma) = synthesis_mu /
synthesis_std(z_hat), sigma >= 0.11 -> y_hat = floor(y - mu + 0.5) + mu -> Generator(y_hat),
cropped to H x W, clamped to [0, 1]. Bits: upstream's estimate, sum of -log2(likelihood + 1e-9)
of z_hat under HyperpriorDensity and of y_hat under the Gaussian (likelihoods >= 1e-9).
NCHW float tensors throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENCODER_FILTERS = (60, 120, 240, 480, 960)
DECODER_FILTERS = (960, 480, 240, 120, 60)
DISCRIMINATOR_FILTERS = (64, 128, 256, 512)
MIN_SCALE = 0.11  # src/hyperprior.py
MIN_LIKELIHOOD = 1e-9  # src/hyperprior.py, src/compression/entropy_models.py
ENTROPY_EPS = 1e-9  # CodingModel._estimate_entropy


def pad_factor(x: torch.Tensor, factor: int) -> torch.Tensor:
  """src/helpers/utils.py pad_factor: reflect-pad [N, C, H, W] bottom/right to multiples."""
  h, w = x.shape[2:]
  return F.pad(
    x, (0, (factor - w % factor) % factor, 0, (factor - h % factor) % factor), mode="reflect"
  )


class ChannelNorm2D(nn.Module):
  """Normalises over channels with the unbiased variance; gamma/beta [1, C, 1, 1]."""

  def __init__(self, input_channels: int, eps: float = 1e-3):
    super().__init__()
    self.eps = eps
    self.gamma = nn.Parameter(torch.ones(1, input_channels, 1, 1))
    self.beta = nn.Parameter(torch.zeros(1, input_channels, 1, 1))

  def forward(self, x):
    mu, var = torch.mean(x, dim=1, keepdim=True), torch.var(x, dim=1, keepdim=True)
    return self.gamma * ((x - mu) * torch.rsqrt(var + self.eps)) + self.beta


class Encoder(nn.Module):
  """x [B, 3, H, W] -> y [B, C, H/16, W/16] (H, W multiples of 16)."""

  def __init__(self, C: int = 220, filters=ENCODER_FILTERS, eps: float = 1e-3):
    super().__init__()
    self.n_downsampling_layers = 4
    self.pre_pad = nn.ReflectionPad2d(3)
    self.asymmetric_pad = nn.ReflectionPad2d((0, 1, 1, 0))
    self.post_pad = nn.ReflectionPad2d(1)
    self.conv_block1 = nn.Sequential(
      self.pre_pad,
      nn.Conv2d(3, filters[0], (7, 7), stride=1),
      ChannelNorm2D(filters[0], eps),
      nn.ReLU(),
    )
    for i in range(4):
      setattr(
        self,
        f"conv_block{i + 2}",
        nn.Sequential(
          self.asymmetric_pad,
          nn.Conv2d(filters[i], filters[i + 1], 3, stride=2, padding=0),
          ChannelNorm2D(filters[i + 1], eps),
          nn.ReLU(),
        ),
      )
    self.conv_block_out = nn.Sequential(self.post_pad, nn.Conv2d(filters[4], C, 3, stride=1))

  def forward(self, x):
    for i in range(1, 6):
      x = getattr(self, f"conv_block{i}")(x)
    return self.conv_block_out(x)


class ResidualBlock(nn.Module):
  def __init__(self, channels: int, eps: float = 1e-3):
    super().__init__()
    self.pad = nn.ReflectionPad2d(1)
    self.conv1 = nn.Conv2d(channels, channels, 3, stride=1)
    self.conv2 = nn.Conv2d(channels, channels, 3, stride=1)
    self.norm1 = ChannelNorm2D(channels, eps)
    self.norm2 = ChannelNorm2D(channels, eps)

  def forward(self, x):
    res = F.relu(self.norm1(self.conv1(self.pad(x))))
    return self.norm2(self.conv2(self.pad(res))) + x


class Generator(nn.Module):
  """y_hat [B, C, h, w] -> x [B, 3, 16h, 16w] (not clamped)."""

  def __init__(
    self, C: int = 220, filters=DECODER_FILTERS, n_residual_blocks: int = 9, eps: float = 1e-3
  ):
    super().__init__()
    self.n_residual_blocks = n_residual_blocks
    self.pre_pad = nn.ReflectionPad2d(1)
    self.asymmetric_pad = nn.ReflectionPad2d((0, 1, 1, 0))
    self.post_pad = nn.ReflectionPad2d(3)
    self.conv_block_init = nn.Sequential(
      ChannelNorm2D(C, eps),
      self.pre_pad,
      nn.Conv2d(C, filters[0], (3, 3), stride=1),
      ChannelNorm2D(filters[0], eps),
    )
    for m in range(n_residual_blocks):
      self.add_module(f"resblock_{m}", ResidualBlock(filters[0], eps))
    for i in range(4):
      setattr(
        self,
        f"upconv_block{i + 1}",
        nn.Sequential(
          nn.ConvTranspose2d(filters[i], filters[i + 1], 3, stride=2, padding=1, output_padding=1),
          ChannelNorm2D(filters[i + 1], eps),
          nn.ReLU(),
        ),
      )
    self.conv_block_out = nn.Sequential(self.post_pad, nn.Conv2d(filters[4], 3, (7, 7), stride=1))

  def forward(self, x):
    head = self.conv_block_init(x)
    x = head
    for m in range(self.n_residual_blocks):
      x = getattr(self, f"resblock_{m}")(x)
    x = x + head
    for i in range(1, 5):
      x = getattr(self, f"upconv_block{i}")(x)
    return self.conv_block_out(x)


class HyperpriorAnalysis(nn.Module):
  """y [B, C, h, w] -> z [B, N, h/4, w/4] (h, w multiples of 4)."""

  def __init__(self, C: int = 220, N: int = 320):
    super().__init__()
    self.n_downsampling_layers = 2
    kw = dict(kernel_size=5, stride=2, padding=2, padding_mode="reflect")
    self.conv1 = nn.Conv2d(C, N, kernel_size=3, stride=1, padding=1)
    self.conv2 = nn.Conv2d(N, N, **kw)
    self.conv3 = nn.Conv2d(N, N, **kw)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class HyperpriorSynthesis(nn.Module):
  """z_hat [B, N, h, w] -> [B, C, 4h, 4w]."""

  def __init__(self, C: int = 220, N: int = 320):
    super().__init__()
    kw = dict(kernel_size=5, stride=2, padding=2, output_padding=1)
    self.conv1 = nn.ConvTranspose2d(N, N, **kw)
    self.conv2 = nn.ConvTranspose2d(N, N, **kw)
    self.conv3 = nn.ConvTranspose2d(N, C, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class HyperpriorDensity(nn.Module):
  """Factorized density of z: H_k [N, d_{k+1}, d_k], a_k and b_k [N, d_{k+1}, 1] for every
  layer k, the last included (upstream's cdf_logits applies tanh(a_k) * tanh(.) at each)."""

  def __init__(self, n_channels: int, init_scale: float = 10.0, filters=(3, 3, 3)):
    super().__init__()
    self.n_channels = n_channels
    self.filters = tuple(int(f) for f in filters)
    dims = (1,) + self.filters + (1,)
    scale = init_scale ** (1 / (len(self.filters) + 1))
    for k in range(len(self.filters) + 1):
      init = float(np.log(np.expm1(1 / scale / dims[k + 1])))
      self.register_parameter(
        f"H_{k}", nn.Parameter(torch.full((n_channels, dims[k + 1], dims[k]), init))
      )
      self.register_parameter(f"a_{k}", nn.Parameter(torch.zeros(n_channels, dims[k + 1], 1)))
      self.register_parameter(f"b_{k}", nn.Parameter(torch.rand(n_channels, dims[k + 1], 1) - 0.5))

  def cdf_logits(self, x):
    """x [N, 1, M] -> [N, 1, M]."""
    logits = x
    for k in range(len(self.filters) + 1):
      logits = torch.bmm(F.softplus(getattr(self, f"H_{k}")), logits) + getattr(self, f"b_{k}")
      logits = logits + torch.tanh(getattr(self, f"a_{k}")) * torch.tanh(logits)
    return logits

  def likelihood(self, x):
    """x [B, N, h, w] -> the mass of the unit bin around x, >= 1e-9, [B, N, h, w]."""
    lat = x.permute(1, 0, 2, 3)
    shape = lat.shape
    lat = lat.reshape(shape[0], 1, -1)
    upper, lower = self.cdf_logits(lat + 0.5), self.cdf_logits(lat - 0.5)
    sign = -torch.sign(upper + lower)
    lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
    return torch.clamp(lik, min=MIN_LIKELIHOOD).reshape(shape).permute(1, 0, 2, 3)


class Hyperprior(nn.Module):
  """Mean-scale hyperprior (gaussian likelihood) with the factorized density of z."""

  def __init__(
    self, bottleneck_capacity: int = 220, hyperlatent_filters: int = 320, density_filters=(3, 3, 3)
  ):
    super().__init__()
    C, N = bottleneck_capacity, hyperlatent_filters
    self.scale_lower_bound = MIN_SCALE
    self.analysis_net = HyperpriorAnalysis(C=C, N=N)
    self.synthesis_mu = HyperpriorSynthesis(C=C, N=N)
    self.synthesis_std = HyperpriorSynthesis(C=C, N=N)
    self.hyperlatent_likelihood = HyperpriorDensity(N, filters=density_filters)

  def prior(self, z_hat):
    """z_hat -> (mu, sigma), sigma >= 0.11."""
    return (
      self.synthesis_mu(z_hat),
      torch.clamp(self.synthesis_std(z_hat), min=self.scale_lower_bound),
    )

  @staticmethod
  def latent_likelihood(y_hat, mean, scale):
    """Gaussian mass of the unit bin around y_hat, >= 1e-9."""
    v = torch.abs(y_hat - mean)
    cdf = lambda t: 0.5 * torch.erfc(t * (-1.0 / math.sqrt(2.0)))
    return torch.clamp(cdf((0.5 - v) / scale) - cdf(-(0.5 + v) / scale), min=MIN_LIKELIHOOD)


class Discriminator(nn.Module):
  """Conditional PatchGAN: (x [B, 3, H, W], y [B, C, H/16, W/16]) -> (sigmoid, logits [B*P, 1])."""

  def __init__(self, C: int = 220, filters=DISCRIMINATOR_FILTERS, im_channels: int = 3):
    super().__init__()
    context_C_out = 12
    self.context_conv = nn.Conv2d(
      C, context_C_out, kernel_size=3, padding=1, padding_mode="reflect"
    )
    self.context_upsample = nn.Upsample(scale_factor=16, mode="nearest")
    kw = dict(stride=2, padding=1, padding_mode="reflect")
    self.activation = nn.LeakyReLU(negative_slope=0.2)
    sn = nn.utils.spectral_norm
    widths = (im_channels + context_C_out,) + tuple(filters)
    for i in range(4):
      setattr(self, f"conv{i + 1}", sn(nn.Conv2d(widths[i], widths[i + 1], 4, **kw)))
    self.conv_out = nn.Conv2d(filters[3], 1, kernel_size=1, stride=1)

  def forward(self, x, y):
    y = self.context_upsample(self.activation(self.context_conv(y)))
    x = torch.cat((x, y), dim=1)
    for i in range(4):
      x = self.activation(getattr(self, f"conv{i + 1}")(x))
    out_logits = self.conv_out(x).view(-1, 1)
    return torch.sigmoid(out_logits), out_logits


def non_saturating_loss(d_real_logits, d_gen_logits):
  """src/loss/losses.py `_non_saturating_loss` -> (D_loss, G_loss)."""
  bce = F.binary_cross_entropy_with_logits
  d_loss = bce(d_real_logits, torch.ones_like(d_real_logits)) + bce(
    d_gen_logits, torch.zeros_like(d_gen_logits)
  )
  return d_loss, bce(d_gen_logits, torch.ones_like(d_gen_logits))


class HiFiC(nn.Module):
  """src/model.py Model's tensors: Encoder, Generator, Hyperprior (+ Discriminator when
  `discriminator_filters` is given, as in a compression_gan training checkpoint)."""

  def __init__(
    self,
    C: int = 220,
    N: int = 320,
    encoder_filters=ENCODER_FILTERS,
    decoder_filters=DECODER_FILTERS,
    n_residual_blocks: int = 9,
    density_filters=(3, 3, 3),
    discriminator_filters=None,
    eps: float = 1e-3,
    normalize_input_image: bool = False,
  ):
    super().__init__()
    # upstream's args.normalize_input_image: inputs 2x - 1 (its dataset's Normalize(0.5, 0.5)),
    # reconstruction tanh'd and mapped back with (r + 1) / 2 (src/model.py)
    self.normalize_input_image = bool(normalize_input_image)
    self.Encoder = Encoder(C, tuple(encoder_filters), eps)
    self.Generator = Generator(C, tuple(decoder_filters), n_residual_blocks, eps)
    self.Hyperprior = Hyperprior(C, N, tuple(density_filters))
    if discriminator_filters is not None:
      self.Discriminator = Discriminator(C, tuple(discriminator_filters))

  @classmethod
  def from_model_config(cls, m) -> "HiFiC":
    """From our codec `model` config section (widths, blocks, density filters, norm eps)."""
    return cls(
      m.latent_channels,
      m.hyper_channels,
      tuple(m.encoder_filters),
      tuple(m.decoder_filters),
      m.decoder_residual_blocks,
      tuple(m.factorized_filters),
      eps=m.channel_norm_eps,
      normalize_input_image=bool(getattr(m, "normalize_input_image", False)),
    )

  # -- the pieces, unpadded (inputs already of suitable size) ------------------------------------
  def analysis(self, x):
    """E + H_a: x [0, 1] -> (y, z), no padding."""
    y = self.Encoder(2.0 * x - 1.0 if self.normalize_input_image else x)
    return y, self.Hyperprior.analysis_net(y)

  def prior(self, z_hat):
    return self.Hyperprior.prior(z_hat)

  def synthesis(self, y_hat):
    """G: y_hat -> the image in [0, 1] units."""
    x = self.Generator(y_hat)
    return (torch.tanh(x) + 1.0) / 2.0 if self.normalize_input_image else x

  # -- upstream's evaluation path -----------------------------------------------------------------
  @torch.no_grad()
  def code(self, x: torch.Tensor) -> dict:
    """x [B, 3, H, W] in [0, 1] -> reconstruction [B, 3, H, W] in [0, 1], bits per image
    (upstream's estimate), y_hat and z_hat (padded sizes)."""
    h, w = x.shape[2:]
    x_in = 2.0 * x - 1.0 if self.normalize_input_image else x
    y = self.Encoder(pad_factor(x_in, 2**self.Encoder.n_downsampling_layers))
    y = pad_factor(y, 2**self.Hyperprior.analysis_net.n_downsampling_layers)
    z_hat = torch.floor(self.Hyperprior.analysis_net(y) + 0.5)
    mu, sigma = self.Hyperprior.prior(z_hat)
    y_hat = torch.floor(y - mu + 0.5) + mu
    lik_z = self.Hyperprior.hyperlatent_likelihood.likelihood(z_hat)
    lik_y = self.Hyperprior.latent_likelihood(y_hat, mu, sigma)
    b = x.shape[0]
    bits = sum(
      float(-torch.sum(torch.log(lik + ENTROPY_EPS)) / (b * math.log(2.0)))
      for lik in (lik_z, lik_y)
    )
    x_hat = self.synthesis(y_hat)[:, :, :h, :w]
    return {
      "reconstruction": torch.clamp(x_hat, 0.0, 1.0),
      "bits": bits,
      "bpp": bits / (h * w),
      "y_hat": y_hat,
      "z_hat": z_hat,
    }

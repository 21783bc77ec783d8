"""Plain-PyTorch reference of the HiFiC PyTorch implementation's codec modules.

Written to the layout (module names, state-dict keys, paddings, ChannelNorm) of the widely
used re-implementation, so that a state dict from this module has the same keys as
`model_state_dict` there: `Encoder.conv_block1.1.weight`, `Generator.resblock_0.conv1.weight`,
`Hyperprior.analysis_net.conv1.weight`, `Hyperprior.synthesis_mu.*`, `Hyperprior.synthesis_std.*`,
`Hyperprior.hyperlatent_likelihood.{H,a,b}_k`. Used only by tests (NCHW, torch semantics).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelNorm2D(nn.Module):
  def __init__(self, channels, epsilon=1e-3):
    super().__init__()
    self.epsilon = epsilon
    self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
    self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

  def forward(self, x):
    mu, var = torch.mean(x, dim=1, keepdim=True), torch.var(x, dim=1, keepdim=True)
    return self.gamma * ((x - mu) * torch.rsqrt(var + self.epsilon)) + self.beta


class Encoder(nn.Module):
  def __init__(self, C=220, filters=(60, 120, 240, 480, 960)):
    super().__init__()
    self.conv_block1 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, filters[0], 7),
                                     ChannelNorm2D(filters[0]), nn.ReLU())
    for i in range(4):
      setattr(self, f"conv_block{i + 2}", nn.Sequential(
          nn.ReflectionPad2d((0, 1, 1, 0)), nn.Conv2d(filters[i], filters[i + 1], 3, stride=2),
          ChannelNorm2D(filters[i + 1]), nn.ReLU()))
    self.conv_out = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(filters[4], C, 3))

  def forward(self, x):
    for i in range(1, 6):
      x = getattr(self, f"conv_block{i}")(x)
    return self.conv_out(x)


class ResidualBlock(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.pad = nn.ReflectionPad2d(1)
    self.conv1 = nn.Conv2d(channels, channels, 3)
    self.conv2 = nn.Conv2d(channels, channels, 3)
    self.norm1 = ChannelNorm2D(channels)
    self.norm2 = ChannelNorm2D(channels)

  def forward(self, x):
    res = F.relu(self.norm1(self.conv1(self.pad(x))))
    res = self.norm2(self.conv2(self.pad(res)))
    return res + x


class Generator(nn.Module):
  def __init__(self, C=220, filters=(960, 480, 240, 120, 60), n_residual_blocks=9):
    super().__init__()
    self.n_residual_blocks = n_residual_blocks
    self.conv_block_init = nn.Sequential(ChannelNorm2D(C), nn.ReflectionPad2d(1),
                                         nn.Conv2d(C, filters[0], 3), ChannelNorm2D(filters[0]))
    for m in range(n_residual_blocks):
      setattr(self, f"resblock_{m}", ResidualBlock(filters[0]))
    for i in range(4):
      setattr(self, f"upconv_block{i + 1}", nn.Sequential(
          nn.ConvTranspose2d(filters[i], filters[i + 1], 3, stride=2, padding=1, output_padding=1),
          ChannelNorm2D(filters[i + 1]), nn.ReLU()))
    self.conv_block_out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(filters[4], 3, 7))

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
  def __init__(self, C=220, N=320):
    super().__init__()
    kw = dict(kernel_size=5, stride=2, padding=2, padding_mode="reflect")
    self.conv1 = nn.Conv2d(C, N, kernel_size=3, stride=1, padding=1)
    self.conv2 = nn.Conv2d(N, N, **kw)
    self.conv3 = nn.Conv2d(N, N, **kw)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class HyperpriorSynthesis(nn.Module):
  def __init__(self, C=220, N=320):
    super().__init__()
    kw = dict(kernel_size=5, stride=2, padding=2, output_padding=1)
    self.conv1 = nn.ConvTranspose2d(N, N, **kw)
    self.conv2 = nn.ConvTranspose2d(N, N, **kw)
    self.conv3 = nn.ConvTranspose2d(N, C, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class HyperpriorDensity(nn.Module):
  """Balle et al. 2018 factorized density; parameters H_k, a_k, b_k as in the reference."""

  def __init__(self, n_channels, init_scale=10.0, filters=(3, 3, 3)):
    super().__init__()
    self.filters = (1,) + tuple(filters) + (1,)
    scale = init_scale ** (1 / (len(filters) + 1))
    for i in range(len(self.filters) - 1):
      init = np.log(np.expm1(1 / scale / self.filters[i + 1]))
      self.register_parameter(f"H_{i}", nn.Parameter(
          torch.full((n_channels, self.filters[i + 1], self.filters[i]), float(init))))
      self.register_parameter(f"b_{i}", nn.Parameter(
          torch.rand(n_channels, self.filters[i + 1], 1) - 0.5))
      if i < len(self.filters) - 2:
        self.register_parameter(f"a_{i}", nn.Parameter(torch.zeros(n_channels, self.filters[i + 1], 1)))

  def cdf_logits(self, x):  # x [C, 1, M]
    logits = x
    for i in range(len(self.filters) - 1):
      logits = torch.matmul(F.softplus(getattr(self, f"H_{i}")), logits) + getattr(self, f"b_{i}")
      if i < len(self.filters) - 2:
        logits = logits + torch.tanh(getattr(self, f"a_{i}")) * torch.tanh(logits)
    return logits

  def likelihood(self, x):  # x [B, C, H, W]
    b, c, h, w = x.shape
    v = x.permute(1, 0, 2, 3).reshape(c, 1, -1)
    lower, upper = self.cdf_logits(v - 0.5), self.cdf_logits(v + 0.5)
    sign = -torch.sign(lower + upper).detach()
    lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
    return torch.clamp(lik, min=1e-9).reshape(c, b, h, w).permute(1, 0, 2, 3)


class Hyperprior(nn.Module):
  def __init__(self, C=220, N=320, scale_lower_bound=0.11):
    super().__init__()
    self.analysis_net = HyperpriorAnalysis(C, N)
    self.synthesis_mu = HyperpriorSynthesis(C, N)
    self.synthesis_std = HyperpriorSynthesis(C, N)
    self.hyperlatent_likelihood = HyperpriorDensity(N)
    self.scale_lower_bound = scale_lower_bound

  def prior(self, z_hat):
    return self.synthesis_mu(z_hat), torch.clamp(self.synthesis_std(z_hat), min=self.scale_lower_bound)


class HiFiCModel(nn.Module):
  """The codec parts of HiFiC's `Model`: Encoder, Generator, Hyperprior (+ a Discriminator key
  set is added by tests that need it)."""

  def __init__(self, C=220, N=320, enc_filters=(60, 120, 240, 480, 960),
               dec_filters=(960, 480, 240, 120, 60), n_residual_blocks=9):
    super().__init__()
    self.Encoder = Encoder(C, enc_filters)
    self.Generator = Generator(C, dec_filters, n_residual_blocks)
    self.Hyperprior = Hyperprior(C, N)


def gaussian_likelihood(y, mu, sigma):
  v = torch.abs(y - mu)
  cdf = lambda t: 0.5 * torch.erfc(-(2 ** -0.5) * t)
  return torch.clamp(cdf((0.5 - v) / sigma) - cdf((-0.5 - v) / sigma), min=1e-9)

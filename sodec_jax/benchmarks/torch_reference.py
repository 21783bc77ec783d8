"""The codec (E, H_a, P's mean/scale synthesis, D_a) in plain PyTorch, loaded with a JAX model's
weights: the reference `python -m sodec_jax.bench --what codec --reference torch` times.

The modules have the HiFiC PyTorch implementation's layout (module names, paddings, ChannelNorm
with the unbiased variance), so `state_dict_from_jax` is exactly the inverse of
`sodec_jax.weights.hific.hific_key_map`: a state dict converted from a HiFiC checkpoint round-trips
to the same tensors. The factorized density of z is not a torch module here: both sides range-code
with the same host tables (`LoadedModel.z_coder`), so only the neural pieces are compared.
`compress`/`decompress` below are the torch twins of `sodec_jax.api.compress`/`decompress` (same
padding, rounding, scale indexes, coders and container), used for end-to-end timings.

Importing this module imports torch (only the benchmark does).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sodec_jax.errors import SodecError


class ChannelNorm2D(nn.Module):
  def __init__(self, channels: int, epsilon: float = 1e-3):
    super().__init__()
    self.epsilon = epsilon
    self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
    self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

  def forward(self, x):
    mu, var = torch.mean(x, dim=1, keepdim=True), torch.var(x, dim=1, keepdim=True)
    return self.gamma * ((x - mu) * torch.rsqrt(var + self.epsilon)) + self.beta


class Encoder(nn.Module):
  """E: x [B, 3, H, W] -> y [B, C, H/16, W/16]."""

  def __init__(self, C: int, filters, eps: float):
    super().__init__()
    self.conv_block1 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, filters[0], 7),
                                     ChannelNorm2D(filters[0], eps), nn.ReLU())
    for i in range(4):
      setattr(self, f"conv_block{i + 2}", nn.Sequential(
          nn.ReflectionPad2d((0, 1, 1, 0)), nn.Conv2d(filters[i], filters[i + 1], 3, stride=2),
          ChannelNorm2D(filters[i + 1], eps), nn.ReLU()))
    self.conv_out = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(filters[4], C, 3))

  def forward(self, x):
    for i in range(1, 6):
      x = getattr(self, f"conv_block{i}")(x)
    return self.conv_out(x)


class ResidualBlock(nn.Module):
  def __init__(self, channels: int, eps: float):
    super().__init__()
    self.pad = nn.ReflectionPad2d(1)
    self.conv1 = nn.Conv2d(channels, channels, 3)
    self.conv2 = nn.Conv2d(channels, channels, 3)
    self.norm1 = ChannelNorm2D(channels, eps)
    self.norm2 = ChannelNorm2D(channels, eps)

  def forward(self, x):
    res = F.relu(self.norm1(self.conv1(self.pad(x))))
    return self.norm2(self.conv2(self.pad(res))) + x


class Generator(nn.Module):
  """D_a: y_hat [B, C, h, w] -> x_f [B, 3, 16h, 16w]."""

  def __init__(self, C: int, filters, n_residual_blocks: int, eps: float):
    super().__init__()
    self.n_residual_blocks = n_residual_blocks
    self.conv_block_init = nn.Sequential(ChannelNorm2D(C, eps), nn.ReflectionPad2d(1),
                                         nn.Conv2d(C, filters[0], 3), ChannelNorm2D(filters[0], eps))
    for m in range(n_residual_blocks):
      setattr(self, f"resblock_{m}", ResidualBlock(filters[0], eps))
    for i in range(4):
      setattr(self, f"upconv_block{i + 1}", nn.Sequential(
          nn.ConvTranspose2d(filters[i], filters[i + 1], 3, stride=2, padding=1, output_padding=1),
          ChannelNorm2D(filters[i + 1], eps), nn.ReLU()))
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
  def __init__(self, C: int, N: int):
    super().__init__()
    kw = dict(kernel_size=5, stride=2, padding=2, padding_mode="reflect")
    self.conv1 = nn.Conv2d(C, N, kernel_size=3, stride=1, padding=1)
    self.conv2 = nn.Conv2d(N, N, **kw)
    self.conv3 = nn.Conv2d(N, N, **kw)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class HyperpriorSynthesis(nn.Module):
  def __init__(self, C: int, N: int):
    super().__init__()
    kw = dict(kernel_size=5, stride=2, padding=2, output_padding=1)
    self.conv1 = nn.ConvTranspose2d(N, N, **kw)
    self.conv2 = nn.ConvTranspose2d(N, N, **kw)
    self.conv3 = nn.ConvTranspose2d(N, C, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class Hyperprior(nn.Module):
  def __init__(self, C: int, N: int, scale_lower_bound: float):
    super().__init__()
    self.analysis_net = HyperpriorAnalysis(C, N)
    self.synthesis_mu = HyperpriorSynthesis(C, N)
    self.synthesis_std = HyperpriorSynthesis(C, N)
    self.scale_lower_bound = scale_lower_bound


class TorchCodec(nn.Module):
  """HiFiC-layout Encoder / Generator / Hyperprior (no density module); NCHW float."""

  def __init__(self, model_cfg):
    super().__init__()
    c, n, eps = model_cfg.latent_channels, model_cfg.hyper_channels, model_cfg.channel_norm_eps
    self.Encoder = Encoder(c, tuple(model_cfg.encoder_filters), eps)
    self.Generator = Generator(c, tuple(model_cfg.decoder_filters), model_cfg.decoder_residual_blocks, eps)
    self.Hyperprior = Hyperprior(c, n, model_cfg.scale_lower_bound)

  def analysis(self, x):
    """E + H_a: x -> (y, z)."""
    y = self.Encoder(x)
    return y, self.Hyperprior.analysis_net(y)

  def prior(self, z_hat):
    """P: z_hat -> (mu, sigma)."""
    h = self.Hyperprior
    return h.synthesis_mu(z_hat), torch.clamp(h.synthesis_std(z_hat), min=h.scale_lower_bound)

  def synthesis(self, y_hat):
    """D_a: y_hat -> x_f."""
    return self.Generator(y_hat)


# ----------------------------------------------------------------------------- weights


def _to_torch_layout(arr: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `sodec_jax.weights.hific._to_ours`."""
  if kind == "conv":      # [kh, kw, I, O] -> [O, I, kh, kw]
    return arr.transpose(3, 2, 0, 1)
  if kind == "convT":     # [kh, kw, I, O] -> [I, O, kh, kw]
    return arr.transpose(2, 3, 0, 1)
  if kind == "norm":      # [C] -> [1, C, 1, 1]
    return arr.reshape(1, -1, 1, 1)
  return arr


def state_dict_from_jax(model, model_cfg) -> dict[str, np.ndarray]:
  """Our SODEC model's codec parameters -> a HiFiC `model_state_dict` (float32 numpy), every row
  of `hific_key_map` (density parameters included)."""
  from flax import nnx

  from sodec_jax.weights.hific import hific_key_map
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for torch_key, path, kind in hific_key_map(model_cfg):
    if path not in flat:
      raise SodecError(f"the model has no parameter {'/'.join(map(str, path))} for {torch_key}")
    out[torch_key] = np.array(_to_torch_layout(np.asarray(flat[path].value, np.float32), kind),
                              order="C", copy=True)
  return out


def build_reference(loaded, dtype: torch.dtype = torch.float32) -> TorchCodec:
  """A TorchCodec holding `loaded.model`'s weights (strict: every torch parameter is set)."""
  model_cfg = loaded.config.model
  ref = TorchCodec(model_cfg)
  sd = state_dict_from_jax(loaded.model, model_cfg)
  own = ref.state_dict()
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items() if k in own}, strict=True)
  return ref.to(dtype).eval()


# ----------------------------------------------------------------------------- the coding path


def _nchw(x: np.ndarray, dtype) -> torch.Tensor:
  return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), order="C", copy=True)).to(dtype)


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.float().permute(0, 2, 3, 1).contiguous().numpy()


def latents(ref: TorchCodec, loaded, x: np.ndarray):
  """x float32 [B, H, W, 3] (padded) -> sodec_jax.api.Latents computed by the torch networks."""
  from sodec_jax import api
  dtype = next(ref.parameters()).dtype
  with torch.inference_mode():
    y, z = ref.analysis(_nchw(x, dtype))
    z_hat = torch.round(z.float())
    mu, sigma = ref.prior(z_hat.to(dtype))
  return api.Latents.from_prior(loaded, _nhwc(y), _nhwc(z_hat), _nhwc(mu), _nhwc(sigma))


def compress(ref: TorchCodec, loaded, image: np.ndarray) -> bytes:
  """torch twin of `sodec_jax.api.compress`: latents from the torch networks, then `api.pack`
  (the same rounding, scale indexes, coders, container and fingerprint)."""
  from sodec_jax import api
  return api.pack(loaded, latents(ref, loaded, api.pad_image(image)), *image.shape[:2])


def decompress(ref: TorchCodec, loaded, data: bytes) -> np.ndarray:
  """torch twin of `sodec_jax.api.decompress` for the codec decoder: `api.decode_latents` with
  the torch prior, then the torch D_a."""
  from sodec_jax import api
  dtype = next(ref.parameters()).dtype

  def torch_prior(z_hat):
    with torch.inference_mode():
      return tuple(_nhwc(t) for t in ref.prior(_nchw(z_hat, dtype)))

  header, y_hat, _ = api.decode_latents(loaded, data, torch_prior)
  with torch.inference_mode():
    x = _nhwc(ref.synthesis(_nchw(y_hat, dtype)))
  return api.to_uint8(x, header.height, header.width)

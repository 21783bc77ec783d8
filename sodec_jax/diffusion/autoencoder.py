"""AutoencoderKL (the Stable Diffusion VAE) in flax.nnx, NHWC, equal to diffusers'.

    vae = AutoencoderKL(sd21_vae_config(), rngs=nnx.Rngs(0))
    mean, logvar = vae.encode(x)             # x [B,H,W,3] in [-1,1] -> 2 x [B,H/8,W/8,4]
    x_hat = vae.decode(z / vae.config.scaling_factor)   # the caller scales: diffusers semantics

No scaling factor is applied inside encode/decode (as in diffusers). Submodule names follow
diffusers (encoder.down_blocks.0.resnets.1, decoder.mid_block.attentions.0, quant_conv, ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.diffusion.attention import SpatialSelfAttention, default_query_chunk
from sodec_jax.diffusion.blocks import Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from sodec_jax.diffusion.diffusers_config import DiffusersConfig
from sodec_jax.errors import SodecError
from sodec_jax.remat import call, call_module

_UNSUPPORTED_DEFAULTS = {
  "act_fn": "silu",
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
  "latents_mean": None,
  "latents_std": None,
}
_IGNORED = ("force_upcast", "shift_factor", "sample_size")
_EPS = 1e-6  # diffusers' Encoder/Decoder use resnet_eps=1e-6 throughout


@dataclasses.dataclass(frozen=True)
class VAEConfig(DiffusersConfig):
  """diffusers AutoencoderKL config (the keys of its config.json)."""

  WHAT, UNSUPPORTED, IGNORED = "VAE", _UNSUPPORTED_DEFAULTS, _IGNORED

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  def validate(self) -> None:
    n = len(self.block_out_channels)
    if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n:
      raise SodecError(f"VAE config: down_block_types must be {n} x DownEncoderBlock2D")
    if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
      raise SodecError(f"VAE config: up_block_types must be {n} x UpDecoderBlock2D")


def sd21_vae_config() -> VAEConfig:
  """Stable Diffusion 2.1 VAE (stabilityai/stable-diffusion-2-1, vae/config.json)."""
  return VAEConfig()


def tiny_vae_config() -> VAEConfig:
  """A small member of the same family (tests): 2 levels (x2 down), 16/32 channels."""
  return VAEConfig(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
  )


def _resnets(in_channels: int, out_channels: int, n: int, groups: int, **kw) -> nnx.List:
  """The n resnets (no time embedding) of an encoder or decoder block; the first maps
  in_channels -> out_channels."""
  return nnx.List(
    [
      ResnetBlock2D(
        in_channels if i == 0 else out_channels,
        out_channels,
        temb_channels=None,
        groups=groups,
        eps=_EPS,
        **kw,
      )
      for i in range(n)
    ]
  )


class EncoderBlock(nnx.Module):
  """DownEncoderBlock2D: resnets (no time embedding), then a stride-2 conv (pad right/bottom)."""

  def __init__(
    self, in_channels, out_channels, *, num_layers, add_downsample, groups, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = False  # per resnet / downsampler (sodec_jax/remat.py)
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, **kw)
    self.downsamplers = nnx.List(
      [Downsample2D(out_channels, out_channels, padding=0, **kw)] if add_downsample else []
    )

  def __call__(self, x):
    for r in self.resnets:
      x = call_module(r, self.remat, x)
    for d in self.downsamplers:
      x = call_module(d, self.remat, x)
    return x


class DecoderBlock(nnx.Module):
  """UpDecoderBlock2D: resnets (no time embedding), then nearest x2 + conv."""

  def __init__(
    self, in_channels, out_channels, *, num_layers, add_upsample, groups, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = False  # per resnet / upsampler (sodec_jax/remat.py)
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, **kw)
    self.upsamplers = nnx.List(
      [Upsample2D(out_channels, out_channels, **kw)] if add_upsample else []
    )

  def __call__(self, x):
    for r in self.resnets:
      x = call_module(r, self.remat, x)
    for u in self.upsamplers:
      x = call_module(u, self.remat, x)
    return x


class VAEMidBlock(nnx.Module):
  """UNetMidBlock2D of the VAE: resnet, single-head self-attention over H*W, resnet."""

  def __init__(self, channels, *, groups, query_chunk, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = False  # per resnet / attention (sodec_jax/remat.py)
    self.resnets = nnx.List(
      [
        ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS, **kw)
        for _ in range(2)
      ]
    )
    self.attentions = nnx.List(
      [
        SpatialSelfAttention(
          channels, dim_head=channels, groups=groups, eps=_EPS, query_chunk=query_chunk, **kw
        )
      ]
    )

  def __call__(self, x):
    x = call_module(self.resnets[0], self.remat, x)
    x = call_module(self.attentions[0], self.remat, x)
    return call_module(self.resnets[1], self.remat, x)


class Encoder(nnx.Module):
  """x [B, H, W, in_channels] -> moments [B, H/2^(n-1), W/2^(n-1), 2 * latent_channels]."""

  def __init__(self, c: VAEConfig, *, query_chunk, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch = tuple(c.block_out_channels)
    self.conv_in = Conv2d(c.in_channels, ch[0], 3, **kw)
    blocks, out_ch = [], ch[0]
    for i in range(len(ch)):
      in_ch, out_ch = out_ch, ch[i]
      blocks.append(
        EncoderBlock(
          in_ch,
          out_ch,
          num_layers=c.layers_per_block,
          add_downsample=i < len(ch) - 1,
          groups=c.norm_num_groups,
          **kw,
        )
      )
    self.down_blocks = nnx.List(blocks)
    self.mid_block = VAEMidBlock(ch[-1], groups=c.norm_num_groups, query_chunk=query_chunk, **kw)
    self.conv_norm_out = GroupNorm(
      c.norm_num_groups, ch[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype
    )
    self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """z [B, h, w, latent_channels] -> x [B, h * 2^(n-1), w * 2^(n-1), out_channels]."""

  def __init__(self, c: VAEConfig, *, query_chunk, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rch = tuple(c.block_out_channels)[::-1]
    self.conv_in = Conv2d(c.latent_channels, rch[0], 3, **kw)
    self.mid_block = VAEMidBlock(rch[0], groups=c.norm_num_groups, query_chunk=query_chunk, **kw)
    blocks, out_ch = [], rch[0]
    for i in range(len(rch)):
      prev, out_ch = out_ch, rch[i]
      blocks.append(
        DecoderBlock(
          prev,
          out_ch,
          num_layers=c.layers_per_block + 1,
          add_upsample=i < len(rch) - 1,
          groups=c.norm_num_groups,
          **kw,
        )
      )
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(
      c.norm_num_groups, rch[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype
    )
    self.conv_out = Conv2d(rch[-1], c.out_channels, 3, **kw)
    self.remat = False  # the full-resolution tail (norm, SiLU, conv_out): sodec_jax/remat.py

  def __call__(self, z):
    x = self.conv_in(z)
    x = self.mid_block(x)
    for b in self.up_blocks:
      x = b(x)
    return call(_tail, self.remat, self.conv_norm_out, self.conv_out, x)


def _tail(norm, conv, x):
  return conv(jax.nn.silu(norm(x)))


class AutoencoderKL(nnx.Module):
  """The SD VAE. encode(x [B,H,W,3]) -> (mean, logvar) each [B,H/8,W/8,4] (logvar clamped to
  [-30, 20] like diffusers' DiagonalGaussianDistribution); decode(z [B,h,w,4]) -> [B,8h,8w,3].
  No latent scaling inside: divide by `config.scaling_factor` before decode yourself.
  """

  def __init__(
    self,
    config: VAEConfig | dict | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    query_chunk: int | None = None,
    rngs: nnx.Rngs,
  ):
    if config is None:
      config = sd21_vae_config()
    if isinstance(config, dict):
      config = VAEConfig.from_dict(config)
    config.validate()
    self.config = config
    self.dtype = dtype
    if query_chunk is None:
      query_chunk = default_query_chunk()
    kw = dict(query_chunk=query_chunk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    lc = config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    kw.pop("query_chunk")
    self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, padding=0, **kw)
    self.post_quant_conv = Conv2d(lc, lc, 1, padding=0, **kw)

  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B,H,W,in] in [-1, 1] -> (mean, logvar), each [B,H/f,W/f,latent_channels]."""
    moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B,h,w,latent_channels] (unscaled latents) -> image [B,h*f,w*f,out] in about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """decode(encode(x).mean): diffusers' AutoencoderKL.forward without sampling."""
    return self.decode(self.encode(x)[0])

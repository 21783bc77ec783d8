"""UNet2DConditionModel (Stable Diffusion 2.1 family) in flax.nnx, NHWC, equal to diffusers'.

(Over 450 lines: one file per diffusers model class, so that the key map and the parity tests
read against a single module, as diffusers' own unet_2d_condition.py.)

    unet = UNet2DConditionModel(sd21_unet_config(), rngs=nnx.Rngs(0))
    eps = unet(sample, timesteps, encoder_hidden_states)   # [B,H,W,4], [B], [B,T,1024] -> [B,H,W,4]

The configuration is a frozen dataclass with diffusers' config.json keys (`UNetConfig.from_dict`
reads a diffusers config.json); run-time choices (compute dtype, parameter dtype, remat, attention
query chunk) are constructor arguments. Submodule names follow diffusers (down_blocks.0.resnets.1,
...), so the weight converter is a short explicit table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax import remat as remat_lib
from sodec_jax.diffusion.attention import Transformer2DModel, default_query_chunk
from sodec_jax.diffusion.blocks import (
  Conv2d,
  Downsample2D,
  GroupNorm,
  ResnetBlock2D,
  TimestepEmbedding,
  Upsample2D,
  timestep_embedding,
)
from sodec_jax.diffusion.diffusers_config import DiffusersConfig
from sodec_jax.errors import SodecError

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys for features SD 2.1 does not use: accepted only at these values.
_UNSUPPORTED_DEFAULTS = {
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "only_cross_attention": False,
  "act_fn": "silu",
  "dual_cross_attention": False,
  "class_embed_type": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "num_class_embeds": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "reverse_transformer_layers_per_block": None,
}
# Keys that do not change the function at inference (dropout) or are informational.
_IGNORED = ("dropout", "addition_embed_type_num_heads")


@dataclasses.dataclass(frozen=True)
class UNetConfig(DiffusersConfig):
  """diffusers UNet2DConditionModel config (the keys of its config.json), SD 2.1 family."""

  WHAT, UNSUPPORTED, IGNORED = "UNet", _UNSUPPORTED_DEFAULTS, _IGNORED

  sample_size: int = 96
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: Any = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Any = 1024
  transformer_layers_per_block: Any = 1
  attention_head_dim: Any = (5, 10, 20, 20)  # diffusers quirk: these are head COUNTS
  num_attention_heads: Any = None
  use_linear_projection: bool = True
  upcast_attention: bool = True  # attention logits are always float32 here
  time_embedding_dim: int | None = None

  def per_block(self, value) -> tuple:
    n = len(self.block_out_channels)
    if isinstance(value, (int, float)) or value is None:
      return (value,) * n
    if len(value) != n:
      raise SodecError(f"UNet config: {value!r} must have one entry per block ({n})")
    return tuple(value)

  @property
  def heads(self) -> tuple:
    return self.per_block(self.num_attention_heads or self.attention_head_dim)

  def validate(self) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise SodecError(
        "UNet config: down/up block types must have one entry per block_out_channels"
      )
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise SodecError(f"UNet config: down block type {t!r} is not supported ({_DOWN_TYPES})")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise SodecError(f"UNet config: up block type {t!r} is not supported ({_UP_TYPES})")
    t = self.transformer_layers_per_block
    if not isinstance(t, int) and any(isinstance(x, (list, tuple)) for x in t):
      raise SodecError("UNet config: nested transformer_layers_per_block is not supported")
    for c, h in zip(self.block_out_channels, self.heads):
      if c % h or c % self.norm_num_groups:
        raise SodecError(
          f"UNet config: {c} channels do not split into {h} heads / {self.norm_num_groups} groups"
        )


def sd21_unet_config() -> UNetConfig:
  """Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1, unet/config.json)."""
  return UNetConfig()


def tiny_unet_config() -> UNetConfig:
  """A small member of the same family (tests, the tiny default): 2 levels, 32/64 channels."""
  return UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
  )


def _attentions(n: int, channels: int, **kw) -> nnx.List:
  """The n cross-attention transformers of a down or up block (none when n == 0)."""
  return nnx.List([Transformer2DModel(channels, **kw) for _ in range(n)])


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (with_attention) or DownBlock2D.

  (x [B,H,W,Cin], temb, context) -> (x [B,H',W',Cout], skips: one per resnet + one per downsampler).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    temb_channels: int,
    num_layers: int,
    with_attention: bool,
    add_downsample: bool,
    heads: int,
    cross_attention_dim: int,
    transformer_layers: int,
    groups: int,
    eps: float,
    use_linear_projection: bool,
    downsample_padding: int,
    query_chunk: int,
    remat: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          in_channels if i == 0 else out_channels,
          out_channels,
          temb_channels=temb_channels,
          groups=groups,
          eps=eps,
          **kw,
        )
        for i in range(num_layers)
      ]
    )
    self.attentions = _attentions(
      num_layers if with_attention else 0,
      out_channels,
      heads=heads,
      cross_attention_dim=cross_attention_dim,
      num_layers=transformer_layers,
      groups=groups,
      use_linear_projection=use_linear_projection,
      query_chunk=query_chunk,
      **kw,
    )
    self.downsamplers = nnx.List(
      [Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)]
      if add_downsample
      else []
    )

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = _call(resnet, self.remat, x, temb)
      if len(self.attentions):
        x = _call(self.attentions[i], self.remat, x, context)
      skips.append(x)
    for down in self.downsamplers:
      x = down(x)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D (with_attention) or UpBlock2D.

  (x, skips (consumed last-first, concatenated on channels), temb, context, upsample size)
  -> x [B, 2H, 2W, Cout] (or [B, H, W, Cout] for the last block).
  """

  def __init__(
    self,
    in_channels: int,
    prev_output_channels: int,
    out_channels: int,
    *,
    temb_channels: int,
    num_layers: int,
    with_attention: bool,
    add_upsample: bool,
    heads: int,
    cross_attention_dim: int,
    transformer_layers: int,
    groups: int,
    eps: float,
    use_linear_projection: bool,
    query_chunk: int,
    remat: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    resnets = []
    for i in range(num_layers):
      skip_channels = in_channels if i == num_layers - 1 else out_channels
      resnet_in = prev_output_channels if i == 0 else out_channels
      resnets.append(
        ResnetBlock2D(
          resnet_in + skip_channels,
          out_channels,
          temb_channels=temb_channels,
          groups=groups,
          eps=eps,
          **kw,
        )
      )
    self.resnets = nnx.List(resnets)
    self.attentions = _attentions(
      num_layers if with_attention else 0,
      out_channels,
      heads=heads,
      cross_attention_dim=cross_attention_dim,
      num_layers=transformer_layers,
      groups=groups,
      use_linear_projection=use_linear_projection,
      query_chunk=query_chunk,
      **kw,
    )
    self.upsamplers = nnx.List(
      [Upsample2D(out_channels, out_channels, **kw)] if add_upsample else []
    )

  def __call__(self, x, skips: Sequence[jax.Array], temb, context, upsample_size=None):
    skips = list(skips)
    for i, resnet in enumerate(self.resnets):
      skip = skips.pop()
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = _call(resnet, self.remat, x, temb)
      if len(self.attentions):
        x = _call(self.attentions[i], self.remat, x, context)
    for up in self.upsamplers:
      x = up(x, upsample_size)
    return x


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnet, (transformer, resnet) x num_layers. Shapes preserved."""

  def __init__(
    self,
    channels: int,
    *,
    temb_channels: int,
    heads: int,
    cross_attention_dim: int,
    transformer_layers: int,
    groups: int,
    eps: float,
    output_scale_factor: float,
    use_linear_projection: bool,
    query_chunk: int,
    remat: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    num_layers: int = 1,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          channels,
          channels,
          temb_channels=temb_channels,
          groups=groups,
          eps=eps,
          output_scale_factor=output_scale_factor,
          **kw,
        )
        for _ in range(num_layers + 1)
      ]
    )
    self.attentions = nnx.List(
      [
        Transformer2DModel(
          channels,
          heads=heads,
          cross_attention_dim=cross_attention_dim,
          num_layers=transformer_layers,
          groups=groups,
          use_linear_projection=use_linear_projection,
          query_chunk=query_chunk,
          **kw,
        )
        for _ in range(num_layers)
      ]
    )

  def __call__(self, x, temb, context):
    x = _call(self.resnets[0], self.remat, x, temb)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = _call(attn, self.remat, x, context)
      x = _call(resnet, self.remat, x, temb)
    return x


def _call(module, remat, *args):
  """module(*args), rematerialised in the backward pass when `remat` (sodec_jax/remat.py)."""
  return remat_lib.call_module(module, remat, *args)


class UNet2DConditionModel(nnx.Module):
  """The SD UNet. __call__(sample [B,H,W,Cin], timesteps [B] or scalar,
  encoder_hidden_states [B,T,cross_attention_dim]) -> [B,H,W,Cout] (epsilon or v, per the
  scheduler's prediction_type).

  dtype: compute dtype (float32 / bfloat16); param_dtype: storage dtype of the weights.
  remat: rematerialise resnets and transformers in the backward pass (training memory).
  query_chunk: attention query chunk (None: attention.attention_plan decides per call: 256 on
  CPU, cuDNN or a bounded logits buffer elsewhere; 0: whole sequence; > 0: that chunk).
  """

  def __init__(
    self,
    config: UNetConfig | dict | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool = False,
    query_chunk: int | None = None,
    rngs: nnx.Rngs,
  ):
    if config is None:
      config = sd21_unet_config()
    if isinstance(config, dict):
      config = UNetConfig.from_dict(config)
    config.validate()
    self.config = config
    self.dtype = dtype
    c = config
    if query_chunk is None:
      query_chunk = default_query_chunk()
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    common = dict(
      groups=c.norm_num_groups,
      eps=c.norm_eps,
      use_linear_projection=c.use_linear_projection,
      query_chunk=query_chunk,
      remat=remat,
      **kw,
    )
    channels = tuple(c.block_out_channels)
    n = len(channels)
    heads = c.heads
    cross = c.per_block(c.cross_attention_dim)
    layers = c.per_block(c.layers_per_block)
    tlayers = c.per_block(c.transformer_layers_per_block)
    temb = c.time_embedding_dim or channels[0] * 4

    self.conv_in = Conv2d(c.in_channels, channels[0], 3, **kw)
    self.time_embedding = TimestepEmbedding(channels[0], temb, **kw)

    down = []
    out_ch = channels[0]
    for i, kind in enumerate(c.down_block_types):
      in_ch, out_ch = out_ch, channels[i]
      down.append(
        DownBlock(
          in_ch,
          out_ch,
          temb_channels=temb,
          num_layers=layers[i],
          with_attention=kind.startswith("CrossAttn"),
          add_downsample=i < n - 1,
          heads=heads[i],
          cross_attention_dim=cross[i],
          transformer_layers=tlayers[i],
          downsample_padding=c.downsample_padding,
          **common,
        )
      )
    self.down_blocks = nnx.List(down)
    self.mid_block = MidBlock(
      channels[-1],
      temb_channels=temb,
      heads=heads[-1],
      cross_attention_dim=cross[-1],
      transformer_layers=tlayers[-1],
      output_scale_factor=c.mid_block_scale_factor,
      **common,
    )
    rch, rheads, rcross = channels[::-1], heads[::-1], cross[::-1]
    rlayers, rtlayers = layers[::-1], tlayers[::-1]
    up = []
    out_ch = rch[0]
    for i, kind in enumerate(c.up_block_types):
      prev, out_ch = out_ch, rch[i]
      in_ch = rch[min(i + 1, n - 1)]
      up.append(
        UpBlock(
          in_ch,
          prev,
          out_ch,
          temb_channels=temb,
          num_layers=rlayers[i] + 1,
          with_attention=kind.startswith("CrossAttn"),
          add_upsample=i < n - 1,
          heads=rheads[i],
          cross_attention_dim=rcross[i],
          transformer_layers=rtlayers[i],
          **common,
        )
      )
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = GroupNorm(
      c.norm_num_groups, channels[0], eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.conv_out = Conv2d(channels[0], c.out_channels, 3, **kw)

  def __call__(
    self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array
  ) -> jax.Array:
    c = self.config
    b = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    t_emb = timestep_embedding(
      t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
    ).astype(self.dtype)
    temb = self.time_embedding(t_emb)
    context = encoder_hidden_states.astype(self.dtype)
    x = sample.astype(self.dtype)
    if c.center_input_sample:
      x = 2 * x - 1.0
    x = self.conv_in(x)
    skips = [x]
    for block in self.down_blocks:
      x, s = block(x, temb, context)
      skips.extend(s)
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      k = len(block.resnets)
      block_skips, skips = skips[-k:], skips[:-k]
      size = skips[-1].shape[1:3] if skips else None  # upsample onto the next skip's grid
      x = block(x, block_skips, temb, context, size if len(block.upsamplers) else None)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def count_params(module: nnx.Module, filter_=nnx.Param) -> int:
  """Number of scalars in the module's variables matching `filter_` (default: all parameters)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, filter_)))

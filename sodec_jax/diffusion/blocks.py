"""Layers and convolutional blocks shared by the SD UNet and the SD VAE (NHWC throughout).

Every module here mirrors one diffusers (PyTorch) module of the same name and computes the same
function; parameter names follow flax (`kernel`, `bias`, `scale`) and the weight converter in
`sodec_jax/weights/diffusers.py` maps diffusers' names onto them.

Each module takes `dtype` (the compute dtype: inputs and parameters are cast to it) and
`param_dtype` (how parameters are stored). Normalisations always compute their statistics in
float32, as PyTorch autocast does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.layers import winograd_conv3x3

Dtype = jnp.dtype


def _uniform_fan_in(fan_in: int):
  """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


class Linear(nnx.Module):
  """y = x @ kernel + bias. kernel: [in, out]. x: [..., in] -> [..., out].

  `lora` is an optional adapter (see `sodec_jax.diffusion.lora`) whose output is added.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    init = _uniform_fan_in(in_features)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
    self.lora = nnx.data(None)  # optional LoRAAdapter (data: may hold parameters)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = jnp.matmul(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x).astype(self.dtype)
    return y


class Conv2d(nnx.Module):
  """2-D convolution, NHWC. kernel: [kh, kw, in, out]. x: [B, H, W, in] -> [B, H', W', out].

  `padding` is an int (same on all sides, like torch) or ((top, bottom), (left, right)).
  `lora` is an optional adapter (see `sodec_jax.diffusion.lora`) whose output is added.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding=None,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if padding is None:
      padding = kernel_size // 2
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = tuple(tuple(p) for p in padding)
    init = _uniform_fan_in(in_channels * kernel_size * kernel_size)
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(init(rngs.params(), (out_channels,), param_dtype)) if use_bias else None
    self.lora = nnx.data(None)  # optional LoRAAdapter (data: may hold parameters)
    self.dtype = dtype
    self.winograd = None  # set by sodec_jax.layers.use_winograd (inference only)

  def winograd_eligible(self, min_channels: int) -> bool:
    """3x3 stride 1, zero padding 1, float32, no LoRA, >= min_channels in and out."""
    return (
      self.kernel_size == 3
      and self.stride == 1
      and self.padding == ((1, 1), (1, 1))
      and self.lora is None
      and jnp.dtype(self.dtype) == jnp.float32
      and min(self.in_channels, self.out_channels) >= min_channels
    )

  def conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The bare convolution of x with `kernel` ([kh, kw, in, k]) using this layer's geometry."""
    return jax.lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.winograd is not None:
      y = winograd_conv3x3(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), self.winograd[...].astype(self.dtype)
      )
    elif self.kernel_size == 1 and self.stride == 1 and self.padding == ((0, 0), (0, 0)):
      y = jnp.matmul(x, self.kernel[...][0, 0].astype(self.dtype))
    else:
      y = self.conv(x, self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x, self).astype(self.dtype)
    return y


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-last input. x: [B, ..., C] -> same shape.

  Statistics over (all spatial positions, C / num_groups channels) per group, in float32.
  `tile_norm` (None: the plain GroupNorm above) is set only by tiled decoding
  (sodec_jax.tiling) on a merged copy of the model inside its jitted tile program: a TileNorm
  that records this tile's statistics and/or supplies whole-image ones.
  """

  def __init__(
    self,
    num_groups: int,
    num_channels: int,
    *,
    eps: float = 1e-5,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    if num_channels % num_groups:
      raise ValueError(
        f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups"
      )
    self.num_groups = num_groups
    self.num_channels = num_channels
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))
    self.dtype = dtype
    self.tile_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
    if self.tile_norm is not None:
      mean, var = self.tile_norm(self, xg, shape[1:3])
    else:
      mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
      var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis (elementwise affine). x: [..., C] -> same shape."""

  def __init__(
    self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32
  ):
    self.num_features = num_features
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """diffusers ResnetBlock2D ('default' time-embedding norm, SiLU, output scale 1).

  x: [B, H, W, in_channels], temb: [B, temb_channels] or None -> [B, H, W, out_channels].
  h = conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb))))); out = shortcut(x) + h.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    temb_channels: int | None,
    groups: int = 32,
    eps: float = 1e-5,
    output_scale_factor: float = 1.0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, rngs=rngs, **kw)
    self.time_emb_proj = (
      Linear(temb_channels, out_channels, rngs=rngs, **kw) if temb_channels is not None else None
    )
    self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
    self.conv2 = Conv2d(out_channels, out_channels, 3, rngs=rngs, **kw)
    self.conv_shortcut = (
      Conv2d(in_channels, out_channels, 1, padding=0, rngs=rngs, **kw)
      if in_channels != out_channels
      else None
    )
    self.output_scale_factor = output_scale_factor

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
    out = skip + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """diffusers Downsample2D with a conv: 3x3, stride 2. padding=0 pads (0, 1) right/bottom first.

  x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels].
  """

  def __init__(
    self,
    channels: int,
    out_channels: int | None = None,
    *,
    padding: int = 1,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    pad = ((0, 1), (0, 1)) if padding == 0 else padding
    self.conv = Conv2d(
      channels,
      out_channels or channels,
      3,
      stride=2,
      padding=pad,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """torch F.interpolate(mode='nearest') on NHWC: factor 2 by default, or to `size` = (H', W')."""
  h, w = x.shape[1], x.shape[2]
  if size is None or tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  oh, ow = size
  rows = (jnp.arange(oh) * h) // oh  # torch 'nearest': floor(dst * in / out)
  cols = (jnp.arange(ow) * w) // ow
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """diffusers Upsample2D with a conv: nearest x2 (or to `size`), then 3x3 conv.

  x: [B, H, W, C] -> [B, 2H, 2W, out_channels].
  """

  def __init__(
    self,
    channels: int,
    out_channels: int | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.conv = Conv2d(
      channels, out_channels or channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    return self.conv(upsample_nearest(x, size))


def timestep_embedding(
  timesteps: jax.Array,
  dim: int,
  *,
  flip_sin_to_cos: bool,
  freq_shift: float,
  max_period: float = 10000.0,
) -> jax.Array:
  """diffusers get_timestep_embedding: sinusoidal embedding. timesteps [B] -> [B, dim] float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """diffusers TimestepEmbedding: linear_2(silu(linear_1(x))). x: [B, in] -> [B, time_embed_dim]."""

  def __init__(
    self,
    in_channels: int,
    time_embed_dim: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_channels, time_embed_dim, **kw)
    self.linear_2 = Linear(time_embed_dim, time_embed_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))

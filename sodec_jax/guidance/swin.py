"""Swin feature extractor F (transformers' `SwinModel`, Liu et al. 2021) in Flax NNX, NHWC input.

Patch embedding (+ LayerNorm, optional absolute position embeddings), stages of Swin blocks
(window attention with a relative position bias; every second block shifts the windows by
window_size // 2 with a cyclic roll and masks attention across the wrapped regions with -100, as
transformers does), patch merging between stages, final LayerNorm. Output: last_hidden_state
[B, (H/p/2^(S-1)) * (W/p/2^(S-1)), embed_dim * 2^(S-1)], tokens row by row.

Shapes are static, so the window masks and relative-position indices are numpy constants built at
trace time; there are no Python loops over tokens or pixels. Weights are frozen (`FrozenWeight`,
read through `stop_gradient`), gradients flow to the input. Build with
`sodec_jax.weights.transformers.load_swin(folder)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.guidance.vit import (
  MLP,
  VIT_DEFAULT_MEAN,
  VIT_DEFAULT_STD,
  LayerNorm,
  Linear,
  _frozen,
  _pair,
  interpolate_pos_embeddings,
  matmul_precision_scope,
  patch_conv,
  preprocess,
  read,
)
from sodec_jax.layers import resolve_precision
from sodec_jax.remat import call_module

SHIFT_MASK_VALUE = -100.0  # transformers' value for cross-region pairs in shifted windows
_TORCH_LN_EPS = 1e-5  # nn.LayerNorm default: embeddings.norm and downsample.norm use it


@dataclasses.dataclass(frozen=True)
class SwinSpec:
  """The architecture fields of a transformers `SwinConfig` (config.json)."""

  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (4, 4)
  num_channels: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  hidden_act: str = "gelu"
  use_absolute_embeddings: bool = False
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "SwinSpec":
    d = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if cfg.get(f.name) is not None}
    d["image_size"] = _pair(d.get("image_size", cls.image_size))
    d["patch_size"] = _pair(d.get("patch_size", cls.patch_size))
    d["depths"] = tuple(int(v) for v in d.get("depths", cls.depths))
    d["num_heads"] = tuple(int(v) for v in d.get("num_heads", cls.num_heads))
    if len(d["depths"]) != len(d["num_heads"]):
      raise SodecError(
        f"Swin config: depths {d['depths']} and num_heads {d['num_heads']} differ in length"
      )
    return cls(**d)

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

  @property
  def num_features(self) -> int:
    return int(self.embed_dim * 2 ** (len(self.depths) - 1))


def relative_position_index(ws: int) -> np.ndarray:
  """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table (transformers' layout)."""
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shift_window_mask(hp: int, wp: int, ws: int, shift: int) -> np.ndarray:
  """[num_windows, ws*ws, ws*ws] additive mask (0 or -100) of shifted-window attention."""

  def regions(n):
    idx = np.arange(n)
    return (idx >= n - ws).astype(np.int64) + (idx >= n - shift).astype(np.int64)

  img = regions(hp)[:, None] * 3 + regions(wp)[None, :]
  win = img.reshape(hp // ws, ws, wp // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, ws: int) -> jax.Array:
  """[B, H, W, C] -> [B * nW, ws*ws, C] (windows row by row)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(x: jax.Array, ws: int, b: int, h: int, w: int) -> jax.Array:
  c = x.shape[-1]
  x = x.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class WindowAttention(nnx.Module):
  def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool, **kw):
    self.heads, self.dh, self.window = heads, dim // heads, window
    self.precision = kw["precision"]
    self.query = Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.key = Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.value = Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.out = Linear(dim, dim, **kw)
    self.relative_position_bias_table = _frozen(((2 * window - 1) ** 2, heads), kw["param_dtype"])

  def __call__(self, x: jax.Array, batch: int, mask: Optional[np.ndarray]) -> jax.Array:
    """x [B*nW, T, C] windows; mask [nW, T, T] or None."""
    bw, t, c = x.shape
    q, k, v = (f(x).reshape(bw, t, self.heads, self.dh) for f in (self.query, self.key, self.value))
    table = read(self.relative_position_bias_table, jnp.float32)
    bias = table[relative_position_index(self.window)].transpose(2, 0, 1)[None]  # [1, N, T, T]
    if mask is not None:
      bias = bias + jnp.asarray(mask)[:, None]  # [nW, N, T, T]
    bias = jnp.broadcast_to(bias[None], (batch, bw // batch, self.heads, t, t))
    bias = bias.reshape(bw, self.heads, t, t).astype(q.dtype)
    with matmul_precision_scope(self.precision):
      o = jax.nn.dot_product_attention(q, k, v, bias=bias)
    return self.out(o.reshape(bw, t, c))


class SwinBlock(nnx.Module):
  def __init__(self, spec: SwinSpec, dim: int, heads: int, shift: int, **kw):
    ln = dict(eps=spec.layer_norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.window, self.shift = spec.window_size, shift
    self.layernorm_before = LayerNorm(dim, **ln)
    self.attention = WindowAttention(dim, heads, spec.window_size, spec.qkv_bias, **kw)
    self.layernorm_after = LayerNorm(dim, **ln)
    self.mlp = MLP(dim, int(spec.mlp_ratio * dim), spec.hidden_act, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> same."""
    b, h, w, c = x.shape
    ws, shift = self.window, self.shift
    if min(h, w) <= ws:  # transformers: a feature map no larger than the window is one window
      if min(h, w) < ws:
        raise SodecError(
          f"Swin feature map {h}x{w} is smaller than the window {ws}: the input is "
          "too small for this model (transformers fails here too); use a larger input"
        )
      shift = 0
    y = self.layernorm_before(x)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_b or pad_r:
      y = jnp.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = shift_window_mask(hp, wp, ws, shift) if shift else None
    y = self.attention(window_partition(y, ws), b, mask)
    y = window_reverse(y, ws, b, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y[:, :h, :w]
    return x + self.mlp(self.layernorm_after(x))


class PatchMerging(nnx.Module):
  """2x2 neighbourhood -> concat (order (0,0), (1,0), (0,1), (1,1)) -> LayerNorm -> Linear 4C->2C."""

  def __init__(self, dim: int, **kw):
    self.norm = LayerNorm(
      4 * dim, eps=_TORCH_LN_EPS, dtype=kw["dtype"], param_dtype=kw["param_dtype"]
    )
    self.reduction = Linear(4 * dim, 2 * dim, use_bias=False, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate(
      [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1
    )
    return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
  def __init__(self, spec: SwinSpec, dim: int, depth: int, heads: int, downsample: bool, **kw):
    self.blocks = nnx.List(
      [
        SwinBlock(spec, dim, heads, 0 if j % 2 == 0 else spec.window_size // 2, **kw)
        for j in range(depth)
      ]
    )
    self.downsample = PatchMerging(dim, **kw) if downsample else None
    self.remat = False  # per block (sodec_jax/remat.py)

  def __call__(self, x):
    for block in self.blocks:
      x = call_module(block, self.remat, x)
    return x if self.downsample is None else self.downsample(x)


class Swin(nnx.Module):
  """transformers `SwinModel` up to `last_hidden_state` (the average pooler is not part of F).

  Args as `ViT`: spec, dtype (compute), param_dtype (storage), precision, image_mean/std.
  """

  def __init__(
    self,
    spec: SwinSpec,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    precision=None,
    image_mean: Sequence[float] = VIT_DEFAULT_MEAN,
    image_std: Sequence[float] = VIT_DEFAULT_STD,
  ):
    self.spec = spec
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    self.precision = resolve_precision(precision, self.dtype)
    self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
    self.ignored_keys: tuple[str, ...] = ()  # checkpoint keys the loader skipped (pooler, heads)
    kw = dict(dtype=self.dtype, param_dtype=param_dtype, precision=self.precision)
    d, (ph, pw) = spec.embed_dim, spec.patch_size
    self.patch_kernel = _frozen((ph, pw, spec.num_channels, d), param_dtype)
    self.patch_bias = _frozen((d,), param_dtype)
    self.embed_norm = LayerNorm(d, eps=_TORCH_LN_EPS, dtype=self.dtype, param_dtype=param_dtype)
    self.position_embeddings = (
      _frozen((1, spec.grid[0] * spec.grid[1], d), param_dtype)
      if spec.use_absolute_embeddings
      else None
    )
    n = len(spec.depths)
    self.stages = nnx.List(
      [
        SwinStage(spec, int(d * 2**s), spec.depths[s], spec.num_heads[s], s < n - 1, **kw)
        for s in range(n)
      ]
    )
    self.layernorm = LayerNorm(
      spec.num_features, eps=spec.layer_norm_eps, dtype=self.dtype, param_dtype=param_dtype
    )

  def __call__(
    self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
  ) -> jax.Array:
    """pixel_values [B, H, W, C], already normalised -> last_hidden_state [B, T, D].

    Any size works (padded right/bottom to the patch and window grids as transformers does);
    `interpolate_pos_encoding` only matters for checkpoints with absolute position embeddings.
    """
    b, h, w, c = pixel_values.shape
    spec = self.spec
    if c != spec.num_channels:
      raise SodecError(
        f"Swin expects NHWC input with {spec.num_channels} channels, got {pixel_values.shape}"
      )
    ph, pw = spec.patch_size
    x = pixel_values.astype(self.dtype)
    if h % ph or w % pw:
      x = jnp.pad(x, ((0, 0), (0, (ph - h % ph) % ph), (0, (pw - w % pw) % pw), (0, 0)))
    x = patch_conv(
      x,
      read(self.patch_kernel, self.dtype),
      read(self.patch_bias, self.dtype),
      spec.patch_size,
      self.precision,
    )
    x = self.embed_norm(x)
    gh, gw = x.shape[1], x.shape[2]
    if self.position_embeddings is not None:
      pos = read(self.position_embeddings, self.dtype)
      if interpolate_pos_encoding:
        pos = interpolate_pos_embeddings(pos, 0, (gh, gw))
      elif pos.shape[1] != gh * gw:
        raise SodecError(
          f"input gives a {gh}x{gw} patch grid but the absolute position embeddings "
          f"hold {pos.shape[1]} positions; resize the input or pass "
          "interpolate_pos_encoding=True"
        )
      x = x + pos.reshape(1, gh, gw, -1)
    for stage in self.stages:
      x = stage(x)
    x = self.layernorm(x)
    return x.reshape(b, x.shape[1] * x.shape[2], x.shape[3])

  def preprocess(self, x01: jax.Array, **kw) -> jax.Array:
    """[0, 1] NHWC images -> this model's input size and normalisation (see `vit.preprocess`)."""
    return preprocess(x01, self.image_mean, self.image_std, self.spec.image_size, **kw)


__all__: Sequence[str] = (
  "Swin",
  "SwinSpec",
  "relative_position_index",
  "shift_window_mask",
  "window_partition",
  "window_reverse",
)

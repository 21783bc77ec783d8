"""ViT feature extractor F (transformers' `ViTModel`) in Flax NNX, NHWC input.

The fidelity guidance module runs x_f = D_a(y_hat) through a frozen pretrained ViT and hands the
token features [B, 1 + (H/p)(W/p), D] (CLS first, then patches row by row) to the projection F_p.
This file also holds the pieces the Swin extractor reuses: frozen `Linear`/`LayerNorm`, the
activation table, torch-exact bicubic resizing of position-embedding grids, and `preprocess`.

Weights are `FrozenWeight` variables (not `nnx.Param`, see `sodec_jax.layers`): optimizers
and `nnx.grad` over `nnx.Param` never touch them, and every read goes through `stop_gradient`, while
gradients still flow to the input image (D_a trains through F in stages 2-4).

Build with `sodec_jax.weights.transformers.load_vit(folder)`; a bare `ViT(spec)` holds zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.layers import FrozenWeight, resolve_precision
from sodec_jax.remat import call_module

# transformers' ViTImageProcessor defaults (used when a folder has no preprocessor_config.json).
VIT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
VIT_DEFAULT_STD = (0.5, 0.5, 0.5)

_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch GELU (erf)
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise SodecError(
      f"unsupported hidden_act {name!r} (supported: {', '.join(sorted(_ACTIVATIONS))})"
    )
  return _ACTIVATIONS[name]


def _pair(v) -> tuple[int, int]:
  if isinstance(v, (list, tuple)):
    return int(v[0]), int(v[1])
  return int(v), int(v)


def _frozen(shape, param_dtype) -> FrozenWeight:
  return FrozenWeight(jnp.zeros(shape, param_dtype))


def read(w: FrozenWeight, dtype) -> jax.Array:
  """A frozen weight in the compute dtype, with no gradient."""
  return jax.lax.stop_gradient(w[...]).astype(dtype)


class Linear(nnx.Module):
  """torch `nn.Linear`; kernel stored [in, out]."""

  def __init__(
    self,
    din: int,
    dout: int,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    precision=None,
  ):
    self.dtype, self.precision = dtype, precision
    self.kernel = _frozen((din, dout), param_dtype)
    self.bias = _frozen((dout,), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.matmul(x.astype(self.dtype), read(self.kernel, self.dtype), precision=self.precision)
    return y if self.bias is None else y + read(self.bias, self.dtype)


class LayerNorm(nnx.Module):
  """torch `nn.LayerNorm` over the last axis; statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype, self.eps = dtype, float(eps)
    self.scale = _frozen((dim,), param_dtype)
    self.bias = _frozen((dim,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * read(self.scale, jnp.float32) + read(self.bias, jnp.float32)
    return y.astype(self.dtype)


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, **kw):
    activation(act)  # unknown names fail at build time
    self.act = act
    self.fc1 = Linear(dim, hidden, **kw)
    self.fc2 = Linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


def matmul_precision_scope(precision):
  """`jax.nn.dot_product_attention` takes no precision argument: for HIGHEST (float32 parity, no
  TF32 on GPUs) set the default matmul precision around it instead."""
  if precision == jax.lax.Precision.HIGHEST and hasattr(jax, "default_matmul_precision"):
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def patch_conv(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, patch: tuple[int, int], precision
) -> jax.Array:
  """torch `Conv2d(kernel=stride=patch)` on NHWC (trailing pixels that do not fill a patch are
  dropped, as torch does)."""
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=patch,
    padding="VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=precision,
  )
  return y + bias


# ----------------------------------------------------------------------------- bicubic (torch)


def torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] matrix M with `M @ v` == torch `interpolate(mode="bicubic",
  align_corners=False, size=n_out)` along one axis (scale n_in / n_out, Keys kernel a = -0.75,
  out-of-range taps clamped to the border)."""
  scale = n_in / n_out
  src = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
  i0 = np.floor(src)
  t = src - i0

  def near(d):  # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):  # 4 taps; vectorised over outputs
    idx = np.clip(i0.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weights[:, k])
  return m


def resize_pos_grid(grid: jax.Array, new_hw: tuple[int, int]) -> jax.Array:
  """[1, h, w, D] position-embedding grid -> [1, H, W, D], torch-bicubic (align_corners=False)."""
  _, h, w, _ = grid.shape
  mh = jnp.asarray(torch_bicubic_matrix(h, new_hw[0]), jnp.float32)
  mw = jnp.asarray(torch_bicubic_matrix(w, new_hw[1]), jnp.float32)
  g = grid.astype(jnp.float32)
  out = jnp.einsum("Hh,bhwd->bHwd", mh, g, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("Ww,bhwd->bhWd", mw, out, precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid.dtype)


def interpolate_pos_embeddings(
  pos: jax.Array, n_prefix: int, grid_hw: tuple[int, int]
) -> jax.Array:
  """transformers' `interpolate_pos_encoding`: [1, n_prefix + n*n, D] -> [1, n_prefix + H*W, D].

  As transformers, the table is returned unchanged when it already has H*W patch positions and the
  grid is square; otherwise the square n x n grid is resized bicubically to grid_hw.
  """
  n_pos = pos.shape[1] - n_prefix
  gh, gw = grid_hw
  if n_pos == gh * gw and gh == gw:
    return pos
  side = int(round(n_pos**0.5))
  if side * side != n_pos:
    raise SodecError(f"cannot interpolate {n_pos} position embeddings: not a square grid")
  dim = pos.shape[-1]
  grid = pos[:, n_prefix:].reshape(1, side, side, dim)
  patch = resize_pos_grid(grid, (gh, gw)).reshape(1, gh * gw, dim)
  return jnp.concatenate([pos[:, :n_prefix], patch], axis=1)


# ----------------------------------------------------------------------------- preprocessing


def preprocess(
  x01: jax.Array,
  image_mean: Sequence[float],
  image_std: Sequence[float],
  size,
  *,
  method: str = "bilinear",
  antialias: bool = True,
) -> jax.Array:
  """Images in [0, 1], NHWC [B, H, W, 3] -> the extractor's input: resized to `size` (int or
  (h, w)) with `jax.image.resize` (bilinear with antialiasing by default, close to the PIL
  bilinear resize of transformers' ViTImageProcessor; pass method="cubic" for bicubic), then
  (x - mean) / std per channel. Differentiable; no resize when the size already matches.
  """
  x = jnp.asarray(x01)
  if x.ndim != 4 or x.shape[-1] != len(image_mean):
    raise SodecError(
      f"preprocess expects NHWC images with {len(image_mean)} channels, got {x.shape}"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  h, w = _pair(size)
  if (x.shape[1], x.shape[2]) != (h, w):
    x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method=method, antialias=antialias)
  mean = jnp.asarray(image_mean, x.dtype)
  std = jnp.asarray(image_std, x.dtype)
  return (x - mean) / std


# ----------------------------------------------------------------------------- ViT


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """The architecture fields of a transformers `ViTConfig` (config.json) that the forward needs."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (16, 16)
  num_channels: int = 3
  qkv_bias: bool = True
  head_dim: Optional[int] = None

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "ViTSpec":
    d = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if cfg.get(f.name) is not None}
    d["image_size"] = _pair(d.get("image_size", cls.image_size))
    d["patch_size"] = _pair(d.get("patch_size", cls.patch_size))
    return cls(**d)

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

  @property
  def num_tokens(self) -> int:
    return 1 + self.grid[0] * self.grid[1]

  @property
  def dim_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


class ViTAttention(nnx.Module):
  def __init__(self, spec: ViTSpec, **kw):
    self.heads, self.dh = spec.num_attention_heads, spec.dim_head
    inner = self.heads * self.dh
    self.precision = kw["precision"]
    self.query = Linear(spec.hidden_size, inner, use_bias=spec.qkv_bias, **kw)
    self.key = Linear(spec.hidden_size, inner, use_bias=spec.qkv_bias, **kw)
    self.value = Linear(spec.hidden_size, inner, use_bias=spec.qkv_bias, **kw)
    self.out = Linear(inner, spec.hidden_size, **kw)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (f(x).reshape(b, t, self.heads, self.dh) for f in (self.query, self.key, self.value))
    with matmul_precision_scope(self.precision):
      o = jax.nn.dot_product_attention(q, k, v)
    return self.out(o.reshape(b, t, self.heads * self.dh))


class ViTLayer(nnx.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, spec: ViTSpec, **kw):
    ln = dict(eps=spec.layer_norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.layernorm_before = LayerNorm(spec.hidden_size, **ln)
    self.attention = ViTAttention(spec, **kw)
    self.layernorm_after = LayerNorm(spec.hidden_size, **ln)
    self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, **kw)

  def __call__(self, x):
    x = x + self.attention(self.layernorm_before(x))
    return x + self.mlp(self.layernorm_after(x))


class ViT(nnx.Module):
  """transformers `ViTModel` up to `last_hidden_state` (the pooler is not part of F).

  Args:
    spec: architecture (`ViTSpec.from_config(config_json_dict)`).
    dtype: compute dtype; param_dtype: storage dtype of the frozen weights.
    precision: matmul precision; None -> HIGHEST for float32 compute, DEFAULT otherwise.
    image_mean, image_std: the checkpoint's normalisation (for `self.preprocess`).
  """

  def __init__(
    self,
    spec: ViTSpec,
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
    d, (ph, pw) = spec.hidden_size, spec.patch_size
    self.patch_kernel = _frozen((ph, pw, spec.num_channels, d), param_dtype)
    self.patch_bias = _frozen((d,), param_dtype)
    self.cls_token = _frozen((1, 1, d), param_dtype)
    self.position_embeddings = _frozen((1, spec.num_tokens, d), param_dtype)
    self.layers = nnx.List([ViTLayer(spec, **kw) for _ in range(spec.num_hidden_layers)])
    self.remat = False  # per transformer layer (sodec_jax/remat.py)
    self.layernorm = LayerNorm(
      d, eps=spec.layer_norm_eps, dtype=self.dtype, param_dtype=param_dtype
    )

  def embed(self, pixel_values: jax.Array, interpolate_pos_encoding: bool) -> jax.Array:
    b, h, w, c = pixel_values.shape
    spec = self.spec
    if c != spec.num_channels:
      raise SodecError(
        f"ViT expects NHWC input with {spec.num_channels} channels, got {pixel_values.shape}"
      )
    if not interpolate_pos_encoding and (h, w) != spec.image_size:
      raise SodecError(
        f"input size {h}x{w} does not match the ViT's {spec.image_size[0]}x"
        f"{spec.image_size[1]}; resize it (preprocess) or pass interpolate_pos_encoding=True"
      )
    x = patch_conv(
      pixel_values.astype(self.dtype),
      read(self.patch_kernel, self.dtype),
      read(self.patch_bias, self.dtype),
      spec.patch_size,
      self.precision,
    )
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, spec.hidden_size)
    cls = jnp.broadcast_to(read(self.cls_token, self.dtype), (b, 1, spec.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    pos = read(self.position_embeddings, self.dtype)
    if interpolate_pos_encoding:
      pos = interpolate_pos_embeddings(pos, 1, (gh, gw))
    return x + pos

  def __call__(
    self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
  ) -> jax.Array:
    """pixel_values [B, H, W, C], already normalised -> last_hidden_state [B, 1 + gh*gw, D]."""
    x = self.embed(pixel_values, interpolate_pos_encoding)
    for layer in self.layers:
      x = call_module(layer, self.remat, x)
    return self.layernorm(x)

  def preprocess(self, x01: jax.Array, **kw) -> jax.Array:
    """[0, 1] NHWC images -> this model's input size and normalisation (see `preprocess`)."""
    return preprocess(x01, self.image_mean, self.image_std, self.spec.image_size, **kw)


__all__: Sequence[str] = (
  "ViT",
  "ViTSpec",
  "Linear",
  "LayerNorm",
  "MLP",
  "preprocess",
  "interpolate_pos_embeddings",
  "torch_bicubic_matrix",
  "resize_pos_grid",
  "activation",
  "VIT_DEFAULT_MEAN",
  "VIT_DEFAULT_STD",
)

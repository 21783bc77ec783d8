"""CLIP-IQA (Wang, Chan & Loy, AAAI 2023, "Exploring CLIP for Assessing the Look and Feel of
Images"): a no-reference quality score in [0, 1], higher is better, from a CLIP ViT in Flax NNX.

    # python convert/from_torch.py clip-iqa --src clip-vit-base-patch32/ --out /weights/clip-iqa
    iqa = sodec_jax.weights.clip.load_clip_iqa("/weights/clip-iqa")
    scores = iqa(x01)                          # x01 [B, H, W, 3] in [0, 1] -> [B]

Definition (as CLIP-IQA / pyiqa's `clipiqa`): prompts ("Good photo.", "Bad photo."); f_img is the
CLIP image embedding (visual_projection of the post-layernormed CLS token), f_good / f_bad the CLIP
text embeddings of the prompts, all L2-normalised;
logits = s * [f_img . f_good, f_img . f_bad] with s = exp(logit_scale) of the checkpoint (100 for
OpenAI's CLIP: logit_scale = ln 100 there); score = softmax(logits)[0] = sigmoid(s (cos_good -
cos_bad)). With K prompt pairs (good_k, bad_k interleaved) the K pair scores are averaged, as pyiqa
does. The text embeddings are computed once, with the checkpoint's own text tower in PyTorch, when
the checkpoint is converted (`sodec_jax.weights.clip`); only the image tower runs here.

Preprocessing is CLIP's own (transformers' CLIPImageProcessor, whose values the converter stores),
done in JAX inside `__call__`: resize so the shortest side is `shortest_edge` (the long side is
`int(shortest_edge * long / short)`, as transformers computes it) with antialiased bicubic (Keys
a = -0.5, the kernel widened by the downscale factor: PIL's BICUBIC, which CLIPImageProcessor uses,
to ~1e-5 on float images), clip to [0, 1] (PIL works on uint8, which clips the bicubic overshoot),
center crop `crop_size` (top = (H - h) // 2, left = (W - w) // 2; zero padding when the image is
smaller), normalise with OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (or the folder's mean / std). An image
that already has the crop size is only normalised. On uint8 images PIL resamples horizontally, then
vertically, rounding and clipping to uint8 after each pass, while we stay in float32: against
CLIPImageProcessor on uint8 photos the model input differs by ~0.25 grey levels on average (the
rounding) and by up to a few grey levels next to saturated edges (the clip between the passes).

NOT the paper's numbers. The original CLIP-IQA uses OpenAI's CLIP ResNet-50 on the full-resolution
image with its attention-pool positional embedding removed; transformers has no CLIP ResNet, so this
metric runs CLIP ViT checkpoints (e.g. openai/clip-vit-base-patch32, clip-vit-large-patch14) at
their native resolution after CLIP's resize and center crop (which also ignores the image outside
the central square). Scores are comparable with each other for one converted checkpoint (and
between runs of it), not with the RN50 CLIP-IQA figures in papers, nor across checkpoints.

Weights are `FrozenWeight` variables (never trained; gradients stop at them but flow to the image,
except where the [0, 1] clip after resizing is active).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.guidance.vit import (
  LayerNorm,
  Linear,
  ViTLayer,
  ViTSpec,
  activation,
  interpolate_pos_embeddings,
  read,
)
from sodec_jax.layers import FrozenWeight, resolve_precision

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ("Good photo.", "Bad photo.")

# PIL resample codes (transformers' PILImageResampling) -> jax.image.resize methods.
_RESAMPLE = {2: "linear", 3: "cubic"}


def _pair(v) -> tuple[int, int]:
  if isinstance(v, (list, tuple)):
    return int(v[0]), int(v[1])
  return int(v), int(v)


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
  """CLIPImageProcessor's settings (preprocessor_config.json) that `clip_preprocess` applies.

  resize: ("shortest_edge", n) or ("size", (h, w)) or None (no resize); crop: (h, w) or None;
  resample: "cubic" (PIL BICUBIC, CLIP's) or "linear" (PIL BILINEAR).
  """

  resize: Optional[tuple] = ("shortest_edge", 224)
  crop: Optional[tuple[int, int]] = (224, 224)
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: str = "cubic"

  @classmethod
  def from_config(cls, pre: Mapping[str, Any], image_size: int) -> "ClipPreprocess":
    """From a preprocessor_config.json dict ({} -> CLIP's defaults at `image_size`)."""
    resize: Optional[tuple] = ("shortest_edge", int(image_size))
    size = pre.get("size")
    if isinstance(size, Mapping) and size.get("shortest_edge"):
      resize = ("shortest_edge", int(size["shortest_edge"]))
    elif isinstance(size, Mapping) and size.get("height") and size.get("width"):
      resize = ("size", (int(size["height"]), int(size["width"])))
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
      resize = ("shortest_edge", int(size))  # old configs: "size": 224
    elif size is not None:
      raise SodecError(
        f"preprocessor_config.json: unsupported size {size!r} (expected "
        "{'shortest_edge': n} or {'height': h, 'width': w})"
      )
    if pre.get("do_resize", True) is False:
      resize = None
    crop_size = pre.get("crop_size", image_size)
    if isinstance(crop_size, Mapping):
      crop = (int(crop_size["height"]), int(crop_size["width"]))
    else:
      crop = _pair(crop_size)
    if pre.get("do_center_crop", True) is False:
      crop = None
    resample = int(pre.get("resample", 3))
    if resample not in _RESAMPLE:
      raise SodecError(
        f"preprocessor_config.json: resample {resample} is not supported (3 = "
        "bicubic, CLIP's, or 2 = bilinear); fix the file or remove the key"
      )
    mean = tuple(float(m) for m in pre.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(s) for s in pre.get("image_std", OPENAI_CLIP_STD))
    return cls(resize=resize, crop=crop, mean=mean, std=std, resample=_RESAMPLE[resample])

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ClipPreprocess":
    """Inverse of `to_dict` (what the converter stores)."""
    r = d.get("resize")
    resize = None if r is None else (r[0], int(r[1]) if r[0] == "shortest_edge" else _pair(r[1]))
    crop = None if d.get("crop") is None else _pair(d["crop"])
    return cls(
      resize=resize,
      crop=crop,
      mean=tuple(d["mean"]),
      std=tuple(d["std"]),
      resample=d.get("resample", "cubic"),
    )

  def to_dict(self) -> dict:
    return {
      "resize": None if self.resize is None else list(self.resize),
      "crop": None if self.crop is None else list(self.crop),
      "mean": list(self.mean),
      "std": list(self.std),
      "resample": self.resample,
    }

  def output_size(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (final h, w)) for an h x w input (static Python ints)."""
    rh, rw = h, w
    if self.resize is not None and self.resize[0] == "shortest_edge":
      n = int(self.resize[1])
      short, long = (w, h) if w <= h else (h, w)
      new_long = int(n * long / short)  # transformers' get_resize_output_image_size
      rh, rw = (new_long, n) if w <= h else (n, new_long)
    elif self.resize is not None:
      rh, rw = self.resize[1]
    return (rh, rw), (self.crop if self.crop is not None else (rh, rw))


def center_crop(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """transformers' center_crop on NHWC: top = (H - h) // 2, left = (W - w) // 2; a side smaller
  than the crop is zero-padded (ceil of the difference / 2 before it)."""
  ch, cw = size
  _, h, w, _ = x.shape
  ph, pw = max(ch - h, 0), max(cw - w, 0)
  if ph or pw:
    x = jnp.pad(
      x,
      (
        (0, 0),
        (math.ceil(ph / 2), ph - math.ceil(ph / 2)),
        (math.ceil(pw / 2), pw - math.ceil(pw / 2)),
        (0, 0),
      ),
    )
    h, w = x.shape[1], x.shape[2]
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[:, top : top + ch, left : left + cw]


def clip_preprocess(x01: jax.Array, pre: ClipPreprocess) -> jax.Array:
  """[B, H, W, 3] images in [0, 1] -> CLIP's pixel_values, NHWC [B, h, w, 3] (module docstring).

  Resize (skipped when the size already matches), clip to [0, 1], center crop, (x - mean) / std.
  All in float32; jittable (the sizes are static functions of the input shape).
  """
  x = jnp.asarray(x01)
  if x.ndim != 4 or x.shape[-1] != len(pre.mean):
    raise SodecError(
      f"CLIP-IQA expects NHWC images with {len(pre.mean)} channels in [0, 1], "
      f"got shape {tuple(x.shape)}"
    )
  if x.shape[1] < 1 or x.shape[2] < 1:
    raise SodecError(f"CLIP-IQA got an empty image batch of shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  (rh, rw), _ = pre.output_size(x.shape[1], x.shape[2])
  if (rh, rw) != (x.shape[1], x.shape[2]):
    x = jax.image.resize(x, (x.shape[0], rh, rw, x.shape[3]), method=pre.resample, antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
  if pre.crop is not None:
    x = center_crop(x, pre.crop)
  return (x - jnp.asarray(pre.mean, jnp.float32)) / jnp.asarray(pre.std, jnp.float32)


# ----------------------------------------------------------------------------- the image tower


@dataclasses.dataclass(frozen=True)
class ClipVisionSpec:
  """transformers `CLIPVisionConfig` fields the forward needs, plus CLIPConfig's projection_dim."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  projection_dim: int = 512

  @classmethod
  def from_config(cls, vision_config: Mapping[str, Any], projection_dim: int) -> "ClipVisionSpec":
    d = {
      f.name: vision_config[f.name]
      for f in dataclasses.fields(cls)
      if vision_config.get(f.name) is not None and f.name != "projection_dim"
    }
    spec = cls(**d, projection_dim=int(projection_dim))
    if spec.hidden_size % spec.num_attention_heads:
      raise SodecError(
        f"CLIP vision config: hidden_size {spec.hidden_size} is not divisible by "
        f"num_attention_heads {spec.num_attention_heads}"
      )
    activation(spec.hidden_act)
    return spec

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return 1 + self.grid * self.grid


class ClipVision(nnx.Module):
  """transformers `CLIPVisionModel` + `visual_projection` (`CLIPModel.get_image_features`), NHWC.

  Args:
    spec: architecture (`ClipVisionSpec.from_config(config["vision_config"], projection_dim)`).
    dtype: compute dtype; param_dtype: storage dtype of the frozen weights (default = dtype).
    precision: matmul precision; None -> HIGHEST for float32 compute, DEFAULT otherwise.

  A bare `ClipVision(spec)` holds zeros; weights come from
  `sodec_jax.weights.clip.load_clip_iqa` (converted folder).
  """

  def __init__(self, spec: ClipVisionSpec, *, dtype=jnp.float32, param_dtype=None, precision=None):
    self.spec = spec
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    self.precision = resolve_precision(precision, self.dtype)
    self.ignored_keys: tuple[str, ...] = ()  # checkpoint keys the loader skipped
    kw = dict(dtype=self.dtype, param_dtype=param_dtype, precision=self.precision)
    d, p = spec.hidden_size, spec.patch_size

    def frozen(*shape):
      return FrozenWeight(jnp.zeros(shape, param_dtype))

    self.patch_kernel = frozen(p, p, spec.num_channels, d)  # Conv2d(bias=False), HWIO
    self.class_embedding = frozen(d)
    self.position_embedding = frozen(spec.num_positions, d)
    self.pre_layrnorm = LayerNorm(
      d, eps=spec.layer_norm_eps, dtype=self.dtype, param_dtype=param_dtype
    )
    # CLIPEncoderLayer is the pre-LN block of ViT (x + Attn(LN1(x)), x + MLP(LN2(x)), q/k/v/out
    # projections with bias, no mask): the one implementation in guidance/vit.py.
    block = ViTSpec(
      hidden_size=d,
      num_hidden_layers=spec.num_hidden_layers,
      num_attention_heads=spec.num_attention_heads,
      intermediate_size=spec.intermediate_size,
      hidden_act=spec.hidden_act,
      layer_norm_eps=spec.layer_norm_eps,
    )
    self.layers = nnx.List([ViTLayer(block, **kw) for _ in range(spec.num_hidden_layers)])
    self.post_layernorm = LayerNorm(
      d, eps=spec.layer_norm_eps, dtype=self.dtype, param_dtype=param_dtype
    )
    self.visual_projection = Linear(d, spec.projection_dim, use_bias=False, **kw)

  def embed(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
    """[B, H, W, C] normalised pixels -> [B, 1 + gh*gw, D] (CLS first, patches row by row)."""
    b, h, w, c = pixel_values.shape
    spec = self.spec
    if c != spec.num_channels:
      raise SodecError(
        f"CLIP vision tower expects NHWC input with {spec.num_channels} channels, "
        f"got {tuple(pixel_values.shape)}"
      )
    if not interpolate_pos_encoding and (h, w) != (spec.image_size, spec.image_size):
      raise SodecError(
        f"input size {h}x{w} does not match the CLIP vision tower's "
        f"{spec.image_size}x{spec.image_size}; preprocess it (clip_preprocess) or "
        "pass interpolate_pos_encoding=True"
      )
    x = jax.lax.conv_general_dilated(
      pixel_values.astype(self.dtype),
      read(self.patch_kernel, self.dtype),
      window_strides=(spec.patch_size, spec.patch_size),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, spec.hidden_size)
    cls = jnp.broadcast_to(read(self.class_embedding, self.dtype), (b, 1, spec.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    pos = read(self.position_embedding, self.dtype)[None]
    if interpolate_pos_encoding:
      pos = interpolate_pos_embeddings(pos, 1, (gh, gw))
    return x + pos

  def encode(
    self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """-> (last_hidden_state [B, T, D], pooler_output [B, D] = post_layernorm(CLS))."""
    x = self.pre_layrnorm(self.embed(pixel_values, interpolate_pos_encoding))
    for layer in self.layers:
      x = layer(x)
    return x, self.post_layernorm(x[:, 0])

  def __call__(
    self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
  ) -> jax.Array:
    """pixel_values [B, H, W, C], already normalised -> image embeddings [B, projection_dim]
    (not L2-normalised; = `CLIPModel.get_image_features(...).pooler_output`)."""
    _, pooled = self.encode(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    return self.visual_projection(pooled)


# ----------------------------------------------------------------------------- CLIP-IQA


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipIQA(nnx.Module):
  """CLIP-IQA score: `__call__(x01 [B, H, W, 3] in [0, 1]) -> [B]` in [0, 1], higher is better.

  Args:
    spec: the CLIP vision tower; preprocess: CLIP's preprocessing (`ClipPreprocess`).
    prompts: the prompt texts, (good, bad) pairs in order (for the record; their embeddings are
      `text_embeds` [len(prompts), projection_dim], filled by the loader).
    dtype, param_dtype, precision: of the vision tower (see `ClipVision`). The prompt embeddings,
      the logit scale, the normalisation and the softmax are float32.

  Variables: `vision` (ClipVision), `text_embeds` [2K, P] (raw `get_text_features` outputs),
  `logit_scale` [] (the checkpoint's log scale; logits use exp(logit_scale)).
  """

  def __init__(
    self,
    spec: ClipVisionSpec,
    preprocess: ClipPreprocess = ClipPreprocess(),
    *,
    prompts: Sequence[str] = PROMPTS,
    dtype=jnp.float32,
    param_dtype=None,
    precision=None,
  ):
    if len(prompts) < 2 or len(prompts) % 2:
      raise SodecError(f"CLIP-IQA needs (good, bad) prompt pairs, got {len(prompts)} prompts")
    self.spec, self.pre, self.prompts = spec, preprocess, tuple(prompts)
    self.vision = ClipVision(spec, dtype=dtype, param_dtype=param_dtype, precision=precision)
    self.text_embeds = FrozenWeight(
      jnp.zeros((len(self.prompts), spec.projection_dim), jnp.float32)
    )
    self.logit_scale = FrozenWeight(jnp.zeros((), jnp.float32))

  def preprocess(self, x01: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> pixel_values [B, crop_h, crop_w, 3] (`clip_preprocess`)."""
    return clip_preprocess(x01, self.pre)

  def image_embeds(self, x01: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> raw CLIP image embeddings [B, projection_dim] (float32)."""
    return self.vision(self.preprocess(x01)).astype(jnp.float32)

  def logits(self, x01: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> [B, 2K]: exp(logit_scale) * cos(f_img, f_prompt)."""
    f_img = _l2_normalize(self.image_embeds(x01))
    f_txt = _l2_normalize(read(self.text_embeds, jnp.float32))
    scale = jnp.exp(read(self.logit_scale, jnp.float32))
    return scale * jnp.matmul(f_img, f_txt.T, precision=jax.lax.Precision.HIGHEST)

  def __call__(self, x01: jax.Array) -> jax.Array:
    """[B, H, W, 3] images in [0, 1] -> [B] CLIP-IQA scores in [0, 1] (mean over prompt pairs of
    softmax([logit_good, logit_bad])[0])."""
    logits = self.logits(x01)
    pairs = logits.reshape(logits.shape[0], -1, 2)
    return jnp.mean(jax.nn.softmax(pairs, axis=-1)[..., 0], axis=-1)


__all__: Sequence[str] = (
  "ClipIQA",
  "ClipVision",
  "ClipVisionSpec",
  "ClipPreprocess",
  "clip_preprocess",
  "center_crop",
  "OPENAI_CLIP_MEAN",
  "OPENAI_CLIP_STD",
  "PROMPTS",
)

"""Public API: load_model, compress, decompress, read_header, and the coding steps.

(Over 450 lines: the whole coding path, from image to bytes and back, including the file
format's version handling, is kept in one module so that what a .sodec file holds reads in
one place.)

    import sodec_jax
    model = sodec_jax.load_model("runs/tiny")           # the --workdir training wrote
    data = sodec_jax.compress(model, image)             # image: uint8 [H, W, 3] -> bytes
    image2 = sodec_jax.decompress(model, data)          # -> uint8 [H, W, 3]

The steps (sodec_jax.api; H', W' = the image padded by pad_image (to 64 natively),
h = H'/16, w = W'/16, C / N = latent / hyper-latent channels; batch-first NHWC):
  encode_latents(model, image) -> Latents       uint8 [H, W, 3] (or a list of same-size ones)
      z_hat [B, h/4, w/4, N], mu, sigma, y_symbols, indexes, y_hat [B, h, w, C] (numpy)
  encode_within(model, image, max_memory) -> Latents   the same for one image, every encoder
      program within a memory budget (E, H_a, P in bands of rows when needed: banding.py)
  pack(model, latents[b], H, W) -> bytes        range coding + the .sodec container
  decode_latents(model, data) -> (header, y_hat [1, h, w, C], z_hat [1, h/4, w/4, N])
  reconstruct(model, y_hat, z_hat) -> (x_hat, x_f), float [B, H', W', 3]; to_uint8 crops
  compress = encode_latents (encode_within with a budget) + pack
  decompress = decode_latents + reconstruct + to_uint8
  compress_batch / decompress_batch: same-size images, the networks in one batched call
The networks alone (jitted, jax arrays out): analysis(model, x [B, H', W', 3]) -> (y, z),
prior(model, z_hat) -> (mu, sigma), fidelity(model, y_hat) -> x_f = D_a(y_hat).

Coding path (all float work in jitted functions, the same compiled program on the encoder and
the decoder side; which model codes each symbol is computed with integers only):
  x -> analysis -> (y, z);  z_hat = round(z)
  (mu, sigma) = prior(z_hat)                     # same function, same shapes, both sides
  y symbols = round(y - mu);  scale index = IntegerScaleIndexer(z_hat) (integers only)
  streams: z symbols (one factorized model per channel), y symbols (one Gaussian per index)
Decoding: z_hat -> indexes (integers) -> y symbols; mu = P(z_hat); y_hat = symbols + mu -> the
decoder the header names, one jit:
  codec:     D_a(y_hat)
  diffusion: D_m(x0(UNet(T_s(y_hat, H_s(z_hat)), 999, F_p(F(D_a(y_hat)))))) (see model.py)
-> clamp, crop, uint8. Only the container and the range decoding report a bad file
(SodecError); a failure anywhere else (the networks, memory) is a bug and propagates.

Determinism: which model codes each symbol (the z channel, the y scale index) is computed
with exact integer arithmetic from the integers z_hat (codec/integer_prior.py), so a file
decodes on any machine, backend, batch size or XLA version; float differences only move the
reconstruction (mu and the decoders) by rounding error. Version-1 files (float32 sigma indexes)
still decode where they were written (see docs/ARCHITECTURE.md, "Determinism").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax import banding, tiling
from sodec_jax import precision as precision_lib
from sodec_jax.codec import bitstream, integer_prior, padding
from sodec_jax.codec.entropy import (
  CodingTable,
  factorized_coding_table,
  gaussian_coding_table,
  scale_indexes,
  scale_table,
)
from sodec_jax.codec.hific import OPTIONAL_FIELDS
from sodec_jax.color_fix import check_kind as check_color_fix
from sodec_jax.errors import SodecError
from sodec_jax.model import PAD_MULTIPLE, SODEC
from sodec_jax.pretrained import build_model, build_model_to_restore, check_restored


@dataclasses.dataclass
class LoadedModel:
  """A model ready to code: weights, coding tables, the exact scale indexer and the jitted
  pieces of the coding path (private: call them through analysis, prior, fidelity and
  reconstruct). `indexer(z_hat [B, h/4, w/4, N]) -> uint8 [B, h, w, C]`: the y scale indexes
  of .sodec version 2 (integer arithmetic, identical on every machine)."""

  config: Any
  model: SODEC
  fingerprint: bytes
  step: int
  scales: np.ndarray
  y_coder: bitstream.RangeCoder
  z_coder: bitstream.RangeCoder
  indexer: integer_prior.IntegerScaleIndexer
  _analysis: Any = None
  _prior: Any = None
  _mean: Any = None  # z_hat -> mu alone (what coding needs; P's scale half is not computed)
  _synthesis: Any = None  # (y_hat, z_hat) -> (x_hat, x_f): the whole decoder, one jit
  _fidelity: Any = None  # y_hat -> x_f = D_a(y_hat)
  _decode_image: Any = None  # (y symbols, z_hat, H, W) -> uint8 [B, H, W, 3], one jit
  _lower_synthesis: Any = None  # (y_hat, z_hat) -> jax.stages.Lowered of _synthesis (inspection)
  _lower_analysis: Any = None  # x -> jax.stages.Lowered of _analysis (the encoder's memory)
  _graphdef: Any = None  # nnx.split(decoding_model(...)): what the tiled decoder merges
  _state: Any = None
  _plans: dict = dataclasses.field(default_factory=dict)  # tiled decoders by (shapes, budget)
  precision: str = "fp32"  # the reconstruction path's ("fp32" | "bf16"; sodec_jax/precision.py)
  color_fix: str = "none"  # the decoder's colour correction (sodec_jax/color_fix.py)

  @property
  def decoder(self) -> int:
    """The decoder files of this model need (the header's decoder field)."""
    if self.model.decoder_kind == "diffusion":
      return bitstream.DECODER_DIFFUSION
    return bitstream.DECODER_CODEC

  @property
  def max_pixels(self) -> int:
    return int(self.config.entropy.max_pixels)


def fingerprint(config, model: nnx.Module) -> bytes:
  """16-byte hash of the coding-relevant config and every parameter (path, dtype, shape, bytes)."""
  h = hashlib.sha256()
  model_cfg = {
    k: v
    for k, v in config.model.to_dict().items()  # an optional field at its
    if not (k in OPTIONAL_FIELDS and OPTIONAL_FIELDS[k] == v)
  }  # default: as if absent
  h.update(
    json.dumps(
      {"model": model_cfg, "entropy": config.entropy.to_dict()}, sort_keys=True, default=list
    ).encode()
  )
  from sodec_jax.layers import FrozenWeight  # frozen extractor weights shape decoding too

  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, FrozenWeight)))
  for path, var in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
    arr = np.ascontiguousarray(np.asarray(var.value))
    h.update("/".join(map(str, path)).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.digest()[:16]


def decoding_model(
  model: SODEC, winograd: bool | None = None, dtype=None, color_fix: str | None = None
) -> SODEC:
  """The model the jitted coding functions run: a clone of `model` sharing its arrays, with
  inference-time kernels computed once instead of on every call:
  - with `color_fix` ("none" | "wavelet" | "adain"; None: the config's `sodec.color_fix`), the
    diffusion decoder's colour correction against x_f (sodec_jax/color_fix.py; decode only, so
    the files do not depend on it);
  - with `dtype` (a precision: "fp32" | "bf16" | "auto", or "float32" | "bfloat16"), the
    reconstruction path (D_a, H_s, T_s, UNet, D_m, F, F_p) computing in that precision with its
    weights stored in it (cast once, here); E, H_a and P are untouched (sodec_jax/precision.py);
  - every sub-pixel transposed convolution's rearranged kernel (layers.use_subpixel_kernels:
    the same values, so the same outputs);
  - with `winograd` (None: when the backend is the CPU), the reconstruction-only 3x3
    convolutions (D_a, H_s, T_s, the UNet and D_m; float32, >= 192 channels, no LoRA on the
    conv) as Winograd F(4x4, 3x3) kernels (layers.use_winograd: 1.3-5x faster than XLA:CPU's
    direct convolution, relative error ~1e-6, 4x those kernels' memory). The entropy-coding
    path (E, H_a, P) never uses Winograd, so the files are the same bytes either way.
  """
  from sodec_jax.layers import use_subpixel_kernels, use_winograd

  if winograd is None:
    winograd = jax.default_backend() == "cpu"
  clone = nnx.clone(model)
  # a training-only switch (stage 2's stop-gradient); off, so that every stage's decoding model
  # has one structure and shares compiled programs (_coding_programs)
  clone.stop_gradient_latents = False
  if color_fix is not None and model.decoder_kind == "diffusion":
    clone.color_fix = check_color_fix(color_fix)
  if dtype is not None:
    resolved = precision_lib.apply_precision(clone, dtype)
    precision_lib.cast_reconstruction_params(clone, precision_lib.compute_dtype(resolved))
  use_subpixel_kernels(clone)
  if winograd:
    for name in ("hyper_synthesis", "transform", "unet", "vae_decoder"):
      if getattr(clone, name, None) is not None:
        use_winograd(getattr(clone, name))
    use_winograd(clone.codec.fidelity_decoder)
  return clone


@functools.lru_cache(maxsize=8)
def _coding_programs(graphdef, latent_multiple: int) -> types.SimpleNamespace:
  """The jitted coding functions of one model structure (`graphdef`, which holds no weights:
  every function takes the state). Models whose graphdefs are equal, e.g. stages 3 and 4 of a
  pipeline, get the same functions and so share their compiled programs (the pipeline's
  validation and summary load several); the graphdef is hashed here, once per `prepare`, not on
  every call."""

  @jax.jit
  def jit_analysis(state, x):
    return nnx.merge(graphdef, state).analysis(x, latent_multiple)

  @jax.jit
  def jit_prior(state, z_hat):
    return nnx.merge(graphdef, state).prior_parameters(z_hat)

  @jax.jit
  def jit_mean(state, z_hat):
    return nnx.merge(graphdef, state).prior_parameters(z_hat)[0]

  @jax.jit
  def jit_fidelity(state, y_hat):
    return nnx.merge(graphdef, state).fidelity_reconstruction(y_hat)

  @jax.jit
  def jit_synthesis(state, y_hat, z_hat):  # the whole decoder after range decoding, one jit
    return nnx.merge(graphdef, state).reconstruction(y_hat, z_hat)

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def jit_decode_image(state, y_symbols, z_hat, height, width):
    """Range-decoded symbols -> uint8 images, one program: mu = P(z_hat), y_hat = symbols + mu,
    the decoder, crop, clamp, round (nothing but the symbols in and the pixels out cross
    between host and device)."""
    m = nnx.merge(graphdef, state)
    y_hat = y_symbols.astype(jnp.float32) + m.prior_parameters(z_hat)[0]
    x_hat, _ = m.reconstruction(y_hat, z_hat)
    return quantize_image(x_hat[:, :height, :width])

  return types.SimpleNamespace(
    analysis=jit_analysis,
    prior=jit_prior,
    mean=jit_mean,
    fidelity=jit_fidelity,
    synthesis=jit_synthesis,
    decode_image=jit_decode_image,
  )


def prepare(
  config,
  model: SODEC,
  step: int = 0,
  *,
  winograd: bool | None = None,
  dtype: str | None = None,
  color_fix: str | None = None,
) -> LoadedModel:
  """Wraps an in-memory model for coding (computes tables, fingerprint and jitted functions).

  `winograd`: run the decoders' large 3x3 convolutions as Winograd F(4x4, 3x3) (None: on CPU
  only; see decoding_model). `dtype`: the reconstruction path's precision ("fp32" | "bf16" |
  "auto", or "float32" | "bfloat16"; None = config.precision, "auto" by default: bf16 on GPU/TPU,
  fp32 on the CPU). The fingerprint is taken from `model`'s own (float32) weights, and E, H_a, P
  never change precision, so files do not depend on `dtype`. `color_fix`: see decoding_model.
  `model` itself is never modified."""
  e = config.entropy
  scales = scale_table(e.scale_min, e.scale_max, e.scale_levels)
  y_table: CodingTable = gaussian_coding_table(scales, config.entropy.tail_mass)
  z_table: CodingTable = factorized_coding_table(
    model.codec.prior.hyperlatent.numpy_params(), config.entropy.tail_mass
  )
  dtype = precision_lib.resolve(config.get("precision", "auto") if dtype is None else dtype)
  decoder = decoding_model(model, winograd, dtype, color_fix)
  graphdef, state = nnx.split(decoder)
  latent_multiple = padding.scheme(config.model).latent_multiple
  indexer = integer_prior.derive(
    integer_prior.stack_params_of(model.codec.prior.scale_synthesis),
    e.scale_min,
    e.scale_max,
    e.scale_levels,
    model.codec.prior.scale_lower_bound,
  )

  p = _coding_programs(graphdef, latent_multiple)

  return LoadedModel(
    config=config,
    model=model,
    fingerprint=fingerprint(config, model),
    step=step,
    scales=scales,
    y_coder=bitstream.RangeCoder(y_table),
    z_coder=bitstream.RangeCoder(z_table),
    indexer=indexer,
    _analysis=lambda x: p.analysis(state, x),
    _prior=lambda z: p.prior(state, z),
    _mean=lambda z: p.mean(state, z),
    _synthesis=lambda y, z: p.synthesis(state, y, z),
    _fidelity=lambda y: p.fidelity(state, y),
    _decode_image=lambda y, z, h, w: p.decode_image(state, y, z, h, w),
    _lower_synthesis=lambda y, z: p.synthesis.lower(state, y, z),
    _lower_analysis=lambda x: p.analysis.lower(state, x),
    _graphdef=graphdef,
    _state=state,
    precision=dtype,
    color_fix=getattr(decoder, "color_fix", "none"),
  )


def load_model(
  checkpoint_dir: str,
  step: int | None = None,
  *,
  winograd: bool | None = None,
  dtype: str | None = None,
  color_fix: str | None = None,
) -> LoadedModel:
  """Loads the model a training run wrote to `checkpoint_dir` (its --workdir), or a
  `convert/from_torch.py hific` folder. `winograd`: see decoding_model (None: on CPU).
  `color_fix`: the diffusion decoder's colour correction (None: the checkpoint config's
  `sodec.color_fix`; see decoding_model).
  `dtype`: the reconstruction path's precision, "fp32" | "bf16" | "auto" (None: the checkpoint
  config's `precision`, "auto" = bf16 on GPU/TPU, fp32 on CPU); see `prepare`."""
  from sodec_jax import checkpoints  # deferred: orbax import is slow and only needed here

  if not os.path.isdir(checkpoint_dir):
    raise SodecError(
      f"checkpoint directory {checkpoint_dir!r} does not exist: pass the --workdir "
      "a training run wrote (e.g. runs/tiny)"
    )
  if os.path.isfile(os.path.join(checkpoint_dir, "manifest.json")):
    return _load_converted_codec(checkpoint_dir, winograd, dtype)
  config = checkpoints.load_config(checkpoint_dir)
  model = build_model_to_restore(config)  # weights come from the checkpoint
  restored_step = checkpoints.restore_params(checkpoint_dir, model, step=step)
  check_restored(model, checkpoint_dir)
  return prepare(config, model, restored_step, winograd=winograd, dtype=dtype, color_fix=color_fix)


def _load_converted_codec(folder: str, winograd: bool | None = None, dtype=None) -> LoadedModel:
  """A `convert/from_torch.py hific` folder is a complete codec (D_a decoder)."""
  import importlib.util

  from sodec_jax.weights import converted

  kind = converted.read_manifest(folder).get("kind")
  if kind != "hific":
    raise SodecError(
      f"{folder} holds converted {kind!r} weights, not a codec: pass a training "
      "workdir or a `convert/from_torch.py hific` folder"
    )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = os.path.join(root, "configs", "base.py")
  if not os.path.isfile(base):
    raise SodecError(f"loading a converted codec needs the repository's configs/base.py ({base})")
  spec = importlib.util.spec_from_file_location("_sodec_base_config", base)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in converted.load_codec_config(folder).items():
    if key in config.model or key in OPTIONAL_FIELDS:
      config.model[key] = tuple(value) if isinstance(value, list) else value
  model = build_model(config, nnx.Rngs(0), pretrained=False)
  converted.load_codec_params(folder, model)
  return prepare(config, model, 0, winograd=winograd, dtype=dtype)


# --------------------------------------------------------------------------- images <-> tensors
def _check_image(image) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise SodecError(f"compress expects a numpy uint8 array [H, W, 3], got {type(image).__name__}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise SodecError(
      f"compress expects a uint8 array of shape [H, W, 3], got {image.dtype} "
      f"{image.shape}; use sodec_jax.images.read_image to load and convert files"
    )
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise SodecError(f"empty image {image.shape}")
  return image


def pad_image(model: LoadedModel, image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [1, H', W', 3] in [0, 1], reflect-padded bottom/right as the
  model codes (codec/padding.py: to a multiple of 64 natively, of 16 for converted HiFiC)."""
  return padding.pad_image(image, padding.scheme(model.config.model))


def quantize_image(x: jax.Array) -> jax.Array:
  """float [..., 3] -> uint8: clamp to [0, 1], scale to 255, round half to even (jittable; the
  same values as `to_uint8`)."""
  return jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def to_uint8(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """float [1, H', W', 3] -> uint8 [height, width, 3]: crop, clamp to [0, 1], round."""
  x = np.asarray(x[0, :height, :width], np.float32)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- the neural steps
# Each takes and returns batch-first NHWC arrays (numpy or jax in, jax out: np.asarray fetches).
# H', W' are the padded image's sides (pad_image), h = H'/16, w = W'/16, C / N the model's
# latent / hyper-latent channels.
def analysis(model: LoadedModel, x) -> tuple[jax.Array, jax.Array]:
  """E + H_a: x float32 [B, H', W', 3] in [0, 1] -> (y [B, h, w, C], z [B, h/4, w/4, N])."""
  return model._analysis(jnp.asarray(x))


def prior(model: LoadedModel, z_hat) -> tuple[jax.Array, jax.Array]:
  """P: z_hat [B, h/4, w/4, N] (integers) -> (mu, sigma), each float32 [B, h, w, C]."""
  return model._prior(jnp.asarray(z_hat))


def fidelity(model: LoadedModel, y_hat) -> jax.Array:
  """D_a: y_hat [B, h, w, C] -> x_f float [B, H', W', 3] (unclamped; see to_uint8)."""
  return model._fidelity(jnp.asarray(y_hat))


def reconstruct(model: LoadedModel, y_hat, z_hat) -> tuple[jax.Array, jax.Array]:
  """The whole decoder the model has, one jit: (y_hat [B, h, w, C], z_hat [B, h/4, w/4, N]) ->
  (x_hat, x_f), each float [B, H', W', 3]; x_hat = x_f for the codec decoder."""
  return model._synthesis(jnp.asarray(y_hat), jnp.asarray(z_hat))


# --------------------------------------------------------------------------- latents <-> files
@dataclasses.dataclass(frozen=True)
class Latents:
  """What the encoder range-codes; host numpy arrays, batch first (shapes as for `analysis`).

  z_hat      float32 [B, h/4, w/4, N]  round(z), coded with one factorized model per channel
  mu, sigma  float32 [B, h, w, C]      P(z_hat) (float; sigma is not used for coding, and is
                                       None where the caller did not ask for it: compress)
  y_symbols  float32 [B, h, w, C]      round(y - mu), the integers coded for y
  indexes    uint8/16 [B, h, w, C]     scale-table index per symbol: model.indexer(z_hat)
  y_hat      float32 [B, h, w, C]      y_symbols + mu, what the decoder sees
  """

  z_hat: np.ndarray
  mu: np.ndarray
  sigma: np.ndarray | None
  y_symbols: np.ndarray
  indexes: np.ndarray
  y_hat: np.ndarray

  @classmethod
  def from_prior(cls, model: LoadedModel, y, z_hat, mu, sigma) -> "Latents":
    """Latents from y, z_hat and P's (mu, sigma), whoever computed them (array-likes, NHWC).
    The indexes come from z_hat alone (model.indexer), never from the float sigma; they are
    computed on the host before mu and sigma are fetched, so P (dispatched asynchronously by
    jax) runs meanwhile."""
    z_hat = np.asarray(z_hat, np.float32)
    indexes = model.indexer(z_hat)
    mu = np.asarray(mu, np.float32)
    sigma = None if sigma is None else np.asarray(sigma, np.float32)
    y_symbols = np.round(np.asarray(y, np.float32) - mu)
    return cls(
      z_hat=z_hat, mu=mu, sigma=sigma, y_symbols=y_symbols, indexes=indexes, y_hat=y_symbols + mu
    )

  def __len__(self) -> int:
    return self.z_hat.shape[0]

  def __getitem__(self, b: int) -> "Latents":
    """The b-th image's latents (batch 1)."""
    parts = (getattr(self, f.name) for f in dataclasses.fields(self))
    return Latents(*(None if a is None else a[b : b + 1] for a in parts))

  @property
  def z_indexes(self) -> np.ndarray:
    """uint16 [B, h/4, w/4, N]: the factorized model of each z symbol (its channel)."""
    return _channel_ids(self.z_hat.shape)


def _channel_ids(shape) -> np.ndarray:
  return np.broadcast_to(np.arange(shape[-1], dtype=np.uint16), shape)


def _check_batch(model: LoadedModel, images) -> list[np.ndarray]:
  """The images of one call (a list of one size), each a checked uint8 [H, W, 3]."""
  batch = [_check_image(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
  if len({im.shape for im in batch}) != 1:
    raise SodecError(f"a batch needs images of one size, got {sorted({im.shape for im in batch})}")
  h, w = batch[0].shape[:2]
  if h * w > model.max_pixels or max(h, w) > bitstream.MAX_SIDE:
    raise SodecError(
      f"image {h}x{w} is larger than this model codes in one file "
      f"({model.max_pixels} pixels, {bitstream.MAX_SIDE} per side)"
    )
  return batch


def encode_latents(model: LoadedModel, images, *, with_sigma: bool = True) -> Latents:
  """uint8 [H, W, 3] (or a list of same-size ones, one batched jitted call) -> Latents.
  with_sigma=False leaves P's float scale half out (Latents.sigma None): coding reads only mu
  and the exact indexes, so compress skips it."""
  batch = _check_batch(model, images)
  y, z = analysis(model, np.concatenate([pad_image(model, im) for im in batch]))
  z_hat = np.round(np.asarray(z))
  if with_sigma:
    mu, sigma = prior(model, z_hat)
  else:
    mu, sigma = model._mean(jnp.asarray(z_hat)), None
  return Latents.from_prior(model, y, z_hat, mu, sigma)


def encode_within(model: LoadedModel, image, max_memory, *, rows: dict | None = None) -> Latents:
  """One image's Latents (uint8 [H, W, 3] -> batch 1) with every compiled encoder program within
  `max_memory` (bytes or "8GiB"; None with `rows`: only the given band sizes). E + H_a run as
  `encode_latents` does, in one program, when it fits; otherwise E and H_a run in bands of rows
  (sodec_jax/banding.py; `rows`: base rows per band and stage, {"E": 2, "H_a": 1, "P": 1}, for
  tests). P runs whole when its program fits, else in bands. A kept band row is computed as the
  whole image's row, so the symbols and the file are those of `compress` without a budget, up to
  XLA's per-shape float summation order (docs/ARCHITECTURE.md, "Banded encoding")."""
  (image,) = _check_batch(model, image)
  budget = None if max_memory is None else tiling.parse_bytes(max_memory)
  x = pad_image(model, image)
  key = ("encode", x.shape, budget, tuple(sorted((rows or {}).items())))
  if key not in model._plans:
    stages = ("E", "H_a", "P")
    if budget is None and not rows:
      stages = ("P",)
    elif not rows:
      whole_key = ("encode whole", x.shape)
      if whole_key not in model._plans:
        spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        model._plans[whole_key] = tiling.program_bytes(model._lower_analysis(spec).compile())
      if model._plans[whole_key] <= budget:
        stages = ("P",)  # E + H_a: the one program compress runs without a budget
    model._plans[key] = banding.plan_encode(
      model._graphdef,
      model._state,
      x.shape,
      padding.scheme(model.config.model).latent_multiple,
      budget,
      stages=stages,
      rows=rows,
      cache=model._plans.setdefault(("encode bands", x.shape), {}),
    )
  plan = model._plans[key]
  if "E" in plan.stages:
    y, z = banding.analyse(plan, x, padding.scheme(model.config.model).latent_multiple)
  else:
    y, z = analysis(model, x)
  z_hat = np.round(np.asarray(z))
  mu, sigma = banding.run(plan.stages["P"], plan.state, z_hat)
  return Latents.from_prior(model, y, z_hat, mu, sigma)


def pack(model: LoadedModel, latents: Latents, height: int, width: int) -> bytes:
  """Range-codes one image's latents (batch 1) into the bytes of a .sodec file for an image of
  height x width (the unpadded size the decoder crops to)."""
  if len(latents) != 1:
    raise SodecError(f"pack codes one image, got a batch of {len(latents)}: pass latents[b]")
  z_hat, y_sym = latents.z_hat[0], latents.y_symbols[0]
  c, n = model.config.model.latent_channels, model.config.model.hyper_channels
  if bitstream.latent_shapes(height, width, c, n, PAD_MULTIPLE) != (z_hat.shape, y_sym.shape):
    raise SodecError(
      f"latents {z_hat.shape}/{y_sym.shape} are not those of a {height}x{width} "
      "image under this model: pass the size of the image they were encoded from"
    )
  z_stream, z_over = model.z_coder.encode(z_hat.astype(np.int64), latents.z_indexes[0])
  y_stream, y_over = model.y_coder.encode(y_sym.astype(np.int64), latents.indexes[0])
  header = bitstream.Header(
    model.decoder, height, width, model.fingerprint, z_hat.shape, y_sym.shape
  )
  return bitstream.pack(header, [z_stream, y_stream, bitstream.encode_overflow(z_over + y_over)])


# What constriction's extension module raises (it imports no other Python exception types).
_RANGE_DECODER_ERRORS = (ValueError, RuntimeError, AssertionError, SodecError)


def _from_file(step, *args, version: int = bitstream.VERSION):
  """Runs one range-decoder / overflow-reader step on file data that passed the CRC; its failure
  means the file was not written by this model and build (or was altered and re-checksummed)."""
  try:
    return step(*args)
  except _RANGE_DECODER_ERRORS as e:
    where = "build, backend" if version < 2 else "build"  # v1 indexes follow float rounding
    raise SodecError(
      f"cannot range-decode this .sodec file although its checksum is intact "
      f"({type(e).__name__}: {e}): it does not match this model or sodec-jax build "
      f"(written by another version or altered); decode it with the {where} "
      "and --checkpoint that compressed it"
    ) from None


def _check_file(model: LoadedModel, data: bytes):
  """The header and streams of a .sodec file that this model can decode; SodecError else."""
  header, streams = bitstream.unpack(data, model.max_pixels)
  if header.fingerprint != model.fingerprint:
    raise SodecError(
      f"this file was written by a different model (fingerprint "
      f"{header.fingerprint.hex()}, loaded model {model.fingerprint.hex()}): "
      "decode it with the --checkpoint that compressed it"
    )
  if header.decoder != model.decoder:
    raise SodecError(
      f"this file needs the {bitstream.DECODER_NAMES[header.decoder]} decoder, "
      f"which the loaded model does not have"
    )
  c, n = model.config.model.latent_channels, model.config.model.hyper_channels
  if header.y_shape[2] != c or header.z_shape[2] != n:
    raise SodecError(
      f"latent channels {header.y_shape[2]}/{header.z_shape[2]} in the file do not "
      f"match the model's {c}/{n}"
    )
  return header, streams


def _decode_z(model: LoadedModel, header, z_stream, overflow) -> np.ndarray:
  z_sym = _from_file(model.z_coder.decode, z_stream, _channel_ids(header.z_shape), overflow)
  z_hat = z_sym.reshape(header.z_shape).astype(np.float32)[None]
  if not np.all(np.abs(z_hat) < 1e6):
    raise SodecError("corrupted .sodec file: implausible hyper-latent values")
  return z_hat


def decode_symbols(model: LoadedModel, data: bytes):
  """Range-decodes a version-2 .sodec file without any float work -> (header, y symbols float32
  [1, h, w, C], z_hat float32 [1, h/4, w/4, N]); y_hat = symbols + P(z_hat)'s mu. The indexes
  come from z_hat alone (model.indexer). Returns None for a version-1 file (its indexes need the
  float sigma: use decode_latents)."""
  header, (z_stream, y_stream, over_stream) = _check_file(model, data)
  if header.version < 2:
    return None
  overflow = bitstream.OverflowReader(over_stream)
  z_hat = _decode_z(model, header, z_stream, overflow)
  y_sym = _from_file(model.y_coder.decode, y_stream, model.indexer(z_hat)[0], overflow)
  _from_file(overflow.finish)
  return header, y_sym.reshape(header.y_shape)[None].astype(np.float32), z_hat


def decode_latents(
  model: LoadedModel, data: bytes, prior_fn=None
) -> tuple[bitstream.Header, np.ndarray, np.ndarray]:
  """Range-decodes a .sodec file -> (header, y_hat float32 [1, h, w, C], z_hat [1, h/4, w/4, N]).

  `prior_fn`: z_hat -> (mu, sigma), default `prior(model, .)` (a reference implementation can
  pass its own). The y scale indexes come from z_hat through `model.indexer` (version 2 files)
  or from the float32 sigma (version 1 files, see codec/bitstream.py). Only the container and
  the range decoding are reported as a bad file (SodecError); an error in the prior or anywhere
  else is a bug and propagates as it is."""
  header, (z_stream, y_stream, over_stream) = _check_file(model, data)
  overflow = bitstream.OverflowReader(over_stream)
  z_hat = _decode_z(model, header, z_stream, overflow)
  mu_sigma = (prior_fn or (lambda z: prior(model, z)))(z_hat)  # jax: runs while the host works
  if header.version >= 2:
    indexes = model.indexer(z_hat)[0]
  else:  # version 1: float32 sigma indexes, as sodec-jax wrote them before the exact ones
    indexes = scale_indexes(np.asarray(mu_sigma[1]), model.scales)[0]
  mu = np.asarray(mu_sigma[0])
  y_sym = _from_file(model.y_coder.decode, y_stream, indexes, overflow, version=header.version)
  _from_file(overflow.finish, version=header.version)
  return header, y_sym.reshape(header.y_shape)[None].astype(np.float32) + mu, z_hat


# --------------------------------------------------------------------------- the public calls
def compress(model: LoadedModel, image: np.ndarray, max_memory=None) -> bytes:
  """uint8 [H, W, 3] -> the bytes of a .sodec file (encode_latents + pack). `max_memory` (bytes
  or "8GiB"; None: no limit): the encoder's compiled programs stay within it (encode_within: the
  whole image when it fits, else bands of rows); the file is the same either way."""
  if max_memory is None:
    latents = encode_latents(model, image, with_sigma=False)
  else:
    latents = encode_within(model, image, max_memory)
  return pack(model, latents, *image.shape[:2])


def decompress(model: LoadedModel, data: bytes, max_memory=None) -> np.ndarray:
  """The bytes of a .sodec file -> uint8 [H, W, 3]: range decoding on the host (decode_symbols),
  then one jitted program from the symbols to the pixels (mu = P(z_hat), y_hat, the decoder,
  crop, uint8). Version-1 files: decode_latents + reconstruct + to_uint8.

  `max_memory` (bytes, or a string such as "8GiB"; None: no limit, the one program above):
  the decoder's compiled programs stay within it (sodec_jax/tiling.py): the whole decoder when
  its program fits, else overlapping windows of the largest size that fits."""
  return decompress_batch(model, [data], max_memory)[0]


def decode_within(
  model: LoadedModel, y_hat, z_hat, max_memory, *, tiles: dict | None = None
) -> np.ndarray:
  """(y_hat [1, h, w, C], z_hat [1, h/4, w/4, N]) -> x_hat float32 [1, H', W', 3] (host, unclamped)
  with every compiled program within `max_memory` (bytes or "8GiB"; None with `tiles`: only the
  given window sizes): one program for the whole decoder when it fits, else the tiled decoder
  (tiling.plan_decode; `tiles`: window sizes per stage in base units, for tests and figures)."""
  budget = None if max_memory is None else tiling.parse_bytes(max_memory)
  y_hat, z_hat = np.asarray(y_hat, np.float32), np.asarray(z_hat, np.float32)
  if y_hat.shape[0] != 1:
    raise SodecError(f"decode_within decodes one image, got a batch of {y_hat.shape[0]}")
  key = (y_hat.shape, z_hat.shape, budget, tuple(sorted((tiles or {}).items())))
  if key not in model._plans:
    whole = None
    if not tiles:
      whole_key = ("whole", y_hat.shape, z_hat.shape)
      if whole_key not in model._plans:
        model._plans[whole_key] = model._lower_synthesis(y_hat, z_hat).compile()
      whole = model._plans[whole_key]
      if budget is not None and tiling.program_bytes(whole) > budget:
        whole = None
    plan = whole  # the one program (the whole decoder) or, below, the windows' plan
    if plan is None:  # window programs are shared by every budget (as the whole one is)
      cache = model._plans.setdefault(("windows", y_hat.shape, z_hat.shape), {})
      plan = tiling.plan_decode(
        model._graphdef, model._state, y_hat.shape, z_hat.shape, budget, tiles=tiles, cache=cache
      )
    model._plans[key] = plan
  plan = model._plans[key]
  if isinstance(plan, tiling.Plan):
    return tiling.decode_tiled(plan, y_hat, z_hat)[0]
  return np.asarray(plan(model._state, y_hat, z_hat)[0])


def compress_batch(model: LoadedModel, images: list[np.ndarray], max_memory=None) -> list[bytes]:
  """compress over same-size uint8 [H, W, 3] images, E, H_a and P batched (one jitted call
  each), range coding per image. Batched XLA convolutions may round a float differently from
  batch 1, so a rare symbol can differ from `compress` (decoded images agree within 1/255); the
  scale indexes are exact functions of each file's z_hat, so every file decodes anywhere.
  With `max_memory` (see compress) the images are encoded one by one, each within it."""
  if max_memory is not None:
    tiling.parse_bytes(max_memory)  # a bad size fails before any encoding
    _check_batch(model, list(images))
    return [compress(model, im, max_memory) for im in images]
  latents = encode_latents(model, list(images), with_sigma=False)
  h, w = images[0].shape[:2]
  return [pack(model, latents[b], h, w) for b in range(len(latents))]


def decompress_batch(model: LoadedModel, files: list[bytes], max_memory=None) -> list[np.ndarray]:
  """decompress over files of same-size images: range decoding per file, the decoder batched
  (one jitted call) -> uint8 [H, W, 3] each. With `max_memory` (see decompress) the files
  decode one by one, each within it."""
  if max_memory is not None:
    tiling.parse_bytes(max_memory)  # a bad size fails before any decoding
    out = []
    for d in files:
      header, y_hat, z_hat = decode_latents(model, d)
      x_hat = decode_within(model, y_hat, z_hat, max_memory)
      out.append(to_uint8(x_hat, header.height, header.width))
    return out
  symbols = [decode_symbols(model, d) for d in files]
  decoded = symbols if all(s is not None for s in symbols) else None
  if decoded is None:  # a version-1 file among them: the host assembles y_hat
    decoded = [decode_latents(model, d) for d in files]
  if len({(hd.height, hd.width) for hd, _, _ in decoded}) > 1:
    raise SodecError("decompress_batch needs files of one image size; decompress them one by one")
  if decoded is symbols:
    h, w = decoded[0][0].height, decoded[0][0].width
    pixels = model._decode_image(
      np.concatenate([y for _, y, _ in decoded]), np.concatenate([z for _, _, z in decoded]), h, w
    )
    return list(np.asarray(pixels))
  x_hat, _ = reconstruct(
    model, np.concatenate([y for _, y, _ in decoded]), np.concatenate([z for _, _, z in decoded])
  )
  x_hat = np.asarray(x_hat)
  return [to_uint8(x_hat[b : b + 1], hd.height, hd.width) for b, (hd, _, _) in enumerate(decoded)]


def read_header(data: bytes) -> bitstream.Header:
  """Parses and validates a file's header without a model (for `sodec info`)."""
  return bitstream.unpack(data)[0]

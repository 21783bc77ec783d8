"""Public API: load_model, compress, decompress, read_header.

    import sodec_jax
    model = sodec_jax.load_model("runs/tiny")           # the --workdir training wrote
    data = sodec_jax.compress(model, image)             # image: uint8 [H, W, 3] -> bytes
    image2 = sodec_jax.decompress(model, data)          # -> uint8 [H, W, 3]

Coding path (all float work in jitted functions; each runs the same compiled program on the
encoder and the decoder side, which is what makes decoding bit-exact):
  x -> analysis -> (y, z);  z_hat = round(z)
  (mu, sigma) = prior_parameters(z_hat)          # same function, same shapes, both sides
  y symbols = round(y - mu);  scale index = first table scale >= sigma
  streams: z symbols (one factorized model per channel), y symbols (one Gaussian per index)
Decoding: z_hat -> (mu, sigma) -> y_hat = symbols + mu -> the decoder the header names, one jit:
  codec:     D_a(y_hat)
  diffusion: D_m(x0(UNet(T_s(y_hat, H_s(z_hat)), 999, F_p(F(D_a(y_hat)))))) (see model.py)
-> clamp, crop, uint8.

Determinism: on one platform (e.g. any x86-64 CPU with the same jax/XLA version) a file
decodes bit-identically in any process. Across platforms (CPU <-> GPU) the scale indexes are
computed from float32 sigma and can flip at a table boundary when the two platforms' XLA
kernels round differently; a file is guaranteed decodable where sigma is computed with the same
backend and version (see docs/ARCHITECTURE.md, "Determinism").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.codec import bitstream
from sodec_jax.codec.entropy import (CodingTable, factorized_coding_table, gaussian_coding_table,
                                     scale_indexes, scale_table)
from sodec_jax.errors import SodecError
from sodec_jax.model import PAD_MULTIPLE, SODEC
from sodec_jax.pretrained import build_model


@dataclasses.dataclass
class LoadedModel:
  """A model ready to code: weights, coding tables and the jitted pieces of the coding path."""
  config: Any
  model: SODEC
  fingerprint: bytes
  step: int
  scales: np.ndarray
  y_coder: bitstream.RangeCoder
  z_coder: bitstream.RangeCoder
  _analysis: Any = None
  _prior: Any = None
  _synthesis: Any = None   # (y_hat, z_hat) -> (x_hat, x_f): the whole decoder, one jit
  _fidelity: Any = None    # y_hat -> x_f = D_a(y_hat)

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
  h.update(json.dumps({"model": config.model.to_dict(), "entropy": config.entropy.to_dict()},
                      sort_keys=True, default=list).encode())
  from sodec_jax.layers import FrozenWeight  # frozen extractor weights shape decoding too
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, FrozenWeight)))
  for path, var in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
    arr = np.ascontiguousarray(np.asarray(var.value))
    h.update("/".join(map(str, path)).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.digest()[:16]


def decoding_model(model: SODEC, winograd: bool | None = None) -> SODEC:
  """The model the jitted coding functions run: a clone of `model` sharing its arrays, with
  inference-time kernels computed once instead of on every call:
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
  use_subpixel_kernels(clone)
  if winograd:
    for name in ("hyper_synthesis", "transform", "unet", "vae_decoder"):
      if getattr(clone, name, None) is not None:
        use_winograd(getattr(clone, name))
    use_winograd(clone.codec.fidelity_decoder)
  return clone


def prepare(config, model: SODEC, step: int = 0, *, winograd: bool | None = None) -> LoadedModel:
  """Wraps an in-memory model for coding (computes tables, fingerprint and jitted functions).

  `winograd`: run the decoders' large 3x3 convolutions as Winograd F(4x4, 3x3) (None: on CPU
  only; see decoding_model). `model` itself is never modified."""
  scales = scale_table(config.entropy.scale_min, config.entropy.scale_max, config.entropy.scale_levels)
  y_table: CodingTable = gaussian_coding_table(scales, config.entropy.tail_mass)
  z_table: CodingTable = factorized_coding_table(model.codec.prior.hyperlatent.numpy_params(),
                                                 config.entropy.tail_mass)
  graphdef, state = nnx.split(decoding_model(model, winograd))

  @jax.jit
  def analysis(state, x):
    return nnx.merge(graphdef, state).analysis(x)

  @jax.jit
  def prior(state, z_hat):
    return nnx.merge(graphdef, state).prior_parameters(z_hat)

  @jax.jit
  def fidelity(state, y_hat):
    return nnx.merge(graphdef, state).fidelity_reconstruction(y_hat)

  @jax.jit
  def synthesis(state, y_hat, z_hat):  # the whole decoder after range decoding, one jit
    return nnx.merge(graphdef, state).reconstruction(y_hat, z_hat)

  return LoadedModel(
      config=config, model=model, fingerprint=fingerprint(config, model), step=step, scales=scales,
      y_coder=bitstream.RangeCoder(y_table), z_coder=bitstream.RangeCoder(z_table),
      _analysis=lambda x: analysis(state, x), _prior=lambda z: prior(state, z),
      _synthesis=lambda y, z: synthesis(state, y, z), _fidelity=lambda y: fidelity(state, y))


def load_model(checkpoint_dir: str, step: int | None = None, *,
               winograd: bool | None = None) -> LoadedModel:
  """Loads the model a training run wrote to `checkpoint_dir` (its --workdir), or a
  `convert/from_torch.py hific` folder. `winograd`: see decoding_model (None: on CPU)."""
  from sodec_jax import checkpoints  # deferred: orbax import is slow and only needed here

  if not os.path.isdir(checkpoint_dir):
    raise SodecError(f"checkpoint directory {checkpoint_dir!r} does not exist: pass the --workdir "
                     "a training run wrote (e.g. runs/tiny)")
  if os.path.isfile(os.path.join(checkpoint_dir, "manifest.json")):
    return _load_converted_codec(checkpoint_dir, winograd)
  config = checkpoints.load_config(checkpoint_dir)
  model = build_model(config, nnx.Rngs(0), pretrained=False)  # weights come from the checkpoint
  restored_step = checkpoints.restore_params(checkpoint_dir, model, step=step)
  return prepare(config, model, restored_step, winograd=winograd)


def _load_converted_codec(folder: str, winograd: bool | None = None) -> LoadedModel:
  """A `convert/from_torch.py hific` folder is a complete codec (D_a decoder)."""
  import importlib.util
  from sodec_jax.weights import converted
  kind = converted.read_manifest(folder).get("kind")
  if kind != "hific":
    raise SodecError(f"{folder} holds converted {kind!r} weights, not a codec: pass a training "
                     "workdir or a `convert/from_torch.py hific` folder")
  base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")
  if not os.path.isfile(base):
    raise SodecError(f"loading a converted codec needs the repository's configs/base.py ({base})")
  spec = importlib.util.spec_from_file_location("_sodec_base_config", base)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in converted.load_codec_config(folder).items():
    if key in config.model:
      config.model[key] = tuple(value) if isinstance(value, list) else value
  model = build_model(config, nnx.Rngs(0), pretrained=False)
  converted.load_codec_params(folder, model)
  return prepare(config, model, 0, winograd=winograd)


# --------------------------------------------------------------------------- images <-> tensors
def _check_image(image) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise SodecError(f"compress expects a numpy uint8 array [H, W, 3], got {type(image).__name__}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise SodecError(f"compress expects a uint8 array of shape [H, W, 3], got {image.dtype} "
                     f"{image.shape}; use sodec_jax.images.read_image to load and convert files")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise SodecError(f"empty image {image.shape}")
  return image


def pad_image(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [1, H', W', 3] in [0, 1], reflect-padded to a multiple."""
  h, w = image.shape[:2]
  ph, pw = -(-h // multiple) * multiple - h, -(-w // multiple) * multiple - w
  x = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
  return (x.astype(np.float32) / 255.0)[None]


def to_uint8(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """float [1, H', W', 3] -> uint8 [height, width, 3]: crop, clamp to [0, 1], round."""
  x = np.asarray(x[0, :height, :width], np.float32)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- the coding path
def _latents(model: LoadedModel, image: np.ndarray):
  """-> dict with z_hat, mu, sigma, y symbols, scale indexes, y_hat (host numpy arrays)."""
  y, z = model._analysis(jnp.asarray(pad_image(image)))
  z_hat = np.round(np.asarray(z))
  mu, sigma = (np.asarray(a) for a in model._prior(jnp.asarray(z_hat)))
  y_sym = np.round(np.asarray(y) - mu)
  return {"z_hat": z_hat, "mu": mu, "sigma": sigma, "y_sym": y_sym,
          "indexes": scale_indexes(sigma, model.scales), "y_hat": y_sym + mu}


def compress(model: LoadedModel, image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> the bytes of a .sodec file."""
  image = _check_image(image)
  h, w = image.shape[:2]
  if h * w > model.max_pixels or max(h, w) > bitstream.MAX_SIDE:
    raise SodecError(f"image {h}x{w} is larger than this model codes in one file "
                     f"({model.max_pixels} pixels, {bitstream.MAX_SIDE} per side)")
  lat = _latents(model, image)
  z_hat, y_sym = lat["z_hat"][0], lat["y_sym"][0]
  z_ids = np.broadcast_to(np.arange(z_hat.shape[-1], dtype=np.uint16), z_hat.shape)
  z_stream, z_over = model.z_coder.encode(z_hat.astype(np.int64), z_ids)
  y_stream, y_over = model.y_coder.encode(y_sym.astype(np.int64), lat["indexes"][0])
  header = bitstream.Header(model.decoder, h, w, model.fingerprint, z_hat.shape, y_sym.shape)
  return bitstream.pack(header, [z_stream, y_stream, bitstream.encode_overflow(z_over + y_over)])


def decode_latents(model: LoadedModel, data: bytes) -> tuple[bitstream.Header, np.ndarray, np.ndarray]:
  """Range-decodes a .sodec file -> (header, y_hat [1, h, w, C], z_hat [1, h/4, w/4, N])."""
  header, (z_stream, y_stream, over_stream) = bitstream.unpack(data, model.max_pixels)
  if header.fingerprint != model.fingerprint:
    raise SodecError(f"this file was written by a different model (fingerprint "
                     f"{header.fingerprint.hex()}, loaded model {model.fingerprint.hex()}): "
                     "decode it with the --checkpoint that compressed it")
  if header.decoder != model.decoder:
    raise SodecError(f"this file needs the {bitstream.DECODER_NAMES[header.decoder]} decoder, "
                     f"which the loaded model does not have")
  c, n = model.config.model.latent_channels, model.config.model.hyper_channels
  if header.y_shape[2] != c or header.z_shape[2] != n:
    raise SodecError(f"latent channels {header.y_shape[2]}/{header.z_shape[2]} in the file do not "
                     f"match the model's {c}/{n}")
  overflow = bitstream.OverflowReader(over_stream)
  try:
    z_ids = np.broadcast_to(np.arange(n, dtype=np.uint16), header.z_shape)
    z_hat = model.z_coder.decode(z_stream, z_ids, overflow).reshape(header.z_shape)
    z_hat = z_hat.astype(np.float32)[None]
    if not np.all(np.abs(z_hat) < 1e6):
      raise SodecError("corrupted .sodec file: implausible hyper-latent values")
    mu, sigma = (np.asarray(a) for a in model._prior(jnp.asarray(z_hat)))
    indexes = scale_indexes(sigma, model.scales)[0]
    y_sym = model.y_coder.decode(y_stream, indexes, overflow).reshape(header.y_shape)
    overflow.finish()
  except SodecError:
    raise
  except Exception as e:  # anything the range decoder raises on garbage
    raise SodecError(f"corrupted .sodec file: range decoding failed ({type(e).__name__})") from None
  return header, (y_sym[None].astype(np.float32) + mu), z_hat


def decompress(model: LoadedModel, data: bytes) -> np.ndarray:
  """The bytes of a .sodec file -> uint8 [H, W, 3]."""
  header, y_hat, z_hat = decode_latents(model, data)
  x_hat, _ = model._synthesis(jnp.asarray(y_hat), jnp.asarray(z_hat))
  return to_uint8(np.asarray(x_hat), header.height, header.width)


def read_header(data: bytes) -> bitstream.Header:
  """Parses and validates a file's header without a model (for `sodec info`)."""
  return bitstream.unpack(data)[0]

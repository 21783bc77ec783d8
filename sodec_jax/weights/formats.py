"""Reading PyTorch-side weight files, safely: the one copy of every tensor reader.

    src = open_weights("unet/diffusion_pytorch_model.safetensors")   # TensorSource
    src.keys(); src.shape("conv_in.weight"); src.get("conv_in.weight")   # -> numpy
    obj = load_object("weights.pt")         # a whole torch pickle / safetensors dict

`.safetensors` is read without torch (header validated against the file size first, one tensor
at a time); `.pt/.pth/.ckpt/.bin` only through `torch.load(weights_only=True)`: a pickle that
would run code is refused with one SodecError, never executed. Also the constants of the
converted-folder format (manifest name, format version) that both the converters (writing) and
`sodec_jax.weights.converted` (reading) use, and `looks_like`, which names what a state dict
holds from its keys (for the hints in strict-loading errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from sodec_jax.errors import SodecError

# The converted-folder format (written by sodec_jax.converters, read by weights.converted).
FORMAT = "sodec-jax-converted"
FORMAT_VERSION = 1
CONVERTER_VERSION = "1.1"  # 1.1: CLIP-IQA folders name the ViT encoder block like guidance/vit.py
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16", "float16")


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 300 characters)."""
  s = str(e).strip()
  return s.splitlines()[0][:300] if s else ""


def _suffix(hint: str) -> str:
  return f". {hint}" if hint else ""


def to_numpy(v) -> np.ndarray:
  """A numpy array of a tensor-like (torch tensors: bfloat16/float16 widened to float32)."""
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):
    import torch

    t = v.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()
    return t.numpy()
  return np.asarray(v)


def np_dtype(dtype: str) -> np.dtype:
  """numpy dtype of 'float32' | 'bfloat16' (ml_dtypes) | 'float16' | any numpy name."""
  if dtype == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


class TensorSource:
  """A read-only mapping-like view of a state dict: keys(), shape(k), get(k) -> numpy.

  Backed by a safetensors file (one tensor decoded at a time) or by a dict.
  """

  def __init__(self, getter: Callable[[str], np.ndarray], shapes: Mapping[str, tuple], name: str):
    self._get = getter
    self._shapes = dict(shapes)
    self.name = name

  def keys(self):
    return self._shapes.keys()

  def __contains__(self, key):
    return key in self._shapes

  def shape(self, key) -> tuple:
    return tuple(self._shapes[key])

  def get(self, key) -> np.ndarray:
    try:
      return self._get(key)
    except SodecError:
      raise
    except OSError as e:  # a damaged or vanished file surfaces on read
      raise SodecError(
        f"could not read tensor {key} from {self.name} ({type(e).__name__}: {first_line(e)})"
      ) from None

  def to_dict(self) -> dict[str, np.ndarray]:
    """Every tensor, read now."""
    return {k: self.get(k) for k in self.keys()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], name: str) -> "TensorSource":
    d = dict(d)
    return cls(lambda k: to_numpy(d[k]), {k: tuple(np.shape(v)) for k, v in d.items()}, name)

  def renamed(self, mapping: Mapping[str, str]) -> "TensorSource":
    """A view with keys renamed new <- old (`mapping`: new name -> old name)."""
    return TensorSource(
      lambda k: self.get(mapping[k]), {k: self.shape(o) for k, o in mapping.items()}, self.name
    )


_ST_DTYPES = {
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U8": "uint8",
  "BOOL": "bool",
}


def open_safetensors(path: str, *, hint: str = "") -> TensorSource:
  """A lazily read .safetensors file (no torch). Each tensor is read with plain file reads (no
  mmap, so the process never maps the whole file); bfloat16 comes back as float32. The header is
  validated against the file size first: a damaged or truncated file is a SodecError before
  anything is converted. `hint` ends the error message (what the file should be)."""
  path = os.fspath(path)
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError("file shorter than its 8-byte header length")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, 100 << 20):
        raise ValueError(f"header length {n} exceeds the file")
      header = json.loads(f.read(n))
    base = 8 + n
    infos = {}
    for key, info in header.items():
      if key == "__metadata__":
        continue
      dt = _ST_DTYPES.get(info["dtype"])
      if dt is None:
        raise ValueError(f"{key} has unsupported dtype {info['dtype']}")
      start, end = (int(x) for x in info["data_offsets"])
      shape = tuple(int(x) for x in info["shape"])
      npdt = np_dtype(dt)
      if end - start != int(np.prod(shape, dtype=np.int64)) * npdt.itemsize or start > end:
        raise ValueError(f"{key}: byte range does not match shape {shape}")
      if base + end > size:
        raise ValueError(f"{key} lies beyond the end of the file ({size} bytes): truncated")
      infos[key] = (base + start, shape, npdt)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise SodecError(
      f"could not read {path} as safetensors ({type(e).__name__}: "
      f"{first_line(e)}); is the file complete?{_suffix(hint)}"
    ) from None

  def get(k):
    offset, shape, npdt = infos[k]
    with open(path, "rb") as f:
      f.seek(offset)
      a = np.fromfile(f, dtype=npdt, count=int(np.prod(shape, dtype=np.int64)))
    a = a.reshape(shape)
    return a.astype(np.float32) if npdt.name == "bfloat16" else a

  return TensorSource(get, {k: v[1] for k, v in infos.items()}, path)


def _unpickler_reason(e: Exception) -> str:
  """The useful line of torch's weights_only error (e.g. 'unsupported GLOBAL posix.system'),
  without its advice to retry with weights_only=False."""
  for line in str(e).splitlines():
    line = line.split("WeightsUnpickler error:")[-1].strip()
    if "unsupported" in line.lower() and "weights_only" not in line:
      return line.rstrip(".")[:200]
  return "torch.load(weights_only=True) rejected it"


def torch_load(path: str, *, hint: str = ""):
  """torch.load(weights_only=True, mmap when possible). A pickle that needs more than tensors
  (it could run code) -> SodecError 'refused to load ...'; a damaged file -> SodecError."""
  path = os.fspath(path)
  try:
    import torch
  except ImportError:
    raise SodecError(
      f"reading {path} needs torch (it is a torch pickle); install torch or use "
      f".safetensors{_suffix(hint)}"
    ) from None
  try:
    try:
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # old (non-zip) format cannot be mmapped
      if "mmap" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = _unpickler_reason(e)
    if "global" in reason.lower():
      raise SodecError(
        f"refused to load {path}: it is a pickle that needs more than tensors "
        f"({reason}), and loading it could run arbitrary code. Only plain state "
        f"dicts of tensors are accepted (or use .safetensors){_suffix(hint)}"
      ) from None
    raise SodecError(f"could not read {path} as a torch file ({reason}){_suffix(hint)}") from None
  except (RuntimeError, OSError, EOFError, ValueError) as e:
    raise SodecError(
      f"could not read {path} as a torch file ({type(e).__name__}: "
      f"{first_line(e)}); is the file complete?{_suffix(hint)}"
    ) from None


def load_object(path: str, *, hint: str = "") -> Any:
  """What a weights file holds: a .safetensors file as {name: numpy}, a .npz as {name: numpy},
  anything else through `torch_load` (often a dict, maybe nested: the caller unwraps it)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return open_safetensors(path, hint=hint).to_dict()
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
      raise SodecError(
        f"could not read {path} as .npz ({type(e).__name__}: {first_line(e)}){_suffix(hint)}"
      ) from None
  return torch_load(path, hint=hint)


def open_weights(path: str, *, hint: str = "") -> TensorSource:
  """A state dict file: .safetensors (no torch) or a torch pickle (weights_only); a
  {'state_dict': {...}} wrapper is unwrapped and non-tensor entries are dropped."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SodecError(f"{path}: no such file{_suffix(hint)}")
  if path.endswith(".safetensors"):
    return open_safetensors(path, hint=hint)
  obj = torch_load(path, hint=hint)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise SodecError(f"{path} holds a {type(obj).__name__}, not a state dict{_suffix(hint)}")
  return TensorSource.from_dict({str(k): v for k, v in obj.items() if hasattr(v, "shape")}, path)


def read_json(path: str, what: str = "") -> dict:
  """A JSON file; missing or unparsable -> SodecError naming `what` it should hold."""
  prefix = f"{what}: " if what else ""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise SodecError(f"{prefix}{path} not found") from None
  except (OSError, ValueError) as e:
    raise SodecError(f"{prefix}could not parse {path} ({first_line(e)})") from None


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def looks_like(keys: Iterable[str]) -> str:
  """What a state dict with these keys probably is ('' when unknown), with the converter to use."""
  keys = list(keys)
  if any(k.startswith("model.diffusion_model.") for k in keys):
    return "an original Stable Diffusion single-file checkpoint (use `sd21 --src FILE`)"
  if any(k.startswith(("Encoder.", "Generator.", "Hyperprior.")) for k in keys):
    return "a HiFiC checkpoint (use `hific`)"
  if any(k.startswith("time_embedding.") for k in keys):
    return "a diffusers UNet (use `unet`)"
  if any(
    k.startswith(("encoder.down_blocks", "decoder.up_blocks", "post_quant_conv")) for k in keys
  ):
    return "a diffusers VAE (use `vae`)"
  if any(k.startswith("vision_model.") for k in keys) and any(
    k.startswith("text_model.") for k in keys
  ):
    return "a transformers CLIPModel (use `clip-iqa`)"
  if any(k.startswith("text_model.") for k in keys):
    return "a CLIP text encoder"
  if any(k.startswith(("features.",)) for k in keys):
    return "a torchvision VGG (use `lpips`)"
  if any(
    ".attention.attention.query" in k or k.startswith(("vit.", "embeddings.patch")) for k in keys
  ):
    return "a transformers ViT/Swin (use `vit` / `swin`)"
  return ""

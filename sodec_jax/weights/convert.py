"""PyTorch weights -> converted sodec-jax folders (what `python convert/from_torch.py` runs).

One function per subcommand: `convert_sd21`, `convert_unet`, `convert_vae`, `convert_hific`,
`convert_vit`, `convert_swin`, `convert_lpips`, `convert_dists`, `convert_clip_iqa`. Each reads its
source strictly (the key maps live in the sibling modules: diffusers.py, ldm.py, hific.py,
transformers.py, lpips.py, dists.py, clip.py), writes everything into a temporary folder next to
`out` and renames it into place at the end, so a failure leaves nothing at `out`.

The output (read back by `sodec_jax.weights.converted`):

    OUT/manifest.json       {"format": "sodec-jax-converted", "format_version": 1,
                             "converter_version", "kind", "dtype", "components": [...],
                             "source": [{"path", "size", "sha256"}, ...], "created", ...}
    OUT/<component>/config.json    what rebuilds the module (diffusers / transformers config,
                                   scheduler config, our codec `model` section, ...)
    OUT/<component>/params/        orbax checkpoint of the module's variables as a pure dict
                                   (`nnx.to_pure_dict(nnx.state(module))`)

Reading is safe: `.safetensors` without torch; `.pt/.pth/.ckpt/.bin` only through
`torch.load(weights_only=True)` (a pickle that would run code is refused, never executed).
Tensors are converted one at a time from memory-mapped files, so converting the full SD 2.1 UNet
needs little more memory than the converted parameters themselves.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from sodec_jax.errors import SodecError

FORMAT = "sodec-jax-converted"
FORMAT_VERSION = 1
CONVERTER_VERSION = "1.0"
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- reading tensors


class TensorSource:
  """A read-only mapping-like view of a state dict: keys(), shape(k), get(k) -> float numpy.

  Backed by a memory-mapped safetensors file (one tensor decoded at a time) or by a dict.
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
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces on read
      raise SodecError(f"could not read tensor {key} from {self.name} "
                       f"({type(e).__name__}: {_first_line(e)})") from None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], name: str) -> "TensorSource":
    d = dict(d)
    return cls(lambda k: _to_numpy(d[k]), {k: tuple(np.shape(v)) for k, v in d.items()}, name)

  def renamed(self, mapping: Mapping[str, str]) -> "TensorSource":
    """A view with keys renamed new <- old (`mapping`: new name -> old name)."""
    return TensorSource(lambda k: self.get(mapping[k]), {k: self.shape(o) for k, o in mapping.items()},
                        self.name)


def _first_line(e: Exception) -> str:
  s = str(e).strip()
  return s.splitlines()[0][:300] if s else ""


def _to_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):
    import torch
    t = v.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()
    return t.numpy()
  return np.asarray(v)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def open_safetensors(path: str) -> TensorSource:
  """A lazily read .safetensors file (no torch). Each tensor is read with plain file reads (no
  mmap, so the process never maps the whole file). The header is validated against the file
  size first: a damaged or truncated file is a SodecError before anything is converted."""
  import struct
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
      npdt = _np_dtype(dt) if dt == "bfloat16" else np.dtype(dt)
      if end - start != int(np.prod(shape, dtype=np.int64)) * npdt.itemsize or start > end:
        raise ValueError(f"{key}: byte range does not match shape {shape}")
      if base + end > size:
        raise ValueError(f"{key} lies beyond the end of the file ({size} bytes): truncated")
      infos[key] = (base + start, shape, npdt)
  except Exception as e:  # noqa: BLE001
    raise SodecError(f"could not read {path} as safetensors ({type(e).__name__}: "
                     f"{_first_line(e)}); is the file complete?") from None

  def get(k):
    offset, shape, npdt = infos[k]
    with open(path, "rb") as f:
      f.seek(offset)
      a = np.fromfile(f, dtype=npdt, count=int(np.prod(shape, dtype=np.int64)))
    a = a.reshape(shape)
    return a.astype(np.float32) if npdt.name == "bfloat16" else a
  return TensorSource(get, {k: v[1] for k, v in infos.items()}, path)


def _unpickler_reason(e: Exception) -> str:
  for line in str(e).splitlines():
    line = line.split("WeightsUnpickler error:")[-1].strip()
    if "unsupported" in line.lower() and "weights_only" not in line:
      return line.rstrip(".")[:200]
  return "torch.load(weights_only=True) rejected it"


def torch_load(path: str):
  """torch.load(weights_only=True, mmap when possible). Code-running pickles -> SodecError."""
  try:
    import torch
  except ImportError:
    raise SodecError(f"reading {path} needs torch (it is a torch pickle); install torch or use "
                     ".safetensors") from None
  try:
    try:
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:   # old (non-zip) format cannot be mmapped
      if "mmap" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = _unpickler_reason(e)
    if "global" in reason.lower():
      raise SodecError(f"refused to load {path}: it is a pickle that needs more than tensors "
                       f"({reason}), and loading it could run arbitrary code. Only plain state "
                       "dicts of tensors are accepted (or use .safetensors)") from None
    raise SodecError(f"could not read {path} as a torch file ({reason})") from None
  except Exception as e:  # noqa: BLE001
    raise SodecError(f"could not read {path} as a torch file ({type(e).__name__}: "
                     f"{_first_line(e)}); is the file complete?") from None


def open_weights(path: str) -> TensorSource:
  """A state dict file: .safetensors (no torch) or a torch pickle (weights_only)."""
  if not os.path.isfile(path):
    raise SodecError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return open_safetensors(path)
  obj = torch_load(path)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise SodecError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return TensorSource.from_dict({k: v for k, v in obj.items() if hasattr(v, "shape")}, path)


# ----------------------------------------------------------------------------- the output


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def source_entries(paths: Iterable[str]) -> list[dict]:
  out = []
  for p in paths:
    p = os.path.abspath(p)
    out.append({"path": p, "size": os.path.getsize(p), "sha256": sha256_file(p)})
  return out


def _check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise SodecError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  return dtype


def _np_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


class Output:
  """The output folder, written atomically: components go to a temporary sibling folder that is
  renamed to `out` by `commit()`; anything else (an exception) removes it."""

  def __init__(self, out: str, kind: str, dtype: str):
    self.out = os.path.abspath(out)
    self.kind, self.dtype = kind, dtype
    self.components: list[str] = []
    self.sources: list[dict] = []
    self.extra: dict = {}
    if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)):
      raise SodecError(f"--out {out} already exists and is not empty; choose a new folder "
                       "(nothing was written)")
    parent = os.path.dirname(self.out)
    try:
      os.makedirs(parent, exist_ok=True)
      self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=parent)
    except OSError as e:
      raise SodecError(f"cannot write --out {out}: {e.strerror or e}") from None

  def component(self, name: str) -> str:
    path = os.path.join(self.tmp, name)
    os.makedirs(path, exist_ok=True)
    if name not in self.components:
      self.components.append(name)
    return path

  def write_json(self, component: str, name: str, obj) -> None:
    with open(os.path.join(self.component(component), name), "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)

  def save_params(self, component: str, tree) -> None:
    save_tree(os.path.join(self.component(component), PARAMS_DIR), tree)

  def add_sources(self, paths: Iterable[str]) -> None:
    self.sources.extend(source_entries(paths))

  def hash_sources_in_background(self, paths: Iterable[str]) -> None:
    """Hash `paths` in a thread while the conversion runs (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)
    self._pending = pool.submit(source_entries, list(paths))
    pool.shutdown(wait=False)

  def commit(self) -> str:
    if getattr(self, "_pending", None) is not None:
      self.sources.extend(self._pending.result())
      self._pending = None
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "converter_version": CONVERTER_VERSION, "kind": self.kind, "dtype": self.dtype,
                "components": self.components, "source": self.sources,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.extra}
    with open(os.path.join(self.tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, default=_json_default)
    try:
      if os.path.isdir(self.out):
        os.rmdir(self.out)   # an empty folder given as --out
      os.rename(self.tmp, self.out)
    except OSError as e:
      raise SodecError(f"cannot move the result into --out {self.out}: {e.strerror or e}") from None
    os.chmod(self.out, 0o755)
    return self.out

  def abort(self) -> None:
    shutil.rmtree(self.tmp, ignore_errors=True)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  return str(o)


@contextlib.contextmanager
def output(out: str, kind: str, dtype: str):
  """with output(out, kind, dtype) as o: ...write components...; renamed into place on success."""
  o = Output(out, kind, dtype)
  try:
    yield o
    o.commit()
  except BaseException:
    o.abort()
    raise


def save_tree(path: str, tree) -> None:
  """An orbax checkpoint of a pure dict of arrays at `path` (synchronous)."""
  import orbax.checkpoint as ocp
  # Synchronous, no defensive copy of host arrays, at most 1 GB in flight, no compression
  # (weights do not compress): keeps converting the full UNet within memory and time budgets.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  import jax
  tree = jax.tree.map(lambda a: a if isinstance(a, np.ndarray) else np.asarray(a), tree)
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_compression=False,
                                        type_handler_registry=registry)
  try:
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
  except OSError as e:
    raise SodecError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- nnx helpers


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def _module_paths(model) -> dict[int, tuple]:
  from flax import nnx
  return {id(m): tuple(p) for p, m in nnx.iter_modules(model)}


def _state_paths(model) -> dict[tuple, tuple]:
  """Every variable of `model`: path -> (shape, dtype)."""
  from flax import nnx
  flat = nnx.to_flat_state(nnx.state(model))
  return {tuple(k): (tuple(v.value.shape), v.value.dtype) for k, v in flat}


def diffusers_params(model, source: TensorSource, *, what: str, dtype: str, aliases=(),
                     hint: Callable[[list, list], str] | None = None) -> dict:
  """The pure dict of an (abstract) diffusers-family module filled from `source`, strictly.

  Same key map as `sodec_jax.weights.diffusers.load_state_dict_into` (`expected_keys`), but
  tensors are converted one at a time into numpy arrays of `dtype` and nothing is materialised
  in the module. One SodecError lists all missing, unexpected and mis-shaped keys.
  """
  from sodec_jax.weights.diffusers import expected_keys
  table = expected_keys(model)
  paths = _module_paths(model)
  npdt = _np_dtype(dtype)
  variables = _state_paths(model)
  used, missing, bad, flat = set(), [], [], {}
  for key, (module, attr, transform, shape) in table.items():
    src = key
    if src not in source:
      for pattern, repl in aliases:
        prefix, leaf = key.rsplit(".", 1)
        alt = re.sub(pattern, repl, prefix) + "." + leaf
        if alt in source:
          src = alt
          break
    if src not in source:
      missing.append(key)
      continue
    used.add(src)
    got = source.shape(src)
    probe = transform(np.empty(got, np.uint8)) if np.prod(got) < 1 << 31 else None
    if probe is None or tuple(probe.shape) != shape:
      bad.append(f"{src}: {got} does not convert to {shape}")
      continue
    flat[paths[id(module)] + (attr,)] = np.ascontiguousarray(
        transform(source.get(src)).astype(npdt, copy=False))
  unexpected = sorted(set(source.keys()) - used)
  if missing or unexpected or bad:
    lines = [f"{what}: the weights do not match the configuration."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
      if items:
        shown = sorted(items)
        lines.append(f"{len(items)} {title}: " + ", ".join(shown[:30])
                     + (" ..." if len(shown) > 30 else ""))
    if hint:
      h = hint(missing, unexpected)
      if h:
        lines.append(h)
    raise SodecError(" ".join(lines))
  left = sorted(".".join(map(str, p)) for p in set(variables) - set(flat))
  if left:
    raise SodecError(f"{what}: the key map does not cover {left[:10]} (a bug in the converter)")
  return _unflatten(flat)


def _looks_like(keys: Iterable[str]) -> str:
  keys = list(keys)
  if any(k.startswith("model.diffusion_model.") for k in keys):
    return "an original Stable Diffusion single-file checkpoint (use `sd21 --src FILE`)"
  if any(k.startswith(("Encoder.", "Generator.", "Hyperprior.")) for k in keys):
    return "a HiFiC checkpoint (use `hific`)"
  if any(k.startswith("time_embedding.") for k in keys):
    return "a diffusers UNet (use `unet`)"
  if any(k.startswith(("encoder.down_blocks", "decoder.up_blocks", "post_quant_conv")) for k in keys):
    return "a diffusers VAE (use `vae`)"
  if any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys):
    return "a transformers CLIPModel (use `clip-iqa`)"
  if any(k.startswith("text_model.") for k in keys):
    return "a CLIP text encoder"
  if any(k.startswith(("features.",)) for k in keys):
    return "a torchvision VGG (use `lpips`)"
  if any(".attention.attention.query" in k or k.startswith(("vit.", "embeddings.patch")) for k in keys):
    return "a transformers ViT/Swin (use `vit` / `swin`)"
  return ""


def _hint_for(expected: str):
  def hint(missing, unexpected):
    if unexpected and len(missing) > 0:
      looks = _looks_like(unexpected)
      if looks and expected not in looks:
        return f"Hint: these weights look like {looks}."
    return ""
  return hint


# ----------------------------------------------------------------------------- diffusers


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise SodecError(f"{what}: {path} not found") from None
  except (OSError, ValueError) as e:
    raise SodecError(f"{what}: could not parse {path} ({_first_line(e)})") from None


def _diffusers_weight_file(folder: str, what: str) -> str:
  from sodec_jax.weights.diffusers import WEIGHT_FILES
  if not os.path.isdir(folder):
    raise SodecError(f"{folder} is not a folder (expected a diffusers {what} folder with "
                     "config.json and diffusion_pytorch_model.safetensors)")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise SodecError(f"{folder} is not a diffusers {what} folder: it has no config.json")
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  if any(n.endswith(".index.json") for n in os.listdir(folder)):
    raise SodecError(f"{folder} holds a sharded checkpoint, which is not supported; "
                     "re-save it with save_pretrained(max_shard_size='20GB')")
  raise SodecError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _abstract_unet(config: dict, what: str):
  from flax import nnx
  from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig
  if config.get("_class_name") not in (None, "UNet2DConditionModel"):
    raise SodecError(f"{what} holds a {config.get('_class_name')} (config.json), not a "
                     "UNet2DConditionModel")
  cfg = UNetConfig.from_dict(config)
  return cfg, nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))


def _abstract_vae(config: dict, what: str):
  from flax import nnx
  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig
  if config.get("_class_name") not in (None, "AutoencoderKL"):
    raise SodecError(f"{what} holds a {config.get('_class_name')} (config.json), not an "
                     "AutoencoderKL")
  cfg = VAEConfig.from_dict(config)
  return cfg, nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def _write_unet(o: Output, config: dict, source: TensorSource, what: str, dtype: str,
                name: str = "unet", built=None) -> None:
  cfg, model = built or _abstract_unet(config, what)
  params = diffusers_params(model, source, what=what, dtype=dtype, hint=_hint_for("UNet"))
  o.write_json(name, "config.json", {**config, **cfg.to_dict(), "_class_name": "UNet2DConditionModel"})
  o.save_params(name, params)


def _write_vae(o: Output, config: dict, source: TensorSource, what: str, dtype: str,
               name: str = "vae", built=None) -> None:
  from sodec_jax.weights.diffusers import LEGACY_VAE_ATTENTION
  cfg, model = built or _abstract_vae(config, what)
  params = diffusers_params(model, source, what=what, dtype=dtype, aliases=LEGACY_VAE_ATTENTION,
                            hint=_hint_for("VAE"))
  o.write_json(name, "config.json", {**config, **cfg.to_dict(), "_class_name": "AutoencoderKL"})
  o.save_params(name, params)


def _convert_diffusers_component(src: str, out: str, dtype: str, kind: str, what: str,
                                 write) -> str:
  """A diffusers model folder (config.json + weights) -> OUT/<kind>/ through `write`."""
  _check_dtype(dtype)
  weights = _diffusers_weight_file(src, what)
  config = _read_json(os.path.join(src, "config.json"), what)
  source = _open_diffusers(weights)
  with output(out, kind, dtype) as o:
    o.hash_sources_in_background([os.path.join(src, "config.json"), weights])
    write(o, config, source, f"{what} weights in {src}", dtype)
  return out


def convert_unet(src: str, out: str, dtype: str = "float32") -> str:
  """A diffusers UNet2DConditionModel folder -> OUT/unet/."""
  return _convert_diffusers_component(src, out, dtype, "unet", "UNet", _write_unet)


def convert_vae(src: str, out: str, dtype: str = "float32") -> str:
  """A diffusers AutoencoderKL folder -> OUT/vae/."""
  return _convert_diffusers_component(src, out, dtype, "vae", "VAE", _write_vae)


def _open_diffusers(path: str) -> TensorSource:
  return open_weights(path)


SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "prediction_type")


def _write_scheduler(o: Output, sched: dict) -> None:
  from sodec_jax.diffusion.schedule import NoiseSchedule
  NoiseSchedule.from_dict(sched)   # validates (prediction_type, beta_schedule)
  o.write_json("scheduler", "config.json", sched)


def convert_sd21(src: str, out: str, dtype: str = "float32", *, config_dir: str | None = None,
                 prediction_type: str | None = None) -> str:
  """Stable Diffusion 2.1: a diffusers pipeline folder (unet/, vae/, scheduler/) or one original
  single-file checkpoint (.safetensors / .ckpt) -> OUT/{unet,vae,scheduler}/.

  For a single file, the architecture comes from `config_dir` (a diffusers pipeline folder or
  one with unet/config.json, vae/config.json[, scheduler/scheduler_config.json]); default: the
  SD 2.1 configs built in (`ldm.SD21_*`). `prediction_type` overrides the scheduler's.
  """
  _check_dtype(dtype)
  if os.path.isdir(src):
    return _convert_sd21_folder(src, out, dtype, prediction_type)
  if os.path.isfile(src):
    return _convert_sd21_single(src, out, dtype, config_dir, prediction_type)
  raise SodecError(f"--src {src} does not exist (expected a diffusers Stable Diffusion 2.1 folder "
                   "or a .safetensors/.ckpt single-file checkpoint)")


def _convert_sd21_folder(src, out, dtype, prediction_type):
  unet_dir, vae_dir = os.path.join(src, "unet"), os.path.join(src, "vae")
  if not (os.path.isdir(unet_dir) and os.path.isdir(vae_dir)):
    raise SodecError(f"{src} is not a diffusers Stable Diffusion folder: it needs unet/ and vae/ "
                     "(and scheduler/); for one model use the `unet` / `vae` subcommands")
  unet_w = _diffusers_weight_file(unet_dir, "UNet")
  vae_w = _diffusers_weight_file(vae_dir, "VAE")
  sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
  sched = _read_json(sched_path, "scheduler") if os.path.isfile(sched_path) else {}
  if not sched:
    from sodec_jax.weights.ldm import SD21_SCHEDULER
    sched = dict(SD21_SCHEDULER)
  if prediction_type:
    sched["prediction_type"] = prediction_type
  srcs = [os.path.join(unet_dir, "config.json"), unet_w, os.path.join(vae_dir, "config.json"), vae_w]
  if os.path.isfile(sched_path):
    srcs.append(sched_path)
  with output(out, "sd21", dtype) as o:
    o.hash_sources_in_background(srcs)
    _write_scheduler(o, sched)
    _write_unet(o, _read_json(os.path.join(unet_dir, "config.json"), "UNet"), open_weights(unet_w),
                f"UNet weights in {unet_dir}", dtype)
    _write_vae(o, _read_json(os.path.join(vae_dir, "config.json"), "VAE"), open_weights(vae_w),
               f"VAE weights in {vae_dir}", dtype)
    o.extra["layout"] = "diffusers"
    if os.path.isdir(os.path.join(src, "text_encoder")):
      o.extra["skipped"] = ["text_encoder (SODEC conditions the UNet on image guidance, not text)"]
  return out


def _convert_sd21_single(src, out, dtype, config_dir, prediction_type):
  from sodec_jax.weights import ldm
  from sodec_jax.weights.diffusers import expected_keys
  unet_cfg, vae_cfg, sched = ldm.configs_for(config_dir)
  if prediction_type:
    sched["prediction_type"] = prediction_type
  source = open_weights(src)
  unet = _abstract_unet(unet_cfg, "UNet config")
  vae = _abstract_vae(vae_cfg, "VAE config")
  unet_src, vae_src, ignored = ldm.split_single_file(source, expected_keys(unet[1]), unet_cfg,
                                                     expected_keys(vae[1]), vae_cfg)
  with output(out, "sd21", dtype) as o:
    o.hash_sources_in_background([src])
    _write_scheduler(o, sched)
    _write_unet(o, unet_cfg, unet_src, f"UNet weights (model.diffusion_model.*) in {src}", dtype,
                built=unet)
    _write_vae(o, vae_cfg, vae_src, f"VAE weights (first_stage_model.*) in {src}", dtype,
               built=vae)
    o.extra["layout"] = "ldm-single-file"
    o.extra["ignored_prefixes"] = sorted({k.split(".")[0] for k in ignored})
  return out


# ----------------------------------------------------------------------------- HiFiC


def hific_model_config(state: TensorSource, args: Mapping | None = None):
  """Our codec `model` section for a HiFiC state dict: widths read from the tensors' shapes
  (latent_channels, hyper_channels, encoder/decoder filters, residual blocks, density filters);
  the rest from configs/base.py. `args` (the checkpoint's) is cross-checked."""
  from configs import base
  from sodec_jax.weights.hific import HIFIC_PREFIXES, check_key_names
  m = base.get_config().model
  if not any(k.startswith(HIFIC_PREFIXES) for k in state.keys()):
    looks = _looks_like(state.keys())
    raise SodecError("this is not a HiFiC checkpoint: model_state_dict has no Encoder./"
                     "Generator./Hyperprior. keys" + (f" (it looks like {looks})" if looks else ""))
  m.decoder_residual_blocks = len({k.split(".")[1] for k in state.keys()
                                   if k.startswith("Generator.resblock_")})
  n_h = len([k for k in state.keys() if re.fullmatch(r"Hyperprior\.hyperlatent_likelihood\.H_\d+", k)])
  if n_h >= 2:
    # H_k is [C, d_{k+1}, d_k]: the filters are the output widths of all but the last
    m.factorized_filters = tuple(state.shape(f"Hyperprior.hyperlatent_likelihood.H_{k}")[1]
                                 for k in range(n_h - 1))
  m.factorized_last_gate = True   # upstream's density has (and uses) a_k after its last layer
  m.padding = "hific"             # and it pads as upstream codes (sodec_jax/codec/padding.py)
  check_key_names(state.keys(), m)
  m.encoder_filters = tuple(state.shape(f"Encoder.conv_block{i}.1.weight")[0] for i in range(1, 6))
  m.latent_channels = state.shape("Encoder.conv_block_out.1.weight")[0]
  m.hyper_channels = state.shape("Hyperprior.analysis_net.conv1.weight")[0]
  m.decoder_filters = (state.shape("Generator.conv_block_init.2.weight")[0],) + tuple(
      state.shape(f"Generator.upconv_block{i}.0.weight")[1] for i in range(1, 5))
  if args:
    for ours, theirs in (("latent_channels", "latent_channels"),
                         ("decoder_residual_blocks", "n_residual_blocks")):
      if theirs in args and int(args[theirs]) != int(m[ours]):
        raise SodecError(f"the HiFiC checkpoint's args say {theirs}={args[theirs]} but its tensors "
                         f"have {m[ours]}: the file is inconsistent")
  return m


def _hific_state(src: str) -> tuple[TensorSource, dict]:
  if not os.path.isfile(src):
    raise SodecError(f"--src {src}: no such file (expected a HiFiC checkpoint .pt)")
  if src.endswith(".safetensors"):
    return open_safetensors(src), {}
  obj = torch_load(src)
  if not isinstance(obj, Mapping):
    raise SodecError(f"{src} holds a {type(obj).__name__}, not a HiFiC checkpoint dict")
  if "model_state_dict" in obj:
    sd, args = obj["model_state_dict"], obj.get("args") or {}
  else:
    sd, args = obj, {}
  if not isinstance(sd, Mapping):
    raise SodecError(f"{src}: model_state_dict is a {type(sd).__name__}, not a state dict")
  return TensorSource.from_dict(sd, src), dict(args) if isinstance(args, Mapping) else {}


# HiFiC discriminator tensors -> OUT/discriminator/ (no Flax module yet; the GAN stage reads this):
#   Discriminator.<layer>.weight_orig [O, I, kh, kw] (spectral norm) -> <layer>.kernel [kh, kw, I, O]
#   Discriminator.<layer>.weight      [O, I, kh, kw]                 -> <layer>.kernel [kh, kw, I, O]
#   Discriminator.<layer>.weight_u    [O]                            -> <layer>.sn_u   [O]   (as is)
#   Discriminator.<layer>.weight_v    [I*kh*kw]                      -> <layer>.sn_v   [I*kh*kw] (as is)
#   Discriminator.<layer>.bias        [O]                            -> <layer>.bias   [O]
# (<layer> with dots replaced by '_', e.g. context_conv, conv1..conv4, conv_out.)
DISCRIMINATOR_LEAVES = {"weight_orig": "kernel", "weight": "kernel", "weight_u": "sn_u",
                        "weight_v": "sn_v", "bias": "bias"}


def discriminator_arrays(state: TensorSource, dtype: str) -> dict:
  """The `Discriminator.*` tensors in our layout (table above); unknown leaves -> SodecError."""
  npdt = _np_dtype(dtype)
  out: dict = {}
  bad = []
  for k in sorted(state.keys()):
    if not k.startswith("Discriminator."):
      continue
    layer, leaf = k[len("Discriminator."):].rsplit(".", 1)
    if leaf not in DISCRIMINATOR_LEAVES:
      bad.append(k)
      continue
    a = state.get(k)
    if DISCRIMINATOR_LEAVES[leaf] == "kernel":
      if a.ndim != 4:
        bad.append(f"{k} {a.shape}")
        continue
      a = a.transpose(2, 3, 1, 0)
    out.setdefault(layer.replace(".", "_"), {})[DISCRIMINATOR_LEAVES[leaf]] = \
        np.ascontiguousarray(a.astype(npdt if a.dtype.kind == "f" else a.dtype))
  if bad:
    raise SodecError("HiFiC discriminator tensors not understood: " + ", ".join(bad))
  return out


def convert_hific(src: str, out: str, dtype: str = "float32") -> str:
  """A HiFiC PyTorch checkpoint -> OUT/codec/ (E, H_a, P, D_a) [+ OUT/discriminator/]."""
  import ml_collections
  from flax import nnx
  from configs import base
  from sodec_jax.model import build_model
  from sodec_jax.weights.hific import load_hific_state_dict
  _check_dtype(dtype)
  state, args = _hific_state(src)
  model_cfg = hific_model_config(state, args)
  model_cfg.param_dtype = dtype
  config = base.get_config()
  config.model = model_cfg
  model = build_model(config, nnx.Rngs(0))
  arrays = {k: state.get(k) for k in state.keys()}
  ignored = load_hific_state_dict(arrays, model, model_cfg)
  disc = discriminator_arrays(state, dtype) if ignored else {}
  with output(out, "hific", dtype) as o:
    o.write_json("codec", "config.json", ml_collections.ConfigDict(model_cfg).to_dict())
    o.save_params("codec", nnx.to_pure_dict(nnx.state(model.codec, nnx.Param)))
    if disc:
      o.write_json("discriminator", "config.json", {
          "source_prefix": "Discriminator.", "layers": sorted(disc),
          "key_map": {"weight_orig|weight": "kernel (O,I,kh,kw -> kh,kw,I,O)",
                      "weight_u": "sn_u", "weight_v": "sn_v", "bias": "bias"}})
      o.save_params("discriminator", disc)
    o.add_sources([src])
    o.extra["hific_args"] = {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))}
    o.extra["discriminator"] = bool(disc)
  return out


# ----------------------------------------------------------------------------- ViT / Swin


def _convert_extractor(kind: str, src: str, out: str, dtype: str) -> str:
  from flax import nnx
  from sodec_jax.weights import transformers as tw
  _check_dtype(dtype)
  if not os.path.isdir(src):
    raise SodecError(f"--src {src} is not a folder (expected a transformers {kind} model folder "
                     "with config.json and model.safetensors)")
  import jax.numpy as jnp
  loader = tw.load_vit if kind == "vit" else tw.load_swin
  module = loader(src, dtype=jnp.float32, param_dtype=jnp.dtype(dtype))
  config = _read_json(os.path.join(src, "config.json"), kind)
  pre_path = os.path.join(src, "preprocessor_config.json")
  pre = _read_json(pre_path, kind) if os.path.isfile(pre_path) else {}
  tree = nnx.to_pure_dict(nnx.state(module))
  names = [n for n in sorted(os.listdir(src)) if n.endswith((".json", ".safetensors", ".bin"))]
  with output(out, kind, dtype) as o:
    o.write_json("extractor", "config.json", config)
    o.write_json("extractor", "preprocessor_config.json",
                 {**pre, "image_mean": list(module.image_mean), "image_std": list(module.image_std)})
    o.save_params("extractor", tree)
    o.add_sources([os.path.join(src, n) for n in names])
    o.extra["ignored_keys"] = list(module.ignored_keys)
  return out


def convert_vit(src: str, out: str, dtype: str = "float32") -> str:
  return _convert_extractor("vit", src, out, dtype)


def convert_swin(src: str, out: str, dtype: str = "float32") -> str:
  return _convert_extractor("swin", src, out, dtype)


# ----------------------------------------------------------------------------- LPIPS / DISTS


def _vgg_tree(vgg_state: Mapping) -> dict:
  """torchvision `features.{i}.{weight,bias}` -> {conv{i}_kernel (HWIO), conv{i}_bias}."""
  out = {}
  for k, v in vgg_state.items():
    _, idx, leaf = k.split(".")
    a = np.asarray(v, np.float32)
    if leaf == "weight":
      out[f"conv{idx}_kernel"] = np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    else:
      out[f"conv{idx}_bias"] = a
  return out


def convert_lpips(src: str, out: str, dtype: str = "float32", *, heads: str | None = None) -> str:
  """VGG16 (torchvision layout, .pth/.safetensors) + LPIPS heads -> OUT/{vgg16,lpips}/.

  heads: the lpips wheel's weights/v0.1/vgg.pth (or any file with lin{i}.model.1.weight);
  default: the heads shipped with sodec-jax (sodec_jax/metrics/lpips_heads.npz)."""
  from sodec_jax.weights import lpips as lw
  _check_dtype(dtype)
  vgg = lw.load_vgg16(src)
  if heads:
    head_arrays = lw.check_heads(_read_heads(heads), heads)
  else:
    head_arrays = lw.load_shipped_heads()
  npdt = _np_dtype(dtype)
  with output(out, "lpips", dtype) as o:
    o.write_json("vgg16", "config.json", {"layout": "torchvision vgg16 features, HWIO kernels",
                                          "convs": sorted(int(k.split(".")[1]) for k in vgg
                                                          if k.endswith("weight"))})
    o.save_params("vgg16", {k: v.astype(npdt) for k, v in _vgg_tree(vgg).items()})
    o.write_json("lpips", "config.json", {"heads": list(lw.HEAD_KEYS),
                                          "source": os.path.abspath(heads) if heads else "shipped"})
    o.save_params("lpips", {f"lin{i}": np.asarray(head_arrays[k], np.float32).reshape(-1)
                            for i, k in enumerate(lw.HEAD_KEYS)})
    o.add_sources([src] + ([heads] if heads else []))
  return out


def _read_heads(path: str) -> dict:
  from sodec_jax.weights import lpips as lw
  src = open_weights(path) if not path.endswith(".npz") else None
  if src is None:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  missing = [k for k in lw.HEAD_KEYS if k not in src]
  if missing:
    raise SodecError(f"{path} has no LPIPS heads (missing {', '.join(missing)})")
  return {k: src.get(k) for k in lw.HEAD_KEYS}


def convert_dists(src: str, out: str, dtype: str = "float32", *, vgg: str) -> str:
  """DISTS alpha/beta (`src`: the dists-pytorch weights.pt or .safetensors/.npz) + VGG16
  (`vgg`, torchvision layout) -> OUT/{vgg16,dists}/."""
  from sodec_jax.weights import dists as dw
  from sodec_jax.weights import lpips as lw
  _check_dtype(dtype)
  if not vgg:
    raise SodecError("dists needs --vgg PATH (the VGG16 ImageNet weights, torchvision layout)")
  alpha, beta = dw.load_dists_weights(src)
  vgg_state = lw.load_vgg16(vgg)
  npdt = _np_dtype(dtype)
  with output(out, "dists", dtype) as o:
    o.write_json("vgg16", "config.json", {"layout": "torchvision vgg16 features, HWIO kernels"})
    o.save_params("vgg16", {k: v.astype(npdt) for k, v in _vgg_tree(vgg_state).items()})
    o.write_json("dists", "config.json", {"channels": int(alpha.size)})
    o.save_params("dists", {"alpha": alpha.astype(np.float32), "beta": beta.astype(np.float32)})
    o.add_sources([src, vgg])
  return out


# ----------------------------------------------------------------------------- CLIP-IQA


def convert_clip_iqa(src: str, out: str, dtype: str = "float32") -> str:
  """A transformers CLIPModel folder (config.json, model.safetensors, tokenizer files) ->
  OUT/clip_iqa/: the CLIP image tower, the prompt text embeddings (computed here in torch) and the
  logit scale; see `sodec_jax.weights.clip` and `sodec_jax.metrics.clip_iqa`."""
  from flax import nnx
  from sodec_jax.weights import clip as cw
  _check_dtype(dtype)
  import jax.numpy as jnp
  model, cfg = cw.build_from_folder(src, param_dtype=jnp.dtype(dtype))
  tree = nnx.to_pure_dict(nnx.state(model))
  names = [n for n in sorted(os.listdir(src))
           if n.endswith((".json", ".safetensors", ".bin", ".txt", ".model"))]
  with output(out, "clip-iqa", dtype) as o:
    o.write_json("clip_iqa", "config.json", cfg)
    o.save_params("clip_iqa", tree)
    o.add_sources([os.path.join(src, n) for n in names])
    o.extra["ignored_keys"] = list(model.vision.ignored_keys)
    o.extra["prompts"] = list(cfg["prompts"])
    o.extra["logit_scale"] = cfg["logit_scale"]
    o.extra["logit_scale_exp"] = cfg["logit_scale_exp"]
  return out


CONVERTERS = {"sd21": convert_sd21, "unet": convert_unet, "vae": convert_vae,
              "hific": convert_hific, "vit": convert_vit, "swin": convert_swin,
              "lpips": convert_lpips, "dists": convert_dists, "clip-iqa": convert_clip_iqa}

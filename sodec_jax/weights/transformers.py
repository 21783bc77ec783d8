"""transformers model folders -> our frozen ViT / Swin feature extractors (the F of SODEC).

    vit = load_vit("vit-large-patch16-224-in21k/")    # config.json + model.safetensors
    swin = load_swin("swin-base-patch4-window7-224/")
    feats = vit(vit.preprocess(x01))                   # [B, 197, 1024]

A folder is what `save_pretrained` writes (or a hub snapshot): `config.json` plus
`model.safetensors` (read with safetensors' numpy reader, no torch needed), a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (read with `torch.load(weights_only=True)`;
a pickle that needs more than tensors is refused, never executed). `preprocessor_config.json`, when
present, gives image_mean / image_std.

Every key is mapped explicitly (tables below: hub name -> our module path, with the transform:
torch Linear [out, in] -> [in, out], Conv2d [out, in, kh, kw] -> [kh, kw, in, out]). Loading is
strict: missing, unexpected and mis-shaped keys are reported together in one SodecError. Accepted:
the base-model keys (`embeddings.*`, `encoder.*`, `layernorm.*`), the same under the `vit.` /
`swin.` prefix of the task models (their heads -- `classifier.*`, `decoder.*` -- and the ViT
pooler are ignored and listed in `model.ignored_keys`), and transformers-5 module names
(`layers.N.attention.q_proj`, ...) as written by `torch.save(model.state_dict())`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.weights import strict
from sodec_jax.weights.formats import open_safetensors, open_weights, to_numpy

_WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)


# ----------------------------------------------------------------------------- reading a folder


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  return open_safetensors(str(path)).to_dict()


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  return open_weights(str(path), hint="or save the model as model.safetensors").to_dict()


def _read_sharded(index: Path, reader: Callable[[Path], dict]) -> dict[str, np.ndarray]:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except Exception as e:  # noqa: BLE001
    raise SodecError(f"could not read the shard index {index} ({type(e).__name__}: {e})") from e
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    out.update(reader(index.parent / shard))
  return out


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict, dict[str, np.ndarray]]:
  """(config.json, preprocessor_config.json or {}, state dict as numpy) of a transformers folder."""
  folder = Path(folder)
  if not folder.is_dir():
    raise SodecError(
      f"{folder} is not a folder; pass the directory that save_pretrained wrote "
      "(config.json + model.safetensors)"
    )
  cfg_path = folder / "config.json"
  if not cfg_path.is_file():
    raise SodecError(
      f"{folder} has no config.json; pass a transformers model folder "
      "(what save_pretrained or a hub snapshot holds)"
    )
  try:
    config = json.loads(cfg_path.read_text())
  except Exception as e:  # noqa: BLE001
    raise SodecError(f"could not parse {cfg_path} ({type(e).__name__}: {e})") from e
  pre_path = folder / "preprocessor_config.json"
  pre = {}
  if pre_path.is_file():
    try:
      pre = json.loads(pre_path.read_text())
    except Exception as e:  # noqa: BLE001
      raise SodecError(f"could not parse {pre_path} ({type(e).__name__}: {e})") from e
  if (folder / "model.safetensors").is_file():
    state = _read_safetensors(folder / "model.safetensors")
  elif (folder / "model.safetensors.index.json").is_file():
    state = _read_sharded(folder / "model.safetensors.index.json", _read_safetensors)
  elif (folder / "pytorch_model.bin").is_file():
    state = _read_torch_bin(folder / "pytorch_model.bin")
  elif (folder / "pytorch_model.bin.index.json").is_file():
    state = _read_sharded(folder / "pytorch_model.bin.index.json", _read_torch_bin)
  else:
    raise SodecError(f"{folder} has no weights: expected one of {', '.join(_WEIGHT_FILES)}")
  return config, pre, state


# ----------------------------------------------------------------------------- key tables


# Transforms from the torch tensor to our layout.
def _linear(a):  # [out, in] -> [in, out]
  return a.T


def _conv(a):  # [out, in, kh, kw] -> [kh, kw, in, out]
  return a.transpose(2, 3, 1, 0)


def _same(a):
  return a


def _linear_entries(torch_prefix: str, ours: str, bias: bool = True) -> list[tuple]:
  out = [(f"{torch_prefix}.weight", f"{ours}.kernel", _linear)]
  if bias:
    out.append((f"{torch_prefix}.bias", f"{ours}.bias", _same))
  return out


def _norm_entries(torch_prefix: str, ours: str) -> list[tuple]:
  return [
    (f"{torch_prefix}.weight", f"{ours}.scale", _same),
    (f"{torch_prefix}.bias", f"{ours}.bias", _same),
  ]


def vit_table(spec) -> list[tuple[str, str, Callable]]:
  """(hub key, our module path, transform) for every weight of `ViT(spec)`."""
  t = [
    ("embeddings.cls_token", "cls_token", _same),
    ("embeddings.position_embeddings", "position_embeddings", _same),
    ("embeddings.patch_embeddings.projection.weight", "patch_kernel", _conv),
    ("embeddings.patch_embeddings.projection.bias", "patch_bias", _same),
  ]
  for i in range(spec.num_hidden_layers):
    src, dst = f"encoder.layer.{i}", f"layers.{i}"
    t += _norm_entries(f"{src}.layernorm_before", f"{dst}.layernorm_before")
    for name in ("query", "key", "value"):
      t += _linear_entries(
        f"{src}.attention.attention.{name}", f"{dst}.attention.{name}", spec.qkv_bias
      )
    t += _linear_entries(f"{src}.attention.output.dense", f"{dst}.attention.out")
    t += _norm_entries(f"{src}.layernorm_after", f"{dst}.layernorm_after")
    t += _linear_entries(f"{src}.intermediate.dense", f"{dst}.mlp.fc1")
    t += _linear_entries(f"{src}.output.dense", f"{dst}.mlp.fc2")
  t += _norm_entries("layernorm", "layernorm")
  return t


def swin_table(spec) -> list[tuple[str, str, Callable]]:
  """(hub key, our module path, transform) for every weight of `Swin(spec)`."""
  t = [
    ("embeddings.patch_embeddings.projection.weight", "patch_kernel", _conv),
    ("embeddings.patch_embeddings.projection.bias", "patch_bias", _same),
  ]
  t += _norm_entries("embeddings.norm", "embed_norm")
  if spec.use_absolute_embeddings:
    t.append(("embeddings.position_embeddings", "position_embeddings", _same))
  for s, depth in enumerate(spec.depths):
    for j in range(depth):
      src, dst = f"encoder.layers.{s}.blocks.{j}", f"stages.{s}.blocks.{j}"
      t += _norm_entries(f"{src}.layernorm_before", f"{dst}.layernorm_before")
      for name in ("query", "key", "value"):
        t += _linear_entries(
          f"{src}.attention.self.{name}", f"{dst}.attention.{name}", spec.qkv_bias
        )
      t.append(
        (
          f"{src}.attention.self.relative_position_bias_table",
          f"{dst}.attention.relative_position_bias_table",
          _same,
        )
      )
      t += _linear_entries(f"{src}.attention.output.dense", f"{dst}.attention.out")
      t += _norm_entries(f"{src}.layernorm_after", f"{dst}.layernorm_after")
      t += _linear_entries(f"{src}.intermediate.dense", f"{dst}.mlp.fc1")
      t += _linear_entries(f"{src}.output.dense", f"{dst}.mlp.fc2")
    if s < len(spec.depths) - 1:
      t += _norm_entries(f"encoder.layers.{s}.downsample.norm", f"stages.{s}.downsample.norm")
      t.append(
        (
          f"encoder.layers.{s}.downsample.reduction.weight",
          f"stages.{s}.downsample.reduction.kernel",
          _linear,
        )
      )
  t += _norm_entries("layernorm", "layernorm")
  return t


# transformers-5 module names (what `torch.save(model.state_dict())` writes) -> hub names.
_VIT_V5_NAMES = (
  (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
  (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
  (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
  (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
  (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
  (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
  (r"^layers\.(\d+)\.", r"encoder.layer.\1."),  # layernorm_before / layernorm_after
)
_SWIN_V5_NAMES = (
  (r"\.attention\.q_proj\.", ".attention.self.query."),
  (r"\.attention\.k_proj\.", ".attention.self.key."),
  (r"\.attention\.v_proj\.", ".attention.self.value."),
  (
    r"\.attention\.relative_position_bias\.relative_position_bias_table$",
    ".attention.self.relative_position_bias_table",
  ),
  (r"\.attention\.o_proj\.", ".attention.output.dense."),
  (r"\.mlp\.fc1\.", ".intermediate.dense."),
  (r"\.mlp\.fc2\.", ".output.dense."),
)

# Keys that belong to the checkpoint but not to the feature extractor: ignored, and listed.
_VIT_IGNORED = (r"^pooler\.", r"^classifier\.", r"^decoder\.", r"^embeddings\.mask_token$")
_SWIN_IGNORED = (
  r"^classifier\.",
  r"^decoder\.",
  r"^embeddings\.mask_token$",
  r"\.relative_position_index$",
)  # a buffer older checkpoints saved

# model_type values each loader accepts, and which loader fits other types.
_VIT_TYPES = ("vit",)
_SWIN_TYPES = ("swin",)
_OTHER_LOADER = {
  "vit": "load_vit",
  "swin": "load_swin",
  "deit": None,
  "dinov2": None,
  "swinv2": None,
  "clip_vision_model": None,
  "clip": None,
  "siglip": None,
}


def _normalise_keys(
  state: Mapping[str, np.ndarray], prefix: str, v5_names, ignored_patterns
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Strips the task-model prefix, renames transformers-5 names, separates the ignored keys."""
  has_prefix = any(k.startswith(prefix) for k in state)
  out, ignored = {}, []
  for key, value in state.items():
    k = key
    if has_prefix and k.startswith(prefix):
      k = k[len(prefix) :]
    elif has_prefix and not re.search("|".join(ignored_patterns), k):
      out[key] = value  # an unexpected non-prefixed key: keep its name for the error
      continue
    for pat, rep in v5_names:
      k = re.sub(pat, rep, k)
    if any(re.search(p, k) for p in ignored_patterns):
      ignored.append(key)
    else:
      out[k] = value
  return out, sorted(ignored)


def _get_variable(module, path: str):
  node = module
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def _check_type(config: Mapping[str, Any], accepted: tuple[str, ...], loader: str, folder) -> None:
  mt = config.get("model_type")
  if mt in accepted:
    return
  other = _OTHER_LOADER.get(mt)
  if mt == "clip":  # a CLIP checkpoint is the CLIP-IQA metric's, not a guidance extractor
    hint = (
      "; CLIP checkpoints are for the CLIP-IQA metric: `python convert/from_torch.py "
      "clip-iqa --src FOLDER --out DIR`. Guidance extractors are transformers ViT "
      "(model_type 'vit') or Swin ('swin') folders"
    )
  else:
    hint = (
      f"; use {other}() for it"
      if other
      else "; only transformers ViT (model_type 'vit') and Swin ('swin') folders are supported"
    )
  raise SodecError(
    f"{loader}(): {folder} holds a model_type {mt!r} model (config.json), not "
    f"{' / '.join(repr(a) for a in accepted)}{hint}"
  )


def assign(
  module, table, state: Mapping[str, np.ndarray], ignored: list[str], source: str, kind: str
) -> None:
  """Copies every table entry into `module` (strict: one SodecError lists all problems)."""
  import jax.numpy as jnp

  missing, bad, expected = [], [], set()
  staged = []
  for key, path, fn in table:
    expected.add(key)
    if key not in state:
      missing.append(key)
      continue
    var = _get_variable(module, path)
    want = _torch_shape(fn, var.shape)
    if tuple(np.shape(state[key])) != want:
      bad.append(f"{key}: {tuple(np.shape(state[key]))} (expected {want})")
      continue
    staged.append((var, fn(np.asarray(to_numpy(state[key]), np.float32))))
  unexpected = sorted(k for k in state if k not in expected)
  strict.check(f"{source} (the {kind} its config.json describes)", missing, unexpected, bad)
  for var, arr in staged:
    var.value = jnp.asarray(arr, var.value.dtype)
  module.ignored_keys = tuple(ignored)


def _torch_shape(fn, ours: tuple[int, ...]) -> tuple[int, ...]:
  """Our variable shape -> the torch shape the checkpoint should have."""
  if fn is _linear:
    return tuple(ours[::-1])
  if fn is _conv:
    kh, kw, i, o = ours
    return (o, i, kh, kw)
  return tuple(ours)


def _norm_stats(pre: Mapping[str, Any], default_mean, default_std):
  mean = pre.get("image_mean", default_mean)
  std = pre.get("image_std", default_std)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------- public loaders


def _load_extractor(
  folder,
  loader: str,
  types,
  spec_cls,
  model_cls,
  prefix: str,
  v5_names,
  ignored_patterns,
  table,
  kind: str,
  dtype,
  param_dtype,
  precision,
):
  """The shared body of load_vit / load_swin: read, check the model_type, build, copy strictly."""
  import jax.numpy as jnp

  from sodec_jax.guidance.vit import VIT_DEFAULT_MEAN, VIT_DEFAULT_STD

  config, pre, state = read_folder(folder)
  _check_type(config, types, loader, folder)
  spec = spec_cls.from_config(config)
  mean, std = _norm_stats(pre, VIT_DEFAULT_MEAN, VIT_DEFAULT_STD)
  model = model_cls(
    spec,
    dtype=dtype or jnp.float32,
    param_dtype=param_dtype,
    precision=precision,
    image_mean=mean,
    image_std=std,
  )
  state, ignored = _normalise_keys(state, prefix, v5_names, ignored_patterns)
  assign(model, table(spec), state, ignored, f"the weights in {folder}", kind)
  return model


def load_vit(folder: str | os.PathLike, *, dtype=None, param_dtype=None, precision=None):
  """A transformers ViT folder (ViTModel / ViTForImageClassification / ...) -> frozen `ViT`.

  dtype: compute dtype (default float32); param_dtype: storage dtype (default = dtype).
  """
  from sodec_jax.guidance.vit import ViT, ViTSpec

  return _load_extractor(
    folder,
    "load_vit",
    _VIT_TYPES,
    ViTSpec,
    ViT,
    "vit.",
    _VIT_V5_NAMES,
    _VIT_IGNORED,
    vit_table,
    "ViT",
    dtype,
    param_dtype,
    precision,
  )


def load_swin(folder: str | os.PathLike, *, dtype=None, param_dtype=None, precision=None):
  """A transformers Swin folder (SwinModel / SwinForImageClassification / ...) -> frozen `Swin`."""
  from sodec_jax.guidance.swin import Swin, SwinSpec

  return _load_extractor(
    folder,
    "load_swin",
    _SWIN_TYPES,
    SwinSpec,
    Swin,
    "swin.",
    _SWIN_V5_NAMES,
    _SWIN_IGNORED,
    swin_table,
    "Swin",
    dtype,
    param_dtype,
    precision,
  )


__all__ = ("load_vit", "load_swin", "read_folder", "vit_table", "swin_table")

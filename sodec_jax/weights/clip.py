"""A transformers `CLIPModel` folder -> the CLIP-IQA metric (`sodec_jax.metrics.clip_iqa.ClipIQA`).

    iqa, info = build_from_folder("clip-vit-base-patch32/")   # what `from_torch.py clip-iqa` runs
    iqa = load_clip_iqa("/weights/clip-iqa")                    # a converted folder

The folder is what `CLIPModel.save_pretrained` (plus the tokenizer's) writes, or a hub snapshot:
config.json (model_type "clip"), model.safetensors / pytorch_model.bin (sharded too; read by
`sodec_jax.weights.transformers.read_folder`, pickles only with weights_only), the tokenizer files
(tokenizer.json, or vocab.json + merges.txt) and optionally preprocessor_config.json.

Image tower: every key under `vision_model.` plus `visual_projection.weight` is mapped explicitly
(`vision_table`: hub name -> our module path, Linear [out, in] -> [in, out], Conv2d [out, in, kh,
kw] -> [kh, kw, in, out]) and copied strictly (missing / unexpected / mis-shaped keys reported
together). Text side: the prompt embeddings are computed here, once, in PyTorch float32 with the
checkpoint's own text tower -- `CLIPModel(config)` loaded strictly from the same state dict, the
prompts tokenized by the folder's tokenizer padded to max_position_embeddings (77 for CLIP, as
`clip.tokenize`; with CLIP's causal mask the padding does not change the pooled EOS features), then
`CLIPModel.get_text_features` -- so the Flax side needs no text tower. `logit_scale` is the
checkpoint's (exp(logit_scale) multiplies the cosine similarities; 100 for OpenAI's CLIP).
The `position_ids` buffers older checkpoints saved are ignored (and listed).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.metrics.clip_iqa import PROMPTS, ClipIQA, ClipPreprocess, ClipVisionSpec
from sodec_jax.weights import strict
from sodec_jax.weights.formats import MANIFEST, PARAMS_DIR
from sodec_jax.weights.transformers import _conv, _linear, _same, assign, read_folder

KIND = "clip-iqa"  # manifest kind of a converted CLIP-IQA folder
COMPONENT = "clip_iqa"  # its one component folder
CONVERT_COMMAND = (
  "python convert/from_torch.py clip-iqa --src /path/to/clip-vit-base-patch32 --out {out}"
)

# Keys that are neither image tower nor text side: buffers of older checkpoints.
_IGNORED = (r"^(vision|text)_model\.embeddings\.position_ids$",)
_TEXT = (r"^text_model\.", r"^text_projection\.weight$", r"^logit_scale$")
_VISION = (r"^vision_model\.", r"^visual_projection\.weight$")

_HINTS = {
  "vit": "a ViT folder converts with the `vit` subcommand",
  "swin": "a Swin folder converts with the `swin` subcommand",
  "clip_vision_model": "it has no text tower, which CLIP-IQA needs for its prompts; pass the full "
  "CLIPModel folder (e.g. openai/clip-vit-base-patch32)",
  "clip_text_model": "it has no image tower; pass the full CLIPModel folder "
  "(e.g. openai/clip-vit-base-patch32)",
}


def vision_table(spec) -> list[tuple[str, str, Callable]]:
  """(hub key, our ClipVision path, transform) for every weight of `ClipVision(spec)`."""

  def linear(src, dst, bias=True):
    out = [(f"{src}.weight", f"{dst}.kernel", _linear)]
    return out + ([(f"{src}.bias", f"{dst}.bias", _same)] if bias else [])

  def norm(src, dst):
    return [(f"{src}.weight", f"{dst}.scale", _same), (f"{src}.bias", f"{dst}.bias", _same)]

  t = [
    ("vision_model.embeddings.patch_embedding.weight", "patch_kernel", _conv),
    ("vision_model.embeddings.class_embedding", "class_embedding", _same),
    ("vision_model.embeddings.position_embedding.weight", "position_embedding", _same),
  ]
  t += norm("vision_model.pre_layrnorm", "pre_layrnorm")
  for i in range(spec.num_hidden_layers):
    src, dst = f"vision_model.encoder.layers.{i}", f"layers.{i}"
    # our block is guidance/vit.py's ViTLayer (the same pre-LN block under ViT's names)
    t += norm(f"{src}.layer_norm1", f"{dst}.layernorm_before")
    for name, ours in (
      ("q_proj", "query"),
      ("k_proj", "key"),
      ("v_proj", "value"),
      ("out_proj", "out"),
    ):
      t += linear(f"{src}.self_attn.{name}", f"{dst}.attention.{ours}")
    t += norm(f"{src}.layer_norm2", f"{dst}.layernorm_after")
    t += linear(f"{src}.mlp.fc1", f"{dst}.mlp.fc1")
    t += linear(f"{src}.mlp.fc2", f"{dst}.mlp.fc2")
  t += norm("vision_model.post_layernorm", "post_layernorm")
  t += linear("visual_projection", "visual_projection", bias=False)
  return t


def check_clip_config(config: Mapping[str, Any], folder) -> None:
  """SodecError unless config.json describes a full transformers CLIPModel."""
  mt = config.get("model_type")
  if (
    mt == "clip"
    and isinstance(config.get("vision_config"), Mapping)
    and isinstance(config.get("text_config"), Mapping)
  ):
    return
  hint = _HINTS.get(
    mt,
    "CLIP-IQA needs a transformers CLIPModel folder "
    "(e.g. openai/clip-vit-base-patch32 saved locally)",
  )
  raise SodecError(
    f"{folder} holds a model_type {mt!r} model (config.json), not a CLIPModel ('clip'): {hint}"
  )


def split_state(state: Mapping[str, np.ndarray], folder) -> tuple[dict, dict, list[str]]:
  """(image-tower keys, text-side keys, ignored keys); anything else is a SodecError."""
  vision, text, ignored, other = {}, {}, [], []
  for k, v in state.items():
    if any(re.search(p, k) for p in _IGNORED):
      ignored.append(k)
    elif any(re.search(p, k) for p in _VISION):
      vision[k] = v
    elif any(re.search(p, k) for p in _TEXT):
      text[k] = v
    else:
      other.append(k)
  if not vision or not text:
    raise SodecError(
      f"the weights in {folder} are not a CLIPModel's: expected vision_model.*, "
      "visual_projection.weight, text_model.*, text_projection.weight and logit_scale "
      f"keys, got {', '.join(sorted(state)[:8])}{' ...' if len(state) > 8 else ''}"
    )
  if other:
    raise SodecError(
      f"the weights in {folder} have keys a CLIPModel does not: "
      f"{', '.join(sorted(other)[:20])}{' ...' if len(other) > 20 else ''}"
    )
  return vision, text, sorted(ignored)


# ----------------------------------------------------------------------------- text side (torch)


def load_tokenizer(folder):
  """The folder's CLIP tokenizer (AutoTokenizer, else CLIPTokenizer), local files only."""
  try:
    import transformers
  except ImportError:
    raise SodecError(
      "converting CLIP-IQA needs transformers and torch (the prompt embeddings "
      "are computed with the checkpoint's text tower); pip install transformers "
      "torch"
    ) from None
  folder = os.fspath(folder)
  has = lambda n: os.path.isfile(os.path.join(folder, n))  # noqa: E731
  if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
    raise SodecError(
      f"{folder} has no tokenizer files (tokenizer.json, or vocab.json + "
      "merges.txt); CLIP-IQA embeds its prompts with the checkpoint's tokenizer: "
      "save it into the folder (CLIPProcessor/CLIPTokenizer.save_pretrained, or "
      "copy the hub files)"
    )
  errors = []
  for cls in (transformers.AutoTokenizer, transformers.CLIPTokenizer):
    try:
      return cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure: try the next, then report
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      errors.append(f"{type(e).__name__}: {first}")
  raise SodecError(
    f"could not load a tokenizer from {folder} ({errors[-1]}); the folder needs "
    "CLIP's tokenizer files (tokenizer.json, or vocab.json + merges.txt): save them "
    "with the model (processor.save_pretrained or tokenizer.save_pretrained)"
  )


def text_embeddings(
  config: Mapping[str, Any],
  state: Mapping[str, np.ndarray],
  tokenizer,
  prompts: Sequence[str],
  folder,
) -> tuple[np.ndarray, float]:
  """(get_text_features of `prompts` [N, projection_dim] float32, logit_scale), in torch float32.

  `state` is the folder's whole state dict; it is loaded strictly into `CLIPModel(config)`.
  """
  import torch
  import transformers

  try:
    cfg = transformers.CLIPConfig.from_dict(dict(config))
  except Exception as e:  # noqa: BLE001
    raise SodecError(
      f"{folder}/config.json is not a valid CLIPConfig ({type(e).__name__}: {e})"
    ) from None

  def tensor(v):  # float32, contiguous and writable (0-d kept, which np.ascontiguousarray drops)
    a = np.asarray(v, np.float32)
    return torch.from_numpy(a if a.flags.c_contiguous and a.flags.writeable else a.copy())

  torch_state = {
    k: tensor(v) for k, v in state.items() if not any(re.search(p, k) for p in _IGNORED)
  }
  with torch.device("cpu"):
    model = transformers.CLIPModel(cfg).float().eval()
  want = {
    k: tuple(v.shape)
    for k, v in model.state_dict().items()
    if not any(re.search(p, k) for p in _IGNORED)
  }
  missing = sorted(k for k in want if k not in torch_state)
  unexpected = sorted(k for k in torch_state if k not in want)
  bad = sorted(
    f"{k}: {tuple(v.shape)} (expected {want[k]})"
    for k, v in torch_state.items()
    if k in want and tuple(v.shape) != want[k]
  )
  strict.check(f"{folder} (the CLIPModel its config.json describes)", missing, unexpected, bad)
  model.load_state_dict(torch_state, strict=False)  # complete: checked above
  n_pos = int(cfg.text_config.max_position_embeddings)
  try:
    enc = tokenizer(
      list(prompts), padding="max_length", max_length=n_pos, truncation=False, return_tensors="pt"
    )
  except Exception as e:  # noqa: BLE001
    raise SodecError(
      f"the tokenizer in {folder} failed on the prompts ({type(e).__name__}: {e})"
    ) from None
  ids = enc["input_ids"]
  if ids.shape[1] > n_pos:
    raise SodecError(
      f"the prompts tokenize to {ids.shape[1]} tokens, more than the text tower's "
      f"max_position_embeddings {n_pos}"
    )
  eos = getattr(tokenizer, "eos_token_id", None)
  # The token the text tower pools (transformers' CLIPTextModel rule) must be the tokenizer's EOS,
  # else the tokenizer and config.json disagree and the features would be those of another token.
  if cfg.text_config.eos_token_id == 2:
    pooled_at = ids.to(torch.int).argmax(dim=-1)
  else:
    pooled_at = (ids == cfg.text_config.eos_token_id).int().argmax(dim=-1)
  pooled_ids = ids[torch.arange(ids.shape[0]), pooled_at]
  if eos is None or not bool((pooled_ids == eos).all()):
    raise SodecError(
      f"the tokenizer in {folder} does not fit its config.json: the text tower "
      f"would pool token ids {pooled_ids.tolist()} instead of the end-of-text token "
      f"{eos} (text_config.eos_token_id is {cfg.text_config.eos_token_id})"
    )
  with torch.no_grad():
    out = model.get_text_features(input_ids=ids, attention_mask=enc.get("attention_mask"))
  feats = out.pooler_output if hasattr(out, "pooler_output") else out
  scale = float(model.logit_scale.detach().float())
  if not math.isfinite(scale):
    raise SodecError(f"the logit_scale in {folder} is not finite ({scale})")
  return feats.detach().float().numpy(), scale


# ----------------------------------------------------------------------------- the whole model


def iqa_config(config: Mapping[str, Any], pre: Mapping[str, Any], prompts: Sequence[str]) -> dict:
  """What the converter stores as OUT/clip_iqa/config.json (`build_clip_iqa` rebuilds from it;
  `build_from_folder` adds logit_scale and logit_scale_exp)."""
  import dataclasses

  spec = ClipVisionSpec.from_config(config["vision_config"], config.get("projection_dim", 512))
  preprocess = ClipPreprocess.from_config(pre, spec.image_size)
  vision = {
    f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "projection_dim"
  }
  return {
    "vision_config": vision,
    "projection_dim": spec.projection_dim,
    "preprocess": preprocess.to_dict(),
    "prompts": list(prompts),
    "source_model_type": config.get("model_type"),
    "text_embeddings": "CLIPModel.get_text_features (transformers, torch float32) at "
    "conversion time",
  }


def build_from_folder(folder, *, prompts: Sequence[str] | None = None, param_dtype=None):
  """(ClipIQA with every weight filled, its config dict) from a transformers CLIPModel folder.

  param_dtype: storage dtype of the image tower (default float32); the prompt embeddings and the
  logit scale stay float32.
  """
  prompts = tuple(prompts or PROMPTS)
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise SodecError(
      f"--src {folder} is not a folder (expected a transformers CLIPModel folder "
      "with config.json, model.safetensors and the tokenizer files)"
    )
  config, pre, state = read_folder(folder)
  check_clip_config(config, folder)
  vision, _, ignored = split_state(state, folder)
  cfg = iqa_config(config, pre, prompts)
  model = build_clip_iqa(cfg, dtype=jnp.float32, param_dtype=param_dtype or jnp.float32)
  assign(
    model.vision,
    vision_table(model.spec),
    vision,
    ignored,
    f"the state dict in {folder}",
    "CLIP vision tower",
  )
  embeds, logit_scale = text_embeddings(config, state, load_tokenizer(folder), prompts, folder)
  if embeds.shape != model.text_embeds.shape:
    raise SodecError(
      f"the text embeddings have shape {embeds.shape}, expected "
      f"{model.text_embeds.shape} (text_projection vs visual_projection widths)"
    )
  model.text_embeds.set_value(jnp.asarray(embeds, jnp.float32))
  model.logit_scale.set_value(jnp.asarray(logit_scale, jnp.float32))
  cfg["logit_scale"], cfg["logit_scale_exp"] = logit_scale, math.exp(logit_scale)
  return model, cfg


# ----------------------------------------------------------------------------- a converted folder


def _read_json(path: str) -> dict:
  import json

  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise SodecError(
      f"{path} is missing: the converted CLIP-IQA folder is incomplete; convert it again"
    ) from None
  except (OSError, ValueError) as e:
    raise SodecError(f"could not read {path} ({type(e).__name__}: {e})") from None


def build_clip_iqa(
  config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=None, precision=None
) -> ClipIQA:
  """A zero-filled ClipIQA for the converted config.json (`iqa_config`)."""
  try:
    spec = ClipVisionSpec.from_config(config["vision_config"], config["projection_dim"])
    pre = ClipPreprocess.from_dict(config["preprocess"])
    prompts = tuple(config["prompts"])
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise SodecError(
      f"the CLIP-IQA config is malformed ({type(e).__name__}: {e}); convert the checkpoint again"
    ) from None
  return ClipIQA(
    spec, pre, prompts=prompts, dtype=dtype, param_dtype=param_dtype, precision=precision
  )


def load_clip_iqa(
  folder: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, precision=None
) -> ClipIQA:
  """The CLIP-IQA metric from a folder written by `python convert/from_torch.py clip-iqa`.

  dtype: compute dtype of the vision tower (default float32); param_dtype: its storage dtype
  (default = dtype); precision: None -> HIGHEST for float32.
  """
  from sodec_jax.weights.converted import read_manifest, restore_module

  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise SodecError(
      f"{folder} does not exist: make it with `{CONVERT_COMMAND.format(out=folder)}`"
    )
  if not os.path.isfile(os.path.join(folder, MANIFEST)):
    if os.path.isfile(os.path.join(folder, "config.json")):
      raise SodecError(
        f"{folder} is a model folder, not a converted CLIP-IQA folder (no "
        f"{MANIFEST}); convert it first: `python convert/from_torch.py clip-iqa "
        f"--src {folder} --out DIR`, then load DIR"
      )
    raise SodecError(
      f"{folder} is not a converted CLIP-IQA folder (no {MANIFEST}); make one with "
      f"`{CONVERT_COMMAND.format(out=folder)}`"
    )
  manifest = read_manifest(folder)
  if manifest.get("kind") != KIND:
    raise SodecError(
      f"{folder} holds converted {manifest.get('kind')!r} weights, not CLIP-IQA "
      f"ones; make a CLIP-IQA folder with `{CONVERT_COMMAND.format(out='DIR')}`"
    )
  if manifest.get("converter_version") == "1.0":
    raise SodecError(
      f"{folder} was converted by sodec-jax converter 1.0, whose CLIP-IQA parameter "
      f"names this version no longer reads; convert it again: "
      f"`{CONVERT_COMMAND.format(out=folder)}`"
    )
  if COMPONENT not in manifest.get("components", []):
    raise SodecError(f"{folder} has no {COMPONENT}/ component; convert the checkpoint again")
  path = os.path.join(folder, COMPONENT)
  config = _read_json(os.path.join(path, "config.json"))
  model = nnx.eval_shape(
    lambda: build_clip_iqa(config, dtype=dtype, param_dtype=param_dtype, precision=precision)
  )
  model = restore_module(model, os.path.join(path, PARAMS_DIR))
  model.vision.ignored_keys = tuple(manifest.get("ignored_keys", ()))
  return model


__all__ = (
  "load_clip_iqa",
  "build_clip_iqa",
  "vision_table",
  "check_clip_config",
  "split_state",
  "load_tokenizer",
  "text_embeddings",
  "iqa_config",
  "build_from_folder",
)

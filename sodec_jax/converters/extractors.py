"""transformers model folders -> converted folders: the guidance extractors (`convert_vit`,
`convert_swin`: OUT/extractor/) and the CLIP-IQA metric (`convert_clip_iqa`: OUT/clip_iqa/, the
image tower plus the prompt embeddings computed once in torch). Key maps:
`sodec_jax.weights.transformers` and `sodec_jax.weights.clip`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from sodec_jax.converters.output import check_dtype, output
from sodec_jax.errors import SodecError
from sodec_jax.weights import clip as cw
from sodec_jax.weights import transformers as tw
from sodec_jax.weights.formats import read_json


def _convert_extractor(kind: str, src: str, out: str, dtype: str) -> str:
  check_dtype(dtype)
  if not os.path.isdir(src):
    raise SodecError(
      f"--src {src} is not a folder (expected a transformers {kind} model folder "
      "with config.json and model.safetensors)"
    )
  loader = tw.load_vit if kind == "vit" else tw.load_swin
  module = loader(src, dtype=jnp.float32, param_dtype=jnp.dtype(dtype))
  config = read_json(os.path.join(src, "config.json"), kind)
  pre_path = os.path.join(src, "preprocessor_config.json")
  pre = read_json(pre_path, kind) if os.path.isfile(pre_path) else {}
  tree = nnx.to_pure_dict(nnx.state(module))
  names = [n for n in sorted(os.listdir(src)) if n.endswith((".json", ".safetensors", ".bin"))]
  with output(out, kind, dtype) as o:
    o.write_json("extractor", "config.json", config)
    o.write_json(
      "extractor",
      "preprocessor_config.json",
      {**pre, "image_mean": list(module.image_mean), "image_std": list(module.image_std)},
    )
    o.save_params("extractor", tree)
    o.add_sources([os.path.join(src, n) for n in names])
    o.extra["ignored_keys"] = list(module.ignored_keys)
  return out


def convert_vit(src: str, out: str, dtype: str = "float32") -> str:
  return _convert_extractor("vit", src, out, dtype)


def convert_swin(src: str, out: str, dtype: str = "float32") -> str:
  return _convert_extractor("swin", src, out, dtype)


def convert_clip_iqa(src: str, out: str, dtype: str = "float32") -> str:
  """A transformers CLIPModel folder (config.json, model.safetensors, tokenizer files) ->
  OUT/clip_iqa/: the CLIP image tower, the prompt text embeddings (computed here in torch) and the
  logit scale; see `sodec_jax.weights.clip` and `sodec_jax.metrics.clip_iqa`."""
  check_dtype(dtype)
  model, cfg = cw.build_from_folder(src, param_dtype=jnp.dtype(dtype))
  tree = nnx.to_pure_dict(nnx.state(model))
  names = [
    n
    for n in sorted(os.listdir(src))
    if n.endswith((".json", ".safetensors", ".bin", ".txt", ".model"))
  ]
  with output(out, "clip-iqa", dtype) as o:
    o.write_json("clip_iqa", "config.json", cfg)
    o.save_params("clip_iqa", tree)
    o.add_sources([os.path.join(src, n) for n in names])
    o.extra["ignored_keys"] = list(model.vision.ignored_keys)
    o.extra["prompts"] = list(cfg["prompts"])
    o.extra["logit_scale"] = cfg["logit_scale"]
    o.extra["logit_scale_exp"] = cfg["logit_scale_exp"]
  return out

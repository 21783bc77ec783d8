"""A HiFiC PyTorch checkpoint -> a converted folder: OUT/codec/ (E, H_a, P, D_a) and, when the
checkpoint holds one, OUT/discriminator/. The codec's widths are read from the tensors' shapes
(`hific_model_config`); the key map is `sodec_jax.weights.hific`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np
from flax import nnx

from sodec_jax.converters.output import check_dtype, output
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax.weights.formats import (
  TensorSource,
  looks_like,
  np_dtype,
  open_safetensors,
  torch_load,
)
from sodec_jax.weights.hific import load_hific_state_dict


def hific_model_config(state: TensorSource, args: Mapping | None = None):
  """Our codec `model` section for a HiFiC state dict: widths read from the tensors' shapes
  (latent_channels, hyper_channels, encoder/decoder filters, residual blocks, density filters);
  the rest from configs/base.py. `args` (the checkpoint's) is cross-checked."""
  from configs import base
  from sodec_jax.weights.hific import HIFIC_PREFIXES, check_key_names

  m = base.get_config().model
  if not any(k.startswith(HIFIC_PREFIXES) for k in state.keys()):
    looks = looks_like(state.keys())
    raise SodecError(
      "this is not a HiFiC checkpoint: model_state_dict has no Encoder./"
      "Generator./Hyperprior. keys" + (f" (it looks like {looks})" if looks else "")
    )
  m.decoder_residual_blocks = len(
    {k.split(".")[1] for k in state.keys() if k.startswith("Generator.resblock_")}
  )
  n_h = len(
    [k for k in state.keys() if re.fullmatch(r"Hyperprior\.hyperlatent_likelihood\.H_\d+", k)]
  )
  if n_h >= 2:
    # H_k is [C, d_{k+1}, d_k]: the filters are the output widths of all but the last
    m.factorized_filters = tuple(
      state.shape(f"Hyperprior.hyperlatent_likelihood.H_{k}")[1] for k in range(n_h - 1)
    )
  m.factorized_last_gate = True  # upstream's density has (and uses) a_k after its last layer
  m.padding = "hific"  # and it pads as upstream codes (sodec_jax/codec/padding.py)
  check_key_names(state.keys(), m)
  m.encoder_filters = tuple(state.shape(f"Encoder.conv_block{i}.1.weight")[0] for i in range(1, 6))
  m.latent_channels = state.shape("Encoder.conv_block_out.1.weight")[0]
  m.hyper_channels = state.shape("Hyperprior.analysis_net.conv1.weight")[0]
  m.decoder_filters = (state.shape("Generator.conv_block_init.2.weight")[0],) + tuple(
    state.shape(f"Generator.upconv_block{i}.0.weight")[1] for i in range(1, 5)
  )
  if args and "normalize_input_image" in args:
    m.normalize_input_image = bool(args["normalize_input_image"])  # upstream's own flag
  if args:
    for ours, theirs in (
      ("latent_channels", "latent_channels"),
      ("decoder_residual_blocks", "n_residual_blocks"),
    ):
      if theirs in args and int(args[theirs]) != int(m[ours]):
        raise SodecError(
          f"the HiFiC checkpoint's args say {theirs}={args[theirs]} but its tensors "
          f"have {m[ours]}: the file is inconsistent"
        )
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
DISCRIMINATOR_LEAVES = {
  "weight_orig": "kernel",
  "weight": "kernel",
  "weight_u": "sn_u",
  "weight_v": "sn_v",
  "bias": "bias",
}


def discriminator_arrays(state: TensorSource, dtype: str) -> dict:
  """The `Discriminator.*` tensors in our layout (table above); unknown leaves -> SodecError."""
  npdt = np_dtype(dtype)
  out: dict = {}
  bad = []
  for k in sorted(state.keys()):
    if not k.startswith("Discriminator."):
      continue
    layer, leaf = k[len("Discriminator.") :].rsplit(".", 1)
    if leaf not in DISCRIMINATOR_LEAVES:
      bad.append(k)
      continue
    a = state.get(k)
    if DISCRIMINATOR_LEAVES[leaf] == "kernel":
      if a.ndim != 4:
        bad.append(f"{k} {a.shape}")
        continue
      a = a.transpose(2, 3, 1, 0)
    out.setdefault(layer.replace(".", "_"), {})[DISCRIMINATOR_LEAVES[leaf]] = np.ascontiguousarray(
      a.astype(npdt if a.dtype.kind == "f" else a.dtype)
    )
  if bad:
    raise SodecError("HiFiC discriminator tensors not understood: " + ", ".join(bad))
  return out


def convert_hific(src: str, out: str, dtype: str = "float32") -> str:
  """A HiFiC PyTorch checkpoint -> OUT/codec/ (E, H_a, P, D_a) [+ OUT/discriminator/]."""
  import ml_collections

  from configs import base

  check_dtype(dtype)
  state, args = _hific_state(src)
  model_cfg = hific_model_config(state, args)
  model_cfg.param_dtype = dtype
  config = base.get_config()
  config.model = model_cfg
  model = build_model(config, nnx.Rngs(0), pretrained=False)
  arrays = {k: state.get(k) for k in state.keys()}
  ignored = load_hific_state_dict(arrays, model, model_cfg)
  disc = discriminator_arrays(state, dtype) if ignored else {}
  with output(out, "hific", dtype) as o:
    o.write_json("codec", "config.json", ml_collections.ConfigDict(model_cfg).to_dict())
    o.save_params("codec", nnx.to_pure_dict(nnx.state(model.codec, nnx.Param)))
    if disc:
      o.write_json(
        "discriminator",
        "config.json",
        {
          "source_prefix": "Discriminator.",
          "layers": sorted(disc),
          "key_map": {
            "weight_orig|weight": "kernel (O,I,kh,kw -> kh,kw,I,O)",
            "weight_u": "sn_u",
            "weight_v": "sn_v",
            "bias": "bias",
          },
        },
      )
      o.save_params("discriminator", disc)
    o.add_sources([src])
    o.extra["hific_args"] = {
      k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))
    }
    o.extra["discriminator"] = bool(disc)
  return out

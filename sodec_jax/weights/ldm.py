"""Original Stable Diffusion single-file checkpoints (LDM layout) -> diffusers key names.

A single `.safetensors` / `.ckpt` from the original Stable Diffusion repository holds the UNet
under `model.diffusion_model.*`, the VAE under `first_stage_model.*`, the text encoder under
`cond_stage_model.*` (ignored here) and schedule buffers (`betas`, `alphas_cumprod`, ...,
ignored). We rename every diffusers key our modules need to its LDM name -- the same table
diffusers' `convert_from_ckpt` applies in the other direction -- then load through the diffusers
key map (`sodec_jax.weights.diffusers.expected_keys`). The tests check these names against
diffusers' own `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`
(tests/reference/ldm_layout.py).

The prediction type (epsilon / v_prediction) is not in the tensors: `prediction_type_from_yaml`
reads it from the original config beside the file; nothing here defaults it.

UNet (prefix `model.diffusion_model.`; n levels, L_b layers in level b, U_b = L_{n-1-b} + 1
layers in up block b):

| diffusers                                   | LDM                                           |
|---------------------------------------------|-----------------------------------------------|
| time_embedding.linear_1 / linear_2          | time_embed.0 / time_embed.2                   |
| conv_in                                     | input_blocks.0.0                              |
| down_blocks.b.resnets.l                     | input_blocks.{1 + sum_{c<b}(L_c+1) + l}.0     |
| down_blocks.b.attentions.l                  | input_blocks.{...same...}.1                   |
| down_blocks.b.downsamplers.0.conv           | input_blocks.{1 + sum_{c<b}(L_c+1) + L_b}.0.op |
| mid_block.resnets.0 / attentions.0 / resnets.1 | middle_block.0 / .1 / .2                   |
| up_blocks.b.resnets.l                       | output_blocks.{sum_{c<b} U_c + l}.0           |
| up_blocks.b.attentions.l                    | output_blocks.{sum_{c<b} U_c + l}.1           |
| up_blocks.b.upsamplers.0.conv               | output_blocks.{sum_{c<b} U_c + U_b - 1}.{2 with attention, else 1}.conv |
| conv_norm_out / conv_out                    | out.0 / out.2                                 |
| resnet norm1, conv1, time_emb_proj          | in_layers.0, in_layers.2, emb_layers.1        |
| resnet norm2, conv2, conv_shortcut          | out_layers.0, out_layers.3, skip_connection   |
| attention blocks (norm, proj_in, transformer_blocks.*, proj_out) | same names          |

VAE (prefix `first_stage_model.`; n levels):

| diffusers                                   | LDM                                           |
|---------------------------------------------|-----------------------------------------------|
| encoder.down_blocks.i.resnets.j             | encoder.down.i.block.j                        |
| encoder.down_blocks.i.downsamplers.0.conv   | encoder.down.i.downsample.conv                |
| decoder.up_blocks.i.resnets.j               | decoder.up.{n-1-i}.block.j                    |
| decoder.up_blocks.i.upsamplers.0.conv       | decoder.up.{n-1-i}.upsample.conv              |
| {en,de}coder.mid_block.resnets.0 / .1       | {en,de}coder.mid.block_1 / block_2            |
| {en,de}coder.mid_block.attentions.0.group_norm, to_q, to_k, to_v, to_out.0 | mid.attn_1.norm, q, k, v, proj_out (1x1 convs) |
| {en,de}coder.conv_norm_out                  | {en,de}coder.norm_out                         |
| resnet conv_shortcut                        | nin_shortcut                                  |
| conv_in, conv_out, quant_conv, post_quant_conv, resnet norm1/conv1/norm2/conv2 | same  |
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

from sodec_jax.errors import SodecError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# The noise schedule of stabilityai/stable-diffusion-2-1(-base) scheduler/scheduler_config.json,
# the same for both models; they differ only in prediction_type (2.1-base 512: "epsilon", 2.1
# 768: "v_prediction"), which a single file's tensors cannot tell: it is never defaulted here
# (see `prediction_type_from_yaml` and the converter's --prediction-type).
SD21_SCHEDULE = {
  "_class_name": "DDIMScheduler",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": False,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
}
# LatentDiffusion(parameterization=...) in the original configs (ldm/models/diffusion/ddpm.py:
# "eps" when absent) -> the diffusers prediction_type
PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction"}

_RESNET_UNET = (
  ("norm1", "in_layers.0"),
  ("conv1", "in_layers.2"),
  ("time_emb_proj", "emb_layers.1"),
  ("norm2", "out_layers.0"),
  ("conv2", "out_layers.3"),
  ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN = (
  ("group_norm", "norm"),
  ("to_q", "q"),
  ("to_k", "k"),
  ("to_v", "v"),
  ("to_out.0", "proj_out"),
)


def _sub(rest: str, table) -> str:
  for ours, theirs in table:
    if rest == ours or rest.startswith(ours + "."):
      return theirs + rest[len(ours) :]
  return rest


def _per_block(value, n: int) -> tuple:
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),) * n


def unet_ldm_name(key: str, cfg: dict) -> str:
  """A diffusers UNet2DConditionModel key -> its `model.diffusion_model.*` name."""
  n = len(cfg["block_out_channels"])
  layers = _per_block(cfg.get("layers_per_block", 2), n)
  up_layers = [layers[n - 1 - b] + 1 for b in range(n)]
  down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
  up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
  m = re.fullmatch(r"time_embedding\.linear_([12])\.(.+)", key)
  if m:
    return f"{UNET_PREFIX}time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
  for ours, theirs in (
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
  ):
    if key.startswith(ours):
      return UNET_PREFIX + theirs + key[len(ours) :]
  m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
  if m:
    b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
    idx = 1 + sum(layers[c] + 1 for c in range(b)) + l
    if kind == "resnets":
      return f"{UNET_PREFIX}input_blocks.{idx}.0.{_sub(rest, _RESNET_UNET)}"
    return f"{UNET_PREFIX}input_blocks.{idx}.1.{rest}"
  m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
  if m:
    b = int(m[1])
    idx = 1 + sum(layers[c] + 1 for c in range(b)) + layers[b]
    return f"{UNET_PREFIX}input_blocks.{idx}.0.op.{m[2]}"
  m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
  if m:
    if m[1] == "attentions":
      return f"{UNET_PREFIX}middle_block.1.{m[3]}"
    return f"{UNET_PREFIX}middle_block.{0 if m[2] == '0' else 2}.{_sub(m[3], _RESNET_UNET)}"
  m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
  if m:
    b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
    idx = sum(up_layers[:b]) + l
    if kind == "resnets":
      return f"{UNET_PREFIX}output_blocks.{idx}.0.{_sub(rest, _RESNET_UNET)}"
    return f"{UNET_PREFIX}output_blocks.{idx}.1.{rest}"
  m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
  if m:
    b = int(m[1])
    idx = sum(up_layers[:b]) + up_layers[b] - 1
    return f"{UNET_PREFIX}output_blocks.{idx}.{2 if up_attn[b] else 1}.conv.{m[2]}"
  del down_attn
  raise SodecError(f"no LDM name for the UNet key {key} (a bug in the converter's table)")


def vae_ldm_name(key: str, cfg: dict) -> str:
  """A diffusers AutoencoderKL key -> its `first_stage_model.*` name."""
  n = len(cfg["block_out_channels"])
  if key.startswith(("quant_conv.", "post_quant_conv.")):
    return VAE_PREFIX + key
  m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
  if not m:
    raise SodecError(f"no LDM name for the VAE key {key} (a bug in the converter's table)")
  part, rest = m[1], m[2]
  resnet = (("conv_shortcut", "nin_shortcut"),)
  for pattern, fn in (
    (
      r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
      lambda g: f"down.{g[1]}.block.{g[2]}.{_sub(g[3], resnet)}",
    ),
    (
      r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
      lambda g: f"down.{g[1]}.downsample.conv.{g[2]}",
    ),
    (
      r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
      lambda g: f"up.{n - 1 - int(g[1])}.block.{g[2]}.{_sub(g[3], resnet)}",
    ),
    (
      r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
      lambda g: f"up.{n - 1 - int(g[1])}.upsample.conv.{g[2]}",
    ),
    (
      r"mid_block\.resnets\.(\d+)\.(.+)",
      lambda g: f"mid.block_{int(g[1]) + 1}.{_sub(g[2], resnet)}",
    ),
    (r"mid_block\.attentions\.0\.(.+)", lambda g: f"mid.attn_1.{_sub(g[1], _VAE_ATTN)}"),
    (r"conv_norm_out\.(.+)", lambda g: f"norm_out.{g[1]}"),
    (r"(conv_in|conv_out)\.(.+)", lambda g: f"{g[1]}.{g[2]}"),
  ):
    g = re.fullmatch(pattern, rest)
    if g:
      return f"{VAE_PREFIX}{part}.{fn(g)}"
  raise SodecError(f"no LDM name for the VAE key {key} (a bug in the converter's table)")


def rename_view(source, keys: Iterable[str], name_fn, prefix: str):
  """A TensorSource view of `source` under diffusers names: every key in `keys` whose LDM name
  is present, plus (under their own names, so that they are reported as unexpected) the LDM keys
  under `prefix` that no diffusers key claimed."""
  mapping, claimed = {}, set()
  for k in keys:
    ldm = name_fn(k)
    if ldm in source:
      mapping[k] = ldm
      claimed.add(ldm)
  for k in source.keys():
    if k.startswith(prefix) and k not in claimed:
      mapping[k] = k
  return source.renamed(mapping)


def default_configs() -> tuple[dict, dict, dict]:
  from sodec_jax.diffusion.autoencoder import VAEConfig
  from sodec_jax.diffusion.unet import UNetConfig

  unet = {"_class_name": "UNet2DConditionModel", **UNetConfig().to_dict()}
  vae = {"_class_name": "AutoencoderKL", **VAEConfig().to_dict()}
  return unet, vae, dict(SD21_SCHEDULE)


def configs_for(config_dir: str | None) -> tuple[dict, dict, dict]:
  """(unet, vae, scheduler) config dicts: from `config_dir` (unet/config.json, vae/config.json,
  scheduler/scheduler_config.json; any missing one falls back) or SD 2.1's built in. The built-in
  scheduler has no prediction_type (the caller must find one)."""
  unet, vae, sched = default_configs()
  if not config_dir:
    return unet, vae, sched
  if not os.path.isdir(config_dir):
    raise SodecError(f"--config-dir {config_dir} is not a folder")
  out = []
  for default, rel in (
    (unet, "unet/config.json"),
    (vae, "vae/config.json"),
    (sched, "scheduler/scheduler_config.json"),
  ):
    path = os.path.join(config_dir, rel)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          out.append(json.load(f))
      except (OSError, ValueError) as e:
        raise SodecError(f"could not parse {path} ({e})") from None
    else:
      out.append(default)
  return tuple(out)


def yaml_beside(path: str) -> str | None:
  """The original inference config next to a single file (`model.yaml` for `model.ckpt` /
  `model.safetensors`, the name diffusers and the web UIs look for), or None."""
  stem = os.path.splitext(path)[0]
  for ext in (".yaml", ".yml"):
    if os.path.isfile(stem + ext):
      return stem + ext
  return None


def prediction_type_from_yaml(path: str) -> str:
  """The prediction type an original config states: `model.params.parameterization` ("v" ->
  v_prediction; "eps" or absent -> epsilon, LatentDiffusion's default)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise SodecError(f"could not read {path} ({e})") from None
  found = re.findall(
    r"^\s*parameterization\s*:\s*[\"']?([A-Za-z0-9_]+)[\"']?\s*(?:#.*)?$", text, flags=re.MULTILINE
  )
  if not found:
    if not re.search(r"^\s*target\s*:\s*ldm\.models\.diffusion\.ddpm\.", text, re.MULTILINE):
      raise SodecError(
        f"{path} is not an original Stable Diffusion config (no target: "
        "ldm.models.diffusion.ddpm.*); pass --prediction-type epsilon|v_prediction"
      )
    return "epsilon"
  if len(set(found)) > 1 or found[0] not in PARAMETERIZATION:
    raise SodecError(
      f"{path}: parameterization {', '.join(sorted(set(found)))} is not supported "
      "(eps or v); pass --prediction-type epsilon|v_prediction"
    )
  return PARAMETERIZATION[found[0]]


def split_single_file(source, unet_keys, unet_cfg: dict, vae_keys, vae_cfg: dict):
  """(UNet view, VAE view, ignored keys) of a single-file checkpoint."""
  keys = list(source.keys())
  if not any(k.startswith(UNET_PREFIX) for k in keys):
    from sodec_jax.weights.formats import looks_like

    looks = looks_like(keys)
    raise SodecError(
      f"{source.name} is not an original Stable Diffusion checkpoint: it has no "
      f"{UNET_PREFIX}* keys" + (f" (it looks like {looks})" if looks else "")
    )
  unet = rename_view(source, unet_keys, lambda k: unet_ldm_name(k, unet_cfg), UNET_PREFIX)
  vae = rename_view(source, vae_keys, lambda k: vae_ldm_name(k, vae_cfg), VAE_PREFIX)
  ignored = [k for k in keys if not k.startswith((UNET_PREFIX, VAE_PREFIX))]
  return unet, vae, ignored

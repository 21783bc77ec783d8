"""Original Stable Diffusion single-file (LDM) state dicts made from diffusers models, for tests.

The LDM names are written here from the original module structure, not from sodec_jax's tables
(`sodec_jax.weights.ldm`): CompVis/stablediffusion (Stability-AI/stablediffusion, commit
aad6e38a781f) `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel: `time_embed`,
`input_blocks`, `middle_block`, `output_blocks`, `out`; ResBlock's `in_layers` = [norm, SiLU,
conv], `emb_layers` = [SiLU, linear], `out_layers` = [norm, SiLU, dropout, conv],
`skip_connection`; Downsample's `op`, Upsample's `conv`) and
`ldm/modules/diffusionmodules/model.py` (Encoder/Decoder: `down[i].block[j]`, `downsample`,
`mid.block_1/attn_1/block_2`, `up[i]` inserted at 0 so `up[i]` is resolution level i,
`norm_out`; ResnetBlock's `nin_shortcut`; AttnBlock's 1x1-conv `q/k/v/proj_out`).

They are then checked by diffusers' own converter (`diffusers.loaders.single_file_utils.
convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`, the pinned diffusers): `ldm_unet` /
`ldm_vae` assert that diffusers turns the LDM dict back into exactly the model's state dict
(every key, every tensor). So the names a test writes to a single file are the ones diffusers
reads, whatever our converter's tables say.
"""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import (
  convert_ldm_unet_checkpoint,
  convert_ldm_vae_checkpoint,
)

UNET = "model.diffusion_model."
VAE = "first_stage_model."

# ResBlock (openaimodel.py) submodules -> their diffusers ResnetBlock2D names
_RESBLOCK = {
  "in_layers.0": "norm1",
  "in_layers.2": "conv1",
  "emb_layers.1": "time_emb_proj",
  "out_layers.0": "norm2",
  "out_layers.3": "conv2",
  "skip_connection": "conv_shortcut",
}


def _take(sd: dict, out: dict, theirs: str, ldm: str, leaves: dict | None = None) -> None:
  """Move every diffusers key under module `theirs` to LDM module `ldm` (submodule renames in
  `leaves`: LDM submodule -> diffusers submodule)."""
  inverse = {v: k for k, v in (leaves or {}).items()}
  for k in [k for k in sd if k.startswith(theirs + ".")]:
    rest = k[len(theirs) + 1 :]
    for diff_sub, ldm_sub in inverse.items():
      if rest.startswith(diff_sub + "."):
        rest = ldm_sub + rest[len(diff_sub) :]
        break
    out[f"{ldm}.{rest}"] = sd.pop(k)


def _ldm_unet_names(sd: dict, cfg: dict) -> dict:
  n = len(cfg["block_out_channels"])
  layers = cfg["layers_per_block"]
  down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
  up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
  sd, out = dict(sd), {}
  _take(sd, out, "time_embedding.linear_1", "time_embed.0")
  _take(sd, out, "time_embedding.linear_2", "time_embed.2")
  _take(sd, out, "conv_in", "input_blocks.0.0")
  i = 1
  for level in range(n):  # UNetModel.__init__: input_blocks, in order
    for j in range(layers):
      _take(sd, out, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", _RESBLOCK)
      if down_attn[level]:
        _take(sd, out, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1")
      i += 1
    if level != n - 1:
      _take(sd, out, f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{i}.0.op")
      i += 1
  _take(sd, out, "mid_block.resnets.0", "middle_block.0", _RESBLOCK)
  _take(sd, out, "mid_block.attentions.0", "middle_block.1")
  _take(sd, out, "mid_block.resnets.1", "middle_block.2", _RESBLOCK)
  i = 0
  for b in range(n):  # output_blocks, deepest level first
    for j in range(layers + 1):
      mods = [f"output_blocks.{i}.0"]
      _take(sd, out, f"up_blocks.{b}.resnets.{j}", mods[0], _RESBLOCK)
      if up_attn[b]:
        mods.append(f"output_blocks.{i}.1")
        _take(sd, out, f"up_blocks.{b}.attentions.{j}", mods[-1])
      if b != n - 1 and j == layers:  # Upsample is the block's last layer
        _take(sd, out, f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{len(mods)}.conv")
      i += 1
  _take(sd, out, "conv_norm_out", "out.0")
  _take(sd, out, "conv_out", "out.2")
  assert not sd, f"diffusers UNet keys with no LDM module here: {sorted(sd)[:5]}"
  return {UNET + k: v for k, v in out.items()}


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ldm_vae_names(sd: dict, cfg: dict) -> dict:
  n = len(cfg["block_out_channels"])
  sd, out = dict(sd), {}
  res = {"nin_shortcut": "conv_shortcut"}
  for part in ("encoder", "decoder"):
    _take(sd, out, f"{part}.conv_in", f"{part}.conv_in")
    _take(sd, out, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", res)
    _take(sd, out, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _ATTN)
    _take(sd, out, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", res)
    _take(sd, out, f"{part}.conv_norm_out", f"{part}.norm_out")
    _take(sd, out, f"{part}.conv_out", f"{part}.conv_out")
  for level in range(n):
    for j in range(cfg["layers_per_block"]):
      _take(
        sd, out, f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", res
      )
    _take(
      sd,
      out,
      f"encoder.down_blocks.{level}.downsamplers.0.conv",
      f"encoder.down.{level}.downsample.conv",
    )
  for b in range(n):  # Decoder: self.up.insert(0, up) -> up[level]
    level = n - 1 - b
    for j in range(cfg["layers_per_block"] + 1):
      _take(sd, out, f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{level}.block.{j}", res)
    _take(sd, out, f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
  _take(sd, out, "quant_conv", "quant_conv")
  _take(sd, out, "post_quant_conv", "post_quant_conv")
  assert not sd, f"diffusers VAE keys with no LDM module here: {sorted(sd)[:5]}"
  for k, v in out.items():  # AttnBlock's projections are 1x1 convs
    if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 2:
      out[k] = v[:, :, None, None]
  return {VAE + k: v for k, v in out.items()}


def _same(converted: dict, state: dict, what: str) -> None:
  assert sorted(converted) == sorted(state), (
    f"{what}: diffusers' converter gave other keys: missing "
    f"{sorted(set(state) - set(converted))[:5]}, extra {sorted(set(converted) - set(state))[:5]}"
  )
  for k, v in state.items():
    assert torch.equal(converted[k].reshape(v.shape), v), f"{what}: {k} holds another tensor"


def ldm_unet(unet) -> dict[str, torch.Tensor]:
  """`model.diffusion_model.*` state dict of a diffusers UNet2DConditionModel, checked by
  diffusers' `convert_ldm_unet_checkpoint`."""
  state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
  sd = _ldm_unet_names(state, dict(unet.config))
  _same(convert_ldm_unet_checkpoint(dict(sd), dict(unet.config)), state, "UNet")
  return sd


def ldm_vae(vae) -> dict[str, torch.Tensor]:
  """`first_stage_model.*` state dict of a diffusers AutoencoderKL, checked by diffusers'
  `convert_ldm_vae_checkpoint`."""
  state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
  sd = _ldm_vae_names(state, dict(vae.config))
  _same(convert_ldm_vae_checkpoint(dict(sd), dict(vae.config)), state, "VAE")
  return sd

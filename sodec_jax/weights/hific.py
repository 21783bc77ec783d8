"""HiFiC PyTorch checkpoint -> our codec (E, H_a, P, D_a): the explicit key map.

The HiFiC PyTorch implementation (github.com/Justin-Tan/high-fidelity-generative-compression,
commit 7d4e9e7; tests/data/hific_upstream_keys.json lists its paper-size keys and shapes) saves
`model_state_dict` with keys under `Encoder.`, `Generator.`, `Hyperprior.` (and
`Discriminator.`). Each row of `hific_key_map` names a torch key, our nnx path under the SODEC
model, and how the tensor is laid out:

  conv     torch Conv2d weight [O, I, kh, kw]           -> kernel [kh, kw, I, O]
  convT    torch ConvTranspose2d weight [I, O, kh, kw]  -> kernel [kh, kw, I, O]
  norm     ChannelNorm2D gamma/beta [1, C, 1, 1]        -> [C]
  copy     biases [C] and the factorized density's H_k/a_k/b_k [C, d', d] (same layout)

| torch (HiFiC)                                   | ours (model.codec.*)                              |
|-------------------------------------------------|---------------------------------------------------|
| Encoder.conv_block1.1 / .2                      | encoder.conv_in / encoder.norm_in                 |
| Encoder.conv_block{2..5}.1 / .2                 | encoder.down[0..3] / encoder.down_norms[0..3]     |
| Encoder.conv_block_out.1                        | encoder.conv_out                                  |
| Hyperprior.analysis_net.conv{1,2,3}             | hyper_analysis.conv{1,2,3}                        |
| Hyperprior.synthesis_mu.conv{1,2,3}             | prior.mean_synthesis.conv{1,2,3}                  |
| Hyperprior.synthesis_std.conv{1,2,3}            | prior.scale_synthesis.conv{1,2,3}                 |
| Hyperprior.hyperlatent_likelihood.H_k, b_k, a_k | prior.hyperlatent.matrices[k], biases[k], factors[k] |
(upstream has a_k for the last layer too, used in its cdf_logits: mapped when the config sets
`factorized_last_gate`, as `hific_model_config` does for a HiFiC checkpoint)
| Generator.conv_block_init.0 / .2 / .3           | fidelity_decoder.norm_in / conv_in / norm_head    |
| Generator.resblock_m.{conv1,norm1,conv2,norm2}  | fidelity_decoder.residual_blocks[m].*             |
| Generator.upconv_block{1..4}.0 / .1             | fidelity_decoder.up[0..3] / up_norms[0..3]        |
| Generator.conv_block_out.1                      | fidelity_decoder.conv_out                         |
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.weights import strict


def _conv(rows, torch_prefix, path, kind="conv"):
  rows.append((f"{torch_prefix}.weight", path + ("kernel",), kind))
  rows.append((f"{torch_prefix}.bias", path + ("bias",), "copy"))


def _norm(rows, torch_prefix, path):
  rows.append((f"{torch_prefix}.gamma", path + ("gamma",), "norm"))
  rows.append((f"{torch_prefix}.beta", path + ("beta",), "norm"))


def hific_key_map(model_cfg) -> list[tuple[str, tuple, str]]:
  """Rows (torch key, our path under the SODEC model, layout kind) for a codec config."""
  rows: list = []
  e, c = ("codec", "encoder"), "Encoder"
  _conv(rows, f"{c}.conv_block1.1", e + ("conv_in",))
  _norm(rows, f"{c}.conv_block1.2", e + ("norm_in",))
  for i in range(4):
    _conv(rows, f"{c}.conv_block{i + 2}.1", e + ("down", i))
    _norm(rows, f"{c}.conv_block{i + 2}.2", e + ("down_norms", i))
  _conv(rows, f"{c}.conv_block_out.1", e + ("conv_out",))

  for k in (1, 2, 3):
    _conv(rows, f"Hyperprior.analysis_net.conv{k}", ("codec", "hyper_analysis", f"conv{k}"))
    _conv(
      rows,
      f"Hyperprior.synthesis_mu.conv{k}",
      ("codec", "prior", "mean_synthesis", f"conv{k}"),
      "convT",
    )
    _conv(
      rows,
      f"Hyperprior.synthesis_std.conv{k}",
      ("codec", "prior", "scale_synthesis", f"conv{k}"),
      "convT",
    )
  density = ("codec", "prior", "hyperlatent")
  layers = len(model_cfg.factorized_filters) + 1
  gate_last = bool(model_cfg.get("factorized_last_gate", False))
  for k in range(layers):
    rows.append((f"Hyperprior.hyperlatent_likelihood.H_{k}", density + ("matrices", k), "copy"))
    rows.append((f"Hyperprior.hyperlatent_likelihood.b_{k}", density + ("biases", k), "copy"))
    if k < layers - 1 or gate_last:
      rows.append((f"Hyperprior.hyperlatent_likelihood.a_{k}", density + ("factors", k), "copy"))

  d, g = ("codec", "fidelity_decoder"), "Generator"
  _norm(rows, f"{g}.conv_block_init.0", d + ("norm_in",))
  _conv(rows, f"{g}.conv_block_init.2", d + ("conv_in",))
  _norm(rows, f"{g}.conv_block_init.3", d + ("norm_head",))
  for m in range(model_cfg.decoder_residual_blocks):
    blk = d + ("residual_blocks", m)
    for k in (1, 2):
      _conv(rows, f"{g}.resblock_{m}.conv{k}", blk + (f"conv{k}",))
      _norm(rows, f"{g}.resblock_{m}.norm{k}", blk + (f"norm{k}",))
  for i in range(4):
    _conv(rows, f"{g}.upconv_block{i + 1}.0", d + ("up", i), "convT")
    _norm(rows, f"{g}.upconv_block{i + 1}.1", d + ("up_norms", i))
  _conv(rows, f"{g}.conv_block_out.1", d + ("conv_out",))
  return rows


def _to_ours(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return arr.transpose(2, 3, 1, 0)
  if kind == "convT":
    return arr.transpose(2, 3, 0, 1)
  if kind == "norm":
    return arr.reshape(-1)
  return arr


HIFIC_PREFIXES = ("Encoder.", "Generator.", "Hyperprior.")
IGNORED_PREFIXES = ("Discriminator.",)  # converted separately (load_hific_discriminator)
UPSTREAM = "the HiFiC PyTorch implementation (Justin-Tan/high-fidelity-generative-compression)"


def likely_cause(missing, unexpected) -> str:
  """A sentence naming the likely reason a HiFiC-looking state dict's keys do not match."""
  keys = list(missing) + list(unexpected)
  if any(k.startswith("module.") for k in unexpected):
    return (
      "its keys start with 'module.' (saved from a DataParallel-wrapped model): re-save "
      "model.module.state_dict(), as upstream's utils.save_model does"
    )
  if any(".synthesis_DLMM_params." in k for k in unexpected):
    return (
      "it is a latent-mixture model (use_latent_mixture_model=True), which has no "
      "mean/scale synthesis: only the Gaussian hyperprior converts"
    )
  if any(".hyperlatent_likelihood." in k for k in keys) and not any(
    k.startswith(("Encoder.", "Generator.")) for k in keys
  ):
    return (
      "its factorized density has other layers: set the same model.factorized_filters "
      "and factorized_last_gate"
    )
  return (
    "it was saved by another version or fork of that code (this converter maps the module "
    "names of its commit 7d4e9e7): convert a checkpoint its utils.save_model wrote"
  )


def check_key_names(keys, model_cfg) -> None:
  """SodecError (missing and unexpected keys, a few each with counts, and the likely cause)
  unless `keys` are exactly the key map's for `model_cfg` plus ignored `Discriminator.` keys."""
  keys = set(keys)
  mapped = {r[0] for r in hific_key_map(model_cfg)}
  missing = sorted(mapped - keys)
  unexpected = sorted(k for k in keys - mapped if not k.startswith(IGNORED_PREFIXES))
  if missing or unexpected:
    strict.check(
      f"this HiFiC checkpoint (keys of {UPSTREAM})",
      missing,
      unexpected,
      hint=f"likely cause: {likely_cause(missing, unexpected)}",
      limit=4,
    )


def load_hific_state_dict(
  state_dict: dict, model, model_cfg, *, ignore_prefixes=IGNORED_PREFIXES
) -> list[str]:
  """Copies a HiFiC `model_state_dict` (numpy arrays) into `model` (a SODEC built from a config
  whose `.model` is `model_cfg`) in place.

  Strict: every mapped key must be present with the right shape and no other key may appear
  (except under `ignore_prefixes`, returned as the list of ignored keys). All problems are
  reported together in one SodecError.
  """
  rows = hific_key_map(model_cfg)
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  missing, bad_shape, updates = [], [], {}
  for torch_key, path, kind in rows:
    if torch_key not in state_dict:
      missing.append(torch_key)
      continue
    value = _to_ours(np.asarray(state_dict[torch_key], np.float32), kind)
    target = flat[path]
    if value.shape != target.value.shape:
      bad_shape.append(
        f"{torch_key}: {tuple(np.shape(state_dict[torch_key]))} -> expected "
        f"{target.value.shape} (ours, {kind})"
      )
      continue
    updates[path] = value.astype(target.value.dtype)
  mapped = {r[0] for r in rows}
  ignored = sorted(
    k for k in state_dict if k not in mapped and k.startswith(tuple(ignore_prefixes))
  )
  unexpected = sorted(k for k in state_dict if k not in mapped and k not in ignored)
  if missing or bad_shape or unexpected:
    if not any(k.startswith(HIFIC_PREFIXES) for k in state_dict):
      hint = "this does not look like a HiFiC checkpoint: no Encoder./Generator./Hyperprior. keys"
    elif missing or unexpected:
      hint = f"likely cause: {likely_cause(missing, unexpected)}"
    else:
      hint = (
        "check the model config: latent_channels, hyper_channels, encoder/decoder filters, "
        "decoder_residual_blocks must match the checkpoint's args"
      )
    strict.check("HiFiC state dict (the codec)", missing, unexpected, bad_shape, hint, limit=4)
  for path, value in updates.items():
    flat[path].value = value
  nnx.update(model, nnx.from_flat_state(flat))
  return ignored


# ----------------------------------------------------------------------------- discriminator


def hific_discriminator_key_map() -> list[tuple[str, tuple, str]]:
  """(torch key without the `Discriminator.` prefix, our state path, kind) rows.

  kind: "conv" (transpose [O, I, kh, kw] -> [kh, kw, I, O]) or "copy".
  """
  rows = [
    ("context_conv.weight", ("context_conv", "kernel"), "conv"),
    ("context_conv.bias", ("context_conv", "bias"), "copy"),
  ]
  for k in range(1, 5):
    rows += [
      (f"conv{k}.weight_orig", (f"conv{k}", "kernel"), "conv"),
      (f"conv{k}.bias", (f"conv{k}", "bias"), "copy"),
      (f"conv{k}.weight_u", (f"conv{k}", "u"), "copy"),
      (f"conv{k}.weight_v", (f"conv{k}", "v"), "copy"),
    ]
  rows += [
    ("conv_out.weight", ("conv_out", "kernel"), "conv"),
    ("conv_out.bias", ("conv_out", "bias"), "copy"),
  ]
  return rows


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def load_hific_discriminator(
  state_dict: dict, disc, *, prefix: str = "Discriminator."
) -> list[str]:
  """Copies HiFiC's discriminator weights (and spectral-norm u, v) into `disc` in place.

  `state_dict`: a HiFiC `model_state_dict` or any dict of numpy arrays / torch tensors; only
  keys starting with `prefix` are considered (pass prefix="" for a bare Discriminator state
  dict) and the others are returned as the list of ignored keys. Strict under the prefix: every
  mapped key must be present with the right shape and nothing else may appear; all problems
  are reported together in one SodecError. The map covers every variable of `disc`, so an
  abstract module (`nnx.eval_shape(lambda: Discriminator(...))`) can be filled without paying
  for a random init.
  """
  rows = hific_discriminator_key_map()
  from sodec_jax.discriminator import SpectralState

  flat = dict(nnx.to_flat_state(nnx.state(disc, nnx.Any(nnx.Param, SpectralState))))
  ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  ignored = sorted(k for k in state_dict if not k.startswith(prefix))
  missing, bad_shape, updates = [], [], {}
  for key, path, kind in rows:
    if key not in ours:
      missing.append(prefix + key)
      continue
    value = _numpy(ours[key])
    torch_shape = value.shape
    if kind == "conv" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    target = flat[path].get_value()  # an array, or a ShapeDtypeStruct (nnx.eval_shape module)
    if value.shape != tuple(target.shape):
      bad_shape.append(
        f"{prefix}{key}: {torch_shape} -> expected {tuple(target.shape)} (ours, {kind})"
      )
      continue
    updates[path] = value.astype(target.dtype)
  mapped = {r[0] for r in rows}
  unexpected = sorted(prefix + k for k in ours if k not in mapped)
  if missing or bad_shape or unexpected:
    hint = ""
    if not ours:
      hint = f" (no keys start with {prefix!r}; pass prefix='' for a bare discriminator dict)"
    elif bad_shape:
      hint = " (check latent_channels, filters and context_channels against the checkpoint's args)"
    strict.check(
      "HiFiC discriminator state dict", missing, unexpected, bad_shape, hint.strip(" ()")
    )
  for path, value in updates.items():
    flat[path].set_value(jnp.asarray(value))
  nnx.update(disc, nnx.from_flat_state(flat))
  return ignored

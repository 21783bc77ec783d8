"""Load what `python convert/from_torch.py` wrote (layout: `sodec_jax.converters.output`).

    unet = load_unet("/weights/sd21")               # converted sd21 or unet folder, or a raw
    vae = load_vae("/weights/sd21")                 #   diffusers folder (read directly)
    schedule = load_schedule("/weights/sd21")
    vit = load_extractor("/weights/vit")            # vit or swin, per the manifest
    load_codec_params("/weights/hific", model)      # into an existing SODEC's `codec`
    lpips = load_lpips("/weights/lpips"); dists = load_dists("/weights/dists")

Modules are built abstractly (`nnx.eval_shape`, nothing initialised) and the orbax checkpoint is
restored straight into them, so loading the full UNet never allocates random weights first.
A missing folder is a SodecError naming the converter command that makes it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.weights.formats import FORMAT, FORMAT_VERSION, MANIFEST, PARAMS_DIR, read_json

_COMMANDS = {
  "sd21": "python convert/from_torch.py sd21 --src /path/to/stable-diffusion-2-1 --out {out}",
  "unet": "python convert/from_torch.py unet --src /path/to/stable-diffusion-2-1/unet --out {out}",
  "vae": "python convert/from_torch.py vae --src /path/to/stable-diffusion-2-1/vae --out {out}",
  "hific": "python convert/from_torch.py hific --src /path/to/hific_checkpoint.pt --out {out}",
  "extractor": "python convert/from_torch.py vit --src /path/to/vit-folder --out {out} "
  "(or: swin --src /path/to/swin-folder)",
  "lpips": "python convert/from_torch.py lpips --src /path/to/vgg16.pth --out {out}",
  "dists": "python convert/from_torch.py dists --src /path/to/dists/weights.pt "
  "--vgg /path/to/vgg16.pth --out {out}",
}


def _missing(folder: str, what: str) -> SodecError:
  cmd = _COMMANDS[what].format(out=folder)
  return SodecError(f"{folder} does not exist: make it with `{cmd}`")


def read_manifest(folder: str) -> dict:
  """manifest.json of a converted folder (validated), or SodecError."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise SodecError(
      f"{folder} is not a converted weights folder (no {MANIFEST}); make one with "
      "python convert/from_torch.py"
    )
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise SodecError(f"could not parse {path} ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise SodecError(f"{path} is not a sodec-jax converted-weights manifest")
  if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
    raise SodecError(
      f"{folder} was written by a newer converter (format_version "
      f"{manifest.get('format_version')}); update sodec-jax"
    )
  for c in manifest.get("components", []):
    if not os.path.isdir(os.path.join(folder, c)):
      raise SodecError(f"{folder} is incomplete: component {c}/ listed in {MANIFEST} is missing")
  return manifest


def _abstract(tree, dtype=None):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=sharding), tree
  )


def restore_tree(path: str, template=None) -> Any:
  """Restore the orbax checkpoint at `path`, shaped and typed like `template` (arrays or
  ShapeDtypeStructs; stored values are cast to its dtypes), or as stored when None."""
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise SodecError(f"{path} is missing: the converted folder is incomplete")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      if template is None:
        return ckptr.restore(os.path.abspath(path))
      return ckptr.restore(os.path.abspath(path), _abstract(template))
  except SodecError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise SodecError(
      f"cannot restore {path}: {type(e).__name__}: {msg} (was it converted for a "
      "different configuration?)"
    ) from None


def restore_module(model: nnx.Module, path: str, variables=nnx.Variable) -> nnx.Module:
  """Fill `model` (typically built with nnx.eval_shape) from the pure-dict checkpoint at `path`."""
  state = nnx.state(model, variables)
  template = nnx.to_pure_dict(state)
  restored = restore_tree(path, template)
  want = jax.tree_util.tree_structure(template)
  if jax.tree_util.tree_structure(restored) != want:
    raise SodecError(f"{path} does not hold the variables this module needs")
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model


def _component(folder: str, names: tuple[str, ...], kinds: tuple[str, ...], what: str) -> str:
  """The component folder (e.g. OUT/unet) of a converted folder of one of `kinds`."""
  manifest = read_manifest(folder)
  if manifest.get("kind") not in kinds:
    raise SodecError(
      f"{folder} holds converted {manifest.get('kind')!r} weights, not "
      f"{' / '.join(kinds)} (needed for the {what})"
    )
  for n in names:
    if n in manifest.get("components", []):
      return os.path.join(folder, n)
  raise SodecError(f"{folder} has no {'/'.join(names)} component")


def _is_diffusers_model(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "config.json")) and any(
    os.path.isfile(os.path.join(folder, n))
    for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
  )


def _is_component(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(
    os.path.join(folder, PARAMS_DIR)
  )


def _locate(folder: str, sub: str, kinds: tuple[str, ...], what: str) -> tuple[str, str]:
  """('diffusers' | 'converted', path) for a UNet/VAE in `folder`."""
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "sd21" if "sd21" in kinds else sub)
  if os.path.isfile(os.path.join(folder, MANIFEST)):
    return "converted", _component(folder, (sub,), kinds, what)
  if _is_component(folder):
    return "converted", folder
  if _is_diffusers_model(folder):
    return "diffusers", folder
  if _is_diffusers_model(os.path.join(folder, sub)):
    return "diffusers", os.path.join(folder, sub)
  raise SodecError(
    f"{folder} holds no {what}: expected a converted folder (manifest.json), or a "
    f"diffusers folder ({sub}/config.json + diffusion_pytorch_model.safetensors); "
    f"make one with `{_COMMANDS['sd21'].format(out=folder)}`"
  )


def _load_diffusers_component(
  folder, sub, what, module_cls, config_cls, diffusers_loader, dtype, param_dtype, kwargs
):
  """A UNet / VAE from a converted sd21/<sub> or <sub> folder, or a raw diffusers folder."""
  how, path = _locate(folder, sub, ("sd21", sub), what)
  if how == "diffusers":
    return diffusers_loader(path, dtype=dtype, param_dtype=param_dtype, **kwargs)
  cfg = config_cls.from_dict(read_json(os.path.join(path, "config.json")))
  pdt = dtype if param_dtype is None else param_dtype
  model = nnx.eval_shape(
    lambda: module_cls(cfg, dtype=dtype, param_dtype=pdt, rngs=nnx.Rngs(0), **kwargs)
  )
  return restore_module(model, os.path.join(path, PARAMS_DIR))


def load_unet(folder: str, dtype=jnp.float32, param_dtype=None, **kwargs):
  """UNet2DConditionModel from a converted sd21/unet folder or a raw diffusers folder."""
  from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig
  from sodec_jax.weights import diffusers

  return _load_diffusers_component(
    folder,
    "unet",
    "UNet",
    UNet2DConditionModel,
    UNetConfig,
    diffusers.load_unet,
    dtype,
    param_dtype,
    kwargs,
  )


def load_vae(folder: str, dtype=jnp.float32, param_dtype=None, **kwargs):
  """AutoencoderKL from a converted sd21/vae folder or a raw diffusers folder."""
  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig
  from sodec_jax.weights import diffusers

  return _load_diffusers_component(
    folder, "vae", "VAE", AutoencoderKL, VAEConfig, diffusers.load_vae, dtype, param_dtype, kwargs
  )


def load_schedule(folder: str):
  """NoiseSchedule of a converted sd21 folder or a diffusers pipeline folder (scheduler/)."""
  from sodec_jax.diffusion.schedule import NoiseSchedule

  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "sd21")
  if os.path.isfile(os.path.join(folder, MANIFEST)):
    path = os.path.join(
      _component(folder, ("scheduler",), ("sd21",), "noise schedule"), "config.json"
    )
  else:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
      raise SodecError(f"{folder} has no scheduler/scheduler_config.json (nor a manifest.json)")
  return NoiseSchedule.from_dict(read_json(path))


def recorded_prediction_type(folder: str) -> tuple[str | None, str]:
  """(prediction type, where it is recorded) of SD weights in `folder`: a converted folder's
  manifest (`prediction_type`, or its scheduler/config.json for older sd21 folders), or a
  diffusers pipeline folder's scheduler/scheduler_config.json (diffusers' default "epsilon"
  when the key is absent); (None, reason) when the folder records none (e.g. a converted `unet`
  folder made without a scheduler beside it)."""
  folder = os.fspath(folder)
  if os.path.isfile(os.path.join(folder, MANIFEST)):
    manifest = read_manifest(folder)
    if manifest.get("prediction_type"):
      return str(manifest["prediction_type"]), os.path.join(folder, MANIFEST)
    path = os.path.join(folder, "scheduler", "config.json")
    if "scheduler" in manifest.get("components", []) and os.path.isfile(path):
      return str(read_json(path).get("prediction_type", "epsilon")), path
    return None, f"{os.path.join(folder, MANIFEST)} records no prediction_type"
  path = os.path.join(folder, "scheduler", "scheduler_config.json")
  if os.path.isfile(path):
    return str(read_json(path).get("prediction_type", "epsilon")), path
  return None, f"{folder} has no scheduler/scheduler_config.json"


def load_extractor(folder: str, dtype=jnp.float32, param_dtype=None, precision=None):
  """The frozen ViT or Swin (per the manifest) of a converted vit/swin folder."""
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "extractor")
  manifest = read_manifest(folder)
  path = _component(folder, ("extractor",), ("vit", "swin"), "guidance extractor")
  config = read_json(os.path.join(path, "config.json"))
  pre = read_json(os.path.join(path, "preprocessor_config.json"))
  pdt = jnp.dtype(param_dtype or dtype)
  kw = dict(
    dtype=dtype,
    param_dtype=pdt,
    precision=precision,
    image_mean=tuple(pre["image_mean"]),
    image_std=tuple(pre["image_std"]),
  )
  if manifest["kind"] == "vit":
    from sodec_jax.guidance.vit import ViT, ViTSpec

    spec = ViTSpec.from_config(config)
    model = nnx.eval_shape(lambda: ViT(spec, **kw))
  else:
    from sodec_jax.guidance.swin import Swin, SwinSpec

    spec = SwinSpec.from_config(config)
    model = nnx.eval_shape(lambda: Swin(spec, **kw))
  model = restore_module(model, os.path.join(path, PARAMS_DIR))
  model.ignored_keys = tuple(manifest.get("ignored_keys", ()))
  return model


def load_codec_config(folder: str) -> dict:
  """Our codec `model` config section stored with a converted HiFiC checkpoint."""
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "hific")
  path = _component(folder, ("codec",), ("hific",), "codec")
  return read_json(os.path.join(path, "config.json"))


def load_codec_params(folder: str, model) -> dict:
  """Copies the converted HiFiC codec (E, H_a, P, D_a) into `model.codec`; returns the codec
  config it was converted with. A model of another shape -> SodecError saying which fields."""
  cfg = load_codec_config(folder)
  path = os.path.join(folder, "codec", PARAMS_DIR)
  ours = model.codec if hasattr(model, "codec") else model
  try:
    restore_module(ours, path, nnx.Param)
  except SodecError as e:
    raise SodecError(
      f"{e}. The converted codec has "
      + ", ".join(
        f"{k}={cfg[k]}"
        for k in (
          "latent_channels",
          "hyper_channels",
          "encoder_filters",
          "decoder_filters",
          "decoder_residual_blocks",
        )
        if k in cfg
      )
      + "; set the same in the config's `model` section"
    ) from None
  return cfg


def load_discriminator_arrays(folder: str) -> dict | None:
  """The converted HiFiC discriminator tensors ({layer: {kernel, bias, sn_u, sn_v}}), or None."""
  manifest = read_manifest(folder)
  if "discriminator" not in manifest.get("components", []):
    return None
  tree = restore_tree(os.path.join(folder, "discriminator", PARAMS_DIR))
  return jax.tree.map(np.asarray, tree)


def load_discriminator(folder: str, disc) -> None:
  """Copies a converted HiFiC discriminator (OUT/discriminator/) into our `Discriminator`
  (strictly, through sodec_jax.weights.hific.load_hific_discriminator's key map)."""
  from sodec_jax.weights.hific import load_hific_discriminator

  arrays = load_discriminator_arrays(folder)
  if arrays is None:
    raise SodecError(f"{folder} has no discriminator/ (the HiFiC checkpoint held none)")
  names = {"sn_u": "weight_u", "sn_v": "weight_v", "bias": "bias"}
  state = {}
  for layer, leaves in arrays.items():
    for leaf, a in leaves.items():
      if leaf == "kernel":  # back to torch's [O, I, kh, kw] under its spectral-norm name
        state[f"{layer}.{'weight_orig' if 'sn_u' in leaves else 'weight'}"] = a.transpose(
          3, 2, 0, 1
        )
      else:
        state[f"{layer}.{names[leaf]}"] = a
  load_hific_discriminator(state, disc, prefix="")


def _vgg_state(tree: dict) -> dict:
  out = {}
  for k, v in tree.items():
    idx = k[len("conv") :].split("_")[0]
    a = np.asarray(v, np.float32)
    if k.endswith("_kernel"):
      out[f"features.{idx}.weight"] = a.transpose(3, 2, 0, 1)
    else:
      out[f"features.{idx}.bias"] = a
  return out


def load_lpips(folder: str, dtype=jnp.float32, precision=None):
  """LPIPS-VGG from a converted lpips folder."""
  from sodec_jax.metrics.lpips import LPIPS
  from sodec_jax.weights.lpips import HEAD_KEYS, check_heads, check_vgg16_state

  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "lpips")
  _component(folder, ("vgg16",), ("lpips",), "LPIPS metric")
  vgg = _vgg_state(restore_tree(os.path.join(folder, "vgg16", PARAMS_DIR)))
  heads_tree = restore_tree(os.path.join(folder, "lpips", PARAMS_DIR))
  heads = {
    k: np.asarray(heads_tree[f"lin{i}"], np.float32).reshape(1, -1, 1, 1)
    for i, k in enumerate(HEAD_KEYS)
  }
  return LPIPS(
    check_vgg16_state(vgg, folder), check_heads(heads, folder), dtype=dtype, precision=precision
  )


def load_dists(folder: str, dtype=jnp.float32, precision=None):
  """DISTS from a converted dists folder."""
  from sodec_jax.metrics.dists import DISTS
  from sodec_jax.weights.dists import check_alpha_beta
  from sodec_jax.weights.lpips import check_vgg16_state

  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise _missing(folder, "dists")
  _component(folder, ("vgg16",), ("dists",), "DISTS metric")
  vgg = _vgg_state(restore_tree(os.path.join(folder, "vgg16", PARAMS_DIR)))
  ab = restore_tree(os.path.join(folder, "dists", PARAMS_DIR))
  alpha, beta = check_alpha_beta(
    {"alpha": np.asarray(ab["alpha"]), "beta": np.asarray(ab["beta"])}, folder
  )
  return DISTS(check_vgg16_state(vgg, folder), alpha, beta, dtype=dtype, precision=precision)


__all__ = [
  "read_manifest",
  "load_unet",
  "load_vae",
  "load_schedule",
  "recorded_prediction_type",
  "load_extractor",
  "load_codec_config",
  "load_codec_params",
  "load_discriminator_arrays",
  "load_lpips",
  "load_dists",
  "restore_module",
  "restore_tree",
]

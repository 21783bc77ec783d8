"""Stable Diffusion 2.1 weights -> converted folders: `convert_sd21` (a diffusers pipeline folder
or one original single-file checkpoint), `convert_unet`, `convert_vae` (one diffusers model
folder). Key maps: `sodec_jax.weights.diffusers` (and `weights.ldm` for single files); tensors
are converted one at a time, so the full UNet needs little more memory than its converted size.
"""

from __future__ import annotations

import os

from flax import nnx

from sodec_jax.converters.output import Output, check_dtype, output
from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig
from sodec_jax.diffusion.schedule import NoiseSchedule
from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig
from sodec_jax.errors import SodecError
from sodec_jax.weights import ldm
from sodec_jax.weights.diffusers import (
  LEGACY_VAE_ATTENTION,
  diffusers_params,
  expected_keys,
  hint_for,
  weight_file,
)
from sodec_jax.weights.formats import TensorSource, open_weights, read_json


def _abstract_unet(config: dict, what: str):
  if config.get("_class_name") not in (None, "UNet2DConditionModel"):
    raise SodecError(
      f"{what} holds a {config.get('_class_name')} (config.json), not a UNet2DConditionModel"
    )
  cfg = UNetConfig.from_dict(config)
  return cfg, nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))


def _abstract_vae(config: dict, what: str):
  if config.get("_class_name") not in (None, "AutoencoderKL"):
    raise SodecError(
      f"{what} holds a {config.get('_class_name')} (config.json), not an AutoencoderKL"
    )
  cfg = VAEConfig.from_dict(config)
  return cfg, nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def _write_unet(
  o: Output,
  config: dict,
  source: TensorSource,
  what: str,
  dtype: str,
  name: str = "unet",
  built=None,
) -> None:
  cfg, model = built or _abstract_unet(config, what)
  params = diffusers_params(model, source, what=what, dtype=dtype, hint=hint_for("UNet"))
  o.write_json(
    name, "config.json", {**config, **cfg.to_dict(), "_class_name": "UNet2DConditionModel"}
  )
  o.save_params(name, params)


def _write_vae(
  o: Output,
  config: dict,
  source: TensorSource,
  what: str,
  dtype: str,
  name: str = "vae",
  built=None,
) -> None:
  cfg, model = built or _abstract_vae(config, what)
  params = diffusers_params(
    model, source, what=what, dtype=dtype, aliases=LEGACY_VAE_ATTENTION, hint=hint_for("VAE")
  )
  o.write_json(name, "config.json", {**config, **cfg.to_dict(), "_class_name": "AutoencoderKL"})
  o.save_params(name, params)


def _convert_diffusers_component(
  src: str, out: str, dtype: str, kind: str, what: str, write
) -> str:
  """A diffusers model folder (config.json + weights) -> OUT/<kind>/ through `write`."""
  check_dtype(dtype)
  weights = weight_file(src, what)
  config = read_json(os.path.join(src, "config.json"), what)
  source = open_weights(weights)
  with output(out, kind, dtype) as o:
    o.hash_sources_in_background([os.path.join(src, "config.json"), weights])
    write(o, config, source, f"{what} weights in {src}", dtype)
  return out


def convert_unet(
  src: str, out: str, dtype: str = "float32", prediction_type: str | None = None
) -> str:
  """A diffusers UNet2DConditionModel folder -> OUT/unet/. The manifest records the prediction
  type: `prediction_type`, else the pipeline's ../scheduler/scheduler_config.json beside `src`,
  else none (loading then warns that it cannot check `config.diffusion.prediction_type`)."""
  sched_path = os.path.join(
    os.path.dirname(os.path.abspath(src)), "scheduler", "scheduler_config.json"
  )
  found = None
  if prediction_type:
    found = (_checked(prediction_type), "--prediction-type")
  elif os.path.isfile(sched_path):
    found = (_scheduler_prediction_type(read_json(sched_path, "scheduler")), sched_path)

  def write(o, config, source, what, dtype):
    if found:
      o.extra["prediction_type"], o.extra["prediction_type_from"] = found
    _write_unet(o, config, source, what, dtype)

  return _convert_diffusers_component(src, out, dtype, "unet", "UNet", write)


def convert_vae(src: str, out: str, dtype: str = "float32") -> str:
  """A diffusers AutoencoderKL folder -> OUT/vae/."""
  return _convert_diffusers_component(src, out, dtype, "vae", "VAE", _write_vae)


SCHEDULER_KEYS = (
  "num_train_timesteps",
  "beta_start",
  "beta_end",
  "beta_schedule",
  "prediction_type",
)
NEED_PREDICTION_TYPE = (
  "pass --prediction-type epsilon (SD 2.1-base, 512) or --prediction-type "
  "v_prediction (SD 2.1, 768)"
)


def _checked(prediction_type: str) -> str:
  NoiseSchedule(prediction_type=prediction_type)  # validates
  return prediction_type


def _scheduler_prediction_type(sched: dict) -> str:
  """A diffusers scheduler config's prediction_type ("epsilon" when absent: diffusers' default)."""
  return _checked(sched.get("prediction_type", "epsilon"))


def _write_scheduler(o: Output, sched: dict, prediction_type: str, found_in: str) -> None:
  """OUT/scheduler/config.json, and the prediction type (with where it came from) in the
  manifest: `pretrained` checks it against config.diffusion.prediction_type."""
  sched = {**sched, "prediction_type": prediction_type}
  NoiseSchedule.from_dict(sched)  # validates (prediction_type, beta_schedule)
  o.write_json("scheduler", "config.json", sched)
  o.extra["prediction_type"], o.extra["prediction_type_from"] = prediction_type, found_in


def convert_sd21(
  src: str,
  out: str,
  dtype: str = "float32",
  *,
  config_dir: str | None = None,
  prediction_type: str | None = None,
) -> str:
  """Stable Diffusion 2.1: a diffusers pipeline folder (unet/, vae/, scheduler/) or one original
  single-file checkpoint (.safetensors / .ckpt) -> OUT/{unet,vae,scheduler}/.

  For a single file, the architecture comes from `config_dir` (a diffusers pipeline folder or
  one with unet/config.json, vae/config.json[, scheduler/scheduler_config.json]); default: the
  SD 2.1 configs built in (`ldm.default_configs`).

  The prediction type (epsilon or v_prediction) is never guessed: `prediction_type` when given,
  else the folder's scheduler/scheduler_config.json (for a single file: `config_dir`'s, else the
  original config `.yaml` beside the file, `parameterization: "v"`), else a SodecError asking for
  --prediction-type. It is recorded in the manifest and OUT/scheduler/config.json.
  """
  check_dtype(dtype)
  if prediction_type:
    _checked(prediction_type)
  if os.path.isdir(src):
    return _convert_sd21_folder(src, out, dtype, prediction_type)
  if os.path.isfile(src):
    return _convert_sd21_single(src, out, dtype, config_dir, prediction_type)
  raise SodecError(
    f"--src {src} does not exist (expected a diffusers Stable Diffusion 2.1 folder "
    "or a .safetensors/.ckpt single-file checkpoint)"
  )


def _convert_sd21_folder(src, out, dtype, prediction_type):
  unet_dir, vae_dir = os.path.join(src, "unet"), os.path.join(src, "vae")
  if not (os.path.isdir(unet_dir) and os.path.isdir(vae_dir)):
    raise SodecError(
      f"{src} is not a diffusers Stable Diffusion folder: it needs unet/ and vae/ "
      "(and scheduler/); for one model use the `unet` / `vae` subcommands"
    )
  unet_w = weight_file(unet_dir, "UNet")
  vae_w = weight_file(vae_dir, "VAE")
  sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
  has_sched = os.path.isfile(sched_path)
  if not (has_sched or prediction_type):
    raise SodecError(
      f"{src} has no scheduler/scheduler_config.json, so its prediction type is "
      f"unknown: {NEED_PREDICTION_TYPE}"
    )
  sched = read_json(sched_path, "scheduler") if has_sched else dict(ldm.SD21_SCHEDULE)
  found = (
    (prediction_type, "--prediction-type")
    if prediction_type
    else (_scheduler_prediction_type(sched), sched_path)
  )
  srcs = [
    os.path.join(unet_dir, "config.json"),
    unet_w,
    os.path.join(vae_dir, "config.json"),
    vae_w,
  ]
  if has_sched:
    srcs.append(sched_path)
  with output(out, "sd21", dtype) as o:
    o.hash_sources_in_background(srcs)
    _write_scheduler(o, sched, *found)
    _write_unet(
      o,
      read_json(os.path.join(unet_dir, "config.json"), "UNet"),
      open_weights(unet_w),
      f"UNet weights in {unet_dir}",
      dtype,
    )
    _write_vae(
      o,
      read_json(os.path.join(vae_dir, "config.json"), "VAE"),
      open_weights(vae_w),
      f"VAE weights in {vae_dir}",
      dtype,
    )
    o.extra["layout"] = "diffusers"
    if os.path.isdir(os.path.join(src, "text_encoder")):
      o.extra["skipped"] = ["text_encoder (SODEC conditions the UNet on image guidance, not text)"]
  return out


def _single_file_prediction_type(src, config_dir, prediction_type) -> tuple[str, str]:
  """(prediction type, where it came from) for a single file; SodecError when nothing says."""
  if prediction_type:
    return prediction_type, "--prediction-type"
  if config_dir:
    path = os.path.join(config_dir, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
      return _scheduler_prediction_type(read_json(path, "scheduler")), path
  yaml = ldm.yaml_beside(src)
  if yaml:
    return ldm.prediction_type_from_yaml(yaml), yaml
  raise SodecError(
    f"the prediction type of {src} cannot be read from its tensors (SD 2.1-base "
    "and SD 2.1-768 differ only in it) and no original config "
    f"{os.path.splitext(os.path.basename(src))[0]}.yaml is beside it: "
    f"{NEED_PREDICTION_TYPE}"
  )


def _convert_sd21_single(src, out, dtype, config_dir, prediction_type):
  unet_cfg, vae_cfg, sched = ldm.configs_for(config_dir)
  found = _single_file_prediction_type(src, config_dir, prediction_type)
  source = open_weights(src)
  unet = _abstract_unet(unet_cfg, "UNet config")
  vae = _abstract_vae(vae_cfg, "VAE config")
  unet_src, vae_src, ignored = ldm.split_single_file(
    source, expected_keys(unet[1]), unet_cfg, expected_keys(vae[1]), vae_cfg
  )
  srcs = [src] + ([found[1]] if found[1] != "--prediction-type" else [])
  with output(out, "sd21", dtype) as o:
    o.hash_sources_in_background(srcs)
    _write_scheduler(o, sched, *found)
    _write_unet(
      o, unet_cfg, unet_src, f"UNet weights (model.diffusion_model.*) in {src}", dtype, built=unet
    )
    _write_vae(o, vae_cfg, vae_src, f"VAE weights (first_stage_model.*) in {src}", dtype, built=vae)
    o.extra["layout"] = "ldm-single-file"
    o.extra["ignored_prefixes"] = sorted({k.split(".")[0] for k in ignored})
  return out

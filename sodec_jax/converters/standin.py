"""The tiny pipeline's stand-in for Stable Diffusion (stage 0: a small VAE and UNet trained on the
bundled photos) -> a diffusers-layout folder, what `python convert/from_torch.py export-standin
--src WORKDIR/0_pretrain --out FOLDER` runs:

    FOLDER/unet/config.json + diffusion_pytorch_model.safetensors   UNet2DConditionModel
    FOLDER/vae/config.json + diffusion_pytorch_model.safetensors    AutoencoderKL (with encoder)
    FOLDER/scheduler/scheduler_config.json                          DDPMScheduler, SD 2.1 base's
                                                                    betas, its prediction type
    FOLDER/standin.json                                             where it came from

It is read like any SD 2.1 folder (`--config.diffusion.weights=FOLDER`, sodec_jax.weights.diffusers)
and by diffusers' own `UNet2DConditionModel.from_pretrained(FOLDER, subfolder="unet")`. The
repository ships one (weights/tiny_sd, docs/ARCHITECTURE.md "The tiny stand-in for SD") so the
tiny default starts from a pretrained stand-in, as the paper starts from SD 2.1. Weights are
written through `sodec_jax.weights.export.diffusers_state_dict` (the key maps' inverse); no torch
is imported.
"""

from __future__ import annotations

import json
import os

from sodec_jax.converters.output import atomic_folder
from sodec_jax.errors import SodecError

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _scheduler_config(schedule) -> dict:
  """diffusers DDPMScheduler config of our NoiseSchedule (SD 2.1 base's betas by default)."""
  return {
    "_class_name": "DDPMScheduler",
    "beta_start": float(schedule.beta_start),
    "beta_end": float(schedule.beta_end),
    "beta_schedule": schedule.beta_schedule,
    "num_train_timesteps": int(schedule.num_train_timesteps),
    "prediction_type": schedule.prediction_type,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
  }


def export_standin(unet, vae, schedule, out: str, *, metadata: dict | None = None) -> str:
  """Our UNet2DConditionModel and AutoencoderKL (nnx, LoRA merged if any) and NoiseSchedule ->
  `out` (atomically). Returns the absolute path."""
  from safetensors.numpy import save_file

  from sodec_jax.weights.export import diffusers_state_dict
  from sodec_jax.weights.formats import CONVERTER_VERSION

  with atomic_folder(out) as tmp:
    for name, module, cls in (
      ("unet", unet, "UNet2DConditionModel"),
      ("vae", vae, "AutoencoderKL"),
    ):
      os.makedirs(os.path.join(tmp, name))
      config = {"_class_name": cls, **module.config.to_dict()}
      with open(os.path.join(tmp, name, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
      save_file(
        diffusers_state_dict(module),
        os.path.join(tmp, name, WEIGHTS_FILE),
        metadata={"format": "pt", "converter": f"sodec-jax {CONVERTER_VERSION}"},
      )
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(_scheduler_config(schedule), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "standin.json"), "w") as f:
      json.dump({"converter": f"sodec-jax {CONVERTER_VERSION}", **(metadata or {})}, f, indent=2)
  return os.path.abspath(out)


def export_standin_from_workdir(workdir: str, out: str, step: int | None = None) -> str:
  """The stand-in of a tiny pipeline's stage-0 workdir (e.g. runs/tiny/0_pretrain; latest or the
  given checkpoint) -> `out`."""
  from flax import nnx

  from sodec_jax import checkpoints
  from sodec_jax.pretrained import build_latent_pretrain

  if not os.path.isfile(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    raise SodecError(
      f"--src {workdir} is not a sodec-jax training workdir (no {checkpoints.CONFIG_FILE})"
    )
  config = checkpoints.load_config(workdir)
  if int(config.stage) != 0:
    raise SodecError(
      f"--src {workdir} is a stage-{config.stage} workdir; export-standin takes the tiny "
      "pipeline's stage 0 (its pretrain stage, e.g. runs/tiny/0_pretrain)"
    )
  model = build_latent_pretrain(config, nnx.Rngs(0))
  step = checkpoints.restore_params(workdir, model, step)
  meta = {"workdir": os.path.abspath(workdir), "step": step}
  return export_standin(model.unet, model.vae_decoder, model.schedule, out, metadata=meta)

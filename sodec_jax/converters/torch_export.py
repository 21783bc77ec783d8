"""A diffusion workdir -> the whole SODEC decoder for PyTorch users (what
`python convert/from_torch.py export-torch --src WORKDIR --out FOLDER` runs).

    FOLDER/sodec_torch.json     how to rebuild the modules (`sodec_torch.describe`): the codec
                                config, H_s / T_s / F_p sizes, the ViT, UNet and VAE configs,
                                the noise schedule, t and the VAE scaling factor
    FOLDER/model.safetensors    the state dict of `sodec_torch.SODECDecoder` (codec.*,
                                hyper_synthesis.*, transform.*, guidance_projection.*,
                                extractor.*, unet.* with the LoRA merged, vae_decoder.*)

In PyTorch: `sodec_jax.benchmarks.sodec_torch.load_exported(FOLDER)` (torch, diffusers and
transformers only) -> `decoder.reconstruct(y_hat, z_hat)`.
"""

from __future__ import annotations

import json
import os

from sodec_jax.converters.output import atomic_folder
from sodec_jax.errors import SodecError


def export_torch(loaded, out: str, *, metadata: dict | None = None) -> str:
  """`loaded` (an api.LoadedModel with the diffusion decoder) -> `out` (atomically: a temporary
  sibling folder renamed at the end)."""
  from safetensors.torch import save_file

  from sodec_jax.benchmarks import sodec_torch
  from sodec_jax.weights.formats import CONVERTER_VERSION

  description = sodec_torch.describe(loaded)
  ref = sodec_torch.build_sodec_reference(loaded)
  with atomic_folder(out) as tmp:
    meta = {"format": "sodec-torch", "converter": f"sodec-jax {CONVERTER_VERSION}"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, os.path.join(tmp, sodec_torch.EXPORT_WEIGHTS), metadata=meta)
    with open(os.path.join(tmp, sodec_torch.EXPORT_CONFIG), "w") as f:
      json.dump(description, f, indent=2, sort_keys=True)
  return os.path.abspath(out)


def export_torch_from_workdir(workdir: str, out: str, step: int | None = None) -> str:
  """The diffusion decoder of a training workdir's latest (or given) checkpoint -> `out`."""
  from sodec_jax import api, checkpoints

  if not os.path.isfile(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    raise SodecError(
      f"--src {workdir} is not a sodec-jax training workdir (no {checkpoints.CONFIG_FILE})"
    )
  loaded = api.load_model(workdir, step, winograd=False)
  if loaded.model.decoder_kind != "diffusion":
    raise SodecError(
      f"the model of {workdir} has the codec decoder (stage 1): there is no diffusion decoder "
      "to export; pass a stage-2+ workdir"
    )
  meta = {"workdir": os.path.abspath(workdir), "step": loaded.step}
  return export_torch(loaded, out, metadata=meta)

"""The writing side: PyTorch weights -> converted sodec-jax folders (what
`python convert/from_torch.py <kind>` runs), and the LoRA export of a trained UNet.

One function per subcommand (table `CONVERTERS`): sd21 / unet / vae (`converters.diffusers`),
hific (`converters.hific`), vit / swin / clip-iqa (`converters.extractors`), lpips / dists
(`converters.metrics`); `converters.lora.export_lora_from_workdir` for export-lora. Each reads its
source strictly through the key maps of `sodec_jax.weights` and writes through
`converters.output` (atomic folder + manifest). The folders are read back by
`sodec_jax.weights.converted`.
"""

from sodec_jax.converters.diffusers import convert_sd21, convert_unet, convert_vae
from sodec_jax.converters.extractors import convert_clip_iqa, convert_swin, convert_vit
from sodec_jax.converters.hific import convert_hific
from sodec_jax.converters.metrics import convert_dists, convert_lpips

CONVERTERS = {
  "sd21": convert_sd21,
  "unet": convert_unet,
  "vae": convert_vae,
  "hific": convert_hific,
  "vit": convert_vit,
  "swin": convert_swin,
  "lpips": convert_lpips,
  "dists": convert_dists,
  "clip-iqa": convert_clip_iqa,
}

__all__ = [
  "CONVERTERS",
  "convert_sd21",
  "convert_unet",
  "convert_vae",
  "convert_hific",
  "convert_vit",
  "convert_swin",
  "convert_lpips",
  "convert_dists",
  "convert_clip_iqa",
]

"""Stable Diffusion 2.1 in flax.nnx (NHWC): UNet with LoRA, AutoencoderKL, noise schedule.

Equal to diffusers (PyTorch) given the same weights; see sodec_jax.weights.diffusers for loading.
"""

from sodec_jax.diffusion.autoencoder import (
  AutoencoderKL,
  VAEConfig,
  sd21_vae_config,
  tiny_vae_config,
)
from sodec_jax.diffusion.lora import LoRAConfig, LoRAParam, apply_lora, lora_state, merge_lora
from sodec_jax.diffusion.schedule import NoiseSchedule, sd21_schedule
from sodec_jax.diffusion.unet import (
  UNet2DConditionModel,
  UNetConfig,
  count_params,
  sd21_unet_config,
  tiny_unet_config,
)

__all__ = [
  "AutoencoderKL",
  "VAEConfig",
  "sd21_vae_config",
  "tiny_vae_config",
  "LoRAConfig",
  "LoRAParam",
  "apply_lora",
  "lora_state",
  "merge_lora",
  "NoiseSchedule",
  "sd21_schedule",
  "UNet2DConditionModel",
  "UNetConfig",
  "count_params",
  "sd21_unet_config",
  "tiny_unet_config",
]

"""Image quality metrics: PSNR, MS-SSIM (as pytorch_msssim) and LPIPS-VGG (as the lpips package)."""

from sodec_jax.metrics.lpips import LPIPS
from sodec_jax.metrics.ms_ssim import ms_ssim
from sodec_jax.metrics.psnr import psnr
from sodec_jax.metrics.vgg16 import VGG16Features

__all__ = ["psnr", "ms_ssim", "LPIPS", "VGG16Features"]

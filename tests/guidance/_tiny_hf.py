"""Small random transformers ViT / Swin models saved into a folder, and real-photo inputs."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_photo

VIT_KW = dict(
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  image_size=32,
  patch_size=8,
)
SWIN_KW = dict(
  image_size=32, patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4
)


def _perturb(model, seed: int):
  """Random init leaves LayerNorms at (1, 0) and some tables at 0: perturb every tensor so that a
  mis-mapped key cannot go unnoticed."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def tiny_vit(cls_name: str = "ViTModel", seed: int = 0, **overrides):
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.ViTConfig(**{**VIT_KW, **overrides}, num_labels=3)
  return _perturb(getattr(transformers, cls_name)(cfg), seed)


def tiny_swin(cls_name: str = "SwinModel", seed: int = 0, **overrides):
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.SwinConfig(**{**SWIN_KW, **overrides}, num_labels=3)
  return _perturb(getattr(transformers, cls_name)(cfg), seed)


def photo_batch(h: int, w: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
  """[2, h, w, 3] float32: crops of two real photos, each a 4x-downscaled patch, normalised."""
  out = []
  for name, (top, left) in (("astronaut.png", (40, 150)), ("chelsea.png", (30, 120))):
    img = load_photo(name).astype(np.float32) / 255.0
    crop = img[top : top + 4 * h, left : left + 4 * w]
    crop = crop.reshape(h, 4, w, 4, 3).mean(axis=(1, 3))
    out.append((crop - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out).astype(np.float32)


def torch_forward(model, x_nhwc: np.ndarray, **kw) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous(), **kw)
  return out.last_hidden_state.numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))

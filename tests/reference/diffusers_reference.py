"""Helpers to compare our flax modules with diffusers (PyTorch) ones on the same random weights."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
  """A torch module's state dict as float32 numpy arrays."""
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  """NCHW torch -> NHWC numpy."""
  return t.detach().float().permute(0, 2, 3, 1).numpy()


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
  """Give every parameter (norm affines included, which default to 1/0) random values, so that a
  mapping mistake between two parameters of the same shape cannot go unnoticed."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(
        (
          "norm.weight",
          "norm1.weight",
          "norm2.weight",
          "norm3.weight",
          "norm_out.weight",
          "group_norm.weight",
        )
      ):
        p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(scale * torch.randn(p.shape, generator=g))
  return module


def assert_close(a, b, tol: float, what: str = "") -> float:
  """Assert rel_err(a, b) <= tol; prints the error (see it with pytest -s)."""
  import os

  err = rel_err(a, b)
  test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
  print(f"[rel_err] {test} {what}: {err:.3e} (tol {tol:.0e})")
  assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
  return err

"""Real photos (shipped with scikit-image) for metric tests, as float32 NHWC in [0, 1]."""

from __future__ import annotations

import numpy as np
from skimage import data


def crops(size: tuple[int, int]) -> np.ndarray:
  """[2, H, W, 3]: a crop of astronaut and one of coffee."""
  h, w = size
  a = data.astronaut()[40 : 40 + h, 150 : 150 + w]
  c = data.coffee()[60 : 60 + h, 200 : 200 + w]
  return np.stack([a, c]).astype(np.float32) / 255.0


def degrade(x: np.ndarray, seed: int = 0) -> np.ndarray:
  """Box blur of the first image, gaussian noise on the second; clipped to [0, 1]."""
  rng = np.random.default_rng(seed)
  out = x.copy()
  p = np.pad(x[0], ((1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  out[0] = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
  out[1] = x[1] + rng.normal(0, 0.05, x[1].shape).astype(np.float32)
  return np.clip(out, 0.0, 1.0).astype(np.float32)

"""Figures of an evaluation: rate-distortion plots (bpp vs each metric, per image and per
checkpoint) and side-by-side grids (original | x_f | x_hat, with zoomed detail crops).
Written with matplotlib (Agg) by `sodec_jax.evaluate`."""

from __future__ import annotations

import math
import os

import numpy as np

HIGHER_IS_BETTER = {
  "psnr": True,
  "ms_ssim": True,
  "lpips": False,
  "dists": False,
  "niqe": False,
  "clip_iqa": True,
}


def rd_plots(out_dir: str, rows: list[dict], labels: list[str], metrics: list[str]) -> list[str]:
  """bpp vs each metric: per-image dots and per-checkpoint means (joined in bpp order)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for metric in metrics:
    if not any(not math.isnan(r[metric]) for r in rows):
      continue  # e.g. MS-SSIM when every image is under 161 px
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    means = []
    for i, label in enumerate(labels):
      pts = [
        (r["bpp"], r[metric])
        for r in rows
        if r["checkpoint"] == label and not math.isnan(r[metric])
      ]
      if not pts:
        continue
      b, m = np.array(pts).T
      color = f"C{i % 10}"
      ax.scatter(b, m, s=10, alpha=0.35, color=color)
      ax.plot([b.mean()], [m.mean()], "o", ms=8, color=color, label=f"{label} (mean of {len(b)})")
      means.append((b.mean(), m.mean()))
    if len(means) > 1:
      b, m = np.array(sorted(means)).T
      ax.plot(b, m, "-", color="0.3", lw=1, label="means, by rate")
    arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
    ax.set(
      xlabel="bpp (from .sodec bytes)",
      ylabel=f"{metric.upper()} ({arrow})",
      title=f"rate-distortion: {metric.upper()}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"rd_{metric}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


def detail_window(image: np.ndarray, size: int) -> tuple[int, int]:
  """(top, left) of the size x size window with the most gradient energy (where artefacts show)."""
  g = image.astype(np.float32).mean(-1)
  e = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
  h, w = e.shape
  best, pos = -1.0, (0, 0)
  step = max(size // 4, 1)
  ii = np.pad(e, ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # integral image
  for top in range(0, max(h - size, 0) + 1, step):
    for left in range(0, max(w - size, 0) + 1, step):
      b, r = min(top + size, h), min(left + size, w)
      s = ii[b, r] - ii[top, r] - ii[b, left] + ii[top, left]
      if s > best:
        best, pos = s, (top, left)
  return pos


def grid_plot(
  path: str, name: str, original: np.ndarray, panels: list[tuple[str, np.ndarray]]
) -> None:
  """Top row: full images with the crop box; bottom row: the zoomed crop."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  h, w = original.shape[:2]
  size = max(min(h, w, 160), min(h, w) // 4)
  top, left = detail_window(original, size)
  cols = [("original", original)] + panels
  n = len(cols)
  fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 3.2 * (h / w) + 3.4), dpi=100, squeeze=False)
  for j, (title, img) in enumerate(cols):
    a, b = axes[0, j], axes[1, j]
    a.imshow(img, interpolation="lanczos")
    a.add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, ec="red", lw=1))
    a.set_title(title, fontsize=8)
    b.imshow(img[top : top + size, left : left + size], interpolation="nearest")
    for ax in (a, b):
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(f"{name} ({w}x{h}); crop {size}x{size} at ({left}, {top})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ----------------------------------------------------------------------------- the run

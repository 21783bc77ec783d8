"""Validation on held-out photos through real .sodec files (what a user of the model gets).

    from sodec_jax import validation
    images = validation.holdout_images(config)            # config.data.holdout, uint8 [H, W, 3]
    row = validation.validate(sodec_jax.load_model("runs/tiny"), images)
    # row = {"bpp": ..., "psnr": ..., "ms_ssim": ..., "images": [per-image dicts]}
    validation.summary_png("summary.png", validation.pipeline_models("runs/tiny"), images[:2])

bpp is 8 * len(file) / (H * W) of the bytes `api.compress` writes (header included); PSNR and
MS-SSIM compare the original with `api.decompress` of those bytes. MS-SSIM (5 scales) needs
both sides >= 161 pixels; smaller images are left out of its mean (`ms_ssim_images` counts the
ones in it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from sodec_jax import api, checkpoints, data
from sodec_jax.codec import padding
from sodec_jax.errors import SodecError
from sodec_jax.images import read_image

MS_SSIM_MIN_SIDE = 161


def holdout_paths(config) -> list[str]:
  """Paths of config.data.holdout (file names without extension) among the training images of
  config.data.train_dir ("" = the scikit-image photos), in the order the names are given."""
  names = tuple(config.data.get("holdout", ()))
  if not names:
    raise SodecError(
      "config.data.holdout is empty: name the photos to validate on, e.g. "
      "--config.data.holdout=\"('astronaut', 'coffee')\""
    )
  return named_paths(config, names, "config.data.holdout")


def named_paths(config, names, option: str) -> list[str]:
  """Paths of `names` (file names without extension, from the config option `option`) among the
  images of config.data.train_dir, in the order given; a missing one is a SodecError."""
  by_stem = {
    os.path.splitext(os.path.basename(p))[0]: p for p in data.list_images(config.data.train_dir)
  }
  missing = [n for n in names if n not in by_stem]
  if missing:
    raise SodecError(
      f"{option} names {', '.join(missing)}, not among the images of "
      f"config.data.train_dir; fix --{option}"
    )
  return [by_stem[n] for n in names]


@dataclasses.dataclass(frozen=True)
class CalibrationPhoto:
  """One photo the dual rate controller measures: `image` uint8 [H', W', 3] as the coder codes it
  (a whole photo reflect-padded to the model's multiple; a crop as it is), `pixels` the photo's
  own H x W (its bpp's denominator, as in a .sodec file's bpp)."""

  image: np.ndarray
  pixels: int


def calibration_images(config) -> list[CalibrationPhoto] | None:
  """The dual rate controller's calibration photos (loss.rate_control.photos): with
  loss.rate_control.crop 0 each whole photo padded as the coder pads it (codec/padding.py), so
  the controller sees the bits its .sodec file carries over its own pixels, padding included;
  else each one's central `crop` square. None when none are named."""
  names = data.calibration_names(config)
  if not names:
    return None
  size = int(config.loss.rate_control.crop)
  if size < 0 or size % 64:
    raise SodecError(
      f"config.loss.rate_control.crop={size} must be a multiple of 64 (0: whole photos)"
    )
  out = []
  for path in named_paths(config, names, "config.loss.rate_control.photos"):
    image = read_image(path)[0]
    h, w = image.shape[:2]
    if h < max(size, 64) or w < max(size, 64):
      raise SodecError(
        f"calibration photo {path} is {h}x{w}, smaller than "
        f"config.loss.rate_control.crop={size} (or 64): choose a smaller crop or a larger photo"
      )
    if size:
      top, left = (h - size) // 2, (w - size) // 2
      crop = np.ascontiguousarray(image[top : top + size, left : left + size])
      out.append(CalibrationPhoto(crop, size * size))
    else:
      padded = padding.pad_pixels(image, padding.scheme(config.model))
      out.append(CalibrationPhoto(np.ascontiguousarray(padded), h * w))
  return out


def holdout_images(config) -> list[np.ndarray]:
  """The held-out photos of `config` as uint8 [H, W, 3] arrays."""
  return [read_image(p)[0] for p in holdout_paths(config)]


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two uint8 images (peak 255), in float64."""
  mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
  return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def ms_ssim_u8(a: np.ndarray, b: np.ndarray) -> float | None:
  """MS-SSIM of two uint8 [H, W, 3] images, or None when a side is below 161 pixels."""
  if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
    return None
  from sodec_jax.metrics import ms_ssim  # pylint: disable=import-outside-toplevel

  x = np.asarray(a, np.float32)[None] / 255.0
  y = np.asarray(b, np.float32)[None] / 255.0
  return float(np.asarray(ms_ssim(x, y))[0])


def code_one(model: api.LoadedModel, image: np.ndarray) -> tuple[np.ndarray, dict]:
  """Compresses and decompresses one uint8 [H, W, 3] image -> (decoded uint8, metrics dict with
  bytes, bpp, psnr, ms_ssim (None below 161 pixels a side))."""
  blob = api.compress(model, image)
  decoded = api.decompress(model, blob)
  h, w = image.shape[:2]
  return decoded, {
    "height": h,
    "width": w,
    "bytes": len(blob),
    "bpp": 8.0 * len(blob) / (h * w),
    "psnr": psnr_u8(image, decoded),
    "ms_ssim": ms_ssim_u8(image, decoded),
  }


def validate(
  model: api.LoadedModel, images: Sequence[np.ndarray], return_decoded: bool = False
) -> dict:
  """Mean bpp (real files), PSNR and MS-SSIM over `images` (uint8 [H, W, 3] each).

  Returns {"bpp", "psnr", "ms_ssim" (None when no image allows it), "ms_ssim_images",
  "images": per-image dicts} and, with return_decoded, "decoded": the uint8 decodes.
  """
  if not images:
    raise SodecError("validate needs at least one image")
  rows, decoded = [], []
  for image in images:
    out, row = code_one(model, image)
    rows.append(row)
    decoded.append(out)
  ssims = [r["ms_ssim"] for r in rows if r["ms_ssim"] is not None]
  result = {
    "bpp": float(np.mean([r["bpp"] for r in rows])),
    "psnr": float(np.mean([r["psnr"] for r in rows])),
    "ms_ssim": float(np.mean(ssims)) if ssims else None,
    "ms_ssim_images": len(ssims),
    "images": rows,
  }
  if return_decoded:
    result["decoded"] = decoded
  return result


def pipeline_models(workdir: str) -> list[tuple[str, api.LoadedModel]]:
  """(stage directory name, LoadedModel) of each coding stage of a pipeline workdir (the tiny
  default's) that has a checkpoint (best.json's step, else the latest); stage 0 codes nothing
  and is left out. A plain training workdir gives itself."""
  path = os.path.join(workdir, checkpoints.PIPELINE_FILE)
  if not os.path.isfile(path):
    return [(os.path.basename(os.path.normpath(workdir)), api.load_model(workdir))]
  with open(path) as f:
    stages = json.load(f)["stages"]
  out = []
  for name in stages:
    d = os.path.join(workdir, name)
    if checkpoints.latest_step(d) is None or checkpoints.load_config(d).stage == 0:
      continue
    out.append((name, api.load_model(d)))
  if not out:
    raise SodecError(f"the pipeline in {workdir} has no finished coding stage yet; run it first")
  return out


def summary_grid(
  images: Sequence[np.ndarray],
  models: Sequence[tuple[str, api.LoadedModel]],
  coded: Sequence[Sequence[tuple[np.ndarray, dict]]] | None = None,
) -> tuple[np.ndarray, list[list[dict]]]:
  """One row per image: original | each model's decode (through a .sodec file), each panel
  captioned with its label, bpp and PSNR -> (uint8 [rows*(h+16), (1+models)*w, 3], metrics[i][j]).
  Images are centre-cropped to the smallest height and width among them so the rows align, and
  the crops are coded. `coded[j][i]`: model j's (decode, metrics) of the whole image i, made
  before (`validate(..., return_decoded=True)`): its decode is cropped with the image and its
  caption gives the whole image's bpp and PSNR; nothing is coded again."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  h = min(im.shape[0] for im in images)
  w = min(im.shape[1] for im in images)
  caption = 16
  rows, metrics = [], []
  for i, image in enumerate(images):
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    crop = lambda x: np.ascontiguousarray(x[top : top + h, left : left + w])
    image = crop(image)
    panels, labels, row_metrics = [image], ["original"], []
    for j, (label, model) in enumerate(models):
      if coded is None:
        out, m = code_one(model, image)
      else:
        out, m = crop(coded[j][i][0]), coded[j][i][1]
      panels.append(out)
      labels.append(f"{label} {m['bpp']:.3f} bpp {m['psnr']:.1f} dB")
      row_metrics.append(m)
    canvas = Image.new("RGB", (w * len(panels), h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (panel, text) in enumerate(zip(panels, labels)):
      canvas.paste(Image.fromarray(panel), (k * w, caption))
      draw.text((k * w + 2, 2), text, fill=(0, 0, 0))
    rows.append(np.asarray(canvas))
    metrics.append(row_metrics)
  return np.concatenate(rows, axis=0), metrics


def summary_png(
  path: str,
  models: Sequence[tuple[str, api.LoadedModel]],
  images: Sequence[np.ndarray],
  coded: Sequence[Sequence[tuple[np.ndarray, dict]]] | None = None,
) -> list[list[dict]]:
  """Writes `summary_grid` as a PNG at `path` (e.g. original | each stage, two held-out photos)
  and returns its metrics."""
  from sodec_jax.images import write_image  # pylint: disable=import-outside-toplevel

  grid, metrics = summary_grid(images, models, coded)
  write_image(path, grid)
  return metrics

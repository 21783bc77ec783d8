"""Reading images from any common file into uint8 RGB (the one reader of inference, evaluation
and training), listing the image files of a folder, and writing outputs atomically."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sodec_jax.errors import SodecError

Image.MAX_IMAGE_PIXELS = 1 << 28  # same bound as a .sodec file; PIL raises past it

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(folder: str, what: str) -> list[str]:
  """Image files (by extension) under `folder`, recursive, sorted; hidden files and folders left
  out. `what` names the folder's option in the messages ('--images', 'config.data.train_dir').
  SodecError when `folder` is not a directory or holds no image file."""
  if not os.path.isdir(folder):
    raise SodecError(f"{what}={folder!r} is not a directory")
  out = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [
      os.path.join(root, f)
      for f in sorted(files)
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    ]
  if not out:
    raise SodecError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {what}={folder!r}")
  return out


def to_rgb8(img: Image.Image) -> tuple[np.ndarray, list[str]]:
  """Converts a PIL image of any mode to uint8 [H, W, 3]; returns the notes on what changed."""
  notes = []
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
    notes.append(f"{mode} (16-bit) grayscale image converted to 8-bit RGB")
    return np.repeat(arr[..., None], 3, axis=-1), notes
  if mode == "F":
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(np.round(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(
      np.uint8
    )
    notes.append("floating-point grayscale image converted to 8-bit RGB")
    return np.repeat(arr[..., None], 3, axis=-1), notes
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
    notes.append(f"{mode} image: alpha channel dropped (composited on white)")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba)
  elif mode == "CMYK":
    notes.append("CMYK image converted to RGB")
  elif mode in ("L", "1"):
    notes.append("grayscale image converted to RGB")
  elif mode != "RGB":
    notes.append(f"{mode} image converted to RGB")
  return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)), notes


def read_image(path: str) -> tuple[np.ndarray, list[str]]:
  """Reads an image file -> (uint8 [H, W, 3], notes). Raises SodecError for anything unusable."""
  if not os.path.exists(path):
    raise SodecError(f"no such file: {path}")
  if os.path.isdir(path):
    raise SodecError(f"{path} is a directory, not an image file")
  try:
    with Image.open(path) as img:
      img.load()
      transposed = ImageOps.exif_transpose(img)
      notes = (
        ["EXIF orientation applied"]
        if transposed is not img and img.getexif().get(0x0112, 1) != 1
        else []
      )
      arr, more = to_rgb8(transposed)
  except UnidentifiedImageError:
    raise SodecError(
      f"{path} is not an image file that can be read (PNG, JPEG, TIFF, BMP, WebP, ...)"
    ) from None
  except Image.DecompressionBombError:
    raise SodecError(f"{path} is too large (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
  except PermissionError:
    raise SodecError(f"cannot read {path}: permission denied") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise SodecError(f"cannot read image {path}: {e} (truncated or damaged file?)") from None
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise SodecError(f"{path} has no pixels")
  return arr, notes + more


def check_writable(path: str) -> None:
  """Fails early (before any work) when `path` cannot be written."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise SodecError(f"cannot write {path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise SodecError(f"cannot write {path}: folder {folder} is not writable")
  if os.path.isdir(path):
    raise SodecError(f"cannot write {path}: it is a directory")


def write_atomic(path: str, data: bytes) -> None:
  """Writes bytes to `path` via a temporary file and a rename: never a half-written file."""
  check_writable(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".sodec-", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


_FORMATS = {
  ".png": "PNG",
  ".jpg": "JPEG",
  ".jpeg": "JPEG",
  ".bmp": "BMP",
  ".tif": "TIFF",
  ".tiff": "TIFF",
  ".webp": "WEBP",
  ".ppm": "PPM",
}


def image_format(path: str) -> str:
  """The PIL format the extension of `path` names; SodecError for an unknown extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in _FORMATS:
    raise SodecError(
      f"unknown image extension {ext!r} for {path}; use one of {', '.join(sorted(_FORMATS))}"
    )
  return _FORMATS[ext]


def encode_image(image: np.ndarray, path: str) -> bytes:
  """uint8 [H, W, 3] -> file bytes in the format the extension of `path` names."""
  import io

  fmt = image_format(path)
  buf = io.BytesIO()
  kwargs = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def write_image(path: str, image: np.ndarray) -> None:
  """Atomically writes uint8 [H, W, 3] to `path` (format from the extension)."""
  write_atomic(path, encode_image(image, path))

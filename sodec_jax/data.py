"""Training data: random crops of the images in a folder, as a grain MapDataset indexed by step.

The element at position `step` is the batch that training step uses, and everything in it (which
images, where the crops sit, whether they flip) derives from `(config.seed, step)` alone. A
resumed run therefore reads exactly the batches an uninterrupted run would have read, by
construction: `train_dataset(config, start_step=s)` is the same dataset sliced at `s`.

`config.data.train_dir == ""` means the images bundled with scikit-image (a curated list,
SKIMAGE_PHOTOS: mostly colour photos), so the tiny config trains offline.

Batches are uint8 arrays [B, crop, crop, 3]; the train step converts them to float32 in [0, 1].
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from typing import Sequence

import grain
import numpy as np
from PIL import Image

from sodec_jax import images
from sodec_jax.errors import SodecError

# The images shipped inside the scikit-image wheel (skimage/data) that the tiny default trains on.
# Grayscale ones are converted to RGB. Colour photographs first; then the colour wheel (a smooth
# synthetic image: the few colour photos cover few hues) and four grayscale photos. Left out on
# purpose: text, logos, charts, masks, tiny or multi-page files, and the grayscale textures
# brick, grass, gravel and clock_motion: a third of all crops, they taught the tiny codec grey
# texture instead of colour (held-out PSNR +1.1 / +2.4 dB without them: docs/ARCHITECTURE.md).
SKIMAGE_PHOTOS = (
  "astronaut.png",
  "chelsea.png",
  "coffee.png",
  "hubble_deep_field.jpg",
  "ihc.png",
  "motorcycle_left.png",
  "motorcycle_right.png",
  "retina.jpg",
  "rocket.jpg",
  "color.png",
  "camera.png",
  "cell.png",
  "coins.png",
  "moon.png",
)

_log = logging.getLogger(__name__)


def skimage_photo_dir() -> str:
  import skimage.data  # pylint: disable=import-outside-toplevel

  return os.path.dirname(skimage.data.__file__)


def skimage_photos() -> list[str]:
  """Paths of the curated scikit-image photos that exist in this installation."""
  root = skimage_photo_dir()
  return [os.path.join(root, f) for f in SKIMAGE_PHOTOS if os.path.isfile(os.path.join(root, f))]


def _warn_skip(path: str, err: Exception) -> None:
  warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", stacklevel=3)


def list_images(train_dir: str) -> list[str]:
  """Sorted readable image paths under `train_dir` (images.list_images: recursive, hidden files
  and folders left out); "" = the scikit-image photos.

  Files whose header PIL cannot read are skipped with a warning. No usable image -> SodecError.
  """
  if not train_dir:
    candidates = skimage_photos()
    where = f"the scikit-image photos in {skimage_photo_dir()}"
  else:
    train_dir = os.path.expanduser(train_dir)
    candidates = images.list_images(train_dir, "config.data.train_dir")
    where = f"config.data.train_dir={train_dir!r}"
  paths = []
  for path in candidates:
    try:
      with Image.open(path) as im:
        _ = im.size  # reads the header: a file Pillow cannot open is skipped here
      paths.append(path)
    except Exception as err:  # pylint: disable=broad-except
      _warn_skip(path, err)
  if not paths:
    raise SodecError(
      f"no readable images ({', '.join(images.IMAGE_EXTENSIONS)}) in {where}; "
      "point --config.data.train_dir at a folder of photos"
    )
  return paths


def exclude_holdout(
  paths: Sequence[str], names: Sequence[str], option: str = "config.data.holdout"
) -> list[str]:
  """`paths` without the held-out images: those whose file name without extension is in `names`
  (`option`: config.data.holdout, e.g. ("astronaut", "coffee"), config.data.exclude, or the rate
  controller's calibration photos). A name matching no path, or no path left, is a SodecError."""
  names = tuple(names)
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]
  missing = sorted(set(names) - {stem(p) for p in paths})
  if missing:
    raise SodecError(
      f"{option} names {', '.join(missing)}, not among the training "
      f"images (file names without extension); fix --{option}"
    )
  kept = [p for p in paths if stem(p) not in names]
  if not kept:
    raise SodecError(f"{option} holds out every training image; hold out fewer")
  return kept


def calibration_names(config) -> tuple[str, ...]:
  """config.loss.rate_control.photos: the rate controller's calibration photos (kept out of
  training like config.data.holdout), () when none are named."""
  rc = config.get("loss", {}).get("rate_control")
  return () if rc is None else tuple(rc.get("photos", ()))


def pad_to(img: np.ndarray, size: int) -> np.ndarray:
  """Pads H and W up to at least `size` (reflect where the image allows it, else edge)."""
  h, w = img.shape[:2]
  ph, pw = max(0, size - h), max(0, size - w)
  if not ph and not pw:
    return img
  pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
  mode = "reflect" if ph < h and pw < w else "edge"
  return np.pad(img, pads, mode=mode)


def random_rescale(img: np.ndarray, scale: tuple, rng: np.random.Generator) -> np.ndarray:
  """img resized (bicubic) by a factor drawn uniformly from [scale[0], scale[1]] (both 1: as
  is). Downscaled photos put more content in each crop: the tiny default trains on a dozen."""
  lo, hi = float(scale[0]), float(scale[1])
  if lo == hi == 1.0:
    return img
  f = float(rng.uniform(lo, hi))
  h, w = img.shape[:2]
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def random_crop(
  img: np.ndarray,
  size: int,
  rng: np.random.Generator,
  hflip: bool = True,
  scale: tuple = (1.0, 1.0),
  channel_shuffle: bool = False,
) -> np.ndarray:
  """A size x size crop of img (padded when smaller), after `random_rescale` by `scale`,
  mirrored left-right with probability 1/2 when hflip, its R, G, B in one of the 6 orders drawn
  uniformly when channel_shuffle (a dozen photos cover few hues: a codec trained on them alone
  pulls every colour towards theirs)."""
  img = pad_to(random_rescale(img, scale, rng), size)
  h, w = img.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  crop = img[top : top + size, left : left + size]
  if hflip and rng.random() < 0.5:
    crop = crop[:, ::-1]
  if channel_shuffle:
    crop = crop[..., rng.permutation(3)]
  return np.ascontiguousarray(crop)


class CropLoader:
  """Maps a global example index to a uint8 crop; deterministic in (seed, index).

  Example `i` belongs to epoch `i // n`; each epoch visits the n images in its own permutation.
  Decoded images are kept in memory when they all fit in `cache_mb`.
  """

  def __init__(
    self,
    paths: Sequence[str],
    crop_size: int,
    seed: int,
    hflip: bool = True,
    cache_mb: float = 1024,
    scale: tuple = (1.0, 1.0),
    channel_shuffle: bool = False,
  ):
    self.paths = list(paths)
    self.channel_shuffle = bool(channel_shuffle)
    self.crop_size = crop_size
    self.seed = int(seed)
    self.hflip = hflip
    self.scale = tuple(float(v) for v in scale)
    if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
      raise SodecError(f"config.data.scale={scale!r} must be (low, high) with 0 < low <= high")
    total = 0
    for p in self.paths:
      with Image.open(p) as im:
        total += im.size[0] * im.size[1] * 3
    self._cache = {} if total <= cache_mb * 2**20 else None
    self._lock = threading.Lock()
    self._bad: set[int] = set()

  def __getstate__(self):  # picklable for grain worker processes (no lock, empty cache)
    state = dict(self.__dict__)
    state["_lock"] = None
    state["_cache"] = {} if self._cache is not None else None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @functools.lru_cache(maxsize=4)  # noqa: B019 (the loader lives as long as the run)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.paths))

  def _image(self, k: int) -> np.ndarray | None:
    if self._cache is not None and k in self._cache:
      return self._cache[k]
    if k in self._bad:
      return None
    try:
      img = images.read_image(self.paths[k])[0]  # as the CLI and evaluation read it
    except Exception as err:  # pylint: disable=broad-except
      with self._lock:
        if k not in self._bad:
          self._bad.add(k)
          _warn_skip(self.paths[k], err)
      return None
    if self._cache is not None:
      with self._lock:
        self._cache[k] = img
    return img

  def __call__(self, index: int) -> np.ndarray:
    index = int(index)
    n = len(self.paths)
    perm = self._permutation(index // n)
    rng = np.random.default_rng([self.seed, 2, index])
    for j in range(n):  # an image that fails to decode is replaced by the next one in the epoch
      img = self._image(int(perm[(index + j) % n]))
      if img is not None:
        return random_crop(img, self.crop_size, rng, self.hflip, self.scale, self.channel_shuffle)
    raise SodecError(f"none of the {n} training images could be decoded")


class _ProcessRows:
  """Position k of one process's stream -> the global example index: process p of P reads rows
  [p * B/P, (p + 1) * B/P) of every global batch of B (picklable for grain workers)."""

  def __init__(self, batch: int, process_index: int, process_count: int):
    self.b, self.local, self.offset = (
      batch,
      batch // process_count,
      process_index * (batch // process_count),
    )

  def __call__(self, k: int) -> int:
    k = int(k)
    return (k // self.local) * self.b + self.offset + k % self.local


def train_dataset(
  config,
  start_step: int = 0,
  paths: Sequence[str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """MapDataset whose element k is the uint8 batch [B, crop, crop, 3] of step start_step + k;
  with process_count P > 1, this process's rows of it: [B/P, crop, crop, 3] (B must divide)."""
  d = config.data
  if paths is None:
    paths = list_images(d.train_dir)
  paths = exclude_holdout(paths, d.get("holdout", ()))
  paths = exclude_holdout(paths, d.get("exclude", ()), "config.data.exclude")
  if calibration_names(config):
    paths = exclude_holdout(paths, calibration_names(config), "config.loss.rate_control.photos")
  loader = CropLoader(
    paths,
    d.crop_size,
    config.seed,
    d.hflip,
    d.get("cache_mb", 1024),
    scale=tuple(d.get("scale", (1.0, 1.0))),
    channel_shuffle=bool(d.get("channel_shuffle", False)),
  )
  b = d.batch_size
  end = max(int(config.train.num_steps), start_step)
  if process_count == 1:
    return grain.MapDataset.range(start_step * b, end * b).map(loader).batch(b)
  if b % process_count:
    raise SodecError(f"config.data.batch_size={b} does not divide over {process_count} processes")
  local = b // process_count
  rows = _ProcessRows(b, process_index, process_count)
  return grain.MapDataset.range(start_step * local, end * local).map(rows).map(loader).batch(local)


def train_iterator(
  config,
  start_step: int = 0,
  paths: Sequence[str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
):
  """An iterator over the batches of steps start_step, start_step + 1, ... (prefetched); with
  process_count > 1, this process's share of each global batch (train_dataset).

  config.data.worker_count > 0: that many grain worker processes decode and crop in parallel
  (mp_prefetch); 0: two reader threads in this process. The loop then puts the batches on the
  devices ahead of the step (train/feed.py, config.data.prefetch); `python -m sodec_jax.bench
  --what data` measures whether this keeps up with the train step."""
  ds = train_dataset(config, start_step, paths, process_index, process_count)
  workers = int(config.data.worker_count)
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2 if workers == 0 else 1, prefetch_buffer_size=4)
  )
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)

"""The grain training pipeline: image lists, decoding, crops, determinism by step."""

import os

import numpy as np
import pytest
from PIL import Image

from sodec_jax import data, images
from sodec_jax.errors import SodecError
from tests.conftest import load_photo, make_micro_config


def _write(path, arr):
  Image.fromarray(arr).save(path)
  return str(path)


def test_default_is_the_skimage_photos():
  paths = data.list_images("")
  assert len(paths) >= 10
  names = {os.path.basename(p) for p in paths}
  assert {"astronaut.png", "coffee.png", "chelsea.png"} <= names
  assert not names & {"text.png", "page.png", "logo.png", "horse.png"}


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(SodecError, match="no image files.*train_dir"):
    data.list_images(str(tmp_path))
  with pytest.raises(SodecError, match="not a directory"):
    data.list_images(str(tmp_path / "nope"))


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
  good = _write(tmp_path / "a.png", load_photo("astronaut.png")[:100, :100])
  (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
  with pytest.warns(UserWarning, match="skipping unreadable image .*b.jpg"):
    paths = data.list_images(str(tmp_path))
  assert paths == [good]


def test_truncated_file_is_replaced_with_a_warning(tmp_path):
  _write(tmp_path / "a.png", load_photo("coffee.png")[:96, :96])
  whole = open(_write(tmp_path / "b.png", load_photo("chelsea.png")), "rb").read()
  (tmp_path / "b.png").write_bytes(whole[: len(whole) // 3])  # header fine, data cut
  paths = data.list_images(str(tmp_path))
  assert len(paths) == 2
  loader = data.CropLoader(paths, 64, seed=0, hflip=False)
  with pytest.warns(UserWarning, match="skipping unreadable image .*b.png"):
    crops = [loader(i) for i in range(4)]
  ref = load_photo("coffee.png")[:96, :96]
  for c in crops:  # every crop comes from the good image
    assert c.shape == (64, 64, 3)
    assert any((ref[t : t + 64, l : l + 64] == c).all() for t in range(33) for l in range(33))


def test_grayscale_becomes_rgb_and_small_images_are_padded(tmp_path):
  gray = load_photo("camera.png")
  assert gray.shape == (512, 512, 3) and (gray[..., 0] == gray[..., 2]).all()
  small = load_photo("astronaut.png")[:40, :20]
  out = data.pad_to(small, 64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out[12:52, 22:42], small)  # centred; reflect/edge around it
  rng = np.random.default_rng(0)
  assert data.random_crop(small, 64, rng).shape == (64, 64, 3)
  _write(tmp_path / "g.png", gray[:50, :70, 0])
  assert images.read_image(str(tmp_path / "g.png"))[0].shape == (50, 70, 3)


def test_batches_derive_from_seed_and_step_only():
  c = make_micro_config(**{"train.num_steps": 20})
  ds = data.train_dataset(c)
  assert len(ds) == 20
  b3 = ds[3]
  assert b3.shape == (2, 64, 64, 3) and b3.dtype == np.uint8
  np.testing.assert_array_equal(data.train_dataset(c, start_step=3)[0], b3)  # resume = slice
  np.testing.assert_array_equal(next(data.train_iterator(c, start_step=3)), b3)
  assert not np.array_equal(ds[4], b3)
  other = data.train_dataset(make_micro_config(**{"train.num_steps": 20, "seed": 1}))
  assert not np.array_equal(other[3], b3)


def test_each_epoch_visits_every_image_once():
  loader = data.CropLoader(data.list_images("")[:5], 64, seed=3)
  for epoch in range(2):
    assert sorted(loader._permutation(epoch)) == list(range(5))  # pylint: disable=protected-access


def _windows(img, size):
  """Every size x size window of img (uint8 [H, W, 3]), for locating a crop."""
  h, w = img.shape[:2]
  return [img[t : t + size, l : l + size] for t in range(h - size + 1) for l in range(w - size + 1)]


def test_training_reads_files_as_the_cli_does(tmp_path):
  """RGBA, 16-bit and EXIF-rotated files: a training crop is a window of what `sodec compress`
  reads (images.read_image), which composites alpha on white, scales 16-bit by 65535 and
  applies the EXIF orientation."""
  photo = load_photo("chelsea.png")[:64, :96]  # [64, 96, 3]
  alpha = np.zeros((64, 96), np.uint8)
  alpha[:, 48:] = 255  # left half transparent
  _write(tmp_path / "rgba.png", np.dstack([photo, alpha]))
  sixteen = photo[..., 0].astype(np.uint16) * 4  # max 1020 of 65535
  Image.fromarray(sixteen).save(tmp_path / "sixteen.png")  # mode I;16
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 clockwise
  Image.fromarray(photo).save(tmp_path / "rotated.jpg", exif=exif, quality=95)

  rgba, _ = images.read_image(str(tmp_path / "rgba.png"))
  assert (rgba[:, :48] == 255).all() and (rgba[:, 48:] == photo[:, 48:]).all()
  gray16, _ = images.read_image(str(tmp_path / "sixteen.png"))
  np.testing.assert_array_equal(gray16[..., 0], np.round(sixteen / 65535 * 255).astype(np.uint8))
  assert gray16.max() <= 4  # not stretched to 255
  rotated, _ = images.read_image(str(tmp_path / "rotated.jpg"))
  assert rotated.shape == (96, 64, 3)

  for name, cli in (("rgba.png", rgba), ("sixteen.png", gray16), ("rotated.jpg", rotated)):
    loader = data.CropLoader([str(tmp_path / name)], 64, seed=0, hflip=False)
    for i in range(3):
      crop = loader(i)
      assert any((w == crop).all() for w in _windows(cli, 64)), (name, i)
  stored = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))  # [64, 96]: unrotated
  crop = data.CropLoader([str(tmp_path / "rotated.jpg")], 64, seed=0, hflip=False)(0)
  assert not any((w == crop).all() for w in _windows(stored, 64))


def test_holdout_photos_are_kept_out_of_training():
  paths = data.list_images("")
  kept = data.exclude_holdout(paths, ("astronaut", "coffee"))
  names = {os.path.basename(p) for p in kept}
  assert len(kept) == len(paths) - 2 and not names & {"astronaut.png", "coffee.png"}
  # hold out every colour photo: then every training crop is grey (R == G == B)
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]
  colour = tuple(stem(p) for p in paths if images.read_image(p)[0].std(axis=-1).max() > 0)
  assert "astronaut" in colour and len(colour) < len(paths)
  batches = lambda **o: np.concatenate(
    list(data.train_dataset(make_micro_config(**{"train.num_steps": 6, **o})))
  )
  grey = lambda b: bool(np.all(b[..., 0] == b[..., 1]) and np.all(b[..., 1] == b[..., 2]))
  assert not grey(batches())
  assert grey(batches(**{"data.holdout": colour}))
  held = tuple(make_micro_config().data.holdout)
  # data.exclude: left out of training (and not validated on)
  assert grey(batches(**{"data.exclude": tuple(c for c in colour if c not in held)}))
  with pytest.raises(SodecError, match="config.data.exclude names astronot"):
    batches(**{"data.exclude": ("astronot",)})
  with pytest.raises(SodecError, match="holdout names astronot"):
    data.exclude_holdout(paths, ("astronot",))
  with pytest.raises(SodecError, match="every training image"):
    data.exclude_holdout(paths[:1], (stem(paths[0]),))


def test_channel_shuffle_permutes_rgb_per_crop():
  """data.channel_shuffle: every crop is the plain crop (same rng draws) with its R, G, B in one
  of the 6 orders, and over many crops more than one order occurs."""
  photo = load_photo("astronaut.png")[:96, :96]
  orders = set()
  for seed in range(12):
    plain = data.random_crop(photo, 64, np.random.default_rng(seed))
    shuffled = data.random_crop(photo, 64, np.random.default_rng(seed), channel_shuffle=True)
    match = [
      p
      for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
      if np.array_equal(plain[..., list(p)], shuffled)
    ]
    assert len(match) == 1, seed
    orders.add(match[0])
  assert len(orders) > 1
  c = make_micro_config(**{"train.num_steps": 4, "data.channel_shuffle": True})
  off = make_micro_config(**{"train.num_steps": 4})
  a = np.stack([data.train_dataset(c)[k] for k in range(4)])
  b = np.stack([data.train_dataset(off)[k] for k in range(4)])
  assert a.shape == b.shape and not np.array_equal(a, b)
  np.testing.assert_array_equal(np.sort(a, -1), np.sort(b, -1))  # same pixels, other order

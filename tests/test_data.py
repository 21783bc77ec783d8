"""The grain training pipeline: image lists, decoding, crops, determinism by step."""
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from sodec_jax import data
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
  with pytest.raises(SodecError, match="no readable images.*train_dir"):
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
  good = _write(tmp_path / "a.png", load_photo("coffee.png")[:96, :96])
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
    assert any((ref[t:t + 64, l:l + 64] == c).all() for t in range(33) for l in range(33))


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
  assert data.load_image(str(tmp_path / "g.png")).shape == (50, 70, 3)


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


def test_holdout_photos_are_kept_out_of_training():
  paths = data.list_images("")
  kept = data.exclude_holdout(paths, ("astronaut", "coffee"))
  names = {os.path.basename(p) for p in kept}
  assert len(kept) == len(paths) - 2 and not names & {"astronaut.png", "coffee.png"}
  # hold out every colour photo: then every training crop is grey (R == G == B)
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]
  colour = tuple(stem(p) for p in paths if data.load_image(p).std(axis=-1).max() > 0)
  assert "astronaut" in colour and len(colour) < len(paths)
  batches = lambda **o: np.concatenate(list(data.train_dataset(
      make_micro_config(**{"train.num_steps": 6, **o}))))
  grey = lambda b: bool(np.all(b[..., 0] == b[..., 1]) and np.all(b[..., 1] == b[..., 2]))
  assert not grey(batches())
  assert grey(batches(**{"data.holdout": colour}))
  with pytest.raises(SodecError, match="holdout names astronot"):
    data.exclude_holdout(paths, ("astronot",))
  with pytest.raises(SodecError, match="every training image"):
    data.exclude_holdout(paths[:1], (stem(paths[0]),))

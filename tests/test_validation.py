"""Held-out validation through real .sodec files: bpp from the file size, PSNR as scikit-image
computes it, MS-SSIM only where the image is large enough, and the summary grid."""

import numpy as np
import pytest
from flax import nnx
from skimage.metrics import peak_signal_noise_ratio

from sodec_jax import api, validation
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from tests.conftest import load_photo, make_micro_config


@pytest.fixture(scope="module")
def codec():
  c = make_micro_config()
  return api.prepare(c, build_model(c, nnx.Rngs(0)))


def test_validate_measures_real_files(codec):
  big, small = load_photo("coffee.png")[:176, :200], load_photo("chelsea.png")[:96, :128]
  r = validation.validate(codec, [big, small], return_decoded=True)
  for image, row, out in zip([big, small], r["images"], r["decoded"]):
    blob = api.compress(codec, image)
    assert row["bytes"] == len(blob)
    assert row["bpp"] == pytest.approx(8 * len(blob) / (image.shape[0] * image.shape[1]))
    np.testing.assert_array_equal(out, api.decompress(codec, blob))
    want = peak_signal_noise_ratio(image, out, data_range=255)
    assert row["psnr"] == pytest.approx(want, abs=1e-6)
  assert r["images"][1]["ms_ssim"] is None and r["ms_ssim_images"] == 1  # 96 px < 161
  assert 0.0 < r["ms_ssim"] == r["images"][0]["ms_ssim"] <= 1.0
  assert r["psnr"] == pytest.approx(np.mean([x["psnr"] for x in r["images"]]))
  with pytest.raises(SodecError, match="at least one image"):
    validation.validate(codec, [])


def test_holdout_images_and_summary_grid(codec, tmp_path, monkeypatch):
  c = make_micro_config(**{"data.holdout": ("coffee", "astronaut")})
  images = validation.holdout_images(c)
  assert [im.shape for im in images] == [(400, 600, 3), (512, 512, 3)]
  with pytest.raises(SodecError, match="holdout names nope"):
    validation.holdout_paths(make_micro_config(**{"data.holdout": ("nope",)}))
  crops = [im[:96, :160] for im in images]
  path = str(tmp_path / "summary.png")
  metrics = validation.summary_png(path, [("a", codec), ("b", codec)], crops)
  grid = np.asarray(__import__("PIL.Image").Image.open(path).convert("RGB"))
  assert grid.shape == (2 * (96 + 16), 3 * 160, 3)
  np.testing.assert_array_equal(grid[16:112, :160], crops[0])  # the original panel
  out = api.decompress(codec, api.compress(codec, crops[1]))
  np.testing.assert_array_equal(grid[128:, 320:], out)  # row 2, model b
  assert metrics[1][1]["psnr"] == pytest.approx(validation.psnr_u8(crops[1], out))
  # decodes made before (the pipeline's summary: validate's): cropped as the images, not coded
  sizes = [images[0][:96, :160], images[1][:112, :176]]
  coded = [[validation.code_one(codec, im) for im in sizes]]
  monkeypatch.setattr(validation, "code_one", lambda *a: pytest.fail("coded again"))
  grid, metrics = validation.summary_grid(sizes, [("a", codec)], coded)
  assert grid.shape == (2 * (96 + 16), 2 * 160, 3)
  np.testing.assert_array_equal(grid[128:, 160:], coded[0][1][0][8:104, 8:168])
  assert metrics[1][0] is coded[0][1][1]

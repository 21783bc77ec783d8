"""NIQE: golden values from BasicSR's own NIQE (independent), a plain loop-per-block NumPy
re-reading of the MATLAB release (tests/reference/niqe_numpy.py: NOT independent -- it repeats this
package's reading of the MATLAB code, so it checks vectorisation, not interpretation), MATLAB
imresize against its per-pixel form, parameter files, errors, and a sanity check that
distortions raise the score.

The independent reference: basicsr 1.4.2 (PyPI sdist), basicsr/metrics/niqe.py, whose docstring
reports 5.7296 against MATLAB R2021a's niqe_release on its baboon.png. It cannot be installed
here (basicsr requires torchvision; pyiqa 0.1.16 requires torchvision too and downloads its NIQE
parameters at run time), so its values were computed once by tests/reference/upstream_goldens.py
and are checked in below, with its pristine model (tests/data/basicsr_niqe_pris_params.npz, copied
from the sdist, Apache-2.0). No MATLAB run was available.
"""

import hashlib
import os
import sys

import numpy as np
import pytest
import scipy.io
from skimage import data

from sodec_jax.errors import SodecError
from sodec_jax.metrics.niqe import (
  NiqeParams,
  block_features,
  block_moments,
  gaussian_window,
  load_niqe_params,
  luma,
  niqe,
  resize_matrix,
)
from tests.conftest import ROOT, load_photo

sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import niqe_numpy as ref  # noqa: E402


def _pristine(names=("chelsea.png", "coffee.png", "rocket.jpg"), ridge=1e-3) -> NiqeParams:
  """A pristine model fitted (by the reference) to clean photos: the MATLAB release's recipe
  minus its sharpness-based block selection."""
  f = np.concatenate([ref.niqe_features(ref.rgb_to_y(load_photo(n))) for n in names])
  f = f[~np.isnan(f).any(1)]
  return NiqeParams(f.mean(0), np.cov(f, rowvar=False) + ridge * np.eye(36))


@pytest.fixture(scope="module")
def pristine():
  return _pristine()


BASICSR_PARAMS = os.path.join(ROOT, "tests", "data", "basicsr_niqe_pris_params.npz")
BASICSR_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
# scikit-image 0.26 photo: (basicsr calculate_niqe(img, 0, input_order="HW"), which casts to
# float32 first; basicsr's niqe() core on the float64 image), both with BASICSR_PARAMS
BASICSR_NIQE = {
  "camera": (3.0962066193457405, 3.09622028525054),
  "coins": (3.6226717159368853, 3.622671252317404),
  "moon": (9.112051531111902, 9.113508038820404),
}


@pytest.mark.parametrize("name", sorted(BASICSR_NIQE))
def test_matches_basicsr_golden(name):
  """Same pristine model, same gray photo: ours within 1e-5 of basicsr's float64 core (measured:
  at most 6e-6 relative, a residual we did not isolate) and within 3e-4 of its float32
  calculate_niqe."""
  with open(BASICSR_PARAMS, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == BASICSR_SHA256
  got = niqe(getattr(data, name)(), load_niqe_params(BASICSR_PARAMS))
  f32, f64 = BASICSR_NIQE[name]
  assert got == pytest.approx(f64, rel=1e-5)
  assert got == pytest.approx(f32, rel=3e-4)


def _random_spd(seed=0) -> NiqeParams:
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(36, 36))
  return NiqeParams(rng.normal(size=36), a @ a.T / 36 + np.eye(36))


@pytest.mark.parametrize(
  "name,crop",
  [
    ("astronaut.png", None),
    ("coffee.png", (300, 451)),
    ("chelsea.png", (200, 290)),
    ("camera.png", (250, 333)),
  ],
)
def test_matches_reference_on_photos(pristine, name, crop):
  img = load_photo(name)
  if crop:
    img = img[: crop[0], : crop[1]]  # sides that are not multiples of 96
  y = ref.rgb_to_y(img)
  np.testing.assert_array_equal(luma(img), y)
  for params in (pristine, _random_spd()):
    want = ref.niqe(y, params.mu, params.cov)
    got = niqe(img, params)
    assert abs(got - want) <= 1e-9 * want, (name, got, want)


def test_gray_input_and_features(pristine):
  gray = load_photo("camera.png")[..., 0]  # camera is a gray photo: [H, W]
  want = ref.niqe(gray.astype(np.float64), pristine.mu, pristine.cov)
  assert niqe(gray, pristine) == pytest.approx(want, rel=1e-9)
  y = gray[:288, :384].astype(np.float64)
  f = block_features(block_moments(y))
  np.testing.assert_allclose(f, ref.niqe_features(y), rtol=1e-9, atol=1e-12)
  assert f.shape == (12, 36)


@pytest.mark.parametrize("n", [96, 97, 50, 5, 1])
def test_resize_matrix_is_matlab_imresize(n):
  rng = np.random.default_rng(n)
  x = rng.uniform(0, 1, (n, 7))
  want = ref.imresize(x, 0.5)
  got = resize_matrix(n, 0.5) @ x @ resize_matrix(7, 0.5).T
  assert got.shape == want.shape == (int(np.ceil(n / 2)), 4)
  np.testing.assert_allclose(got, want, atol=1e-12)
  np.testing.assert_allclose(resize_matrix(n, 0.5).sum(1), 1.0, atol=1e-12)  # constants stay


def test_gaussian_window():
  np.testing.assert_allclose(gaussian_window(), ref.fspecial_gaussian(), atol=1e-15)


def test_distortions_raise_the_score(pristine):
  clean = load_photo("astronaut.png")
  rng = np.random.default_rng(0)
  noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
  p = np.pad(clean.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="edge")
  blurred = np.round(
    sum(p[i : i + 512, j : j + 512] for i in range(5) for j in range(5)) / 25
  ).astype(np.uint8)
  base = niqe(clean, pristine)
  assert niqe(noisy, pristine) > base + 5
  assert niqe(blurred, pristine) > base + 1


def test_param_files(tmp_path, pristine):
  mat, npz = tmp_path / "modelparameters.mat", tmp_path / "niqe_pris_params.npz"
  scipy.io.savemat(mat, {"mu_prisparam": pristine.mu[None], "cov_prisparam": pristine.cov})
  np.savez(
    npz,
    mu_pris_param=pristine.mu[None],
    cov_pris_param=pristine.cov,
    gaussian_window=gaussian_window(),
  )
  a, b = load_niqe_params(str(mat)), load_niqe_params(str(npz))
  np.testing.assert_array_equal(a.mu, pristine.mu)
  np.testing.assert_array_equal(a.cov, b.cov)
  img = load_photo("chelsea.png")
  assert niqe(img, a) == niqe(img, b)

  with pytest.raises(SodecError, match="not found"):
    load_niqe_params(str(tmp_path / "missing.mat"))
  (tmp_path / "junk.mat").write_bytes(b"not a mat file")
  with pytest.raises(SodecError, match="could not read"):
    load_niqe_params(str(tmp_path / "junk.mat"))
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(SodecError, match="mu_pris_param"):
    load_niqe_params(str(tmp_path / "other.npz"))
  np.savez(tmp_path / "short.npz", mu_pris_param=np.zeros(18), cov_pris_param=np.eye(18))
  with pytest.raises(SodecError, match="expected 36"):
    load_niqe_params(str(tmp_path / "short.npz"))
  np.savez(tmp_path / "nan.npz", mu_pris_param=np.full(36, np.nan), cov_pris_param=np.eye(36))
  with pytest.raises(SodecError, match="non-finite"):
    load_niqe_params(str(tmp_path / "nan.npz"))


def test_small_or_bad_images(pristine):
  with pytest.raises(SodecError, match="at least 96x96"):
    niqe(load_photo("chelsea.png")[:95], pristine)
  with pytest.raises(SodecError, match="RGB"):
    niqe(np.zeros((100, 100, 4), np.uint8), pristine)

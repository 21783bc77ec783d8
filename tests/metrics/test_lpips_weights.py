"""load_lpips / load_vgg16: .safetensors and .pth round trips, and the errors users see."""

from __future__ import annotations

import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sodec_jax.errors import SodecError
from sodec_jax.metrics import LPIPS
from sodec_jax.metrics.vgg16 import VGG16_FEATURE_SHAPES
from sodec_jax.weights.lpips import check_vgg16_state, load_lpips, load_shipped_heads, load_vgg16


def _random_vgg(seed=0, classifier=True):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in VGG16_FEATURE_SHAPES.items():
    fan_out = shape[0] * 9
    scale = np.sqrt(2.0 / fan_out) if k.endswith("weight") else 0.05
    sd[k] = (rng.standard_normal(shape) * scale).astype(np.float32)
  if classifier:  # a real vgg16 has classifier.{0,3,6}.*; small stand-ins, ignored by the loader
    sd["classifier.0.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
    sd["classifier.6.bias"] = rng.standard_normal((10,)).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def vgg():
  return _random_vgg()


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(1, 32, 32, 3)).astype(np.float32)
  return x, np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def reference_value(vgg, images):
  return np.asarray(LPIPS(vgg, load_shipped_heads())(*images))


def _check_same(path, vgg, images, reference_value):
  got = load_vgg16(path)
  assert sorted(got) == sorted(VGG16_FEATURE_SHAPES)  # classifier.* dropped
  for k in got:
    assert got[k].dtype == np.float32 and np.array_equal(got[k], vgg[k]), k
  m = load_lpips(path)
  np.testing.assert_array_equal(np.asarray(m(*images)), reference_value)
  for k, v in m.vgg.to_state_dict().items():
    assert np.array_equal(v, vgg[k]), k


def test_safetensors_round_trip(tmp_path, vgg, images, reference_value):
  p = tmp_path / "vgg16.safetensors"
  save_file(vgg, str(p))
  _check_same(p, vgg, images, reference_value)


def test_pth_round_trip_full_and_features_only(tmp_path, vgg, images, reference_value):
  full = tmp_path / "vgg16_full.pth"
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, full)
  _check_same(full, vgg, images, reference_value)
  # `model.features.state_dict()` layout: keys 0.weight ... 28.bias
  feats = tmp_path / "vgg16_features.pth"
  torch.save(
    {
      k[len("features.") :]: torch.from_numpy(v)
      for k, v in vgg.items()
      if k.startswith("features.")
    },
    feats,
  )
  _check_same(feats, vgg, images, reference_value)


def test_half_precision_pth_is_upcast(tmp_path, vgg):
  p = tmp_path / "vgg16_fp16.pth"
  torch.save({k: torch.from_numpy(v).half() for k, v in vgg.items()}, p)
  got = load_vgg16(p)
  assert got["features.0.weight"].dtype == np.float32
  np.testing.assert_allclose(got["features.0.weight"], vgg["features.0.weight"], atol=1e-3)


def test_missing_file(tmp_path):
  p = tmp_path / "nope" / "vgg16.pth"
  with pytest.raises(SodecError) as e:
    load_lpips(str(p))
  msg = str(e.value)
  assert str(p) in msg and "VGG16 ImageNet weights" in msg and "torchvision" in msg
  assert "\n" not in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_missing_and_misshaped_keys(tmp_path, vgg, suffix):
  bad = dict(vgg)
  del bad["features.28.bias"]
  del bad["features.5.weight"]
  bad["features.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
  p = tmp_path / f"bad{suffix}"
  if suffix == ".safetensors":
    save_file(bad, str(p))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, p)
  with pytest.raises(SodecError) as e:
    load_lpips(p)
  msg = str(e.value)
  assert "features.28.bias" in msg and "features.5.weight" in msg
  assert "features.0.weight: (64, 3, 5, 5) (expected (64, 3, 3, 3))" in msg
  assert str(p) in msg


def test_in_memory_dict_errors(vgg):
  bad = {k: v for k, v in vgg.items() if k != "features.2.weight"}
  with pytest.raises(SodecError, match="features.2.weight"):
    check_vgg16_state(bad)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path, vgg):
  marker = tmp_path / "pwned"
  p = tmp_path / "evil.pth"
  payload = {k: torch.from_numpy(v) for k, v in vgg.items()}
  payload["features.0.weight"] = _Evil(marker)
  torch.save(payload, p)  # zip-format torch checkpoint whose data.pkl calls os.system
  with pytest.raises(SodecError, match="refused") as e:
    load_lpips(p)
  assert str(p) in str(e.value)
  raw = tmp_path / "evil_raw.pth"  # a bare pickle stream, not a torch zip
  with open(raw, "wb") as f:
    pickle.dump({"features.0.weight": _Evil(marker)}, f)
  with pytest.raises(SodecError):
    load_vgg16(raw)
  assert not marker.exists(), "unpickling executed code"


def test_not_a_state_dict(tmp_path):
  p = tmp_path / "list.pth"
  torch.save([torch.zeros(1)], p)
  with pytest.raises(SodecError, match="not a state dict"):
    load_vgg16(p)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file")
  with pytest.raises(SodecError, match="safetensors"):
    load_vgg16(junk)


def test_dtype_bfloat16(tmp_path, vgg, images, reference_value):
  p = tmp_path / "vgg16.safetensors"
  save_file(vgg, str(p))
  m = load_lpips(p, dtype=jnp.bfloat16)
  assert m.vgg.conv0_kernel[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(m(*images)), reference_value, rtol=0.1)

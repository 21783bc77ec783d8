"""vit / swin / lpips / dists converters: real-library models saved for real, converted, loaded,
compared with the PyTorch outputs."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_dists
import torch_lpips
import torch_vgg16
from safetensors.torch import save_file as save_torch

from sodec_jax import converters as convert
from sodec_jax.errors import SodecError
from sodec_jax.weights import converted
from sodec_jax.weights.lpips import HEAD_KEYS, lpips_wheel_heads_path
from tests.convert.conftest import assert_out_clean, errors
from tests.guidance._tiny_hf import photo_batch, tiny_swin, tiny_vit, torch_forward

TOL = 1e-5


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_extractor(kind, tmp_path):
  model = tiny_vit("ViTForImageClassification") if kind == "vit" else tiny_swin()
  model.save_pretrained(tmp_path / "src")
  out = getattr(convert, f"convert_{kind}")(str(tmp_path / "src"), str(tmp_path / "out"))
  manifest = converted.read_manifest(out)
  assert manifest["kind"] == kind
  assert any(s["path"].endswith("model.safetensors") for s in manifest["source"])
  ours = converted.load_extractor(out)
  x = photo_batch(32, 32)
  base = model.vit if kind == "vit" else model
  ref = torch_forward(base, x)
  assert errors(ours(jnp.asarray(x)), ref)[0] <= TOL
  if kind == "vit":
    assert any(k.startswith("classifier") for k in manifest["ignored_keys"])


def test_extractor_wrong_folder(tmp_path):
  tiny_swin().save_pretrained(tmp_path / "swin")
  with pytest.raises(SodecError, match="model_type 'swin'.*use load_swin"):
    convert.convert_vit(str(tmp_path / "swin"), str(tmp_path / "out"))
  assert_out_clean(str(tmp_path / "out"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
  feats = torch_vgg16.vgg16_features(seed=3)
  path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
  torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
  return str(path), feats


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _images():
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(2, 48, 48, 3)).astype(np.float32)
  return x, np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)


def test_lpips_with_wheel_heads(vgg_file, tmp_path):
  path, feats = vgg_file
  heads_path = str(lpips_wheel_heads_path())
  if not os.path.isfile(heads_path):
    pytest.skip("the lpips wheel is not installed")
  out = convert.convert_lpips(path, str(tmp_path / "lpips"), heads=heads_path)
  assert converted.read_manifest(out)["components"] == ["vgg16", "lpips"]
  heads = torch.load(heads_path, map_location="cpu", weights_only=True)
  ref = torch_lpips.TorchLPIPS(feats, {k: heads[k] for k in HEAD_KEYS})
  x, y = _images()
  with torch.no_grad():
    want = ref(_nchw(x), _nchw(y)).numpy().reshape(-1)
  got = converted.load_lpips(out)(jnp.asarray(x), jnp.asarray(y))
  assert errors(got, want)[0] <= TOL


def test_dists(vgg_file, tmp_path):
  path, feats = vgg_file
  alpha, beta = torch_dists.random_alpha_beta(seed=4)
  ab = tmp_path / "weights.safetensors"
  save_torch({"alpha": torch.from_numpy(alpha), "beta": torch.from_numpy(beta)}, str(ab))
  out = convert.convert_dists(str(ab), str(tmp_path / "dists"), vgg=path)
  ref = torch_dists.TorchDISTS(feats, torch.from_numpy(alpha), torch.from_numpy(beta))
  x, y = _images()
  with torch.no_grad():
    want = ref(_nchw(x), _nchw(y), batch_average=False).numpy().reshape(-1)
  got = converted.load_dists(out)(jnp.asarray(x), jnp.asarray(y))
  assert errors(got, want)[0] <= TOL


def test_metric_bad_inputs(vgg_file, tmp_path):
  path, _ = vgg_file
  sd = torch.load(path, weights_only=True)
  del sd["features.28.bias"]
  torch.save(sd, tmp_path / "partial.pth")
  with pytest.raises(SodecError, match="missing 1: features.28.bias"):
    convert.convert_lpips(str(tmp_path / "partial.pth"), str(tmp_path / "o"))
  with pytest.raises(SodecError, match="DISTS weights file not found"):
    convert.convert_dists(str(tmp_path / "nope.pt"), str(tmp_path / "o"), vgg=path)
  assert_out_clean(str(tmp_path / "o"))

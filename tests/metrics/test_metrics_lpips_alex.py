"""LPIPS-Alex (Flax) vs the lpips package's formula in plain torch (tests/reference/torch_lpips.py
with AlexNet's slices) over a plain-torch AlexNet written from torchvision's source
(tests/reference/torch_alexnet.py): same random AlexNet, the real alex heads read from the lpips
wheel's weights/v0.1/alex.pth with torch.load (lpips itself is not imported: it needs
torchvision). Also: the shipped heads are the wheel's, and the weight file loader."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import _photos  # noqa: E402
import torch_alexnet  # noqa: E402
import torch_lpips  # noqa: E402

from sodec_jax.errors import SodecError  # noqa: E402
from sodec_jax.metrics.lpips import LPIPSAlex  # noqa: E402
from sodec_jax.weights import lpips as lw  # noqa: E402


@pytest.fixture(scope="module")
def models():
  feats = torch_alexnet.alexnet_features(seed=0)
  heads = {
    k: v.numpy()
    for k, v in torch.load(lw.lpips_wheel_heads_path("alex"), map_location="cpu").items()
  }
  ref = torch_lpips.TorchLPIPS(feats, heads, slices=torch_lpips.ALEX_SLICES)
  ours = LPIPSAlex(torch_alexnet.features_state_dict_numpy(feats), lw.load_shipped_heads("alex"))
  return feats, ref, ours


def _torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_matches_torch_reference(models, size):
  _, ref, ours = models
  x = _photos.crops(size)
  y = _photos.degrade(x)
  with torch.no_grad():
    want, want_layers = ref(_torch(x), _torch(y), ret_per_layer=True)
  want = want.reshape(-1).numpy().astype(np.float64)
  fn = jax.jit(lambda a, b: (ours(a, b), ours.per_layer(a, b)))
  got, layers = (np.asarray(v, np.float64) for v in fn(x, y))
  assert np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  want_l = np.stack([w.reshape(-1).numpy() for w in want_layers]).astype(np.float64)
  np.testing.assert_allclose(layers, want_l, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(fn(x, x)[0]), 0.0, atol=1e-12)


def test_shipped_alex_heads_are_the_wheels():
  shipped = lw.load_shipped_heads("alex")
  wheel = lw.heads_from_lpips_wheel(net="alex")
  assert [shipped[k].shape[1] for k in lw.HEAD_KEYS] == [64, 192, 384, 256, 256]
  for k in lw.HEAD_KEYS:
    np.testing.assert_array_equal(shipped[k], wheel[k])


def test_load_lpips_alex_from_a_file(models, tmp_path):
  feats, _, ours = models
  path = tmp_path / "alexnet.pth"
  state = {f"features.{k}": v for k, v in feats.state_dict().items()}
  state["classifier.1.weight"] = torch.zeros(4, 9216)  # a whole alexnet() state dict: ignored
  torch.save(state, path)
  loaded = lw.load_lpips_alex(path)
  x = _photos.crops((64, 64))
  y = _photos.degrade(x)
  np.testing.assert_allclose(np.asarray(loaded(x, y)), np.asarray(ours(x, y)), rtol=1e-6)
  del state["features.8.bias"]
  torch.save(state, path)
  with pytest.raises(SodecError, match="features.8.bias"):
    lw.load_lpips_alex(path)
  with pytest.raises(SodecError, match="AlexNet weights file not found"):
    lw.load_lpips_alex(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="at least 31x31"):
    ours(x[:, :30, :30], y[:, :30, :30])


def test_training_loss_takes_lpips_net_alex(models, tmp_path):
  """loss.lpips_net='alex' builds the loss's LPIPS from lpips.alexnet_weights (and names that
  field when it is empty)."""
  from flax import nnx

  from sodec_jax.train import build
  from tests.conftest import make_micro_config

  feats, _, ours = models
  path = tmp_path / "alexnet.pth"
  torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
  c = make_micro_config(**{"loss.k_P": 1.0, "loss.lpips_net": "alex"})
  with pytest.raises(SodecError, match="lpips.alexnet_weights"):
    build.validate_config(c)
  c.lpips.alexnet_weights = str(path)
  build.validate_config(c)
  graphdef, state = build.load_lpips(c)
  fn = nnx.merge(graphdef, state)
  assert isinstance(fn, LPIPSAlex)
  x = _photos.crops((64, 64))
  y = _photos.degrade(x)
  np.testing.assert_allclose(np.asarray(fn(x, y)), np.asarray(ours(x, y)), rtol=1e-4)

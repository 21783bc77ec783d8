"""DISTS (Flax) vs golden values of the dists-pytorch package itself (independent), and vs the
DISTS_pytorch formula re-written in plain torch (tests/reference/torch_dists.py, from
DISTS_pytorch 0.1's DISTS_pt.py): same random VGG16, random positive alpha/beta, real photos.
And the alpha/beta loader (round trips, bad files, refused pickles).

dists-pytorch 0.1 is not installed here: DISTS_pt.py imports torchvision (never installed in this
project) and builds `models.vgg16(pretrained=True)`, a download. Its golden values were computed
once by tests/reference/upstream_goldens.py, running the wheel's DISTS_pt.py with a stand-in
`torchvision.models.vgg16` that returns the seed-1 VGG16 of tests/reference/torch_vgg16.py and
alpha/beta = torch_dists.random_alpha_beta(seed=1); the trunk's layout (torchvision cfg "D") is
the one part not from upstream."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import _photos  # noqa: E402
import torch_dists  # noqa: E402
import torch_vgg16  # noqa: E402

from sodec_jax.errors import SodecError  # noqa: E402
from sodec_jax.layers import FrozenWeight  # noqa: E402
from sodec_jax.metrics.dists import DISTS, hanning_filter, l2_pool  # noqa: E402
from sodec_jax.weights.dists import load_dists, load_dists_weights  # noqa: E402


@pytest.fixture(scope="module")
def models():
  feats = torch_vgg16.vgg16_features(seed=1)
  alpha, beta = torch_dists.random_alpha_beta(seed=1)
  ref = torch_dists.TorchDISTS(feats, torch.from_numpy(alpha), torch.from_numpy(beta))
  ours = DISTS(torch_vgg16.features_state_dict_numpy(feats), alpha, beta)
  return ref, ours, (alpha, beta)


def _torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_l2_pool_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 9, 12, 5)).astype(np.float32)
  want = torch_dists.L2pooling(channels=5)(_torch(x)).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(l2_pool(jnp.asarray(x)))
  assert got.shape == want.shape == (2, 5, 6, 5)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(
    hanning_filter(), np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
  )


@pytest.mark.parametrize("size", [(64, 64), (75, 53)])
def test_matches_torch_reference(models, size):
  ref, ours, _ = models
  x = _photos.crops(size)
  y = _photos.degrade(x)
  want = ref(_torch(x), _torch(y)).detach().numpy().astype(np.float64)
  got = np.asarray(jax.jit(lambda a, b: ours(a, b))(x, y), np.float64)
  err = np.abs(got - want)
  print(f"DISTS {size}: ours {got} torch {want} abs err {err}")
  assert np.all(want > 1e-3)
  assert err.max() <= 1e-5
  # the identical pair scores ~0 in both (cov and var are computed by different formulas)
  same = np.asarray(ours(x, x))
  same_ref = ref(_torch(x), _torch(x)).detach().numpy()
  assert np.abs(same).max() < 1e-4 and np.abs(same - same_ref).max() <= 1e-5


# DISTS_pytorch 0.1 DISTS_pt.DISTS(load_weights=False).forward(x, y) on _photos.crops(size) vs
# _photos.degrade (tests/reference/upstream_goldens.py), float32
DISTS_PYTORCH = {
  (64, 64): [0.007013916969299316, 0.00793755054473877],
  (75, 53): [0.005591392517089844, 0.008247137069702148],
}


@pytest.mark.parametrize("size", sorted(DISTS_PYTORCH))
def test_matches_dists_pytorch_golden(models, size):
  _, ours, _ = models
  x = _photos.crops(size)
  got = np.asarray(jax.jit(lambda a, b: ours(a, b))(x, _photos.degrade(x)), np.float64)
  np.testing.assert_allclose(got, DISTS_PYTORCH[size], rtol=0, atol=1e-6)


def test_gradient_finite_and_matches_torch(models):
  ref, ours, _ = models
  x = _photos.crops((48, 48))
  y = _photos.degrade(x)
  g = np.asarray(jax.jit(jax.grad(lambda a, b: jnp.sum(ours(a, b))))(x, y))
  xt = _torch(x).requires_grad_(True)
  ref(xt, _torch(y), require_grad=True).sum().backward()
  gt = xt.grad.numpy().transpose(0, 2, 3, 1)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  rel = np.linalg.norm(g - gt) / np.linalg.norm(gt)
  print(f"DISTS grad rel L2 err {rel:.2e}")
  assert rel <= 1e-4


def test_weights_are_frozen(models):
  _, ours, _ = models
  assert len(jax.tree.leaves(nnx.state(ours, nnx.Param))) == 0
  assert len(jax.tree.leaves(nnx.state(ours, FrozenWeight))) == 26 + 4
  with pytest.raises(ValueError, match="at least 16x16"):
    ours(jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))


def test_loader_round_trips(models, tmp_path):
  ref, ours, (alpha, beta) = models
  # the wheel's weights.pt layout: {'alpha': [1,1475,1,1], 'beta': [1,1475,1,1]} as torch tensors
  torch.save(
    {"alpha": torch.from_numpy(alpha), "beta": torch.from_numpy(beta)}, tmp_path / "weights.pt"
  )
  np.savez(tmp_path / "w.npz", alpha=alpha, beta=beta)
  for name in ("weights.pt", "w.npz"):
    a, b = load_dists_weights(tmp_path / name)
    np.testing.assert_array_equal(a, alpha.reshape(-1))
    np.testing.assert_array_equal(b, beta.reshape(-1))
  vgg = tmp_path / "vgg.pth"
  torch.save({k: torch.from_numpy(v) for k, v in ours.vgg.to_state_dict().items()}, vgg)
  loaded = load_dists(vgg, tmp_path / "weights.pt")
  x = _photos.crops((32, 32))
  np.testing.assert_allclose(
    np.asarray(loaded(x, x[::-1])), np.asarray(ours(x, x[::-1])), rtol=1e-6
  )


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_loader_errors(tmp_path):
  with pytest.raises(SodecError, match="not found"):
    load_dists_weights(tmp_path / "nothing.pt")
  np.savez(tmp_path / "short.npz", alpha=np.ones(10, np.float32), beta=np.ones(1475, np.float32))
  with pytest.raises(SodecError, match="alpha.*expected"):
    load_dists_weights(tmp_path / "short.npz")
  torch.save({"alpha": torch.ones(1, 1475, 1, 1)}, tmp_path / "nobeta.pt")
  with pytest.raises(SodecError, match="missing `beta`"):
    load_dists_weights(tmp_path / "nobeta.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(SodecError, match="could not read"):
    load_dists_weights(tmp_path / "junk.pt")
  marker = tmp_path / "pwned"
  torch.save({"alpha": _Evil(marker), "beta": torch.ones(1, 1475, 1, 1)}, tmp_path / "evil.pt")
  with pytest.raises(SodecError, match="refused"):
    load_dists_weights(tmp_path / "evil.pt")
  with open(tmp_path / "raw.pt", "wb") as f:
    pickle.dump({"alpha": _Evil(marker)}, f)
  with pytest.raises(SodecError):
    load_dists_weights(tmp_path / "raw.pt")
  assert not marker.exists(), "unpickling executed code"

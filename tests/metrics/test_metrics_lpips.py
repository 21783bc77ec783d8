"""LPIPS (Flax) vs the lpips package's formula in plain torch (tests/reference/torch_lpips.py), and
vs the lpips wheel's own `lpips.LPIPS` class (lpips 0.1.4, the independent reference): same
random VGG16, real heads.

`import lpips` fails here as installed: lpips/pretrained_networks.py does `from torchvision import
models as tv`, and torchvision is never installed in this project. `test_matches_the_lpips_package`
therefore puts a stand-in `torchvision` module (only `models.vgg16(pretrained=False).features`,
returning tests/reference/torch_vgg16.py's torchvision-layout VGG16 `features`) in sys.modules
while the wheel is imported and `lpips.LPIPS(net="vgg", pnet_rand=True)` is built; everything else
(ScalingLayer, the slices, normalize_tensor, the NetLinLayer heads read by the wheel from its own
weights/v0.1/vgg.pth, the spatial average) is the wheel's code. The VGG16 trunk is the one part
not from upstream (the real weights are ImageNet's; the layout is torchvision's cfg "D")."""

from __future__ import annotations

import sys
import types
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
import torch_lpips  # noqa: E402
import torch_vgg16  # noqa: E402

from sodec_jax.layers import FrozenWeight  # noqa: E402
from sodec_jax.metrics import LPIPS  # noqa: E402
from sodec_jax.weights.lpips import heads_from_lpips_wheel, load_shipped_heads  # noqa: E402


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  feats = torch_vgg16.vgg16_features(seed=0)
  heads = heads_from_lpips_wheel()
  ref = torch_lpips.TorchLPIPS(feats, heads)
  ours = LPIPS(torch_vgg16.features_state_dict_numpy(feats), load_shipped_heads())
  return ref, ours


@pytest.fixture(scope="module")
def lpips_package():
  """The lpips wheel's own LPIPS (VGG, v0.1), its trunk the seed-0 VGG16 of `models`."""
  feats = torch_vgg16.vgg16_features(seed=0)
  calls = []

  def vgg16(pretrained=True, **kwargs):
    calls.append((pretrained, kwargs))
    return types.SimpleNamespace(features=feats)

  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.vgg16 = vgg16
  assert "torchvision" not in sys.modules and "lpips" not in sys.modules
  sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
  try:
    import lpips

    net = lpips.LPIPS(
      net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False
    ).eval()
  finally:  # the stand-in and the wheel leave no trace for later tests
    for k in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "lpips")]:
      del sys.modules[k]
  assert calls == [(False, {})]  # pnet_rand: nothing downloaded, the trunk is ours
  return net


def _torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_matches_torch_reference(models, size):
  ref, ours = models
  x = _photos.crops(size)
  y = _photos.degrade(x)
  with torch.no_grad():
    want, want_layers = ref(_torch(x), _torch(y), ret_per_layer=True)
  want = want.reshape(-1).numpy().astype(np.float64)
  fn = jax.jit(lambda a, b: (ours(a, b), ours.per_layer(a, b)))
  got, layers = (np.asarray(v, np.float64) for v in fn(x, y))
  rel = np.abs(got - want) / np.abs(want)
  print(f"LPIPS {size}: ours {got} torch {want} rel err {rel}")
  assert np.all(want > 0)
  assert rel.max() <= 1e-5
  want_l = np.stack([w.reshape(-1).numpy() for w in want_layers]).astype(np.float64)
  np.testing.assert_allclose(layers, want_l, rtol=1e-5, atol=1e-9)
  # identical images -> 0
  same = np.asarray(fn(x, x)[0])
  np.testing.assert_allclose(same, 0.0, atol=1e-12)


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_matches_the_lpips_package(models, lpips_package, size):
  _, ours = models
  x = _photos.crops(size)
  y = _photos.degrade(x)
  with torch.no_grad():
    want = lpips_package(_torch(x), _torch(y), normalize=True).reshape(-1).numpy()
  got = np.asarray(jax.jit(ours)(x, y), np.float64)
  rel = np.abs(got - want) / np.abs(want)
  print(f"LPIPS {size} vs lpips.LPIPS: ours {got} lpips {want} rel err {rel}")
  assert np.all(want > 0) and rel.max() <= 1e-5


def test_gradient_finite_and_matches_torch(models):
  ref, ours = models
  x = _photos.crops((64, 64))
  y = _photos.degrade(x)
  grad_fn = jax.jit(jax.grad(lambda a, b: jnp.sum(ours(a, b))))
  g = np.asarray(grad_fn(x, y))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  xt = _torch(x).requires_grad_(True)
  ref(xt, _torch(y)).sum().backward()
  gt = xt.grad.numpy().transpose(0, 2, 3, 1)
  # Not elementwise: a 2x2 max-pool window whose two largest values differ by ~1e-6 (relative)
  # can pick a different argmax in XLA's and torch's float32 rounding, which routes that window's
  # gradient to a neighbouring pixel (both are valid subgradients; float64 JAX matches torch to
  # 2e-6). Globally the gradients agree closely.
  rel_l2 = np.linalg.norm(g - gt) / np.linalg.norm(gt)
  v = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  dd, dd_ref = float(np.sum(g * v)), float(np.sum(gt * v))
  print(f"LPIPS grad rel L2 err {rel_l2:.2e}, directional derivative {dd:.6g} vs {dd_ref:.6g}")
  assert rel_l2 <= 5e-3
  assert abs(dd - dd_ref) <= 1e-3 * abs(dd_ref)
  # gradients also finite at x == y and with constant (flat) images
  flat = jnp.full(x.shape, 0.5, jnp.float32)
  for a, b in ((y, y), (flat, flat + 0.01)):
    assert np.all(np.isfinite(np.asarray(grad_fn(a, b))))


def test_weights_are_frozen_and_nnx_jit(models):
  _, ours = models
  assert len(jax.tree.leaves(nnx.state(ours, nnx.Param))) == 0
  assert len(jax.tree.leaves(nnx.state(ours, FrozenWeight))) == 26 + 5 + 2
  x = jnp.asarray(_photos.crops((32, 32)))
  out = nnx.jit(lambda m, a, b: m(a, b))(ours, x, x[::-1])
  assert out.shape == (2,) and np.all(np.isfinite(np.asarray(out)))
  # the trainer's pattern: split once, pass the (frozen) state as a jit argument, merge inside
  graphdef, state = nnx.split(ours)
  out2 = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))(state, x, x[::-1])
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6)


def test_bfloat16_close(models):
  _, ours = models
  x = _photos.crops((32, 32))
  y = _photos.degrade(x)
  lo = LPIPS(ours.vgg.to_state_dict(), load_shipped_heads(), dtype=jnp.bfloat16)
  a, b = np.asarray(ours(x, y)), np.asarray(lo(x, y))
  assert b.dtype == np.float32
  np.testing.assert_allclose(b, a, rtol=0.1)


def test_shape_errors(models):
  _, ours = models
  with pytest.raises(ValueError, match="at least 16x16"):
    ours(jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))
  with pytest.raises(ValueError, match="same shape"):
    ours(jnp.zeros((1, 32, 32, 3)), jnp.zeros((2, 32, 32, 3)))


def test_shipped_heads_equal_wheel():
  shipped = load_shipped_heads()
  wheel = heads_from_lpips_wheel()
  assert sorted(shipped) == sorted(wheel)
  for k in wheel:
    assert shipped[k].dtype == wheel[k].dtype == np.float32
    assert shipped[k].shape == wheel[k].shape
    assert np.array_equal(shipped[k], wheel[k]), k


def test_normalize_zero_feature_vector_has_finite_grad():
  from sodec_jax.metrics.lpips import _normalize_channels

  f = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 8)), jnp.float32)
  f = f.at[0, 0, 0].set(0.0)  # an all-zero feature vector (all ReLUs off): torch's grad is NaN here
  n = _normalize_channels(f)
  ref = f / (jnp.sqrt(jnp.sum(f * f, -1, keepdims=True)) + 1e-10)
  np.testing.assert_array_equal(np.asarray(n), np.asarray(ref))
  g = jax.grad(lambda a: jnp.sum(_normalize_channels(a) * jnp.arange(8.0)))(f)
  assert np.all(np.isfinite(np.asarray(g)))

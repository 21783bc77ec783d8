"""How the golden values in tests/metrics/test_niqe.py and tests/metrics/test_dists.py were made:
by the upstream packages' own code, run once from their PyPI files (not installed: both
packages require torchvision, which this project never installs).

    pip download --no-deps basicsr==1.4.2 dists-pytorch==0.1 -d /tmp/up
    tar xzf /tmp/up/basicsr-1.4.2.tar.gz -C /tmp/up
    unzip -q /tmp/up/DISTS_pytorch-0.1-py3-none-any.whl -d /tmp/up/dists
    PYTHONPATH=. python tests/reference/upstream_goldens.py /tmp/up/basicsr-1.4.2 /tmp/up/dists

NIQE: basicsr/metrics/niqe.py `calculate_niqe(img, 0, input_order="HW")` (its float32 path) and
its `niqe()` core on the float64 image, with basicsr's shipped `niqe_pris_params.npz` (copied to
tests/data/basicsr_niqe_pris_params.npz), on scikit-image's gray photos. basicsr's package
__init__ imports torchvision, so its four modules are loaded by path; niqe.py's `import cv2`
(used only for convert_to="gray") gets an empty stand-in.

DISTS: DISTS_pytorch/DISTS_pt.py `DISTS(load_weights=False)` with alpha/beta set to
`torch_dists.random_alpha_beta(seed=1)` and its trunk the seed-1 VGG16 of
tests/reference/torch_vgg16.py (a stand-in `torchvision.models.vgg16` returns it), on
tests/metrics/_photos.py's crops.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def basicsr_niqe(root: str) -> None:
  from skimage import data

  b = os.path.join(root, "basicsr")
  sys.modules.setdefault("cv2", types.ModuleType("cv2"))
  for pkg in ("basicsr", "basicsr.utils", "basicsr.metrics"):
    sys.modules[pkg] = types.ModuleType(pkg)
  _load("basicsr.utils.registry", os.path.join(b, "utils", "registry.py"))
  color = _load("basicsr.utils.color_util", os.path.join(b, "utils", "color_util.py"))
  sys.modules["basicsr.utils"].bgr2ycbcr = color.bgr2ycbcr
  _load("basicsr.utils.matlab_functions", os.path.join(b, "utils", "matlab_functions.py"))
  _load("basicsr.metrics.metric_util", os.path.join(b, "metrics", "metric_util.py"))
  niqe = _load("basicsr.metrics.niqe", os.path.join(b, "metrics", "niqe.py"))
  p = np.load(os.path.join(b, "metrics", "niqe_pris_params.npz"))
  for name in ("camera", "coins", "moon"):
    img = getattr(data, name)()
    f32 = niqe.calculate_niqe(img, 0, input_order="HW")
    f64 = niqe.niqe(
      img.astype(np.float64), p["mu_pris_param"], p["cov_pris_param"], p["gaussian_window"]
    )
    print(f"NIQE {name} {img.shape}: calculate_niqe {f32!r}  float64 core {f64!r}")


def dists_pytorch(root: str) -> None:
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics")
  )
  import _photos
  import torch_dists
  import torch_vgg16

  feats = torch_vgg16.vgg16_features(seed=1)
  tv = types.ModuleType("torchvision")
  tv.models = types.SimpleNamespace(
    vgg16=lambda pretrained=True: types.SimpleNamespace(features=feats)
  )
  tv.transforms = types.ModuleType("torchvision.transforms")
  sys.modules["torchvision"] = tv
  dists = _load("DISTS_pt", os.path.join(root, "DISTS_pytorch", "DISTS_pt.py"))
  model = dists.DISTS(load_weights=False).eval()
  alpha, beta = torch_dists.random_alpha_beta(seed=1)
  model.alpha.data = torch.from_numpy(alpha).reshape(model.alpha.shape)
  model.beta.data = torch.from_numpy(beta).reshape(model.beta.shape)
  for size in ((64, 64), (75, 53)):
    x = _photos.crops(size)
    y = _photos.degrade(x)
    t = [torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, y)]
    print(f"DISTS {size}: {model(*t).detach().numpy().astype(np.float64).tolist()!r}")


if __name__ == "__main__":
  basicsr_niqe(sys.argv[1])
  dists_pytorch(sys.argv[2])

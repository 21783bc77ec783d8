"""LPIPS v0.1 (VGG or AlexNet trunk) in plain torch: the `lpips` package's formula, without
importing lpips (which needs torchvision). Written from lpips/lpips.py (LPIPS.forward) and
lpips/pretrained_networks.py (the trunks' slices), richzhang/PerceptualSimilarity at commit
9606c353e5777fc95186a5a4c876e7c6a17651a6 (= the lpips 0.1.4 wheel).

lpips.LPIPS(net='vgg', version='0.1').forward(in0, in1, normalize=True):
  in = 2 * in - 1                                   (normalize=True: [0,1] -> [-1,1])
  in = (in - shift) / scale                         (ScalingLayer)
  taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3  (vgg16 features[0:4], [4:9], [9:16], [16:23], [23:30])
  f = f / (sqrt(sum_c f^2) + 1e-10)                 (lpips.normalize_tensor)
  d = (f0 - f1)^2
  res_l = mean_hw(conv1x1(d, lin_l, bias=False))    (NetLinLayer; dropout is identity in eval)
  val = sum_l res_l                                 -> [N, 1, 1, 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHIFT = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
SCALE = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
# pretrained_networks.alexnet: relu1 = features[0:2], relu2 [2:5], relu3 [5:8], relu4 [8:10],
# relu5 [10:12]
ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))


def normalize_tensor(in_feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
  norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
  return in_feat / (norm_factor + eps)


def vgg_taps(features: nn.Sequential, x: torch.Tensor, slices=SLICES) -> list[torch.Tensor]:
  outs = []
  h = x
  for a, b in slices:
    for i in range(a, b):
      h = features[i](h)
    outs.append(h)
  return outs


class TorchLPIPS(nn.Module):
  """features: torchvision-layout vgg16 `features` (or alexnet's, with slices=ALEX_SLICES);
  heads: {'lin{i}.model.1.weight': [1,C,1,1]}."""

  def __init__(self, features: nn.Sequential, heads: dict, slices=SLICES):
    super().__init__()
    self.features = features.eval()
    self.slices = slices
    self.lins = [torch.as_tensor(heads[f"lin{i}.model.1.weight"]).float() for i in range(5)]

  def forward(
    self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = True, ret_per_layer: bool = False
  ):
    """in0, in1: NCHW; in [0,1] with normalize=True, else in [-1,1]. Returns [N, 1, 1, 1]."""
    if normalize:
      in0 = 2 * in0 - 1
      in1 = 2 * in1 - 1
    in0 = (in0 - SHIFT) / SCALE
    in1 = (in1 - SHIFT) / SCALE
    outs0 = vgg_taps(self.features, in0, self.slices)
    outs1 = vgg_taps(self.features, in1, self.slices)
    res = []
    for kk in range(5):
      f0, f1 = normalize_tensor(outs0[kk]), normalize_tensor(outs1[kk])
      diff = (f0 - f1) ** 2
      res.append(F.conv2d(diff, self.lins[kk]).mean([2, 3], keepdim=True))
    val = sum(res)
    return (val, res) if ret_per_layer else val

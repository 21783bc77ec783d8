"""DISTS in plain torch: the `DISTS_pytorch.DISTS` formula (dists-pytorch package), without
importing it (its module imports torchvision for `models.vgg16`).

  L2pooling(filter_size=5, stride=2, channels=C): padding (5-2)//2 = 1,
    g = outer(hanning(5)[1:-1]) / sum, out = sqrt(conv2d(x**2, g, stride 2, padding 1, groups C) + 1e-12)
  stage1 = features[0:4]; stage2..5 = L2pooling + features[5:9], [10:16], [17:23], [24:30]
  forward_once(x) = [x, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] with h = (x - mean) / std
  forward(x, y): w_sum = alpha.sum() + beta.sum(); alpha, beta split by chns [3,64,128,256,512,512]
    dist1 += (alpha_k * (2 mx my + c1) / (mx^2 + my^2 + c1)).sum(1)
    dist2 += (beta_k * (2 cov + c2) / (vx + vy + c2)).sum(1),  c1 = c2 = 1e-6
    score = 1 - (dist1 + dist2).squeeze()
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class L2pooling(nn.Module):
  def __init__(self, filter_size=5, stride=2, channels=None, pad_off=0):
    super().__init__()
    self.padding = (filter_size - 2) // 2
    self.stride = stride
    self.channels = channels
    a = np.hanning(filter_size)[1:-1]
    g = torch.Tensor(a[:, None] * a[None, :])
    g = g / torch.sum(g)
    self.register_buffer("filter", g[None, None, :, :].repeat((self.channels, 1, 1, 1)))

  def forward(self, input):
    input = input**2
    out = F.conv2d(
      input, self.filter, stride=self.stride, padding=self.padding, groups=input.shape[1]
    )
    return (out + 1e-12).sqrt()


class TorchDISTS(nn.Module):
  """features: torchvision-layout vgg16 `features` (nn.Sequential); alpha, beta: [1, 1475, 1, 1]."""

  def __init__(self, features: nn.Sequential, alpha, beta):
    super().__init__()
    self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = (
      nn.Sequential() for _ in range(5)
    )
    for x in range(0, 4):
      self.stage1.add_module(str(x), features[x])
    self.stage2.add_module(str(4), L2pooling(channels=64))
    for x in range(5, 9):
      self.stage2.add_module(str(x), features[x])
    self.stage3.add_module(str(9), L2pooling(channels=128))
    for x in range(10, 16):
      self.stage3.add_module(str(x), features[x])
    self.stage4.add_module(str(16), L2pooling(channels=256))
    for x in range(17, 23):
      self.stage4.add_module(str(x), features[x])
    self.stage5.add_module(str(23), L2pooling(channels=512))
    for x in range(24, 30):
      self.stage5.add_module(str(x), features[x])
    for param in self.parameters():
      param.requires_grad = False
    self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
    self.chns = [3, 64, 128, 256, 512, 512]
    self.alpha = nn.Parameter(torch.as_tensor(alpha).float().reshape(1, sum(self.chns), 1, 1))
    self.beta = nn.Parameter(torch.as_tensor(beta).float().reshape(1, sum(self.chns), 1, 1))
    self.eval()

  def forward_once(self, x):
    h = (x - self.mean) / self.std
    h = self.stage1(h)
    h_relu1_2 = h
    h = self.stage2(h)
    h_relu2_2 = h
    h = self.stage3(h)
    h_relu3_3 = h
    h = self.stage4(h)
    h_relu4_3 = h
    h = self.stage5(h)
    h_relu5_3 = h
    return [x, h_relu1_2, h_relu2_2, h_relu3_3, h_relu4_3, h_relu5_3]

  def forward(self, x, y, require_grad=False, batch_average=False):
    if require_grad:
      feats0 = self.forward_once(x)
      feats1 = self.forward_once(y)
    else:
      with torch.no_grad():
        feats0 = self.forward_once(x)
        feats1 = self.forward_once(y)
    dist1 = 0
    dist2 = 0
    c1 = 1e-6
    c2 = 1e-6
    w_sum = self.alpha.sum() + self.beta.sum()
    alpha = torch.split(self.alpha / w_sum, self.chns, dim=1)
    beta = torch.split(self.beta / w_sum, self.chns, dim=1)
    for k in range(len(self.chns)):
      x_mean = feats0[k].mean([2, 3], keepdim=True)
      y_mean = feats1[k].mean([2, 3], keepdim=True)
      S1 = (2 * x_mean * y_mean + c1) / (x_mean**2 + y_mean**2 + c1)
      dist1 = dist1 + (alpha[k] * S1).sum(1, keepdim=True)
      x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
      y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
      xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
      S2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
      dist2 = dist2 + (beta[k] * S2).sum(1, keepdim=True)
    score = 1 - (dist1 + dist2).squeeze()
    if batch_average:
      return score.mean()
    return score


def random_alpha_beta(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Positive alpha/beta [1, 1475, 1, 1] (DISTS initialises them as N(0.1, 0.01))."""
  rng = np.random.default_rng(seed)
  a = np.abs(rng.normal(0.1, 0.05, (1, 1475, 1, 1))).astype(np.float32) + 1e-3
  b = np.abs(rng.normal(0.1, 0.05, (1, 1475, 1, 1))).astype(np.float32) + 1e-3
  return a, b

"""Plain-torch AlexNet `features` with torchvision's layout and state-dict keys (no torchvision).

Written from pytorch/vision torchvision/models/alexnet.py at commit
29032aaf498f6b21faf460ac1acf3f7745b9516e (`AlexNet.features`): Conv2d(3, 64, 11, stride 4,
padding 2), ReLU, MaxPool2d(3, 2), Conv2d(64, 192, 5, padding 2), ReLU, MaxPool2d(3, 2),
Conv2d(192, 384, 3, padding 1), ReLU, Conv2d(384, 256, 3, padding 1), ReLU, Conv2d(256, 256, 3,
padding 1), ReLU, MaxPool2d(3, 2); keys `0.weight` ... `10.bias`. Random weights (He normal,
small random biases): the layout, not ImageNet's values, is what the comparison checks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def alexnet_features(seed: int = 0) -> nn.Sequential:
  features = nn.Sequential(
    nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
    nn.ReLU(inplace=True),
    nn.MaxPool2d(kernel_size=3, stride=2),
    nn.Conv2d(64, 192, kernel_size=5, padding=2),
    nn.ReLU(inplace=True),
    nn.MaxPool2d(kernel_size=3, stride=2),
    nn.Conv2d(192, 384, kernel_size=3, padding=1),
    nn.ReLU(inplace=True),
    nn.Conv2d(384, 256, kernel_size=3, padding=1),
    nn.ReLU(inplace=True),
    nn.Conv2d(256, 256, kernel_size=3, padding=1),
    nn.ReLU(inplace=True),
    nn.MaxPool2d(kernel_size=3, stride=2),
  )
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in features:
      if isinstance(m, nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * np.sqrt(2.0 / fan_out))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
  return features.eval()


def features_state_dict_numpy(features: nn.Sequential) -> dict[str, np.ndarray]:
  """`features.{i}.weight|bias` -> float32 numpy."""
  return {
    f"features.{k}": v.detach().cpu().numpy().astype(np.float32)
    for k, v in features.state_dict().items()
  }

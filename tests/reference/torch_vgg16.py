"""Plain-torch VGG16 `features` with torchvision's layout and state-dict keys (no torchvision).

`vgg16_features()` is `torchvision.models.vgg16().features`: 13 Conv2d(3x3, padding 1) + ReLU,
MaxPool2d(2, 2) after each of the 5 blocks; state-dict keys `0.weight` ... `28.bias` (prefixed
`features.` inside `VGG16FeaturesOnly`). Random init follows torchvision's `_initialize_weights`
(kaiming_normal_ fan_out / relu, zero bias), optionally with small random biases.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# torchvision cfg "D"
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_features(seed: int = 0, random_bias: bool = True) -> nn.Sequential:
  layers: list[nn.Module] = []
  c_in = 3
  for v in VGG16_CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      c_in = v
  features = nn.Sequential(*layers)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in features:
      if isinstance(m, nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * np.sqrt(2.0 / fan_out))
        if random_bias:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
        else:
          m.bias.zero_()
  return features.eval()


class VGG16FeaturesOnly(nn.Module):
  """Holds `features` so that `state_dict()` has torchvision keys `features.{i}.weight|bias`."""

  def __init__(self, seed: int = 0, random_bias: bool = True):
    super().__init__()
    self.features = vgg16_features(seed, random_bias)


def features_state_dict_numpy(features: nn.Sequential) -> dict[str, np.ndarray]:
  """`features.{i}.weight|bias` -> float32 numpy."""
  return {
    f"features.{k}": v.detach().cpu().numpy().astype(np.float32)
    for k, v in features.state_dict().items()
  }

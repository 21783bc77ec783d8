"""Plain-PyTorch reference of the HiFiC PyTorch implementation's Discriminator (tests only).

Same layout and state-dict keys as `src/network/discriminator.py` of the widely used
re-implementation: `context_conv.{weight,bias}` (3x3, reflect pad 1, C -> 12), nearest x16
upsample, `conv{1..4}` = spectral_norm(Conv2d(k=4, stride=2, padding=1, padding_mode='reflect'))
with keys `weight_orig`, `weight_u`, `weight_v`, `bias`, leaky ReLU 0.2 everywhere, and a plain
`conv_out` 1x1 -> 1. NCHW, torch semantics. forward returns (sigmoid(logits), logits [B*N, 1]).
"""
import torch
import torch.nn as nn


class Discriminator(nn.Module):
  def __init__(self, C, context_C_out=12, filters=(64, 128, 256, 512), im_channels=3):
    super().__init__()
    self.context_conv = nn.Conv2d(C, context_C_out, kernel_size=3, padding=1,
                                  padding_mode="reflect")
    self.context_upsample = nn.Upsample(scale_factor=16, mode="nearest")
    cnn_kwargs = dict(stride=2, padding=1, padding_mode="reflect")
    self.activation = nn.LeakyReLU(negative_slope=0.2)
    norm = nn.utils.spectral_norm
    widths = (im_channels + context_C_out,) + tuple(filters)
    for i in range(4):
      setattr(self, f"conv{i + 1}", norm(nn.Conv2d(widths[i], widths[i + 1], 4, **cnn_kwargs)))
    self.conv_out = nn.Conv2d(filters[-1], 1, kernel_size=1, stride=1)

  def forward(self, x, y):
    y = self.activation(self.context_conv(y))
    y = self.context_upsample(y)
    x = torch.cat((x, y), dim=1)
    for i in range(4):
      x = self.activation(getattr(self, f"conv{i + 1}")(x))
    out_logits = self.conv_out(x).view(-1, 1)
    return torch.sigmoid(out_logits), out_logits


def non_saturating_loss(d_real_logits, d_gen_logits):
  """HiFiC's `_non_saturating_loss` -> (D_loss, G_loss)."""
  bce = nn.functional.binary_cross_entropy_with_logits
  d_loss = (bce(d_real_logits, torch.ones_like(d_real_logits))
            + bce(d_gen_logits, torch.zeros_like(d_gen_logits)))
  g_loss = bce(d_gen_logits, torch.ones_like(d_gen_logits))
  return d_loss, g_loss

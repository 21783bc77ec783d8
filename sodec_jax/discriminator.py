"""HiFiC's conditional PatchGAN discriminator (stage-4 finetune, paper Eq. 12: + beta * L_g).

Layout of the HiFiC PyTorch re-implementation (Justin-Tan/high-fidelity-generative-compression,
`src/network/discriminator.py`), NHWC here:

  y_hat [B, h, w, C] -> reflect-pad 1, conv3x3 C -> 12 (+bias), leaky ReLU 0.2
                     -> nearest upsample x16 -> [B, 16h, 16w, 12]
  concat with image [B, H, W, 3] (image first, then context; H = 16h, W = 16w)
  4 x (reflect-pad 1, spectral-norm conv4x4 stride 2 (+bias), leaky ReLU 0.2): 64, 128, 256, 512
  conv1x1 512 -> 1 (+bias; NOT spectral-normed in HiFiC)  -> logits [B, H/16 * W/16]

HiFiC returns `(sigmoid(logits), logits)` with logits viewed as [B*N, 1]; we return only the
logits as [B, N] (row-major over the H/16 x W/16 output grid, the same numbers in the same
order). `jax.nn.sigmoid(logits)` gives HiFiC's probabilities. Images are fed as HiFiC feeds
them with `normalize_input_image=False`: RGB in [0, 1].

Spectral norm follows `torch.nn.utils.spectral_norm` (n_power_iterations=1, eps=1e-12, dim=0):
W_mat = weight_orig reshaped to [out, in*kh*kw] in torch's (in, kh, kw) order; with
`update_stats=True` (torch's training mode) one power iteration
  v <- normalize(W_mat^T u), u <- normalize(W_mat v)      (normalize: x / max(||x||, eps))
is run without gradient and stored; then sigma = u . (W_mat v) (gradient flows through W only)
and the conv uses W / sigma. With `update_stats=False` (torch's eval mode) the stored u, v are
used as they are. u, v live in `SpectralState` variables (not `nnx.Param`, so an optimizer over
`nnx.Param` never sees them); under `nnx.split(model, nnx.Param, ...)` + `nnx.merge` inside
`jax.jit`, read the updated values back with `nnx.state(merged, SpectralState)`.

Key map (`sodec_jax.weights.hific.load_hific_discriminator`; torch key under `Discriminator.` ->
our path; conv weights [O, I, kh, kw] ->
kernel [kh, kw, I, O] = w.transpose(2, 3, 1, 0); everything else copied as is):

  context_conv.weight       -> context_conv.kernel   (transpose)
  context_conv.bias         -> context_conv.bias
  conv{k}.weight_orig       -> conv{k}.kernel        (transpose; the unnormalised weight)
  conv{k}.bias              -> conv{k}.bias
  conv{k}.weight_u  [O]     -> conv{k}.u             (SpectralState)
  conv{k}.weight_v  [I*kh*kw] -> conv{k}.v           (SpectralState, torch's (I, kh, kw) order)
  conv_out.weight           -> conv_out.kernel       (transpose)
  conv_out.bias             -> conv_out.bias
for k = 1..4. torch's spectral_norm keeps no `conv{k}.weight` in the state dict (it is
recomputed every forward); one is rejected as unexpected.

Deviation from HiFiC kept on purpose (see `sodec_jax.gan.real_fake_logits`): HiFiC pairs the
concatenated images [x_0..x_{B-1}, x_hat_0..x_hat_{B-1}] with
`repeat_interleave(y_hat, 2, dim=0)` = [y_0, y_0, y_1, y_1, ...], which mismatches image and
context for batch > 1; we pair each image with its own y_hat. At batch 1 the two agree.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.layers import Conv2d

UPSAMPLE = 16  # HiFiC's fixed context upsampling factor (nn.Upsample(scale_factor=16))
_DIMS = ("NHWC", "HWIO", "NHWC")
_EPS = 1e-12  # torch.nn.utils.spectral_norm default


class SpectralState(nnx.Variable):
  """Power-iteration vectors u, v of a spectral-norm layer: state, not trained parameters."""


def _normalize(x: jax.Array) -> jax.Array:
  """torch.nn.functional.normalize(x, dim=0, eps=1e-12) for a vector."""
  return x / jnp.maximum(jnp.linalg.norm(x), _EPS)


class SpectralConv2d(nnx.Module):
  """Conv2d wrapped in torch's `spectral_norm`, reflect padding, PyTorch output size.

  x [B, H, W, in_ch] -> [B, (H + 2p - k) // stride + 1, ..., out_ch].
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    k = kernel_size
    fan_in = in_ch * k * k
    bound = 1.0 / math.sqrt(fan_in)  # torch's default Conv2d init
    self.kernel = nnx.Param(
      jax.random.uniform(rngs.params(), (k, k, in_ch, out_ch), param_dtype, -bound, bound)
    )
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_ch,), param_dtype, -bound, bound))
    # torch: u, v = normalize(normal(0, 1)) at wrap time, no power iteration until a forward.
    self.u = SpectralState(_normalize(jax.random.normal(rngs.params(), (out_ch,), param_dtype)))
    self.v = SpectralState(_normalize(jax.random.normal(rngs.params(), (fan_in,), param_dtype)))
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def weight_matrix(self) -> jax.Array:
    """The unnormalised weight as torch's W_mat [out, in*kh*kw] (float32)."""
    w = self.kernel[...].astype(jnp.float32)  # [kh, kw, in, out]
    return jnp.transpose(w, (3, 2, 0, 1)).reshape(w.shape[3], -1)

  def normalized_kernel(self, update_stats: bool) -> jax.Array:
    """kernel / sigma (HWIO, float32); runs one power iteration and stores u, v if update_stats."""
    w_mat = self.weight_matrix()
    u = self.u[...].astype(jnp.float32)
    v = self.v[...].astype(jnp.float32)
    if update_stats:
      w_sg = jax.lax.stop_gradient(w_mat)
      v = _normalize(w_sg.T @ u)
      u = _normalize(w_sg @ v)
      self.u.set_value(u.astype(self.u[...].dtype))
      self.v.set_value(v.astype(self.v[...].dtype))
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, w_mat @ v)
    return self.kernel[...].astype(jnp.float32) / sigma

  def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
    kernel = self.normalized_kernel(update_stats).astype(self.dtype)
    x = x.astype(self.dtype)
    p = self.padding
    if p:
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    y = jax.lax.conv_general_dilated(
      x, kernel, (self.stride, self.stride), ((0, 0), (0, 0)), dimension_numbers=_DIMS
    )
    return y + self.bias[...].astype(self.dtype)


#: HiFiC's widths of the four spectral-norm convs
HIFIC_FILTERS = (64, 128, 256, 512)


class Discriminator(nnx.Module):
  """HiFiC's conditional discriminator D(image, y_hat) -> logits [B, (H/16) * (W/16)].

  Args:
    latent_channels: C of y_hat (HiFiC: 220).
    filters: widths of the four spectral-norm 4x4 stride-2 convs.
    context_channels: width of the y_hat context branch (HiFiC: 12).
  """

  def __init__(
    self,
    latent_channels: int,
    *,
    filters: Sequence[int] = HIFIC_FILTERS,
    context_channels: int = 12,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if len(filters) != 4:
      raise SodecError(f"Discriminator filters must have 4 entries (HiFiC layout), got {filters}")
    self.latent_channels = latent_channels
    self.filters = tuple(int(f) for f in filters)
    self.context_channels = context_channels
    self.dtype = dtype
    self.context_conv = Conv2d(
      latent_channels,
      context_channels,
      3,
      padding=1,
      padding_mode="reflect",
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    widths = (3 + context_channels,) + self.filters
    for i in range(4):
      setattr(
        self,
        f"conv{i + 1}",
        SpectralConv2d(
          widths[i],
          widths[i + 1],
          4,
          stride=2,
          padding=1,
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=rngs,
        ),
      )
    self.conv_out = Conv2d(self.filters[-1], 1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, image: jax.Array, y_hat: jax.Array, *, update_stats: bool) -> jax.Array:
    """image [B, H, W, 3] in [0, 1]; y_hat [B, H/16, W/16, C] -> logits [B, N] (dtype float32).

    update_stats: run torch's training-mode power iteration and store u, v (True in training
    steps, as HiFiC's Discriminator is in train() mode there); False = torch's eval mode.
    """
    b, h, w, c = y_hat.shape
    if image.ndim != 4 or image.shape[-1] != 3 or c != self.latent_channels:
      raise SodecError(
        f"Discriminator expects image [B, H, W, 3] and y_hat [B, h, w, "
        f"{self.latent_channels}], got {image.shape} and {y_hat.shape}"
      )
    if image.shape[:3] != (b, h * UPSAMPLE, w * UPSAMPLE):
      raise SodecError(
        f"Discriminator: image {image.shape[1:3]} must be {UPSAMPLE}x the y_hat "
        f"grid {(h, w)} (and the batch sizes equal): got image {image.shape}, "
        f"y_hat {y_hat.shape}"
      )
    ctx = jax.nn.leaky_relu(self.context_conv(y_hat), 0.2)
    ctx = jnp.repeat(jnp.repeat(ctx, UPSAMPLE, axis=1), UPSAMPLE, axis=2)  # nearest x16
    x = jnp.concatenate([image.astype(self.dtype), ctx.astype(self.dtype)], axis=-1)
    for i in range(4):
      x = jax.nn.leaky_relu(getattr(self, f"conv{i + 1}")(x, update_stats=update_stats), 0.2)
    logits = self.conv_out(x)
    return logits.reshape(b, -1).astype(jnp.float32)

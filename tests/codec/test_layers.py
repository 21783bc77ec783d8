"""Layers with PyTorch semantics against torch itself (same random weights)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sodec_jax.layers import ChannelNorm, Conv2d, ConvTranspose2d


@pytest.mark.parametrize(
  "k,s,p,op", [(3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 1, 0), (4, 2, 1, 0), (3, 2, 1, 0)]
)
def test_conv_transpose_matches_torch(k, s, p, op):
  """Covers the sub-pixel fast path (output = s x input) and the dilated general path."""
  ours = ConvTranspose2d(6, 5, k, stride=s, padding=p, output_padding=op, rngs=nnx.Rngs(0))
  ref = torch.nn.ConvTranspose2d(6, 5, k, stride=s, padding=p, output_padding=op)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.array(ours.kernel[...]).transpose(2, 3, 0, 1)))
    ref.bias.copy_(torch.from_numpy(np.array(ours.bias[...])))
  x = np.random.default_rng(0).normal(size=(2, 7, 9, 6)).astype(np.float32)
  got = np.asarray(ours(jnp.asarray(x)))
  want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,pad", [("reflect", (1, 0, 0, 1)), ("zeros", 2), ("reflect", 3)])
def test_conv_matches_torch(mode, pad):
  ours = Conv2d(4, 6, 3, stride=2, padding=pad, padding_mode=mode, rngs=nnx.Rngs(1))
  x = np.random.default_rng(1).normal(size=(1, 11, 10, 4)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  top, bottom, left, right = (pad,) * 4 if isinstance(pad, int) else pad
  if mode == "reflect":
    xt = torch.nn.functional.pad(xt, (left, right, top, bottom), mode="reflect")
  else:
    xt = torch.nn.functional.pad(xt, (left, right, top, bottom))
  w = torch.from_numpy(np.array(ours.kernel[...]).transpose(3, 2, 0, 1))
  want = torch.nn.functional.conv2d(xt, w, torch.from_numpy(np.array(ours.bias[...])), stride=2)
  np.testing.assert_allclose(
    np.asarray(ours(jnp.asarray(x))), want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
  )


def test_channel_norm_closed_form():
  x = np.random.default_rng(2).normal(size=(2, 3, 4, 8)).astype(np.float32)
  y = np.asarray(ChannelNorm(8, eps=1e-3)(jnp.asarray(x)))
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-3)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "mode,size,batch",
  [("reflect", (13, 22), 2), ("zeros", (8, 8), 1), ("zeros", (1, 5), 1), ("reflect", (2, 3), 1)],
)
def test_winograd_conv_matches_torch(mode, size, batch):
  """Winograd F(4x4, 3x3) (use_winograd) against torch's direct conv, sides not multiples of 4."""
  from sodec_jax.layers import use_winograd

  ours = Conv2d(24, 16, 3, padding=1, padding_mode=mode, rngs=nnx.Rngs(3))
  x = np.random.default_rng(3).normal(size=(batch, *size, 24)).astype(np.float32)
  direct = np.asarray(ours(jnp.asarray(x)))
  assert use_winograd(ours, min_channels=16) == 1 and ours.winograd[...].shape == (36, 24, 16)
  got = np.asarray(ours(jnp.asarray(x)))
  xt = torch.nn.functional.pad(
    torch.from_numpy(x.transpose(0, 3, 1, 2)),
    (1, 1, 1, 1),
    mode="reflect" if mode == "reflect" else "constant",
  )
  w = torch.from_numpy(np.array(ours.kernel[...]).transpose(3, 2, 0, 1))
  want = torch.nn.functional.conv2d(xt, w, torch.from_numpy(np.array(ours.bias[...])))
  want = want.numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < 1e-5, err
  assert not np.array_equal(got, direct)  # it did take the Winograd path


def test_use_winograd_eligibility():
  from sodec_jax.layers import ResidualBlock, use_winograd

  rngs = nnx.Rngs(0)
  block = ResidualBlock(32, rngs=rngs)
  strided = Conv2d(32, 32, 3, stride=2, padding=1, rngs=rngs)
  five = Conv2d(32, 32, 5, padding=2, rngs=rngs)
  narrow = Conv2d(8, 32, 3, padding=1, rngs=rngs)
  # the default threshold (WINOGRAD_MIN_CHANNELS = 192 in and out) leaves 32 channels direct
  assert use_winograd(block) == 0
  assert block.conv1.winograd is None and block.conv2.winograd is None
  assert use_winograd(Conv2d(191, 192, 3, padding=1, rngs=rngs)) == 0
  assert use_winograd(Conv2d(192, 192, 3, padding=1, rngs=rngs)) == 1
  assert use_winograd(block, min_channels=16) == 2
  assert block.conv1.winograd is not None and block.conv2.winograd is not None
  for conv in (strided, five, narrow):
    assert use_winograd(conv, min_channels=16) == 0 and conv.winograd is None
  bf16 = Conv2d(32, 32, 3, padding=1, dtype=jnp.bfloat16, rngs=rngs)
  assert use_winograd(bf16, min_channels=16) == 0


def test_subpixel_kernels_precomputed_same_outputs():
  """use_subpixel_kernels stores the rearranged kernel once; outputs are the same bits."""
  from sodec_jax.layers import use_subpixel_kernels

  m = ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1, rngs=nnx.Rngs(4))
  general = ConvTranspose2d(6, 5, 3, stride=1, padding=1, rngs=nnx.Rngs(4))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 7, 9, 6)).astype(np.float32))
  before = np.asarray(m(x))
  assert use_subpixel_kernels(m) == 1 and m.subpixel[...].shape == (3, 3, 6, 20)
  assert use_subpixel_kernels(general) == 0 and general.subpixel is None
  np.testing.assert_array_equal(np.asarray(m(x)), before)

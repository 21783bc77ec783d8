"""The colour correction of the diffusion output against x_f (sodec_jax/color_fix.py).

Reference: StableSR's colour fix, re-implemented below in plain torch from
github.com/IceClear/StableSR, scripts/wavelet_color_fix.py at commit
4b2ac150d288976f7c27cabe58eee16b447f8ce8 (NCHW; `wavelet_blur`: the 3x3 kernel
[[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]] repeated over 3
channels, `F.pad(..., mode="replicate")` by the radius, `F.conv2d(groups=3, dilation=radius)`;
`wavelet_decomposition`: radius 2**i for i < levels, high += image - low; `calc_mean_std`:
`var(dim=2)` (unbiased) + 1e-5, sqrt; upstream fixes levels at 5, OSEDiff's copy
(cswry/OSEDiff, my_utils/wavelet_color_fix.py) is the same, chaiNNer's passes `levels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from sodec_jax import color_fix
from sodec_jax.errors import SodecError
from tests.conftest import make_micro_sodec_config


def _torch_wavelet_blur(image, radius):
  k = torch.tensor(
    [[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=image.dtype
  )
  k = k[None, None].repeat(3, 1, 1, 1)
  image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
  return F.conv2d(image, k, groups=3, dilation=radius)


def _torch_wavelet_decomposition(image, levels):
  high = torch.zeros_like(image)
  for i in range(levels):
    low = _torch_wavelet_blur(image, 2**i)
    high += image - low
    image = low
  return high, low


def _torch_wavelet_reconstruction(content, style, levels=5):
  return (
    _torch_wavelet_decomposition(content, levels)[0]
    + _torch_wavelet_decomposition(style, levels)[1]
  )


def _torch_calc_mean_std(feat, eps=1e-5):
  b, c = feat.shape[:2]
  std = (feat.reshape(b, c, -1).var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)
  return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), std


def _torch_adain(content, style):
  s_mean, s_std = _torch_calc_mean_std(style)
  c_mean, c_std = _torch_calc_mean_std(content)
  return (content - c_mean) / c_std * s_std + s_mean


def _images(seed=0, shape=(2, 37, 53, 3)):
  rng = np.random.default_rng(seed)
  smooth = rng.uniform(0.2, 0.8, (shape[0], 1, 1, 3))  # different colours per image
  return [(smooth + 0.2 * rng.standard_normal(shape)).astype(np.float32) for _ in range(2)]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("levels", [5, 3])
@pytest.mark.parametrize("xp", ["jax", "numpy"])
def test_wavelet_matches_stablesr(levels, xp):
  content, reference = _images(levels)
  want = _nhwc(_torch_wavelet_reconstruction(_nchw(content), _nchw(reference), levels))
  conv = jnp.asarray if xp == "jax" else np.asarray
  got = color_fix.color_fix("wavelet", conv(content), conv(reference), levels)
  assert isinstance(got, np.ndarray) == (xp == "numpy")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


@pytest.mark.parametrize("xp", ["jax", "numpy"])
def test_adain_matches_stablesr(xp):
  content, reference = _images(7)
  want = _nhwc(_torch_adain(_nchw(content), _nchw(reference)))
  conv = jnp.asarray if xp == "jax" else np.asarray
  got = np.asarray(color_fix.color_fix("adain", conv(content), conv(reference)))
  np.testing.assert_allclose(got, want, atol=2e-6)
  # closed form: the result has the reference's channel means
  np.testing.assert_allclose(got.mean((1, 2)), reference.mean((1, 2)), atol=1e-5)


def test_closed_forms():
  x, r = _images(3)
  high, low = color_fix.wavelet_decomposition(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(high + low), x, atol=1e-6)  # the split is complete
  # a constant image is all low frequency, so the fix of anything against it keeps only x's high
  flat = np.full_like(r, 0.25)
  fixed = np.asarray(color_fix.wavelet_color_fix(jnp.asarray(x), jnp.asarray(flat)))
  np.testing.assert_allclose(fixed, np.asarray(high) + 0.25, atol=1e-6)
  assert color_fix.color_fix("none", x, r) is x
  with pytest.raises(SodecError, match="color_fix"):
    color_fix.color_fix("histogram", x, r)


def test_the_model_fixes_colours_at_decode_only():
  """SODEC.reconstruction applies sodec.color_fix to the diffusion output against x_f when it
  decodes, and the training forward (train=True) leaves x_hat as D_m gives it."""
  from sodec_jax.pretrained import build_model

  c = make_micro_sodec_config(2, **{"sodec.color_fix": "wavelet", "sodec.color_fix_levels": 3})
  model = build_model(c, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  y_hat = jnp.asarray(np.round(3 * rng.standard_normal((1, 4, 4, c.model.latent_channels))))
  z_hat = jnp.asarray(np.round(rng.standard_normal((1, 1, 1, c.model.hyper_channels))))
  fixed, x_f = model.reconstruction(y_hat, z_hat)
  raw, x_f2 = model.reconstruction(y_hat, z_hat, decode=False)
  np.testing.assert_array_equal(np.asarray(x_f), np.asarray(x_f2))
  want = color_fix.wavelet_color_fix(raw, x_f, 3)
  np.testing.assert_allclose(np.asarray(fixed), np.asarray(want), atol=1e-6)
  assert float(jnp.abs(fixed - raw).max()) > 1e-2  # the fix changed the image
  # the same model, the option off: the decode is D_m's output
  model.color_fix = "none"
  np.testing.assert_array_equal(np.asarray(model.reconstruction(y_hat, z_hat)[0]), np.asarray(raw))


def test_training_refuses_a_colour_fix_without_an_aligned_x_f():
  """Stage 2 trains D_a through the guidance alone, so its x_f is no image to take colours from;
  stages 3-4 with the alignment loss take the setting, and so does any stage trained through the
  fix (the distortion then reaches x_f's low frequencies)."""
  from sodec_jax.train import build

  fix = {"sodec.color_fix": "wavelet"}
  with pytest.raises(SodecError, match="color_fix='wavelet' takes x_hat's colours from x_f"):
    build.validate_config(make_micro_sodec_config(2, **fix))
  with pytest.raises(SodecError, match="alignment"):
    build.validate_config(make_micro_sodec_config(3, **fix, **{"loss.alignment": "none"}))
  build.validate_config(make_micro_sodec_config(3, **fix))
  build.validate_config(make_micro_sodec_config(4, **fix))
  in_training = {"sodec.color_fix_in_training": True}
  with pytest.raises(SodecError, match="color_fix_in_training=True .* 'none'"):
    build.validate_config(make_micro_sodec_config(3, **in_training))
  build.validate_config(make_micro_sodec_config(3, **fix, **in_training))
  build.validate_config(make_micro_sodec_config(2, **fix, **in_training))
  build.validate_config(
    make_micro_sodec_config(3, **fix, **in_training, **{"loss.alignment": "none"})
  )


def test_training_through_the_colour_fix():
  """sodec.color_fix_in_training: the training forward's x_hat is the corrected decode (the same
  fix of the same raw output against the same x_f), and the distortion's gradient reaches both
  the diffusion path (LoRA) and D_a through the fix."""
  from sodec_jax import losses
  from sodec_jax.pretrained import build_model

  opts = {"sodec.color_fix": "wavelet", "sodec.color_fix_levels": 3}
  c = make_micro_sodec_config(3, **opts)
  model = build_model(c, nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 64, 64, 3)), jnp.float32)
  key = jax.random.key(3)
  raw = model(x, noise_key=key)
  model.color_fix_in_training = True
  out = model(x, noise_key=key)
  np.testing.assert_array_equal(np.asarray(out["x_f"]), np.asarray(raw["x_f"]))
  want = color_fix.wavelet_color_fix(raw["x_hat"], raw["x_f"], 3)
  np.testing.assert_allclose(np.asarray(out["x_hat"]), np.asarray(want), atol=1e-6)
  assert float(jnp.abs(out["x_hat"] - raw["x_hat"]).max()) > 1e-2

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def distortion(p):
    return losses.mse_255(x, nnx.merge(graphdef, p, rest)(x, noise_key=key)["x_hat"])

  grads = nnx.to_flat_state(jax.grad(distortion)(params))
  norm = lambda part: sum(
    float(jnp.sum(jnp.square(v.get_value()))) for k, v in grads if part in "/".join(map(str, k))
  )
  assert norm("fidelity_decoder") > 0 and norm("lora") > 0

"""CLIP-IQA preprocessing (resize shortest side, center crop, normalise) against closed forms, PIL's
bicubic and transformers' CLIPImageProcessor; the score formula on a zero-weight model.

Parity of the CLIP tower and of the scores with PyTorch: tests/convert/test_convert_clip.py."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from sodec_jax.errors import SodecError
from sodec_jax.metrics.clip_iqa import (
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
  ClipIQA,
  ClipPreprocess,
  ClipVisionSpec,
  center_crop,
  clip_preprocess,
)

MEAN, STD = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)


def _pre(size: int) -> ClipPreprocess:
  return ClipPreprocess.from_config({}, size)


def _photos():
  return [np.asarray(f(), np.float32) / 255.0 for f in (data.astronaut, data.coffee, data.chelsea)]


def pil_reference(img: np.ndarray, size: int) -> np.ndarray:
  """Written plainly: PIL bicubic on float ('F') channels to shortest side `size` (long side
  int(size * long / short)), clip to [0, 1], crop at ((H-h)//2, (W-w)//2), normalise."""
  h, w = img.shape[:2]
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  x = np.stack(
    [
      np.asarray(
        Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize(
          (nw, nh), resample=Image.BICUBIC
        )
      )
      for c in range(3)
    ],
    -1,
  )
  x = np.clip(x, 0.0, 1.0)
  top, left = (nh - size) // 2, (nw - size) // 2
  return (x[top : top + size, left : left + size] - MEAN) / STD


def test_defaults_are_clips():
  pre = _pre(224)
  assert pre.resize == ("shortest_edge", 224) and pre.crop == (224, 224)
  assert pre.mean == OPENAI_CLIP_MEAN and pre.std == OPENAI_CLIP_STD and pre.resample == "cubic"
  # the hub's openai/clip-vit-* preprocessor_config.json, old and new forms
  new = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "resample": 3,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
  }
  assert ClipPreprocess.from_config(new, 336) == pre
  assert ClipPreprocess.from_config({"size": 224, "crop_size": 224}, 336) == pre
  assert ClipPreprocess.from_dict(pre.to_dict()) == pre
  with pytest.raises(SodecError, match="resample 1 is not supported"):
    ClipPreprocess.from_config({"resample": 1}, 224)


def test_output_size_rule():
  pre = _pre(224)
  # transformers: short side -> 224, long side int(224 * long / short)
  assert pre.output_size(300, 451) == ((224, 336), (224, 224))
  assert pre.output_size(451, 300) == ((336, 224), (224, 224))
  assert pre.output_size(512, 512) == ((224, 224), (224, 224))
  assert pre.output_size(100, 1000) == ((224, 2240), (224, 224))
  assert pre.output_size(20, 30) == ((224, 336), (224, 224))


def test_at_crop_size_only_normalised():
  """Closed form: an image already at the crop size is not resampled, only normalised; one whose
  short side already matches is only center-cropped."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
    clip_preprocess(jnp.asarray(x), _pre(32)), (x - MEAN) / STD, rtol=0, atol=1e-6
  )
  wide = rng.uniform(size=(1, 32, 41, 3)).astype(np.float32)
  np.testing.assert_allclose(
    clip_preprocess(jnp.asarray(wide), _pre(32)), (wide[:, :, 4:36] - MEAN) / STD, rtol=0, atol=1e-6
  )


def test_center_crop_pads_small_images():
  x = jnp.ones((1, 3, 5, 1))
  y = np.asarray(center_crop(x, (6, 4)))[0, ..., 0]  # rows padded 2 before (ceil 3/2), 1 after
  assert y.shape == (6, 4)
  np.testing.assert_array_equal(y, np.pad(np.ones((3, 4)), ((2, 1), (0, 0))))


@pytest.mark.parametrize("size", [224, 32])
def test_resize_matches_pil_bicubic(size):
  errs = []
  for img in _photos():
    ours = np.asarray(
      jax.jit(clip_preprocess, static_argnums=1)(jnp.asarray(img[None]), _pre(size))
    )[0]
    ref = pil_reference(img, size)
    assert ours.shape == ref.shape == (size, size, 3)
    errs.append(float(np.abs(ours - ref).max()))
  print(f"[clip-iqa preprocess vs PIL float bicubic, {size}] max abs {max(errs):.2e} (normalised)")
  assert max(errs) <= 1e-4


def test_close_to_clip_image_processor():
  """transformers' CLIPImageProcessor (PIL backend) on uint8 photos: PIL rounds to uint8 after its
  horizontal and its vertical pass, we stay float -- about a quarter grey level on average, a few
  grey levels at most next to saturated edges."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil()
  pre = ClipPreprocess.from_config(proc.to_dict(), 224)
  assert pre == _pre(224)
  for f in (data.astronaut, data.coffee, data.chelsea):
    u8 = f()
    ref = proc(images=u8, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(clip_preprocess(jnp.asarray(u8[None], jnp.float32) / 255.0, pre))[0]
    levels = np.abs(ours - ref) * STD * 255.0
    print(
      f"[clip-iqa preprocess vs CLIPImageProcessor] {f.__name__}: mean {levels.mean():.3f} "
      f"p99 {np.quantile(levels, 0.99):.3f} max {levels.max():.2f} grey levels"
    )
    assert levels.mean() <= 0.35 and np.quantile(levels, 0.99) <= 1.0 and levels.max() <= 8.0


def test_score_formula_and_errors():
  spec = ClipVisionSpec(
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    image_size=16,
    patch_size=8,
    projection_dim=4,
  )
  iqa = ClipIQA(spec, _pre(16))
  # the formula alone: fixed text embeddings, logit scale ln 100, a patched-in image embedding
  iqa.text_embeds.set_value(jnp.asarray([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
  iqa.logit_scale.set_value(jnp.log(jnp.asarray(100.0)))
  f = jnp.asarray([[3.0, 4.0, 0, 0]])
  iqa.image_embeds = lambda x: f  # noqa: E731 - the formula only
  s = float(iqa(jnp.zeros((1, 16, 16, 3)))[0])
  assert s == pytest.approx(float(jax.nn.sigmoid(100.0 * (0.6 - 0.8))), rel=1e-6)
  with pytest.raises(SodecError, match="NHWC images with 3 channels"):
    clip_preprocess(jnp.zeros((16, 16, 3)), _pre(16))
  with pytest.raises(SodecError, match="prompt pairs"):
    ClipIQA(spec, prompts=("Good photo.",))

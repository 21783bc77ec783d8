"""The dual rate controller (loss.rate_control.mode = "dual"): the multiplier's closed form, the
measured rate against real .sodec files, and the controller in training (logged updates,
checkpoint meta, resume, the next stage's start, the calibration photos kept out of training)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sodec_jax import checkpoints, data, losses, validation
from sodec_jax.codec import bitstream
from sodec_jax.errors import SodecError
from tests.conftest import load_photo, make_micro_config, make_micro_sodec_config

TARGET = 0.1  # far below what the random micro model codes at: m must rise


def _dual(stage=3, **overrides):
  return make_micro_sodec_config(
    stage,
    **{
      "loss.anneal.target_rate": TARGET,
      "loss.rate_control.mode": "dual",
      "loss.rate_control.photos": ("chelsea",),
      "loss.rate_control.crop": 64,
      "loss.rate_control.integral_gain": 0.5,
      "loss.rate_control.proportional_gain": 0.5,
      "data.holdout": ("astronaut",),
      **overrides,
    },
  )


def test_dual_lambda_and_update_in_closed_form():
  c = _dual(**{"loss.anneal.start": 1.0, "loss.anneal.end": 3.0, "loss.anneal.steps": 10})
  lam, target = losses.targeted_lambda(jnp.float32(5.0), 5, c.loss, jnp.float32(np.log(2.0)))
  # lambda(5) = 1 + (3 - 1) * 5 / 10 = 2, times m = 2; the batch's bpp plays no part
  np.testing.assert_allclose(float(lam), 4.0, rtol=1e-6)
  assert float(target) == pytest.approx(TARGET)
  with pytest.raises(ValueError, match="log_multiplier"):
    losses.targeted_lambda(jnp.float32(5.0), 5, c.loss)

  # the PI step: e = log(r / target); log m = I + kp e; I' = I + ki e (both within +-max_log)
  ki, kp = c.loss.rate_control.integral_gain, c.loss.rate_control.proportional_gain
  for integral, rate in ((0.3, 2 * TARGET), (0.3, TARGET / 4), (-1.0, TARGET)):
    log_m, nxt = losses.rate_control(jnp.float32(integral), jnp.float32(rate), c.loss)
    e = np.log(rate / TARGET)
    np.testing.assert_allclose(float(log_m), integral + kp * e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(nxt), integral + ki * e, rtol=1e-5, atol=1e-6)
  log_m, nxt = losses.rate_control(jnp.float32(3.9), jnp.float32(1e3), c.loss)
  assert float(log_m) == float(nxt) == pytest.approx(c.loss.rate_control.max_log)

  # "switch" (the default) is HiFiC's rule, unchanged
  c.loss.rate_control.mode = "switch"
  hi, _ = losses.targeted_lambda(jnp.float32(1.0), 5, c.loss)
  lo, _ = losses.targeted_lambda(jnp.float32(0.0), 5, c.loss)
  np.testing.assert_allclose([float(hi), float(lo)], [2.0, 2.0 * c.loss.lambda_B / c.loss.lambda_A])
  assert losses.uses_rate_multiplier(_dual().loss)
  assert not losses.uses_rate_multiplier(c.loss)
  assert not losses.uses_rate_multiplier(_dual(**{"loss.anneal.target_rate": 0.0}).loss)


def test_coded_bpp_is_the_rate_of_the_real_file(micro_workdir):
  """SODEC.coded_bpp (what the controller measures) against the bits api.compress writes, the
  header taken off: the range coder's quantized tables and its flush cost a few percent."""
  from sodec_jax import api
  from sodec_jax.codec import bitstream

  model = api.load_model(micro_workdir)
  for name in ("chelsea.png", "coffee.png"):
    x = load_photo(name)[:256, :384]
    blob = api.compress(model, x)
    header = bitstream.unpack(blob)[0]
    payload_bits = 8 * (len(blob) - bitstream.HEADER_MIN)
    predicted = float(model.model.coded_bpp(jnp.asarray(x[None], jnp.float32) / 255.0))
    measured = payload_bits / (256 * 384)
    assert (header.height, header.width) == (256, 384)
    assert measured == pytest.approx(predicted, rel=0.05), (name, measured, predicted)


def test_calibration_measures_the_file_of_the_whole_photo(micro_workdir, tmp_path):
  """With crop 0 a calibration photo is the whole photo padded as the coder pads it, and the
  controller's measure (step.calibration_bpp) is the bpp of its .sodec file, padding and header
  counted, within the range coder's few percent. A photo far from a multiple of 64 (100 x 150
  codes as 128 x 192, 1.64x its pixels) tells the padded file apart from the crop."""
  from PIL import Image

  from sodec_jax import api
  from sodec_jax.train import step

  photos = {"odd": load_photo("chelsea.png")[:100, :150], "even": load_photo("coffee.png")[:128]}
  for name, image in photos.items():
    Image.fromarray(image).save(tmp_path / f"{name}.png")
  model = api.load_model(micro_workdir)
  c = model.config.copy_and_resolve_references()
  c.data.train_dir, c.data.holdout = str(tmp_path), ()
  c.loss.rate_control.photos, c.loss.rate_control.crop = ("odd", "even"), 0
  calibration = validation.calibration_images(c)
  assert [p.image.shape for p in calibration] == [(128, 192, 3), (128, 640, 3)]
  assert [p.pixels for p in calibration] == [100 * 150, 128 * 600]
  np.testing.assert_array_equal(
    calibration[0].image, np.round(api.pad_image(model, photos["odd"])[0] * 255).astype(np.uint8)
  )
  measured = float(step.calibration_bpp(model.model, step.calibration_groups(calibration)))
  files = [8 * len(api.compress(model, im)) / (im.shape[0] * im.shape[1]) for im in photos.values()]
  assert measured == pytest.approx(np.mean(files), rel=0.05), (measured, files)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# -m slow (~85 s): the default suite trains with the dual controller in
# test_dual_without_photos_measures_the_training_batch
@pytest.mark.slow
def test_dual_controller_in_training(tmp_path, monkeypatch):
  from sodec_jax.train import build, train

  # the calibration photo is kept out of the training set (with the held-out one)
  seen = {}
  real_loader = data.CropLoader

  def recording_loader(paths, *args, **kwargs):
    seen["paths"] = list(paths)
    return real_loader(paths, *args, **kwargs)

  monkeypatch.setattr(data, "CropLoader", recording_loader)
  c = _dual(**{"train.num_steps": 3, "train.checkpoint_every": 3})
  straight = str(tmp_path / "straight")
  train(c, straight)
  stems = {os.path.splitext(os.path.basename(p))[0] for p in seen["paths"]}
  assert "chelsea" not in stems and "astronaut" not in stems and "coffee" in stems

  rows = _rows(straight)
  assert [r["step"] for r in rows] == [1, 2, 3]
  # step 1 measured the calibration crop with the initial parameters
  model = build.build_training_model(c)
  (photo,) = validation.calibration_images(c)
  assert photo.image.shape == (64, 64, 3) and photo.pixels == 64 * 64
  coded = float(model.coded_bpp(jnp.asarray(photo.image[None], jnp.float32) / 255.0))
  first = coded + 8 * bitstream.HEADER_MIN / photo.pixels  # the header counts, as in a file
  np.testing.assert_allclose(rows[0]["controlled_bpp"], first, rtol=1e-4)
  # each step's m = exp(I + kp e) with e = log(measured / target), then I += ki e;
  # lambda = lambda(t) * m
  ki, kp = c.loss.rate_control.integral_gain, c.loss.rate_control.proportional_gain
  integral = 0.0
  for r in rows:
    e = np.log(r["controlled_bpp"]) - np.log(TARGET)
    m = np.exp(np.clip(integral + kp * e, -4.0, 4.0))
    assert 1.0 < m < np.exp(4.0)  # not at the bound: the formula, not the clip, is checked
    np.testing.assert_allclose(r["rate_multiplier"], m, rtol=1e-5)
    lam_t = float(losses.annealed_lambda(r["step"] - 1, c.loss.anneal))
    np.testing.assert_allclose(r["lambda"], lam_t * m, rtol=1e-5)
    integral = np.clip(integral + ki * e, -4.0, 4.0)
  assert integral > 0  # the micro model codes far above the target: lambda rose
  meta = checkpoints.read_meta(straight, 3)
  np.testing.assert_allclose(meta["rate_control_integral"], integral, rtol=1e-5)

  # resuming carries the integral: 2 steps, then the same command to 3, as the straight run
  resumed = str(tmp_path / "resumed")
  train(_dual(**{"train.num_steps": 2, "train.checkpoint_every": 2}), resumed)
  train(_dual(**{"train.num_steps": 3, "train.checkpoint_every": 3}), resumed)
  assert checkpoints.read_meta(resumed, 3)["rate_control_integral"] == meta["rate_control_integral"]
  assert [r["rate_multiplier"] for r in _rows(resumed)] == [r["rate_multiplier"] for r in rows]

  # the next stage (init_from) starts from the integral its source ended with
  nxt = str(tmp_path / "next")
  train(_dual(**{"train.num_steps": 1, "init_from": straight}), nxt)
  first = _rows(nxt)[0]
  e = np.log(first["controlled_bpp"]) - np.log(TARGET)
  np.testing.assert_allclose(first["rate_multiplier"], np.exp(integral + kp * e), rtol=1e-5)


def test_dual_without_photos_measures_the_training_batch(tmp_path):
  from sodec_jax.train import build, train

  c = _dual(**{"train.num_steps": 1, "loss.rate_control.photos": ()})
  train(c, str(tmp_path))
  batch = data.train_dataset(c)[0]  # step 0's batch
  model = build.build_training_model(c)
  expected = float(model.coded_bpp(jnp.asarray(batch, jnp.float32) / 255.0))
  np.testing.assert_allclose(_rows(str(tmp_path))[0]["controlled_bpp"], expected, rtol=1e-4)


@pytest.mark.parametrize(
  "overrides, pattern",
  [
    ({"loss.rate_control.mode": "pid"}, "rate_control.mode='pid' is not one of"),
    ({"loss.rate_control.integral_gain": 0.0}, "integral_gain=0.0 and max_log=4.0 must be > 0"),
    ({"loss.rate_control.proportional_gain": -1.0}, "proportional_gain=-1.0 >= 0"),
    ({"loss.rate_control.photos": ("astronaut",)}, "both name astronaut"),
    ({"loss.rate_control.photos": ("kodim01",)}, "rate_control.photos names kodim01"),
    ({"loss.rate_control.crop": 100}, "crop=100 must be a multiple of 64 .0: whole photos"),
    ({"loss.rate_control.crop": 384}, "chelsea.* smaller than config.loss.rate_control.crop=384"),
  ],
)
def test_bad_rate_control_is_a_one_line_error(tmp_path, overrides, pattern):
  from sodec_jax.train import train

  c = _dual(**{"train.num_steps": 1, **overrides})
  with pytest.raises(SodecError, match=pattern):
    train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_stage1_ignores_the_dual_mode_but_keeps_the_photos_out(tmp_path):
  """Stage 1 steers with HiFiC's switch; naming calibration photos still keeps them out of its
  training data, so the controller of a later stage measures photos no stage trained on."""
  c = make_micro_config(
    **{"loss.rate_control.mode": "dual", "loss.rate_control.photos": ("chelsea",)}
  )
  paths = data.exclude_holdout(
    data.list_images(""), data.calibration_names(c), "config.loss.rate_control.photos"
  )
  assert "chelsea" not in {os.path.splitext(os.path.basename(p))[0] for p in paths}
  assert not losses.uses_rate_multiplier(c.loss)  # rate_mode "hific"

"""Every experiment config loads and validates (a paper config without its weights is the one-line
error naming them; given them, the rest validates), and the ablations differ from stage 3 exactly
where their table row says."""

import glob
import importlib
import os

import pytest

from configs import stage3
from sodec_jax.errors import SodecError
from sodec_jax.train.build import validate_config
from sodec_jax.train.pipeline import stage_config
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
CONFIGS = [p for p in CONFIGS if not p.endswith("__init__.py")]


def _module(path):
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return importlib.import_module(rel)


def _diff(a, b, prefix=""):
  out = set()
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out |= _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.add(f"{prefix}{k}")
  return out


# The first missing weights validate_config reports: SD 2.1 for a diffusion config (checked first),
# else the LPIPS VGG16 weights when the loss uses LPIPS.
MISSING_SD21 = (
  "config.diffusion.weights is empty but unet='sd21' / vae='sd21' need pretrained "
  "SD 2.1 weights; make them with: python convert/from_torch.py sd21 "
)
MISSING_VGG = (
  "config.loss.k_P=1.0 needs LPIPS VGG16 weights: pass "
  "--config.lpips.vgg_weights=/path/to/vgg16.pth"
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads(path, tmp_path):
  c = _module(path).get_config()
  assert c.stage in (0, 1, 2, 3, 4)
  if c.pipeline.stages:  # the tiny pipeline: every stage validates as it is (no weights needed)
    for name in c.pipeline.stages:
      validate_config(stage_config(c, name))
    return
  for name in ("data", "loss", "train", "optim"):
    assert name in c
  expected = MISSING_SD21 if c.decoder == "diffusion" else MISSING_VGG
  with pytest.raises(SodecError) as err:
    validate_config(c)
  assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
  # given the weights it asks for (validate_config checks that the folders exist), it validates
  c.diffusion.weights = c.guidance.extractor_weights = str(tmp_path)
  c.lpips.vgg_weights = str(tmp_path / "vgg16.pth")
  validate_config(c)


EXPECTED = {
  "guidance_none": {"guidance.mode"},
  "guidance_text": {"guidance.mode"},
  "guidance_hyperprior": {"guidance.mode"},
  "guidance_fidelity": set(),
  "alignment_none": {"loss.alignment"},
  "alignment_mse_lpips": {"loss.alignment"},
  "alignment_merged": {"loss.alignment"},
  "alignment_mse": set(),
  "strategy_frozen_vae": {"sodec.stop_gradient_latents", "train.trainable", "loss.rate_mode"},
  "strategy_joint_matched": {"loss.anneal.shape"},
  "strategy_low_to_high": {"loss.anneal.start", "loss.anneal.end"},
  "strategy_rate_annealing": set(),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_changes_only_its_row(name):
  c = importlib.import_module(f"configs.ablations.{name}").get_config().to_dict()
  base = stage3.get_config().to_dict()
  assert _diff(c, base) - {"name"} == EXPECTED[name]


def test_prediction_type_mismatch_is_one_line(tmp_path):
  """SD weights (here a diffusers pipeline folder's scheduler) of another prediction type than
  config.diffusion.prediction_type fail validation before anything runs, naming the fix."""
  c = stage3.get_config()
  assert c.decoder == "diffusion" and c.diffusion.prediction_type == "epsilon"
  c.diffusion.weights = c.guidance.extractor_weights = str(tmp_path)
  c.lpips.vgg_weights = str(tmp_path / "vgg16.pth")
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(
    '{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}'
  )
  with pytest.raises(SodecError) as err:
    validate_config(c)
  msg = str(err.value)
  assert "\n" not in msg and "is a v_prediction model" in msg, msg
  assert msg.endswith(
    "config.diffusion.prediction_type='epsilon'; set "
    "--config.diffusion.prediction_type=v_prediction"
  ), msg
  c.diffusion.prediction_type = "v_prediction"
  validate_config(c)

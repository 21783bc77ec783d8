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


def _validates_given_its_weights(c, tmp_path):
  """validate_config(c) fails with the one-line message naming the first missing weights, and,
  given them (validate_config checks that the folders exist), passes."""
  expected = MISSING_SD21 if c.decoder == "diffusion" else MISSING_VGG
  with pytest.raises(SodecError) as err:
    validate_config(c)
  assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
  c.diffusion.weights = c.guidance.extractor_weights = str(tmp_path)
  c.lpips.vgg_weights = str(tmp_path / "vgg16.pth")
  validate_config(c)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads(path, tmp_path):
  c = _module(path).get_config()
  assert c.stage in (0, 1, 2, 3, 4)
  for name in ("data", "loss", "train", "optim"):
    assert name in c
  if c.pipeline.stages:  # each stage validates: the tiny one as it is, paper size given weights
    for name in c.pipeline.stages:
      s = stage_config(c, name)
      if c.diffusion.unet == "tiny":
        validate_config(s)
      else:
        _validates_given_its_weights(s, tmp_path)
    return
  _validates_given_its_weights(c, tmp_path)


# What each ablation row changes in its stage 2 and stage 3 against its table's own row (the
# paper's method): Table 2 against guidance_fidelity, Table 3 alignment_mse, Table 4
# strategy_rate_annealing.
REFERENCE = {2: "guidance_fidelity", 3: "alignment_mse", 4: "strategy_rate_annealing"}
EXPECTED = {
  "guidance_none": (2, {"guidance.mode"}, {"guidance.mode"}),
  "guidance_text": (2, {"guidance.mode"}, {"guidance.mode"}),
  "guidance_hyperprior": (2, {"guidance.mode"}, {"guidance.mode"}),
  "guidance_fidelity": (2, set(), set()),
  "alignment_none": (3, set(), {"loss.alignment"}),
  "alignment_mse_lpips": (3, set(), {"loss.alignment"}),
  "alignment_merged": (3, set(), {"loss.alignment"}),
  "alignment_mse": (3, set(), set()),
  "strategy_frozen_vae": (
    4,
    set(),
    {"sodec.stop_gradient_latents", "train.trainable", "loss.rate_mode"},
  ),
  "strategy_joint_matched": (4, set(), {"loss.anneal.shape", "loss.anneal.target_rate"}),
  "strategy_low_to_high": (4, set(), {"loss.anneal.start", "loss.anneal.end"}),
  "strategy_rate_annealing": (4, set(), set()),
}


def _row_stages(name):
  c = importlib.import_module(f"configs.ablations.{name}").get_config()
  assert c.pipeline.stages == ("stage2", "stage3")
  return [stage_config(c, s).to_dict() for s in c.pipeline.stages]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_changes_only_its_row(name):
  table, in_stage2, in_stage3 = EXPECTED[name]
  ours, ref = _row_stages(name), _row_stages(REFERENCE[table])
  for got, want in ((_diff(ours[0], ref[0]), in_stage2), (_diff(ours[1], ref[1]), in_stage3)):
    assert {k for k in got if k != "name" and not k.startswith("pipeline.")} == want


def test_ablation_schedule_is_the_papers():
  """50K stage 1 with HiFiC's schedules scaled (it ends past the x2 lambda phase), stage 3 in
  40K starting at the lambda stage 1 ended with; Table 4 (iii) ends at (iv)'s rate target and
  (ii) at stage 1's."""
  from configs import ablations, stage1
  from configs.ablations import stage1_50k

  s1 = stage1_50k.get_config()
  assert s1.train.num_steps == 50_000 and s1.loss.lambda_schedule_steps == (2_500,)
  assert s1.optim.lr_decay_steps == (25_000,)
  final = s1.loss.lambda_A * s1.loss.lambda_schedule_values[-1]
  s2, s3 = _row_stages("strategy_rate_annealing")
  assert s3["train"]["num_steps"] == 40_000 and s3["loss"]["anneal"]["start"] == final
  assert s3["loss"]["anneal"]["end"] > final
  low = _row_stages("strategy_low_to_high")[1]["loss"]["anneal"]
  assert (low["start"], low["end"]) == (s3["loss"]["anneal"]["end"], final)
  assert low["target_rate"] == s3["loss"]["anneal"]["target_rate"] == ablations.TABLE_TARGET_BPP[4]
  matched = _row_stages("strategy_joint_matched")[1]["loss"]["anneal"]
  assert matched["target_rate"] == stage1.STAGE1_TARGET_BPP


def test_paper_operating_points_are_one_family():
  from configs import paper
  from sodec_jax.train.cli import UsageError, load_config_file

  points = {}
  for bpp in paper.OPERATING_POINTS:
    c = load_config_file(os.path.join(ROOT, f"configs/paper.py:{bpp}"))
    assert c.pipeline.stages == ("stage1", "stage2", "stage3", "finetune")
    stages = {s: stage_config(c, s) for s in c.pipeline.stages}
    assert stages["stage1"].loss.target_rate == 0.07 and stages["stage1"].data.crop_size == 256
    for s in ("stage2", "stage3", "finetune"):
      assert stages[s].data.crop_size == 512
    for s in ("stage3", "finetune"):
      assert stages[s].loss.rate_mode == "anneal"
      assert stages[s].loss.anneal.target_rate == bpp
    points[bpp] = stages["stage3"].to_dict()
  # the four points differ in the rate target alone
  first = points[paper.OPERATING_POINTS[0]]
  for d in points.values():
    assert _diff(d, first) - {"name"} <= {"loss.anneal.target_rate"}
  with pytest.raises(UsageError, match="below stage 1"):
    load_config_file(os.path.join(ROOT, "configs/paper.py:0.2"))


def test_tiny_targets_steer_stages_3_and_4_on_photos_no_stage_trains_on():
  from configs import tiny_targets
  from sodec_jax.train.cli import UsageError, load_config_file

  c = load_config_file(os.path.join(ROOT, "configs/tiny_targets.py:0.2"))
  stages = {s: stage_config(c, s) for s in c.pipeline.stages}
  for s in ("stage3", "finetune"):
    assert stages[s].loss.anneal.target_rate == 0.2
    assert stages[s].loss.rate_control.mode == "dual"
  for s in stages.values():  # kept out of every stage's training data, stage 1 included
    assert tuple(s.loss.rate_control.photos) == tiny_targets.CALIBRATION_PHOTOS
    assert not set(s.loss.rate_control.photos) & set(s.data.holdout)
    # as in the runs docs/EXPERIMENTS.md reports: no colour fix anywhere
    assert s.sodec.color_fix == "none" and not s.sodec.color_fix_in_training
  with pytest.raises(UsageError, match="must be a number"):
    load_config_file(os.path.join(ROOT, "configs/tiny_targets.py:low"))


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

"""Held-out validation during training (train/guard.py): val_* rows measured through real files,
the guard line and best.json when validation falls, guard_action=stop, and the pipeline's
closing summary (table, summary.json, summary.png)."""

import json
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from sodec_jax import api, checkpoints, validation
from sodec_jax.errors import SodecError
from sodec_jax.images import write_image
from sodec_jax.train import guard as guard_lib
from sodec_jax.train import train
from tests.conftest import load_photo, make_micro_config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_validation_rows_are_the_saved_model_through_real_files(tmp_path):
  wd = str(tmp_path)
  c = make_micro_config(
    **{"train.num_steps": 4, "train.validate_every": 2, "train.validate_size": 176}
  )
  train(c, wd)
  val = [r for r in _rows(wd) if "val_psnr" in r]
  assert [r["step"] for r in val] == [0, 2, 4]  # start of the stage, then every 2
  assert all(0 < r["val_ms_ssim"] <= 1 and r["val_bpp"] > 0 for r in val)  # 176 px >= 161
  crops = [guard_lib.center_crop(im, 176) for im in validation.holdout_images(c)]
  assert [im.shape for im in crops] == [(176, 176, 3)] * 2
  want = validation.validate(api.load_model(wd, step=4), crops)  # the checkpoint, reloaded
  assert val[-1]["val_psnr"] == pytest.approx(want["psnr"], abs=1e-9)
  assert val[-1]["val_bpp"] == want["bpp"]
  best = checkpoints.read_best(wd)  # the latest step within guard_db (3 dB) of the start
  within = [r for r in val if r["val_psnr"] >= val[0]["val_psnr"] - 3.0]
  assert best["step"] == within[-1]["step"]
  assert best["start_step"] == 0 and best["start_psnr"] == val[0]["val_psnr"]


def _falling(monkeypatch, psnrs):
  """validation.validate returning the given PSNRs one call after the other."""
  it = iter(psnrs)

  def fake(model, images, return_decoded=False):  # pylint: disable=unused-argument
    return {"bpp": 0.5, "psnr": next(it), "ms_ssim": None, "ms_ssim_images": 0, "images": []}

  monkeypatch.setattr(validation, "validate", fake)


def test_guard_line_and_best_json_when_validation_falls(tmp_path, monkeypatch, capsys):
  _falling(monkeypatch, [20.0, 21.0, 19.0, 17.5])  # steps 0, 2, 4, 6
  wd = str(tmp_path / "run")
  c = make_micro_config(
    **{
      "train.num_steps": 6,
      "train.validate_every": 2,
      "train.keep_checkpoints": 1,
      "train.guard_db": 2.0,
    }
  )
  train(c, wd)
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.startswith("guard:")]
  assert len(lines) == 1, out  # 20 -> 17.5 at step 6, said once
  assert "run (stage 1)" in lines[0] and "step 6" in lines[0] and "20.00 dB" in lines[0]
  assert "17.50 dB" in lines[0] and "stays at step 4" in lines[0]
  # the output: the latest step within guard_db of the start (19.0 at step 4), not the
  # highest PSNR (21.0 at step 2: a stage that lowers the rate would be discarded by that)
  best = checkpoints.read_best(wd)
  assert best["step"] == 4 and best["val_psnr"] == 19.0
  # keep_checkpoints=1 keeps the latest and the output, nothing else
  assert sorted(int(s) for s in os.listdir(checkpoints.checkpoint_dir(wd))) == [4, 6]
  assert api.load_model(wd).step == 4  # restore_params reads best.json
  assert api.load_model(wd, step=6).step == 6
  params, step = checkpoints.read_params(wd)  # what init_from copies
  assert step == 4
  want, _ = checkpoints.read_params(wd, step=4)
  other, _ = checkpoints.read_params(wd, step=6)
  leaf = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_array_equal(leaf(params), leaf(want))
  assert not np.array_equal(leaf(params), leaf(other))


def test_guard_action_stop_raises_naming_the_stage(tmp_path, monkeypatch):
  _falling(monkeypatch, [20.0, 15.0])
  c = make_micro_config(
    **{"train.num_steps": 4, "train.validate_every": 2, "train.guard_action": "stop"}
  )
  with pytest.raises(
    SodecError,
    match=r"guard: stopme \(stage 1\) validation PSNR fell from "
    r"20.00 dB \(step 0\) to 15.00 dB at step 2",
  ):
    train(c, str(tmp_path / "stopme"))
  assert checkpoints.read_best(str(tmp_path / "stopme"))["step"] == 0
  with pytest.raises(SodecError, match="guard_action='halt' must be"):
    train(
      make_micro_config(**{"train.validate_every": 2, "train.guard_action": "halt"}),
      str(tmp_path / "bad"),
    )


def test_pipeline_summary_table_json_and_png(tmp_path, capsys):
  photos = tmp_path / "photos"  # small photos, so the full-size summary is quick
  os.makedirs(photos)
  for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"):
    ext = "png" if name != "rocket" else "jpg"
    write_image(str(photos / f"{name}.png"), load_photo(f"{name}.{ext}")[:96, :128])
  c = make_micro_config()  # two codec stages: the diffusion stages compile too slowly for a test
  c.data.train_dir, c.data.holdout = str(photos), ("astronaut", "coffee")
  c.pipeline.stages, c.pipeline.summary = ("stage1", "stage1"), True
  small = {
    "data": {"crop_size": 64, "batch_size": 2},
    "train": {"num_steps": 1, "checkpoint_every": 1},
  }
  for name in c.pipeline.stages:
    c.pipeline[name] = ConfigDict(small)
  wd = str(tmp_path / "pipe")
  train(c, wd)
  out = capsys.readouterr().out
  with open(os.path.join(wd, "summary.json")) as f:
    summary = json.load(f)
  assert summary["holdout"] == ["astronaut", "coffee"]
  assert [r["stage"] for r in summary["stages"]] == ["0_stage1", "1_stage1"]
  images = validation.holdout_images(c)
  for row in summary["stages"]:
    want = validation.validate(api.load_model(os.path.join(wd, row["stage"])), images)
    assert row["psnr"] == pytest.approx(want["psnr"], abs=1e-9) and row["bpp"] == want["bpp"]
    assert row["ms_ssim"] is None  # 96 px < 161
    line = [l for l in out.splitlines() if l.startswith(row["stage"] + " ")]
    assert len(line) == 1 and f"{row['psnr']:.2f}" in line[0] and f"{row['bpp']:.3f}" in line[0]
  grid = np.asarray(__import__("PIL.Image").Image.open(os.path.join(wd, "summary.png")))
  assert grid.shape == (2 * (96 + 16), 3 * 128, 3)  # original | each stage, 2 rows
  np.testing.assert_array_equal(grid[16:112, :128], images[0])


def test_no_holdout_no_summary(tmp_path, capsys):
  from sodec_jax.train import pipeline

  c = make_micro_config(**{"data.holdout": ()})
  assert pipeline.summary(c, str(tmp_path)) is None
  assert "config.data.holdout is empty" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "summary.json")

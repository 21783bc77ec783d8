"""The training entry point: flags and one-line errors, metrics, resume == uninterrupted run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax import checkpoints, losses
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax.train import train
from sodec_jax.train.logs import SAMPLES_DIR
from tests.conftest import ROOT, make_micro_config

# The resume test builds the same jitted step three times: let the later ones reuse the code.
jax.config.update(
  "jax_compilation_cache_dir", os.environ.get("SODEC_TEST_JAX_CACHE", "/tmp/sodec_jax_test_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "sodec_jax.train", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args,pattern",
  [
    (["--config.data.bogus=3"], "unknown config field 'data.bogus'"),
    (["--config.data.batch_size=abc"], "--config.data.batch_size=abc"),
    (["--config.train.num_steps=1.5"], "--config.train.num_steps=1.5"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
  ],
)
def test_bad_override_is_a_one_line_error(tmp_path, args, pattern):
  r = _cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), *args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr
  assert not (tmp_path / "w").exists()


def test_missing_workdir_and_config_are_one_line_errors(tmp_path):
  r = _cli("--config", "configs/tiny.py")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    "error: --workdir is required: the directory for config, checkpoints and metrics"
  ]
  r = _cli("--config", "configs/nope.py", "--workdir", str(tmp_path))
  assert (
    r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such file" in r.stderr
  )


def _sections(stdout):
  """--print_config's output -> {'config': text, 'stage1': text, ...} (one per '# ' header)."""
  out, name = {}, None
  for line in stdout.splitlines():
    if line.startswith("# "):
      name = line.split(": ")[-1] if "pipeline stage" in line else line[2:]
      out[name] = ""
    else:
      out[name] += line + "\n"
  return out


def test_print_config_shows_each_pipeline_stage_as_trained(tmp_path):
  r = _cli("--config", "configs/tiny.py", "--print_config", "--config.train.log_every=7")
  assert r.returncode == 0, r.stderr
  parts = _sections(r.stdout)
  assert list(parts) == ["config", "stage1", "stage2", "stage3", "finetune"]
  assert all("  log_every: 7\n" in text for text in parts.values())  # the override
  assert all("weights/tiny_sd\n" in text for text in parts.values())  # the shipped stand-in SD
  assert "decoder: diffusion\n" in parts["stage2"] and "  num_steps: 300\n" in parts["stage2"]
  assert "decoder: codec\n" in parts["stage1"] and "  num_steps: 1000\n" in parts["stage1"]
  assert "stage: 4\n" in parts["finetune"] and "  num_steps: 100\n" in parts["finetune"]
  from configs import tiny
  from sodec_jax.train.pipeline import stage_config

  c = tiny.get_config()
  c.train.log_every = 7
  assert parts["stage3"] == str(stage_config(c, "stage3"))  # as run_pipeline would train it


def test_print_config_of_a_stage_file_with_an_override(capsys):
  from sodec_jax.train import main

  assert (
    main(["train", "--config", "configs/stage2.py", "--config.data.batch_size=3", "--print_config"])
    == 0
  )
  out = capsys.readouterr().out
  assert list(_sections(out)) == ["config"]
  assert "  batch_size: 3\n" in out and "decoder: diffusion\n" in out and "stage: 2\n" in out


def _write_config(tmp_path, body):
  """A config file in tmp_path/configs/ that imports configs.base like the real ones, and
  appends a line to runs.txt each time it is executed."""
  folder = tmp_path / "configs"
  folder.mkdir(exist_ok=True)
  (folder / "base.py").write_text(open(os.path.join(ROOT, "configs", "base.py")).read())
  path = folder / "x.py"
  path.write_text(f"open({str(tmp_path / 'runs.txt')!r}, 'a').write('run\\n')\n" + body)
  return str(path)


@pytest.mark.parametrize(
  "body,line,what",
  [
    (
      "from configs import base\n\ndef get_config():\n  c = base.get_config()\n  c.seed = foo\n"
      "  return c\n",
      6,
      "NameError: name 'foo' is not defined",
    ),
    ("x = 1 / 0\n", 2, "ZeroDivisionError: division by zero"),
    ("def get_config(:\n", 2, "SyntaxError: "),
  ],
)
def test_config_file_error_names_file_and_line(tmp_path, capsys, body, line, what):
  from sodec_jax.train import main

  path = _write_config(tmp_path, body)
  assert main(["train", "--config", path, "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {path}:{line}: {what}"), err
  assert not (tmp_path / "w").exists()


def test_unknown_override_lists_the_parent_fields_and_runs_the_file_once(tmp_path, capsys):
  from sodec_jax.train import main

  path = _write_config(
    tmp_path, "from configs import base\n\ndef get_config():\n  return base.get_config()\n"
  )
  assert (
    main(["train", "--config", path, "--workdir", str(tmp_path / "w"), "--config.optim.bogus=3"])
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  from configs import base

  fields = ", ".join(sorted(base.get_config().optim.keys()))
  assert err == [
    f"error: unknown config field 'optim.bogus' in --config.optim.bogus=3 "
    f"(fields of optim: {fields})"
  ]
  assert (tmp_path / "runs.txt").read_text() == "run\n"  # executed once
  assert main(["train", "--config", path, "--print_config", "--config.nope.x=1"]) == 2
  assert "(fields of config: " in capsys.readouterr().err


def test_lpips_without_weights_is_a_one_line_error(tmp_path):
  r = _cli("--config", "configs/stage1.py", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
    "error: config.loss.k_P=1.0 needs LPIPS VGG16 weights: pass "
    "--config.lpips.vgg_weights=/path/to/vgg16.pth (torchvision layout), or "
    "--config.loss.k_P=0 to train on MSE alone"
  ]


def test_overrides_reach_config_json(tmp_path):
  wd = tmp_path / "w"
  r = _cli(
    "--config",
    "configs/tiny.py",
    "--workdir",
    str(wd),
    "--config.train.num_steps=0",
    "--config.pipeline.stages=()",
    "--config.optim.learning_rate=0.002",
    "--config.model.encoder_filters=(4,4,8,8,8)",
    "--config.train.progress=False",
  )
  assert r.returncode == 0, r.stderr
  saved = json.loads((wd / "config.json").read_text())
  assert saved["optim"]["learning_rate"] == 0.002
  assert saved["model"]["encoder_filters"] == [4, 4, 8, 8, 8]
  assert saved["train"]["num_steps"] == 0 and saved["name"] == "tiny"
  assert "sodec compress" in r.stdout


def _final_params(workdir, config):
  model = build_model(config, nnx.Rngs(123))
  step = checkpoints.restore_params(workdir, model)
  return step, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, capsys):
  c4 = make_micro_config(**{"train.num_steps": 4})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(c4, straight)
  assert "sodec compress photo.png out.sodec --checkpoint " + straight in capsys.readouterr().out

  train(make_micro_config(**{"train.num_steps": 2}), resumed)  # "interrupted" at step 2
  with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:  # logged, never checkpointed
    f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
  train(c4, resumed)  # the same command again: resumes from checkpoint 2

  s1, p1 = _final_params(straight, c4)
  s2, p2 = _final_params(resumed, c4)
  assert s1 == s2 == 4
  jax.tree.map(np.testing.assert_array_equal, p1, p2)  # exactly: the README says so

  rows1, rows2 = _rows(straight), _rows(resumed)
  assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3, 4]
  for r1, r2 in zip(rows1, rows2):
    for k in (
      "loss",
      "bpp",
      "bpp_y",
      "bpp_z",
      "mse",
      "mse_loss",
      "rate_loss",
      "lambda",
      "target_bpp",
      "psnr",
      "learning_rate",
      "grad_norm",
      "param_norm",
    ):
      assert r1[k] == r2[k], (k, r1[k], r2[k])
  assert all(np.isfinite(r["loss"]) for r in rows1)
  assert "step_time" in rows1[-1]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(straight))

  # a different config is refused in one line, unless allowed
  changed = make_micro_config(**{"train.num_steps": 4, "optim.learning_rate": 0.5})
  with pytest.raises(
    SodecError, match="different config.*optim.learning_rate.*allow_config_change"
  ):
    train(changed, resumed)
  changed.train.allow_config_change = True
  train(changed, resumed)  # already at step 4: nothing to do, config.json updated
  assert checkpoints.load_config(resumed).optim.learning_rate == 0.5


def test_non_finite_loss_skips_updates_then_stops(tmp_path, monkeypatch):
  real = losses.stage1_loss

  def nan_loss(outputs, x, step, config, lpips=None):
    loss, terms = real(outputs, x, step, config, lpips)
    loss = jnp.where(step >= 2, jnp.nan, loss)
    return loss, dict(terms, loss=loss)

  monkeypatch.setattr(losses, "stage1_loss", nan_loss)
  c = make_micro_config(**{"train.num_steps": 8, "train.checkpoint_every": 2})
  with pytest.raises(SodecError, match="not finite for 3 steps in a row.*learning_rate"):
    train(c, str(tmp_path))
  assert checkpoints.latest_step(str(tmp_path)) == 2
  assert [r["step"] for r in _rows(str(tmp_path))] == [1, 2]

  # metrics fetched every 4 steps only: the streak is still seen, before any save of a later
  # step (steps 2 and 3 are checked when step 4 would be saved: no checkpoint 4)
  c = make_micro_config(
    **{"train.num_steps": 12, "train.checkpoint_every": 2, "train.log_every": 4}
  )
  late = str(tmp_path / "late")
  with pytest.raises(SodecError, match="not finite for 3 steps in a row .last step 4.*is step 2"):
    train(c, late)
  assert checkpoints.latest_step(late) == 2
  assert not os.path.exists(os.path.join(late, "metrics.jsonl"))  # row 4: step 3 not finite


def test_sample_grids(tmp_path):
  c = make_micro_config(**{"train.num_steps": 4, "train.sample_every": 2})
  train(c, str(tmp_path))
  from PIL import Image

  names = sorted(os.listdir(tmp_path / SAMPLES_DIR))
  assert names == ["step_2.png", "step_4.png"]
  img = np.asarray(Image.open(tmp_path / SAMPLES_DIR / "step_4.png"))
  assert img.shape == (2 * 64, 3 * 64, 3) and img.dtype == np.uint8
  assert img[:, :64].std() > 0 and img[:, 128:].std() > 0  # the photo and a reconstruction


def test_pipeline_first_stage_keeps_the_configs_init_from(tmp_path):
  """A pipeline that starts after stage 1 (configs/paper.py's stage 3 -> finetune from a shared
  stage 2, an ablation row from the 50K stage 1) starts from config.init_from; later stages from
  the stages before them; stage 1 from scratch."""
  from sodec_jax.train.pipeline import run_pipeline
  from tests.conftest import make_micro_config

  seen = []
  c = make_micro_config()
  c.pipeline.summary = False
  c.init_from = "runs/shared/1_stage2"
  c.pipeline.stages = ("stage3", "finetune")
  run_pipeline(c, str(tmp_path / "a"), lambda sc, wd: seen.append((sc.stage, sc.init_from)))
  c.pipeline.stages = ("stage1", "stage2")
  run_pipeline(c, str(tmp_path / "b"), lambda sc, wd: seen.append((sc.stage, sc.init_from)))
  assert seen == [
    (3, "runs/shared/1_stage2"),
    (4, str(tmp_path / "a" / "0_stage3")),
    (1, ""),
    (2, str(tmp_path / "b" / "0_stage1")),
  ]
  c.pipeline.first_index = 1  # the tiny default's: its stage 0 (the stand-in SD) ships
  seen.clear()
  run_pipeline(c, str(tmp_path / "c"), lambda sc, wd: seen.append((sc.stage, sc.init_from)))
  assert seen == [(1, ""), (2, str(tmp_path / "c" / "1_stage1"))]
  with open(tmp_path / "c" / "pipeline.json") as f:
    assert json.load(f)["stages"] == ["1_stage1", "2_stage2"]


def test_metrics_are_fetched_every_log_every_steps_one_step_late(tmp_path, monkeypatch):
  """The loop waits for metrics once per log_every steps (and at the first step, compilation),
  in one transfer, after the next step was dispatched; the rows are the same as ever."""
  from sodec_jax.train import loop

  events = []
  real_make, real_fetch = loop.make_train_step, loop._fetch

  def make(*a, **k):
    step_fn = real_make(*a, **k)

    def traced(state, consts, batch, step):
      events.append(("dispatch", int(step)))
      return step_fn(state, consts, batch, step)

    return traced

  def fetch(tree):
    events.append(("fetch", len(tree)))
    return real_fetch(tree)

  monkeypatch.setattr(loop, "make_train_step", make)
  monkeypatch.setattr(loop, "_fetch", fetch)
  c = make_micro_config(
    **{"train.num_steps": 7, "train.log_every": 3, "train.checkpoint_every": 100}
  )
  train(c, str(tmp_path))
  assert events == [
    ("dispatch", 0),
    ("fetch", 1),  # the first step: compilation, starts the step-time clock
    ("dispatch", 1),
    ("dispatch", 2),
    ("dispatch", 3),
    ("fetch", 2),  # steps 1, 2 (row 3) once step 3 is queued
    ("dispatch", 4),
    ("dispatch", 5),
    ("dispatch", 6),
    ("fetch", 3),  # steps 3, 4, 5 (row 6) once step 6 is queued
    ("fetch", 1),  # the last step, before the final checkpoint
  ]
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [3, 6, 7]
  assert all(np.isfinite(r["loss"]) and r["step_time"] > 0 for r in rows)
  assert checkpoints.latest_step(str(tmp_path)) == 7

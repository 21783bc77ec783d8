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

from sodec_jax import checkpoints, losses, train
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from tests.conftest import ROOT, make_micro_config

# The resume test builds the same jitted step three times: let the later ones reuse the code.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("SODEC_TEST_JAX_CACHE", "/tmp/sodec_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "sodec_jax.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,pattern", [
    (["--config.data.bogus=3"], "unknown config field 'data.bogus'"),
    (["--config.data.batch_size=abc"], "--config.data.batch_size=abc"),
    (["--config.train.num_steps=1.5"], "--config.train.num_steps=1.5"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_bad_override_is_a_one_line_error(tmp_path, args, pattern):
  r = _cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), *args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr
  assert not (tmp_path / "w").exists()


def test_missing_workdir_and_config_are_one_line_errors(tmp_path):
  r = _cli("--config", "configs/tiny.py")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: --workdir is required: the directory for config, checkpoints and metrics"]
  r = _cli("--config", "configs/nope.py", "--workdir", str(tmp_path))
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such file" in r.stderr


def test_lpips_without_weights_is_a_one_line_error(tmp_path):
  r = _cli("--config", "configs/stage1.py", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "error: config.loss.k_P=1.0 needs LPIPS VGG16 weights: pass "
      "--config.lpips.vgg_weights=/path/to/vgg16.pth (torchvision layout), or "
      "--config.loss.k_P=0 to train on MSE alone"]


def test_overrides_reach_config_json(tmp_path):
  wd = tmp_path / "w"
  r = _cli("--config", "configs/tiny.py", "--workdir", str(wd), "--config.train.num_steps=0", "--config.pipeline.stages=()",
           "--config.optim.learning_rate=0.002", "--config.model.encoder_filters=(4,4,8,8,8)",
           "--config.train.progress=False")
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
  train.train(c4, straight)
  assert "sodec compress photo.png out.sodec --checkpoint " + straight in capsys.readouterr().out

  train.train(make_micro_config(**{"train.num_steps": 2}), resumed)  # "interrupted" at step 2
  with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:  # logged, never checkpointed
    f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
  train.train(c4, resumed)  # the same command again: resumes from checkpoint 2

  s1, p1 = _final_params(straight, c4)
  s2, p2 = _final_params(resumed, c4)
  assert s1 == s2 == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), p1, p2)

  rows1, rows2 = _rows(straight), _rows(resumed)
  assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3, 4]
  for r1, r2 in zip(rows1, rows2):
    for k in ("loss", "bpp", "bpp_y", "bpp_z", "mse", "mse_loss", "rate_loss", "lambda",
              "target_bpp", "psnr", "learning_rate", "grad_norm", "param_norm"):
      assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), k
  assert all(np.isfinite(r["loss"]) for r in rows1)
  assert "step_time" in rows1[-1]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(straight))

  # a different config is refused in one line, unless allowed
  changed = make_micro_config(**{"train.num_steps": 4, "optim.learning_rate": 0.5})
  with pytest.raises(SodecError, match="different config.*optim.learning_rate.*allow_config_change"):
    train.train(changed, resumed)
  changed.train.allow_config_change = True
  train.train(changed, resumed)  # already at step 4: nothing to do, config.json updated
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
    train.train(c, str(tmp_path))
  assert checkpoints.latest_step(str(tmp_path)) == 2
  assert [r["step"] for r in _rows(str(tmp_path))] == [1, 2]


def test_sample_grids(tmp_path):
  c = make_micro_config(**{"train.num_steps": 4, "train.sample_every": 2})
  train.train(c, str(tmp_path))
  from PIL import Image
  names = sorted(os.listdir(tmp_path / train.SAMPLES_DIR))
  assert names == ["step_2.png", "step_4.png"]
  img = np.asarray(Image.open(tmp_path / train.SAMPLES_DIR / "step_4.png"))
  assert img.shape == (2 * 64, 3 * 64, 3) and img.dtype == np.uint8
  assert img[:, :64].std() > 0 and img[:, 128:].std() > 0  # the photo and a reconstruction

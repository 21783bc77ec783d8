"""python -m sodec_jax.experiments: the rate-annealing experiment's two schemes, its errors, and
(-m slow) a micro run end to end."""

import csv
import json
import os

import pytest

from sodec_jax import experiments, losses
from sodec_jax.errors import SodecError
from tests.conftest import make_micro_config


def _tiny_pipeline_config():
  from configs import tiny

  return tiny.get_config()


def test_the_two_schemes_differ_only_in_the_rate_weights_path():
  """(ii) direct: the final weight from step 0; (iv) annealing: stage 1's weight at step 0, the
  final one at the last step; same target, steps, seed, start point, everything else."""
  base = _tiny_pipeline_config()
  kw = dict(init_from="runs/tiny/2_stage2", target_bpp=0.15, steps=40, seed=3)
  direct = experiments.scheme_config(base, "direct", **kw)
  anneal = experiments.scheme_config(base, "annealing", **kw)
  a = anneal.loss.anneal
  assert a.start < a.end  # high-to-low bpp: the weight grows
  assert float(losses.annealed_lambda(0, direct.loss.anneal)) == pytest.approx(a.end)
  assert float(losses.annealed_lambda(40, direct.loss.anneal)) == pytest.approx(a.end)
  assert float(losses.annealed_lambda(0, a)) == pytest.approx(a.start)
  assert float(losses.annealed_lambda(20, a)) == pytest.approx((a.start + a.end) / 2)
  assert float(losses.annealed_lambda(40, a)) == pytest.approx(a.end)
  for c in (direct, anneal):
    assert c.stage == 3 and c.init_from == "runs/tiny/2_stage2" and c.seed == 3
    assert c.loss.anneal.target_rate == 0.15 and c.train.num_steps == 40
  d, n = direct.to_dict(), anneal.to_dict()
  d["loss"]["anneal"].pop("shape"), n["loss"]["anneal"].pop("shape")
  assert d == n


def test_unknown_scheme_and_missing_stage2_are_one_line(tmp_path):
  with pytest.raises(SodecError, match="not one of"):
    experiments.scheme_config(
      _tiny_pipeline_config(), "sideways", init_from="x", target_bpp=0.1, steps=2, seed=0
    )
  with pytest.raises(SodecError, match="no pipeline.json.*sodec_jax.train"):
    experiments.stage2_dir(str(tmp_path))
  (tmp_path / "pipeline.json").write_text(json.dumps({"stages": ["0_stage1", "1_stage2"]}))
  with pytest.raises(SodecError, match="no finished stage 2"):
    experiments.stage2_dir(str(tmp_path))


def test_command_line_errors_exit_non_zero(tmp_path, capsys):
  assert experiments.main(["rate_annealing", "--from", str(tmp_path), "--out", "o"]) == 1
  assert "no pipeline.json" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    experiments.main(["rate_annealing", "--from", "a", "--out", "b", "--seeds", "x"])
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    experiments.main(["rate_annealing", "--from", "a", "--out", "b", "--target-bpp", "-1"])
  with pytest.raises(SystemExit):
    experiments.main(["rate_targets", "--from", "a", "--out", "b", "--targets", "0.1,-2"])
  assert experiments.main(["rate_targets", "--from", str(tmp_path), "--out", "o"]) == 1


@pytest.mark.slow
def test_micro_rate_annealing_end_to_end(tmp_path, capsys):
  """A micro stage 1 and stage 2 as a pipeline, then both schemes for 2 steps: two rows measured
  through real files, results.csv/json written, and the rate weights each run used are the
  scheme's (direct: the final weight at step 1; annealing: the start weight)."""
  from sodec_jax.train.loop import train
  from tests.conftest import make_micro_sodec_config

  c = make_micro_sodec_config(stage=2)
  base = make_micro_config()
  for key in ("diffusion", "guidance", "sodec"):
    base[key] = c[key]
  base.pipeline.stages = ("stage1", "stage2")
  base.pipeline.stage2 = base.pipeline.stage2.copy_and_resolve_references()
  base.pipeline.stage2.train.num_steps = 2
  base.pipeline.stage2.train.checkpoint_every = 2
  base.pipeline.stage2.data = {"crop_size": 64, "batch_size": 2}
  base.pipeline.stage3.data = {"crop_size": 64, "batch_size": 2}
  base.data.holdout = ("coffee",)
  workdir = str(tmp_path / "pipe")
  train(base, workdir)
  out = str(tmp_path / "exp")
  summary = experiments.rate_annealing(base, workdir, out, target_bpp=0.5, steps=2, seeds=[0])
  assert [r["run"] for r in summary["runs"]] == ["direct", "annealing"]
  assert all(r["bpp"] > 0 and r["psnr"] > 0 and r["step"] == 2 for r in summary["runs"])
  with open(os.path.join(out, "results.csv")) as f:
    assert len(list(csv.DictReader(f))) == 2
  lams = {}
  for scheme in experiments.SCHEMES:
    with open(os.path.join(out, f"{scheme}_seed0", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if '"lambda"' in line]
    lams[scheme] = rows[0]["lambda"]
  assert lams["direct"] > lams["annealing"]
  assert "means over seeds [0]" in capsys.readouterr().out

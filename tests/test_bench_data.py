"""python -m sodec_jax.bench --what data: the loader's images/s beside the step's need."""

from __future__ import annotations

import re

import pytest

from sodec_jax import bench

LINE = re.compile(r"^data: loader_images_s=([0-9.e+]+) step_images_s=([0-9.e+]+)$", re.M)


def _run(capsys, *args):
  capsys.readouterr()
  code = bench.main(["--what", "data", "--config", "configs/tiny.py", "--repeats", "1", *args])
  out = capsys.readouterr().out
  assert code == 0
  loader, step = (float(v) for v in LINE.search(out).groups())
  return out, loader, step


def test_bench_data_compares_the_loader_with_a_given_step_time(capsys):
  # overrides reach the loader (batch 2) and the need: 2 images per second, then per 1 us
  out, loader, step = _run(capsys, "--config.data.batch_size=2", "--step-ms", "1000")
  assert "global batch 2" in out and "threads" in out and "--step-ms" in out
  assert step == pytest.approx(2.0) and loader > step
  assert "the loader keeps up" in out
  out, loader, step = _run(capsys, "--config.data.batch_size=2", "--step-ms", "0.001")
  assert step == pytest.approx(2e6) and "does NOT keep up" in out and "worker_count" in out


def test_bench_data_usage_errors(capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--what", "data", "--config", "configs/tiny.py", "--config.data.nope=1"])
  assert e.value.code == 2
  assert "unknown config field 'data.nope'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # overrides belong to --what data only
    bench.main(["--what", "codec", "--config.data.batch_size=2"])
  assert e.value.code == 2


@pytest.mark.slow  # compiles the tiny config's train step (~30 s on 2 cores)
def test_bench_data_measures_the_step(capsys):
  out, loader, step = _run(capsys, "--warmup", "0")
  assert "measured, cpu" in out and 0 < step < loader

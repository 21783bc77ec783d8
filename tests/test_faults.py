"""Faults with real signals, each training run in its own process: SIGTERM (preemption) saves a
checkpoint and exits 0; a run killed with SIGKILL and restarted with the same command ends where
an uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sodec_jax import checkpoints
from tests.conftest import ROOT

# A micro training run as a command: driver.py WORKDIR NUM_STEPS CHECKPOINT_EVERY SLEEP.
# SLEEP seconds per batch (in the data iterator, which changes no value) keep the run alive long
# enough to be interrupted at a chosen moment.
DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.conftest import make_micro_config
from sodec_jax import data
from sodec_jax.train import run

workdir, num_steps, every, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if sleep:
  real = data.train_iterator
  def slow(*a, **k):
    for batch in real(*a, **k):
      time.sleep(sleep)
      yield batch
  data.train_iterator = slow
c = make_micro_config(**{{"train.num_steps": num_steps, "train.checkpoint_every": every,
                         "train.log_every": 1}})
sys.exit(run(c, workdir))
"""


def _driver(tmp_path):
  path = tmp_path / "driver.py"
  path.write_text(DRIVER.format(root=ROOT))
  return str(path)


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _start(driver, workdir, num_steps, every, sleep=0.0):
  return subprocess.Popen(
    [sys.executable, driver, workdir, str(num_steps), str(every), str(sleep)],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc, timeout=180):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _saved_steps(workdir):
  """Complete checkpoint steps, read from the directory alone (as another process may)."""
  d = checkpoints.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(pred, proc, timeout=120):
  t0 = time.time()
  while not pred():
    assert proc.poll() is None, f"run ended early: {proc.communicate()}"
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.01)


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
  driver, wd = _driver(tmp_path), str(tmp_path / "w")
  proc = _start(driver, wd, 100_000, 100_000, sleep=0.02)  # no periodic checkpoint would come
  _wait_for(lambda: len(_rows(wd)) >= 1, proc)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = _finish(proc)
  assert rc == 0, err
  msg = [l for l in err.splitlines() if l.startswith("SIGTERM: saved a checkpoint at step ")]
  assert msg, err
  step = int(msg[0].split("step ")[1].split()[0])
  assert step >= 1 and checkpoints.latest_step(wd) == step
  assert checkpoints.read_meta(wd, step)["step"] == step

  rc, out, err = _finish(_start(driver, wd, step + 2, 100_000))  # the same run, resumed
  assert rc == 0, err
  assert checkpoints.latest_step(wd) == step + 2
  assert [r["step"] for r in _rows(wd)][-2:] == [step + 1, step + 2]


# -m slow (~65 s): test_sigterm_saves_a_checkpoint_and_exits_0 interrupts a run in the
# default suite
@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
  driver = _driver(tmp_path)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  num_steps, every = 30, 4
  proc = _start(driver, straight, num_steps, every)
  rc, _, err = _finish(proc)
  assert rc == 0, err

  # killed at a random moment after its first checkpoint (possibly while writing a later one)
  proc = _start(driver, killed, num_steps, every, sleep=0.05)
  _wait_for(lambda: _saved_steps(killed), proc)
  time.sleep(random.Random(os.getpid()).uniform(0.0, 0.8))
  proc.send_signal(signal.SIGKILL)
  rc, _, _ = _finish(proc)
  assert rc == -signal.SIGKILL
  at_kill = checkpoints.latest_step(killed)
  assert at_kill is not None and at_kill < num_steps

  rc, _, err = _finish(_start(driver, killed, num_steps, every))  # the same command again
  assert rc == 0, err

  # bitwise: the same parameters and every logged value but the wall-clock step time
  p1, s1 = checkpoints.read_params(straight)
  p2, s2 = checkpoints.read_params(killed)
  assert s1 == s2 == num_steps
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  rows1, rows2 = _rows(straight), _rows(killed)
  assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, num_steps + 1))
  for r1, r2 in zip(rows1, rows2):
    r1.pop("step_time", None)
    r2.pop("step_time", None)
    assert r1 == r2 and "loss" in r1, (r1, r2)

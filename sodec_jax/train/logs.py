"""What a run writes to its workdir besides checkpoints: config.json (a changed config refused
on resume), metrics.jsonl with TensorBoard scalars, sample grids, and the closing hints.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from PIL import Image

from sodec_jax import checkpoints
from sodec_jax.errors import SodecError

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


def save_sample_grid(path: str, original, x_f, x_hat) -> str:
  """PNG with one row per image: original | x_f | x_hat (uint8 [B, H, W, 3] each)."""
  rows = [
    np.concatenate([np.asarray(a[i]) for a in (original, x_f, x_hat)], axis=1)
    for i in range(len(original))
  ]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
  os.replace(tmp, path)
  return path


def prepare_workdir(config, workdir: str) -> None:
  """Writes WORKDIR/config.json; resuming a checkpoint with a different config is refused
  unless config.train.allow_config_change (a workdir without checkpoints is simply reused)."""
  resuming = checkpoints.latest_step(workdir) is not None
  if resuming and os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    old = checkpoints.load_config(workdir)
    diff = checkpoints.config_diff(old, config)
    if diff:
      if not config.train.get("allow_config_change", False):
        raise SodecError(
          f"{workdir} was trained with a different config ({len(diff)} field(s): "
          f"{'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); use another --workdir, "
          "or pass --config.train.allow_config_change=True to resume with the new one"
        )
      print(f"resuming {workdir} with a changed config: {'; '.join(diff)}", file=sys.stderr)
  if jax.process_index() == 0:
    checkpoints.save_config(workdir, config)


class MetricsLog:
  """metrics.jsonl (one row per logged step) and TensorBoard scalars, written by process 0."""

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop rows past the checkpoint we resume from
      with open(self.path) as f:
        rows = [r for r in f if r.strip() and json.loads(r).get("step", 0) <= start_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self.tb = SummaryWriter(logdir=workdir)

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(f"train/{k}", v, row["step"])
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def next_steps(workdir: str) -> str:
  """Lines naming a finished run's outputs and the commands that use it."""
  return (
    f"outputs in {workdir}: config.json, checkpoints/, {METRICS_FILE}, TensorBoard events "
    f"(tensorboard --logdir {workdir})\n"
    "next:\n"
    f"  sodec compress photo.png out.sodec --checkpoint {workdir}\n"
    f"  sodec decompress out.sodec out.png --checkpoint {workdir}"
  )

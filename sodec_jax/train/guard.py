"""The guard: each stage is measured on photos it did not train on, and keeps its best step.

Every config.train.validate_every steps (0 = off), at the start of a stage and at its last
step, the loop hands the current params to `Guard.check`: the held-out photos
(config.data.holdout, centre-cropped to config.train.validate_size) go through real .sodec files
of the model in memory (api.prepare + validation.validate), and metrics.jsonl gets a row
{"step", "val_psnr", "val_bpp", "val_ms_ssim" (sides >= 161 only)}. The stage's output is its
latest validated step whose val_psnr is within config.train.guard_db of the stage's start: it is
checkpointed (if that step was not saved anyway), protected from keep_checkpoints, and recorded
in WORKDIR/best.json, which checkpoints.restore_params (so load_model, --checkpoint) and
init_from read. Not the step of the highest val_psnr: a stage that lowers the rate (stage 3's
annealing, a rate target) trades PSNR for bits by design, and the highest-PSNR step of such a
stage is its start, which would discard the stage. When val_psnr falls more than guard_db below
the start, one line says so and the output stays at the last step within it; with
config.train.guard_action="stop" the stage stops with a SodecError.
Runs in single-process runs of the coding stages (not stage 0, the latent pretraining).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax import api, checkpoints, validation
from sodec_jax.errors import SodecError


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central min(size, H) x min(size, W) window of a uint8 [H, W, 3] image."""
  h, w = min(size, image.shape[0]), min(size, image.shape[1])
  top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
  return np.ascontiguousarray(image[top : top + h, left : left + w])


class Guard:
  """Validation state of one stage in WORKDIR (see the module docstring); `create` makes one
  when the config asks for it, else returns None (after a note where it cannot run)."""

  def __init__(self, config, workdir: str, graphdef, images, start: int):
    self.config, self.workdir, self.graphdef, self.images = config, workdir, graphdef, images
    self.every = int(config.train.validate_every)
    self.guard_db = float(config.train.get("guard_db", 3.0))
    self.action = str(config.train.get("guard_action", "continue"))
    self.label = f"{os.path.basename(os.path.normpath(workdir))} (stage {config.stage})"
    record = checkpoints.read_best(workdir) if start else None
    if not start and os.path.exists(os.path.join(workdir, checkpoints.BEST_FILE)):
      os.remove(os.path.join(workdir, checkpoints.BEST_FILE))  # a stale one from an older run
    self.record = record or {}

  @classmethod
  def create(cls, config, workdir: str, graphdef, start: int) -> "Guard | None":
    every = int(config.train.get("validate_every", 0))
    if not every or config.stage == 0:
      return None
    if jax.process_count() > 1:
      print(
        f"validation off: {jax.process_count()} processes (held-out validation runs in "
        "single-process training only)"
      )
      return None
    if not tuple(config.data.get("holdout", ())):
      print("validation off: config.data.holdout is empty (name held-out photos to validate on)")
      return None
    action = config.train.get("guard_action", "continue")
    if action not in ("continue", "stop"):
      raise SodecError(f"config.train.guard_action={action!r} must be 'continue' or 'stop'")
    size = int(config.train.get("validate_size", 256))
    if size < 64:
      raise SodecError(f"config.train.validate_size={size} must be >= 64")
    images = [center_crop(im, size) for im in validation.holdout_images(config)]
    return cls(config, workdir, graphdef, images, start)

  @property
  def best_step(self) -> int | None:
    return self.record.get("step")

  def due(self, done: int, last: int) -> bool:
    """Whether step `done` is validated (every `validate_every` and the stage's last step)."""
    return done % self.every == 0 or done == last

  def needs_start(self) -> bool:
    """True until the stage's starting point has been measured."""
    return "start_psnr" not in self.record

  def measure(self, step: int, params, consts) -> dict:
    """{"val_psnr", "val_bpp", "val_ms_ssim" (or absent), "val_seconds"} of the params (pure
    dicts, as in the train state; copied, so later donation of the state does not touch them)."""
    t0 = time.perf_counter()
    frozen, rest, _ = consts
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    model = nnx.merge(self.graphdef, copy(params), copy(frozen), copy(rest))
    result = validation.validate(api.prepare(self.config, model, step), self.images)
    row = {"val_psnr": result["psnr"], "val_bpp": result["bpp"]}
    if result["ms_ssim"] is not None:
      row["val_ms_ssim"] = result["ms_ssim"]
    row["val_seconds"] = time.perf_counter() - t0
    return row

  def check(self, step: int, params, consts, log, save, write) -> dict:
    """Measures `step`, logs the row, checkpoints and records a new best (`save(step)` saves
    the current state unless that step is saved), prints the guard line once (`write`), and
    raises SodecError when the drop exceeds guard_db and guard_action is "stop"."""
    row = self.measure(step, params, consts)
    log.write({"step": step, **row})
    psnr, rec = row["val_psnr"], self.record
    if "start_psnr" not in rec:
      rec.update(start_step=step, start_psnr=psnr)
    drop = rec["start_psnr"] - psnr
    tripped = drop > self.guard_db
    if not tripped:  # the latest step within guard_db of the start is the stage's output
      save(step)
      rec.update(step=step, val_psnr=psnr, val_bpp=row["val_bpp"])
    if tripped and not rec.get("warned"):
      rec["warned"] = step
      if self.action != "stop":
        write(
          f"guard: {self.label} validation PSNR fell {drop:.2f} dB at step {step}: "
          f"{rec['start_psnr']:.2f} dB at step {rec['start_step']} -> {psnr:.2f} dB now "
          f"(> guard_db {self.guard_db}); the stage's output stays at step {rec['step']} "
          f"({rec['val_psnr']:.2f} dB), the last within guard_db (best.json)"
        )
    checkpoints.write_best(self.workdir, rec)
    if tripped and self.action == "stop":
      raise SodecError(
        f"guard: {self.label} validation PSNR fell from {rec['start_psnr']:.2f} dB (step "
        f"{rec['start_step']}) to {psnr:.2f} dB at step {step}; step {rec['step']} kept "
        f"in best.json; lower --config.optim.learning_rate or pass "
        "--config.train.guard_action=continue"
      )
    return row

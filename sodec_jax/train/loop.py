"""The training loop: `train(config, workdir)` trains (or resumes) one stage, top to bottom.

Rerunning the same command resumes from the last checkpoint in WORKDIR and reproduces the run an
uninterrupted command would have made (see sodec_jax/checkpoints.py for the workdir layout and
the resume order). The pieces live beside it: build.py (model, optimizer, discriminator),
step.py (the jitted update), parallel.py (mesh and shardings), logs.py (workdir outputs),
pipeline.py (several stages in one workdir).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import jax
import ml_collections
import numpy as np
from flax import nnx

from sodec_jax import checkpoints, data
from sodec_jax.errors import SodecError
from sodec_jax.train import build, logs, parallel, pipeline
from sodec_jax.train import guard as guard_lib
from sodec_jax.train.step import make_sample_fn, make_train_step


class Preempted(Exception):
  """SIGTERM (preemption) stopped training after a checkpoint at `step` was saved."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, workdir
    super().__init__(
      f"SIGTERM: saved a checkpoint at step {step} in {workdir} and stopped; "
      "rerun the same command to resume"
    )


class _StopFlag:
  """Installs a SIGTERM handler (main thread only) that sets `.set`; the loop saves a checkpoint
  at the end of the current step and stops. `restore()` puts the previous handler back."""

  def __init__(self):
    self.set, self._old = False, None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.set = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics row."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  parallel.init_distributed(config)
  if config.get("pipeline") and config.pipeline.stages:
    return pipeline.run_pipeline(config, workdir, train)
  build.validate_config(config)
  mesh = parallel.make_mesh(config)  # before anything is written: the batch must divide
  lpips_graphdef, lpips_state = build.load_lpips(config)
  paths = data.list_images(config.data.train_dir)
  logs.prepare_workdir(config, workdir)

  mngr = checkpoints.manager(workdir)  # keep-all; checkpoints.prune keeps N and the best step
  start = mngr.latest_step() or 0
  num_steps = int(config.train.num_steps)
  if start >= num_steps:
    print(
      f"nothing to train: {workdir} is at step {start} and num_steps={num_steps} (raise "
      f"--config.train.num_steps to train further)\n{logs.next_steps(workdir)}"
    )
    mngr.close()
    return {"step": start}

  model = build.build_training_model(config)
  if config.init_from and not start:
    for line in checkpoints.init_from(model, config.init_from):
      print(line)
  trainable = build.trainable_filter(config)
  graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
  params, frozen, rest = (nnx.to_pure_dict(t) for t in (params, frozen, rest))
  n_train, n_frozen = build.count_params(params), build.count_params(frozen)
  if not n_train:
    raise SodecError(
      f"config.train.trainable={tuple(config.train.trainable)} matches no parameter "
      "of this model; see the stage configs for the path patterns"
    )
  print(f"{config.name} stage {config.stage}: training {n_train:,} parameters, {n_frozen:,} frozen")
  del model
  tx, lr_schedule = build.make_optimizer(config)
  opt_state = tx.init(params)
  disc_graphdef = disc_tx = None
  if config.stage == 4 and config.loss.beta > 0:
    disc_graphdef, disc_state, disc_tx = build.make_discriminator(config)
    opt_state = {"model": opt_state, "disc": disc_state}  # the checkpoint's opt_state item
  if start:
    full, opt_state, meta = checkpoints.restore(
      mngr, start, build.merge_pure(params, frozen), opt_state, workdir
    )
    params, frozen = build.split_pure(full, params)
    if meta.get("seed") != config.seed:
      warnings.warn(f"checkpoint {start} was written with seed {meta.get('seed')}", stacklevel=2)
  state = {"params": params, "opt_state": opt_state}
  if disc_graphdef is not None:
    state = {"params": params, "opt_state": opt_state["model"], "disc": opt_state["disc"]}

  _, batch_sharding = parallel.shardings(mesh)
  if mesh.size > 1:
    print(
      f"data parallel over {mesh.size} devices: {config.data.batch_size // mesh.size} "
      f"images per device (global batch {config.data.batch_size})"
      + (
        f"; parameters and optimizer state sharded over {mesh.shape[parallel.FSDP_AXIS]} (fsdp)"
        if parallel.FSDP_AXIS in mesh.axis_names
        else ""
      )
    )
  consts = (frozen, rest, lpips_state)
  state_sharding = parallel.param_sharding(mesh, state)
  consts_sharding = parallel.param_sharding(mesh, consts)
  train_step = make_train_step(
    graphdef,
    tx,
    lr_schedule,
    config,
    lpips_graphdef,
    disc_graphdef,
    disc_tx,
    mesh=mesh,
    state_sharding=state_sharding,
    consts_sharding=consts_sharding,
  )
  state = parallel.place(state, state_sharding)
  consts = parallel.place(consts, consts_sharding)
  frozen = consts[0]
  # each process loads its rows of every global batch; the arrays span all processes' devices
  batches = data.train_iterator(config, start, paths, jax.process_index(), jax.process_count())
  log = logs.MetricsLog(workdir, start)
  bar = tqdm(
    total=num_steps,
    initial=start,
    disable=not config.train.progress or jax.process_index() != 0,
    dynamic_ncols=True,
    desc=f"{config.name} stage {config.stage}",
  )
  sample_every = int(config.train.get("sample_every", 0)) if jax.process_count() == 1 else 0
  sample_fn = make_sample_fn(graphdef, config) if sample_every else None
  guard = guard_lib.Guard.create(config, workdir, graphdef, start)
  max_bad = int(config.train.get("max_nonfinite_steps", 3))
  bad, sums, count, times, row = 0, {}, 0, [], {"step": start}
  t_start = time.time()
  stop = _StopFlag()

  def save(done):
    extra = (
      state["opt_state"]
      if "disc" not in state
      else {"model": state["opt_state"], "disc": state["disc"]}
    )
    if done in mngr.all_steps():
      return
    checkpoints.save(mngr, done, build.merge_pure(state["params"], frozen), extra, config)
    checkpoints.prune(
      mngr,
      config.train.keep_checkpoints,
      () if guard is None or guard.best_step is None else (guard.best_step,),
    )

  def validate(done):  # held-out photos through real files; the best step is kept (guard.py)
    guard.check(done, state["params"], consts, log, save, bar.write)

  try:
    if guard is not None and guard.needs_start():
      validate(start)
    for step in range(start, num_steps):
      if stop.set:  # preemption: `state` holds `step` updates; save it (unless saved) and stop
        if mngr.latest_step() != step:
          save(step)
        raise Preempted(step, workdir)
      host_batch = next(batches)
      batch = jax.make_array_from_process_local_data(batch_sharding, host_batch)
      t0 = time.perf_counter()
      state, metrics = train_step(state, consts, batch, np.int32(step))
      metrics = jax.device_get(metrics)
      if step > start:  # the first step of a run includes compilation
        times.append(time.perf_counter() - t0)
      if not metrics.pop("finite"):
        bad += 1
        bar.write(
          f"step {step}: non-finite loss {float(metrics['loss'])} or gradient "
          f"{float(metrics['grad_norm'])}; update skipped ({bad} in a row)"
        )
        if bad >= max_bad:
          raise SodecError(
            f"loss or gradient not finite for {bad} steps in a row (last step {step}); "
            f"the last checkpoint in {workdir} is step {mngr.latest_step() or 'none'}; "
            "try a lower --config.optim.learning_rate or --config.optim.grad_clip_norm=1"
          )
        continue
      bad = 0
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      count += 1
      shown = [k for k in ("loss", "bpp", "psnr") if k in metrics]
      bar.set_postfix(refresh=False, **{k: f"{float(metrics[k]):.4g}" for k in shown})
      bar.update(1)
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps:
        row = {"step": done, **{k: v / count for k, v in sums.items()}}
        if times:
          row["step_time"] = float(np.mean(times))
        log.write(row)
        sums, count, times = {}, 0, []
      if sample_every and done % sample_every == 0 and log.enabled:
        x_f, x_hat = jax.device_get(sample_fn(state["params"], consts, host_batch[:2]))
        logs.save_sample_grid(
          os.path.join(workdir, logs.SAMPLES_DIR, f"step_{done}.png"), host_batch[:2], x_f, x_hat
        )
      if done % config.train.checkpoint_every == 0 or done == num_steps:
        save(done)
      if guard is not None and guard.due(done, num_steps):
        validate(done)
  finally:
    stop.restore()
    bar.close()
    log.close()
    mngr.close()
  minutes, seconds = divmod(int(time.time() - t_start), 60)
  print(
    f"done: steps {start}..{num_steps} in {minutes}m{seconds:02d}s; last logged step "
    f"{row['step']}: loss {row.get('loss', float('nan')):.4g}, bpp "
    f"{row.get('bpp', float('nan')):.3f}, PSNR {row.get('psnr', float('nan')):.2f} dB\n"
    f"{logs.next_steps(workdir)}"
  )
  return row

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

from sodec_jax import checkpoints, data, losses, validation
from sodec_jax.errors import SodecError
from sodec_jax.train import build, feed, logs, parallel, pipeline
from sodec_jax.train import guard as guard_lib
from sodec_jax.train.step import make_sample_fn, make_train_step


def _fetch(tree):
  """Device arrays -> numpy (a blocking transfer); the loop's only wait for its metrics."""
  return jax.device_get(tree)


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


def _initial_rate_integral(config, meta: dict | None) -> tuple[float, str]:
  """(integral, where it came from) for the dual rate controller: a resumed step's meta, else
  the last of config.init_from's workdirs whose checkpoint (the one a reader takes by default)
  carries one (stage 4 goes on from stage 3's), else 0."""
  key = "rate_control_integral"
  if meta is not None and key in meta:
    return float(meta[key]), f"resumed at step {meta['step']}"
  if meta is None and config.init_from:
    for wd in reversed([w.strip() for w in str(config.init_from).split(",") if w.strip()]):
      m = checkpoints.read_default_meta(wd)
      if key in m:
        return float(m[key]), f"from {wd} step {m['step']}"
  return 0.0, "start"


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

  # keep-all (checkpoints.prune keeps N and the stage output); saves write in the background
  mngr = checkpoints.manager(workdir, async_save=True)
  start = mngr.latest_step() or 0
  num_steps = int(config.train.num_steps)
  if start >= num_steps:
    print(
      f"nothing to train: {workdir} is at step {start} and num_steps={num_steps} (raise "
      f"--config.train.num_steps to train further)\n{logs.next_steps(workdir)}"
    )
    mngr.close()
    return {"step": start}

  if config.init_from and not start:
    model, report = build.build_initialised_model(config)
    print("\n".join(report))
  else:
    model = build.build_training_model(config)
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
  ema = float(config.optim.get("ema_decay", 0.0)) > 0
  # the checkpoint's opt_state item: the optax state, with the discriminator's state (stage 4) and
  # the online weights (EMA on: the params item holds the average) beside it under their names
  opt_state = tx.init(params)
  disc_graphdef = disc_tx = None
  if config.stage == 4 and config.loss.beta > 0:
    disc_graphdef, disc_state, disc_tx = build.make_discriminator(config)
    opt_state = {"model": opt_state, "disc": disc_state}
  if ema:
    opt_state = {**(opt_state if disc_graphdef else {"model": opt_state}), "online": params}
  meta = {}
  if start:
    full, opt_state, meta = checkpoints.restore(
      mngr, start, build.merge_pure(params, frozen), opt_state, workdir
    )
    params, frozen = build.split_pure(full, params)
    if meta.get("seed") != config.seed:
      warnings.warn(f"checkpoint {start} was written with seed {meta.get('seed')}", stacklevel=2)
  average = None
  if ema:  # the average starts at the stage's initial weights (a copy: the step donates params)
    average = params if start else jax.tree.map(np.array, params)
    params = opt_state["online"]
  state = {"params": params, "opt_state": opt_state}
  if disc_graphdef is not None or ema:
    state["opt_state"] = opt_state["model"]
  if disc_graphdef is not None:
    state["disc"] = opt_state["disc"]
  if ema:
    state["ema"] = average
  calibration = None
  if config.stage >= 2 and losses.uses_rate_multiplier(config.loss):
    integral, source = _initial_rate_integral(config, meta if start else None)
    state["rate_control"] = {"integral": np.float32(integral)}
    calibration = validation.calibration_images(config)
    print(
      f"rate control: integral {integral:.4g} ({source}), lambda(t) steered to "
      f"{float(config.loss.anneal.target_rate):g} bpp on "
      + (
        f"{len(calibration)} calibration photos ({', '.join(data.calibration_names(config))}, "
        f"{' + '.join(f'{p.image.shape[0]}x{p.image.shape[1]}' for p in calibration)} as coded)"
        if calibration is not None
        else "the training batches (no loss.rate_control.photos)"
      )
    )

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
    calibration=calibration,
  )
  state = parallel.place(state, state_sharding)
  consts = parallel.place(consts, consts_sharding)
  frozen = consts[0]
  # each process loads its rows of every global batch; the arrays span all processes' devices
  batches = feed.device_batches(
    data.train_iterator(config, start, paths, jax.process_index(), jax.process_count()),
    batch_sharding,
    int(config.data.get("prefetch", 2)),
  )
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
  log_every = int(config.train.log_every)
  # host-side bookkeeping of the fetched metrics (see `fetch`)
  acc = {"bad": 0, "sums": {}, "count": 0, "seconds": 0.0, "steps": 0, "finite": True}
  clock = [None, start]  # (perf_counter, steps done) at the last synchronisation
  row = {"step": start}
  pending = []  # (step, metrics as device arrays): dispatched, not fetched yet
  saved = set(mngr.all_steps())
  # (fingerprint of WORKDIR/frozen/, whether it is in place): a resumed step that names one was
  # restored from it (checkpoints.restore checked it); otherwise the first save writes it
  frozen_id = [meta["frozen"], True] if start and "frozen" in meta else [None, False]
  t_start = time.time()
  stop = _StopFlag()

  def consume(step, metrics):
    """One step's fetched metrics, in step order: the non-finite streak, the running means, the
    progress bar and, at every log_every-th step, a metrics.jsonl row."""
    nonlocal row
    acc["finite"] = bool(metrics.pop("finite"))
    if not acc["finite"]:
      acc["bad"] += 1
      bar.write(
        f"step {step}: non-finite loss {float(metrics['loss'])} or gradient "
        f"{float(metrics['grad_norm'])}; update skipped ({acc['bad']} in a row)"
      )
      if acc["bad"] >= max_bad:
        raise SodecError(
          f"loss or gradient not finite for {acc['bad']} steps in a row (last step {step}); "
          f"the last checkpoint in {workdir} is step {max(saved, default='none')}; "
          "try a lower --config.optim.learning_rate or --config.optim.grad_clip_norm=1"
        )
      return
    acc["bad"] = 0
    sums = acc["sums"]
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    acc["count"] += 1
    shown = [k for k in ("loss", "bpp", "psnr") if k in metrics]
    bar.set_postfix(refresh=False, **{k: f"{float(metrics[k]):.4g}" for k in shown})
    bar.update(1)
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      row = {"step": done, **{k: v / acc["count"] for k, v in sums.items()}}
      if acc["steps"]:
        row["step_time"] = acc["seconds"] / acc["steps"]
      log.write(row)
      acc.update(sums={}, count=0, seconds=0.0, steps=0)

  def fetch(keep: int = 0):
    """Brings the pending metrics but the last `keep` steps' to the host in ONE transfer and
    consumes them. The wall time since the last synchronisation, over the steps it covers, is
    the logged step_time (a measure of throughput: data loading included)."""
    todo = pending[: len(pending) - keep]
    if not todo:
      return
    del pending[: len(todo)]
    host = _fetch([m for _, m in todo])
    now, last = time.perf_counter(), todo[-1][0] + 1
    if clock[0] is not None:
      acc["seconds"] += now - clock[0]
      acc["steps"] += last - clock[1]
    clock[:] = [now, last]
    for (step, _), metrics in zip(todo, host):
      consume(step, metrics)

  def save(done):
    """Checkpoint `done` (the trained Params; the frozen ones once, in WORKDIR/frozen), after
    the previous save finished writing and old ones were pruned; returns while it writes."""
    if done in saved:
      return
    extra = state["opt_state"]
    if "disc" in state or ema:
      extra = {"model": extra, **{k: state[k] for k in ("disc",) if k in state}}
    if ema:
      extra["online"] = state["params"]
    if not frozen_id[1]:
      frozen_id[:] = [checkpoints.save_frozen(workdir, frozen), True]
    mngr.wait_until_finished()
    checkpoints.prune(mngr, config.train.keep_checkpoints, protected())
    rate = {}
    if "rate_control" in state:  # a float32 scalar; JSON keeps its value exactly
      rate["rate_control_integral"] = float(jax.device_get(state["rate_control"]["integral"]))
    checkpoints.save(mngr, done, published(), extra, config, frozen=frozen_id[0], extra_meta=rate)
    saved.add(done)

  def published():
    """The weights a checkpoint's params item, validation and samples use: the average (EMA on)
    or the online weights."""
    return state["ema"] if ema else state["params"]

  def protected():
    return () if guard is None or guard.best_step is None else (guard.best_step,)

  def validate(done):  # held-out photos through real files; the output step is kept (guard.py)
    guard.check(done, published(), consts, log, save, bar.write)

  try:
    if guard is not None and guard.needs_start():
      validate(start)
    late = False  # the metrics of steps before this one are due (a log_every boundary)
    for step in range(start, num_steps):
      if stop.set:  # preemption: `state` holds `step` updates; save it (unless saved) and stop
        fetch()
        save(step)
        raise Preempted(step, workdir)
      host_batch, batch = next(batches)
      state, metrics = train_step(state, consts, batch, np.int32(step))
      pending.append((step, metrics))
      # one step late: step `step` is queued on the device before the host waits for the
      # earlier ones; the first step (compilation) is fetched at once to start the clock
      if step == start or late:
        fetch(keep=0 if step == start else 1)
      done = step + 1
      late = done % log_every == 0
      sample = sample_every and done % sample_every == 0 and log.enabled
      checkpoint = done % config.train.checkpoint_every == 0 or done == num_steps
      validating = guard is not None and guard.due(done, num_steps)
      if not (sample or checkpoint or validating or done == num_steps):
        continue
      fetch()  # these wait for the state anyway; nothing is saved before its steps are checked
      late = False
      if not acc["finite"]:
        continue  # as ever: nothing is saved, sampled or validated at a non-finite step
      if sample:
        x_f, x_hat = jax.device_get(sample_fn(published(), consts, host_batch[:2]))
        logs.save_sample_grid(
          os.path.join(workdir, logs.SAMPLES_DIR, f"step_{done}.png"), host_batch[:2], x_f, x_hat
        )
      if checkpoint:
        save(done)
      if validating:
        validate(done)
      clock[:] = [time.perf_counter(), done]  # samples, saves, validation: not in step_time
    fetch()
  finally:
    stop.restore()
    bar.close()
    log.close()
    try:
      mngr.wait_until_finished()  # the last save is complete before training returns or stops
      checkpoints.prune(mngr, config.train.keep_checkpoints, protected())
    finally:
      mngr.close()
  minutes, seconds = divmod(int(time.time() - t_start), 60)
  print(
    f"done: steps {start}..{num_steps} in {minutes}m{seconds:02d}s; last logged step "
    f"{row['step']}: loss {row.get('loss', float('nan')):.4g}, bpp "
    f"{row.get('bpp', float('nan')):.3f}, PSNR {row.get('psnr', float('nan')):.2f} dB\n"
    f"{logs.next_steps(workdir)}"
  )
  return row

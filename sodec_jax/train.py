"""Training: python -m sodec_jax.train --config configs/stage1.py --workdir DIR [--config.a.b=v ...]

Rerunning the same command resumes from the last checkpoint in DIR and reproduces the run an
uninterrupted command would have made (see sodec_jax/checkpoints.py for the workdir layout and
the resume order). The loop reads top to bottom in `train()`; the update is the pure, jitted,
state-donating `train_step` built by `make_train_step()`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from sodec_jax import checkpoints, data, losses
from sodec_jax.errors import SodecError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with --config.a.b=v.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Training directory: config, checkpoints, metrics (resumes).")

METRICS_FILE = "metrics.jsonl"


# --- pieces -------------------------------------------------------------------------------------

def validate_config(config) -> None:
  """One-line SodecError for configs training cannot run with."""
  d, t, l = config.data, config.train, config.loss
  if config.stage != 1:
    raise SodecError(f"config.stage={config.stage}: only stage 1 training is implemented so far")
  if d.crop_size <= 0 or d.crop_size % 64:
    raise SodecError(f"config.data.crop_size={d.crop_size} must be a positive multiple of 64")
  for name in ("data.batch_size", "train.log_every", "train.checkpoint_every"):
    group, field = name.split(".")
    if config[group][field] < 1:
      raise SodecError(f"config.{name}={config[group][field]} must be >= 1")
  if config.seed < 0:
    raise SodecError(f"config.seed={config.seed} must be >= 0")
  if t.num_steps < 0:
    raise SodecError(f"config.train.num_steps={t.num_steps} must be >= 0")
  for sched in ("lambda_schedule", "target_schedule"):
    vals, steps = l[f"{sched}_values"], l[f"{sched}_steps"]
    if len(vals) != len(steps) + 1:
      raise SodecError(f"config.loss.{sched}_values needs one more entry than "
                       f"config.loss.{sched}_steps, got {tuple(vals)} and {tuple(steps)}")
  if l.lambda_A < l.lambda_B:
    raise SodecError(f"config.loss.lambda_A={l.lambda_A} must be >= config.loss.lambda_B="
                     f"{l.lambda_B} (lambda_A applies above the target rate)")
  if l.k_P > 0 and not config.lpips.vgg_weights:
    raise SodecError(
        f"config.loss.k_P={l.k_P} needs LPIPS VGG16 weights: pass "
        "--config.lpips.vgg_weights=/path/to/vgg16.pth (torchvision layout), or "
        "--config.loss.k_P=0 to train on MSE alone")


def make_optimizer(config):
  """AdamW with the piecewise-constant lr schedule (and optional global-norm clipping)."""
  o = config.optim
  lr = optax.piecewise_constant_schedule(
      o.learning_rate, {int(s): o.lr_decay_factor for s in o.lr_decay_steps})
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, lr


def make_train_step(graphdef, tx, lr_schedule, config, lpips_graphdef=None):
  """The jitted update: (state, consts, batch, step) -> (state, metrics); `state` is donated.

  state = {'params': pure dict of the model's nnx.Params, 'opt_state': optax state}
  consts = (the model's non-Param variables, the LPIPS state or None): never trained.
  batch: uint8 [B, H, W, 3]. The noise key of step s is fold_in(key(seed), s).
  A non-finite loss or gradient leaves the state unchanged (metrics['finite'] is False).
  """

  def train_step(state, consts, batch, step):
    rest, lpips_state = consts
    lpips = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
    x = batch.astype(jnp.float32) / 255.0
    key = jax.random.fold_in(jax.random.key(config.seed), step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest)
      out = model(x, noise_key=key, train=True)
      loss, terms = losses.stage1_loss(out, x, step, config, lpips)
      x_hat = jnp.clip(jax.lax.stop_gradient(out["x_hat"]), 0.0, 1.0)
      terms["psnr"] = jnp.mean(_psnr(x, x_hat))
      return loss, terms

    params, opt_state = state["params"], state["opt_state"]
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = {"params": jax.tree.map(keep, new_params, params),
                 "opt_state": jax.tree.map(keep, new_opt_state, opt_state)}
    metrics = dict(terms, grad_norm=grad_norm, param_norm=optax.global_norm(new_state["params"]),
                   learning_rate=lr_schedule(step), finite=finite)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def _psnr(x, y):
  from sodec_jax.metrics import psnr  # pylint: disable=import-outside-toplevel
  return psnr(x, y)


def load_lpips(config):
  """(graphdef, state) of the frozen LPIPS network, or (None, None) when k_P == 0."""
  if config.loss.k_P <= 0:
    return None, None
  path = config.lpips.vgg_weights
  if not os.path.isfile(path):
    raise SodecError(f"config.lpips.vgg_weights={path!r} is not a file")
  from sodec_jax.metrics import load_lpips as _load  # pylint: disable=import-outside-toplevel
  return nnx.split(_load(path, precision="default"))


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
            "or pass --config.train.allow_config_change=True to resume with the new one")
      print(f"resuming {workdir} with a changed config: {'; '.join(diff)}", file=sys.stderr)
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


def _next_steps(workdir: str) -> str:
  return (f"outputs in {workdir}: config.json, checkpoints/, {METRICS_FILE}, TensorBoard events "
          f"(tensorboard --logdir {workdir})\n"
          "next:\n"
          f"  sodec compress photo.png out.sodec --checkpoint {workdir}\n"
          f"  sodec decompress out.sodec out.png --checkpoint {workdir}")


# --- the loop -----------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics row."""
  from sodec_jax.model import build_model  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  validate_config(config)
  lpips_graphdef, lpips_state = load_lpips(config)
  paths = data.list_images(config.data.train_dir)
  prepare_workdir(config, workdir)

  mngr = checkpoints.manager(workdir, keep=config.train.keep_checkpoints)
  start = mngr.latest_step() or 0
  num_steps = int(config.train.num_steps)
  if start >= num_steps:
    print(f"nothing to train: {workdir} is at step {start} and num_steps={num_steps} (raise "
          f"--config.train.num_steps to train further)\n{_next_steps(workdir)}")
    mngr.close()
    return {"step": start}

  model = build_model(config, nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  del model
  tx, lr_schedule = make_optimizer(config)
  opt_state = tx.init(params)
  if start:
    params, opt_state, meta = checkpoints.restore(mngr, start, params, opt_state, workdir)
    if meta.get("seed") != config.seed:
      warnings.warn(f"checkpoint {start} was written with seed {meta.get('seed')}")
  state = {"params": params, "opt_state": opt_state}

  train_step = make_train_step(graphdef, tx, lr_schedule, config, lpips_graphdef)
  consts = (rest, lpips_state)
  batches = data.train_iterator(config, start, paths)
  log = MetricsLog(workdir, start)
  bar = tqdm(total=num_steps, initial=start, disable=not config.train.progress,
             dynamic_ncols=True, desc=f"{config.name} stage {config.stage}")
  max_bad = int(config.train.get("max_nonfinite_steps", 3))
  bad, sums, count, times, row = 0, {}, 0, [], {"step": start}
  t_start = time.time()
  try:
    for step in range(start, num_steps):
      batch = next(batches)
      t0 = time.perf_counter()
      state, metrics = train_step(state, consts, batch, jnp.asarray(step, jnp.int32))
      metrics = jax.device_get(metrics)
      if step > start:  # the first step of a run includes compilation
        times.append(time.perf_counter() - t0)
      if not metrics.pop("finite"):
        bad += 1
        bar.write(f"step {step}: non-finite loss {float(metrics['loss'])} or gradient "
                  f"{float(metrics['grad_norm'])}; update skipped ({bad} in a row)")
        if bad >= max_bad:
          raise SodecError(
              f"loss or gradient not finite for {bad} steps in a row (last step {step}); "
              f"the last checkpoint in {workdir} is step {mngr.latest_step() or 'none'}; "
              "try a lower --config.optim.learning_rate or --config.optim.grad_clip_norm=1")
        continue
      bad = 0
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      count += 1
      bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", bpp=f"{float(metrics['bpp']):.3f}",
                      psnr=f"{float(metrics['psnr']):.2f}", refresh=False)
      bar.update(1)
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps:
        row = {"step": done, **{k: v / count for k, v in sums.items()}}
        if times:
          row["step_time"] = float(np.mean(times))
        log.write(row)
        sums, count, times = {}, 0, []
      if done % config.train.checkpoint_every == 0 or done == num_steps:
        checkpoints.save(mngr, done, state["params"], state["opt_state"], config)
  finally:
    bar.close()
    log.close()
    mngr.close()
  minutes, seconds = divmod(int(time.time() - t_start), 60)
  print(f"done: steps {start}..{num_steps} in {minutes}m{seconds:02d}s; last logged step "
        f"{row['step']}: loss {row.get('loss', float('nan')):.4g}, bpp "
        f"{row.get('bpp', float('nan')):.3f}, PSNR {row.get('psnr', float('nan')):.2f} dB\n"
        f"{_next_steps(workdir)}")
  return row


# --- command line -----------------------------------------------------------------------------

class _UsageError(Exception):
  pass


def _config_path(argv) -> str | None:
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def _unknown_override(argv, path: str) -> str | None:
  """The first --config.a.b override naming a field the config file does not have."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  try:
    spec = importlib.util.spec_from_file_location("_sodec_config", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  for a in argv:
    if not a.startswith("--config."):
      continue
    name = a[len("--config."):].split("=", 1)[0]
    node = base
    for i, part in enumerate(name.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        parent = ".".join(name.split(".")[:i])
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f"unknown config field '{name}' in {a}"
                + (f" (fields of {parent or 'config'}: {', '.join(fields)})" if fields else ""))
      node = node[part]
  return None


def parse_flags(argv):
  """Parses argv into FLAGS; any problem -> _UsageError with a one-line message."""
  path = _config_path(argv)
  if path is None:
    raise _UsageError("--config is required, e.g. --config configs/stage1.py")
  if not os.path.isfile(path.split(":")[0]):
    raise _UsageError(f"--config {path}: no such file")
  # Config files import `configs.base`: make the directory holding configs/ importable.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
  if root not in sys.path:
    sys.path.insert(0, root)
  try:
    FLAGS(argv)
    config = FLAGS.config
  except flags.Error as err:
    raise _UsageError(str(err).splitlines()[0]) from None
  except Exception as err:  # pylint: disable=broad-except
    msg = _unknown_override(argv, path) or f"{type(err).__name__}: {err}".splitlines()[0]
    raise _UsageError(msg) from None
  if config is None:
    raise _UsageError(f"--config {path}: could not load it")
  if not FLAGS.workdir:
    raise _UsageError("--workdir is required: the directory for config, checkpoints and metrics")
  return config, FLAGS.workdir


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    config, workdir = parse_flags(argv)
  except _UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  try:
    train(config, workdir)
  except SodecError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"\ninterrupted; rerun the same command to resume from the last checkpoint in "
          f"{workdir}", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())

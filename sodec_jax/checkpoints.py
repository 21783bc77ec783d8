"""The training directory (workdir): config, orbax checkpoints, and how a run resumes.

(Over 450 lines on purpose: this is the one contract of the workdir layout that the loop, the
readers (load_model, init_from, evaluation) and the pipeline share: config, steps, the frozen
Params, best step, pipeline folders.)

Layout of a workdir:
    config.json                the resolved config of the run (written at start)
    checkpoints/<step>/        one orbax checkpoint per saved step, three named items:
        params/                the stage's TRAINED nnx.Params as a pure dict (those matching
                               config.train.trainable); constants and other non-Param variables
                               (LPIPS, the extractor F) are rebuilt from the config, not saved;
                               with optim.ema_decay > 0 their moving average (what inference,
                               init_from and validation use)
        opt_state/             the optax state (AdamW moments and step count); in stage 4 or
                               with the average, {'model': that, 'disc': the discriminator's
                               params, spectral vectors and optax state, 'online': the trained
                               Params as they are (EMA on)}
        meta/                  JSON: step, seed, stage, config name and fingerprint, time, and
                               `frozen`: the fingerprint of the frozen/ it completes
    frozen/0/                  the nnx.Params this stage does not train (the SD UNet's base
                               weights, the VAE, codec parts a stage keeps fixed), written ONCE per
                               workdir at the run's first save, not in every step: items params/
                               and meta/ (fingerprint: a hash of paths, shapes, dtypes and sums
                               of the arrays; the list of their paths). Absent when a stage trains
                               every Param (stage 1). Checkpoints of older versions hold all
                               Params in params/ and no `frozen` in meta: they restore as before.
    metrics.jsonl              one row per logged step (process 0); val_* rows: validation
    best.json                  the step with the best held-out validation PSNR (train/guard.py):
                               what inference and init_from load when present
    events.out.tfevents.*      TensorBoard scalars (tensorboardX)

A checkpoint at step s holds the state after s updates; the next update to run is step s.
Orbax writes each checkpoint into a temporary directory and renames it into place only once
complete, so a save interrupted mid-write leaves no `<step>/` directory and is never used
(leftover temporaries are ignored and cleaned up). Training saves asynchronously
(`manager(..., async_save=True)`): `save` returns once the arrays are copied off the
accelerator (from each device's shards: no gather to one host) and the files are written in the
background while training continues; the loop waits for the write before the next save, before
pruning, and before it returns or stops (preemption), so the next pipeline stage reads complete
checkpoints.

Resume order (what `python -m sodec_jax.train` does when WORKDIR/config.json exists):
  1. read WORKDIR/config.json and compare it with the config of this command; fields that do
     not change the trajectory (`RESUME_IGNORED`) may differ; any other difference stops the
     run unless --config.train.allow_config_change=True;
  2. build the model from the config and nnx.Rngs(config.seed), and the optimizer;
  3. take the latest complete step s in WORKDIR/checkpoints (none: start at 0);
  4. restore 'params' and 'opt_state' of step s over the freshly built ones ('meta' is checked),
     the frozen Params from frozen/ (its fingerprint must be the one step s's meta names);
  5. restart the data at step s (the dataset is indexed by step) and derive each step's RNG
     key from (seed, step), so the resumed run reproduces an uninterrupted one;
  6. drop rows of metrics.jsonl with step > s (they will be logged again).

`restore_params(workdir, model)` does step 4 for the params alone (no optimizer needed): it is
what inference (`sodec_jax.load_model`) uses; with no step given it takes best.json's step when
that checkpoint exists, else the latest (init_from's read_params does the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sodec_jax.errors import SodecError

CONFIG_FILE = "config.json"
BEST_FILE = "best.json"
CHECKPOINT_DIR = "checkpoints"
FROZEN_DIR = "frozen"
ITEMS = ("params", "opt_state", "meta")
FROZEN_ITEMS = ("params", "meta")

# Config fields that do not change what training computes: they may differ on resume.
RESUME_IGNORED = (
  "train.num_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.progress",
  "train.allow_config_change",
  "train.validate_every",
  "train.validate_size",
  "train.guard_db",
  "train.guard_action",
  "pipeline.summary",
  "train.sample_every",
  "train.fsdp",
  "data.worker_count",
  "data.prefetch",
  "memory.remat",  # rematerialisation recomputes the same values
  "memory.remat_policy",
  "data.cache_mb",
  "distributed.coordinator_address",
  "distributed.num_processes",
  "distributed.process_id",
)


# --- config -----------------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  """Plain JSON-able dict (tuples become lists)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d))


def _lists_to_tuples(x):
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x


def save_config(workdir: str, config) -> str:
  """Writes WORKDIR/config.json (atomically) and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote to WORKDIR/config.json (lists read back as tuples); a
  pipeline workdir (pipeline.json) means its final finished stage."""
  path = os.path.join(resolve_workdir(workdir), CONFIG_FILE)
  try:
    with open(path) as f:
      d = json.load(f)
    if not isinstance(d, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as err:
    raise SodecError(
      f"{workdir} is not a sodec-jax training directory (no config.json); "
      f"pass the --workdir your training wrote ({type(err).__name__})"
    ) from None
  return ml_collections.ConfigDict(_lists_to_tuples(d))


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old, new, ignored=RESUME_IGNORED) -> list[str]:
  """['field: old -> new', ...] over the fields that matter for resuming."""
  a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
  keys = sorted((set(a) | set(b)) - set(ignored))
  missing = "<absent>"
  return [
    f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
    for k in keys
    if a.get(k, missing) != b.get(k, missing)
  ]


def fingerprint(config, ignored=RESUME_IGNORED) -> str:
  """Short hash of the config fields that matter for resuming."""
  flat = {k: v for k, v in _flatten(config_to_dict(config)).items() if k not in ignored}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


# --- checkpoints ----------------------------------------------------------------------------


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(
  workdir: str, keep: int | None = None, create: bool = True, async_save: bool = False
) -> ocp.CheckpointManager:
  """The orbax CheckpointManager of WORKDIR/checkpoints (atomic saves; with async_save, `save`
  returns once the arrays are off the device and the write finishes in the background:
  `mngr.wait_until_finished()` waits for it, `mngr.close()` too).

  Only the writer (create=True: training) removes leftover temporaries of interrupted saves; a
  reader (create=False) must not, since they may be the save a running training is writing."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=create,
    cleanup_tmp_directories=create,
    enable_async_checkpointing=async_save,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def make_meta(step: int, config, frozen: str | None = None, extra: dict | None = None) -> dict:
  meta = {
    "step": int(step),
    "seed": int(config.seed),
    "stage": int(config.stage),
    "name": str(config.name),
    "config_fingerprint": fingerprint(config),
    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  if frozen is not None:
    meta["frozen"] = frozen
  meta.update(extra or {})
  return meta


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  params,
  opt_state,
  config,
  frozen: str | None = None,
  extra_meta: dict | None = None,
) -> None:
  """Saves params (pure dict), opt_state and meta at `step` (overwrites nothing). `frozen`: the
  fingerprint `save_frozen` returned when `params` holds the trained Params only (the rest live
  in WORKDIR/frozen/); None: `params` holds them all. extra_meta: JSON values added to meta
  (the dual rate controller's "rate_control_integral"). Arrays are handed to orbax as they are
  (sharded jax.Arrays are written from their shards). With an async manager this returns before
  the files are written (see `manager`); a synchronous one has finished writing."""
  mngr.save(
    int(step),
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(make_meta(step, config, frozen, extra_meta)),
    ),
    force=True,
  )


# --- the frozen Params, written once per workdir ----------------------------------------------


def frozen_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), FROZEN_DIR)


def _frozen_manager(workdir: str, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    create=create, cleanup_tmp_directories=create, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(frozen_dir(workdir), options=options, item_names=FROZEN_ITEMS)


@jax.jit
def _sums(leaves):
  """Per leaf (sum, sum of squares) in float32: computed where the arrays live (sharded ones
  included), only these scalars come to the host."""
  f32 = lambda a: a.astype(jnp.float32)
  return [jnp.stack([jnp.sum(f32(a)), jnp.sum(jnp.square(f32(a)))]) for a in leaves]


def frozen_fingerprint(tree) -> str:
  """16 hex digits: sha256 over the leaves' paths, shapes, dtypes and (sum, sum of squares)."""
  flat = _flat(tree)
  names = sorted(flat)
  sums = jax.device_get(_sums([flat[k] for k in names]))
  h = hashlib.sha256()
  for k, s in zip(names, sums):
    a = flat[k]
    h.update(f"{k}|{tuple(a.shape)}|{jnp.dtype(a.dtype).name}|".encode())
    h.update(np.asarray(s, np.float32).tobytes())
  return h.hexdigest()[:16]


def read_frozen_meta(workdir: str) -> dict | None:
  """WORKDIR/frozen's meta ({"fingerprint", "paths", "time"}), or None when there is none."""
  if not os.path.isdir(os.path.join(frozen_dir(workdir), "0")):
    return None
  mngr = _frozen_manager(workdir, create=False)
  try:
    return dict(mngr.restore(0, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  finally:
    mngr.close()


def save_frozen(workdir: str, frozen) -> str | None:
  """Writes the frozen Params (pure dict; sharded arrays are written from their shards) to
  WORKDIR/frozen/, replacing an older one; returns its fingerprint (what `save(..., frozen=)`
  records), or None when `frozen` has no arrays (nothing is written). The loop calls it once per
  run, at its first save; a resumed run keeps the frozen/ its checkpoint names."""
  if not jax.tree.leaves(frozen):
    return None
  fp = frozen_fingerprint(frozen)
  mngr = _frozen_manager(workdir, create=True)
  try:
    if 0 in mngr.all_steps():
      mngr.delete(0)
    meta = {"fingerprint": fp, "paths": sorted(_flat(frozen)), "time": time.strftime("%FT%T")}
    mngr.save(
      0,
      args=ocp.args.Composite(params=ocp.args.StandardSave(frozen), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return fp


def _select(tree: dict, keep, prefix: str = "") -> dict:
  """The nested pure dict of the leaves whose '/'-joined path `keep` accepts."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      sub = _select(v, keep, path + "/")
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


def _merge(a: dict, b: dict) -> dict:
  """Union of two nested pure dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def _frozen_paths(workdir: str, step: int, meta: dict) -> set[str]:
  """The paths WORKDIR/frozen holds, after checking it is the one step `step` was saved with."""
  fz = read_frozen_meta(workdir)
  if fz is None or fz.get("fingerprint") != meta["frozen"]:
    got = "missing" if fz is None else f"fingerprint {fz.get('fingerprint')}"
    raise SodecError(
      f"checkpoint step {step} in {workdir} needs {FROZEN_DIR}/ with fingerprint "
      f"{meta['frozen']}, found {got}: copy the workdir whole (checkpoints/ and {FROZEN_DIR}/)"
    )
  return set(fz["paths"])


def _restore_frozen(workdir: str, template) -> dict:
  mngr = _frozen_manager(workdir, create=False)
  try:
    args = ocp.args.StandardRestore(None if template is None else _abstract(template))
    return mngr.restore(0, args=ocp.args.Composite(params=args))["params"]
  finally:
    mngr.close()


def _restore_all_params(mngr, step: int, template, workdir: str, meta: dict) -> dict:
  """The full Params pure dict of `step`: the step's own params (all of them, older layout) or
  its trained ones merged with WORKDIR/frozen (shaped like `template`; None: as saved)."""
  if "frozen" not in meta:
    args = ocp.args.StandardRestore(None if template is None else _abstract(template))
    return mngr.restore(int(step), args=ocp.args.Composite(params=args))["params"]
  paths = _frozen_paths(workdir, step, meta)
  if template is None:
    trained_t = frozen_t = None
  else:
    trained_t = _select(template, lambda p: p not in paths)
    frozen_t = _select(template, lambda p: p in paths)
  args = ocp.args.StandardRestore(None if trained_t is None else _abstract(trained_t))
  trained = mngr.restore(int(step), args=ocp.args.Composite(params=args))["params"]
  return _merge(trained, _restore_frozen(workdir, frozen_t))


def _abstract(tree):
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree
  )


def _check_same(template, restored, what: str, workdir: str, step: int) -> None:
  t = jax.tree_util.tree_flatten_with_path(template)[0]
  r = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  for path, a in t:
    b = r.get(path)
    if b is None or b.shape != a.shape:
      name = jax.tree_util.keystr(path)
      got = "missing" if b is None else f"shape {b.shape}"
      raise SodecError(
        f"checkpoint step {step} in {workdir} does not fit this model: {what}"
        f"{name} is {got}, the model needs {a.shape} (different config?)"
      )


def prune(mngr: ocp.CheckpointManager, keep: int | None, protect=()) -> list[int]:
  """Deletes all but the latest `keep` checkpoints (None or 0: keep all), never a step in
  `protect` (the best validation step); returns the deleted steps. The managers are made with
  keep-all, so this is the only place checkpoints are removed."""
  steps = sorted(mngr.all_steps())
  if not keep or len(steps) <= keep:
    return []
  gone = [s for s in steps[:-keep] if s not in set(protect)]
  for s in gone:
    mngr.delete(s)
  return gone


def read_best(workdir: str) -> dict | None:
  """WORKDIR/best.json ({"step", "val_psnr", "start_step", "start_psnr", ...}) or None."""
  path = os.path.join(workdir, BEST_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    int(record["step"])
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise SodecError(
      f"{path} is damaged ({type(err).__name__}); delete it to use the latest checkpoint"
    ) from None
  return record


def write_best(workdir: str, record: dict) -> str:
  """Writes WORKDIR/best.json atomically; returns its path."""
  path = os.path.join(workdir, BEST_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def default_step(workdir: str, steps) -> int:
  """The step a reader takes when none is given: best.json's (if that checkpoint is among
  `steps`), else the latest."""
  record = read_best(workdir)
  if record is not None and int(record["step"]) in steps:
    return int(record["step"])
  return max(steps)


def _meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return dict(mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore(mngr: ocp.CheckpointManager, step: int, params, opt_state, workdir: str = ""):
  """(params, opt_state, meta) of `step`, shaped like the given templates; `params` is the full
  Params pure dict (the step's trained ones and WORKDIR/frozen's, or all of an older step's)."""
  workdir = workdir or os.path.dirname(str(mngr.directory))
  try:
    meta = _meta(mngr, step)
    full = _restore_all_params(mngr, step, params, workdir, meta)
    opt = mngr.restore(
      int(step), args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(_abstract(opt_state)))
    )["opt_state"]
  except SodecError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise SodecError(
      f"cannot restore checkpoint step {step} in {workdir}: "
      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    ) from None
  _check_same(params, full, "params", workdir, step)
  return full, opt, meta


def latest_step(workdir: str) -> int | None:
  """The last complete checkpoint step in WORKDIR/checkpoints, or None.

  Read from the directory names alone (orbax renames `<step>.orbax-checkpoint-tmp-*` to
  `<step>` once a save is complete), without a CheckpointManager: constructing one is a
  collective in a multi-process run, and this is called where processes may not all be."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return None
  steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n))]
  return max(steps) if steps else None


def restore_params(workdir: str, model: nnx.Module, step: int | None = None) -> int:
  """Loads the Params of the latest (or given) checkpoint into `model` (the step's 'params' item
  and WORKDIR/frozen); returns the step. A pipeline workdir (pipeline.json) means its final
  finished stage."""
  workdir = resolve_workdir(workdir)
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise SodecError(
      f"no checkpoint in {workdir} (no {CHECKPOINT_DIR}/ directory); "
      f"train first: python -m sodec_jax.train --config ... --workdir {workdir}"
    )
  mngr = manager(workdir, create=False)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise SodecError(
        f"no checkpoint in {workdir}; train first: "
        f"python -m sodec_jax.train --config ... --workdir {workdir}"
      )
    if step is None:
      step = default_step(workdir, steps)
    elif step not in steps:
      raise SodecError(f"no checkpoint for step {step} in {workdir} (have {sorted(steps)})")
    state = nnx.state(model, nnx.Param)
    template = nnx.to_pure_dict(state)
    try:
      params = _restore_all_params(mngr, step, template, workdir, _meta(mngr, step))
    except SodecError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      raise SodecError(
        f"cannot restore params of step {step} in {workdir}: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
      ) from None
    _check_same(template, params, "params", workdir, step)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return int(step)
  finally:
    mngr.close()


def read_meta(workdir: str, step: int) -> dict[str, Any]:
  mngr = manager(workdir, create=False)
  try:
    return _meta(mngr, step)
  finally:
    mngr.close()


# --- pipelines and stage-to-stage transfer -------------------------------------------------------

PIPELINE_FILE = "pipeline.json"


def resolve_workdir(workdir: str) -> str:
  """A pipeline workdir (the tiny default's) resolves to its final stage's directory."""
  path = os.path.join(workdir, PIPELINE_FILE)
  if not os.path.isfile(path):
    return workdir
  try:
    with open(path) as f:
      stages = json.load(f)["stages"]
  except (OSError, ValueError, KeyError) as err:
    raise SodecError(f"{path} is damaged ({err}); rerun the pipeline") from None
  done = [s for s in stages if latest_step(os.path.join(workdir, s)) is not None]
  if not done:
    raise SodecError(f"the pipeline in {workdir} has no finished stage yet; run it first")
  return os.path.join(workdir, done[-1])


def read_default_meta(workdir: str) -> dict[str, Any]:
  """The meta of the step a reader takes by default (`default_step`: best.json's or the latest)
  of a workdir (a pipeline folder means its last finished stage); {} when it has no checkpoint."""
  workdir = resolve_workdir(workdir)
  if not os.path.isdir(checkpoint_dir(workdir)):
    return {}
  mngr = manager(workdir, create=False)
  try:
    steps = mngr.all_steps()
    return _meta(mngr, default_step(workdir, steps)) if steps else {}
  finally:
    mngr.close()


def read_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """All Params (pure dict, arrays as saved: the step's and WORKDIR/frozen's) of a workdir's
  latest or given step."""
  workdir = resolve_workdir(workdir)
  mngr = manager(workdir, create=False) if os.path.isdir(checkpoint_dir(workdir)) else None
  try:
    steps = mngr.all_steps() if mngr else []
    if not steps:
      raise SodecError(f"no checkpoint in {workdir} to start from; train that stage first")
    step = default_step(workdir, steps) if step is None else step
    return _restore_all_params(mngr, step, None, workdir, _meta(mngr, step)), int(step)
  finally:
    if mngr:
      mngr.close()


def _flat(tree) -> dict:
  return {
    "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def init_from(model: nnx.Module, workdirs) -> list[str]:
  """Copies every nnx.Param of `model` whose path and shape exist in the given workdirs' latest
  checkpoints (later workdirs win); returns one summary line per workdir. `model` may be
  abstract (pretrained.build_model_to_restore): what the workdirs do not hold stays abstract."""
  if isinstance(workdirs, str):
    workdirs = [w.strip() for w in workdirs.split(",") if w.strip()]
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  ours = _flat(pure)
  updates, report = {}, []
  for wd in workdirs:
    if not os.path.isdir(wd):
      raise SodecError(f"config.init_from: {wd} does not exist")
    src, step = read_params(wd)
    theirs = _flat(src)
    hits = [
      k for k, v in theirs.items() if k in ours and tuple(np.shape(v)) == tuple(ours[k].shape)
    ]
    bad = [k for k, v in theirs.items() if k in ours and tuple(np.shape(v)) != tuple(ours[k].shape)]
    if bad:  # never copied in part: a shape mismatch means another model config
      k = bad[0]
      raise SodecError(
        f"config.init_from: {wd} step {step} has {len(bad)} parameter(s) with other shapes "
        f"than this model (e.g. {k}: {tuple(np.shape(theirs[k]))} there, "
        f"{tuple(ours[k].shape)} here): start from a workdir of the same model config (a "
        "guidance.mode other than the workdir's trains its own stage 2 from stage 1)"
      )
    for k in hits:
      updates[k] = np.asarray(theirs[k])
    report.append(f"init_from {wd} (step {step}): {len(hits)} of {len(ours)} parameter arrays")
  if not updates:
    raise SodecError(
      f"config.init_from: {', '.join(workdirs)} share no parameter with this model "
      "(a workdir of another model?)"
    )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  new = [
    updates.get("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf)
    for path, leaf in leaves
  ]
  new = [  # an abstract model's weights that no workdir holds stay abstract (check_restored)
    v if isinstance(v, jax.ShapeDtypeStruct) else jnp.asarray(v, dtype=l.dtype)
    for v, (_, l) in zip(new, leaves)
  ]
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, state)
  return report

"""Training: python -m sodec_jax.train --config configs/stage1.py --workdir DIR [--config.a.b=v ...]

Rerunning the same command resumes from the last checkpoint in DIR and reproduces the run an
uninterrupted command would have made (see sodec_jax/checkpoints.py for the workdir layout and
the resume order). The loop reads top to bottom in `train()`; the update is the pure, jitted,
state-donating `train_step` built by `make_train_step()`.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
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

from sodec_jax import checkpoints, data, gan, losses
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
  from sodec_jax import pretrained  # pylint: disable=import-outside-toplevel
  pretrained.check_paths(config)
  source = l.get("discriminator_init", "")
  if source and not os.path.isfile(os.path.join(source, "manifest.json")):
    raise SodecError(f"--config.loss.discriminator_init={source} is not a converted folder: make "
                     "one with `python convert/from_torch.py hific --src CHECKPOINT.pt --out DIR`")
  if config.stage not in (0, 1, 2, 3, 4):
    raise SodecError(f"config.stage={config.stage} must be 0 (tiny SD pretraining), 1, 2, 3 or 4")
  if config.stage >= 2 and config.get("decoder", "codec") != "diffusion":
    raise SodecError(f"config.stage={config.stage} trains the diffusion decoder: set "
                     "--config.decoder=diffusion (configs/stage2.py, stage3.py, finetune.py do)")
  if config.stage >= 2 and config.loss.beta > 0 and config.stage != 4:
    raise SodecError("config.loss.beta > 0 (GAN) belongs to stage 4 (configs/finetune.py)")
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


def build_training_model(config):
  """The model a stage trains: stage 0 (tiny pipeline) the latent-space pretraining, else SODEC."""
  rngs = nnx.Rngs(config.seed)
  if config.stage == 0:
    from sodec_jax.pretrained import build_latent_pretrain  # pylint: disable=import-outside-toplevel
    return build_latent_pretrain(config, rngs)
  from sodec_jax.pretrained import build_model  # pylint: disable=import-outside-toplevel
  return build_model(config, rngs)


def trainable_filter(config):
  """nnx filter: the nnx.Params whose '/'-joined path fully matches a config.train.trainable regex."""
  patterns = [re.compile(p) for p in config.train.trainable]

  def keep(path, value):
    if not isinstance(value, nnx.Param):
      return False
    name = "/".join(str(p) for p in path)
    return any(p.fullmatch(name) for p in patterns)
  return keep


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def merge_pure(a: dict, b: dict) -> dict:
  """Union of two nested pure dicts with disjoint leaves (trainable + frozen = all params)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_pure(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def split_pure(full: dict, like: dict) -> tuple[dict, dict]:
  """Splits `full` into (the leaves present in `like`, the rest), keeping the nesting."""
  inside, outside = {}, {}
  for k, v in full.items():
    if k in like and isinstance(v, dict) and isinstance(like[k], dict):
      i, o = split_pure(v, like[k])
      if i:
        inside[k] = i
      if o:
        outside[k] = o
    elif k in like:
      inside[k] = v
    else:
      outside[k] = v
  return inside, outside


def make_optimizer(config):
  """AdamW with the piecewise-constant lr schedule (and optional global-norm clipping)."""
  o = config.optim
  lr = optax.piecewise_constant_schedule(
      o.learning_rate, {int(s): o.lr_decay_factor for s in o.lr_decay_steps})
  tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, lr


def make_discriminator(config):
  """Stage 4: HiFiC's conditional discriminator -> (graphdef, {'params', 'spectral', 'opt_state'},
  its optimizer). Its params and spectral-norm vectors are pure dicts in the train state."""
  from sodec_jax.discriminator import Discriminator, SpectralState  # pylint: disable=import-outside-toplevel
  source = config.loss.get("discriminator_init", "")
  if source:   # a `convert/from_torch.py hific` folder: HiFiC's trained discriminator
    disc = converted_discriminator(source, config.model.latent_channels)
  else:
    disc = Discriminator(config.model.latent_channels, rngs=nnx.Rngs(config.seed + 1))
  graphdef, params, spectral = nnx.split(disc, nnx.Param, SpectralState)
  params, spectral = nnx.to_pure_dict(params), nnx.to_pure_dict(spectral)
  tx = optax.adam(config.loss.disc_learning_rate, b1=config.optim.b1, b2=config.optim.b2)
  return graphdef, {"params": params, "spectral": spectral, "opt_state": tx.init(params)}, tx


def converted_discriminator(folder: str, latent_channels: int):
  """The Discriminator of a `convert/from_torch.py hific` folder (its widths read from the
  converted kernels), loaded strictly; SodecError naming the fix otherwise."""
  from sodec_jax.discriminator import Discriminator  # pylint: disable=import-outside-toplevel
  from sodec_jax.weights import converted  # pylint: disable=import-outside-toplevel
  fix = ("--config.loss.discriminator_init takes a `python convert/from_torch.py hific --src "
         "CHECKPOINT.pt --out DIR` folder whose checkpoint held the discriminator")
  if not os.path.isdir(folder):
    raise SodecError(f"discriminator_init {folder!r} does not exist; {fix}")
  if converted.read_manifest(folder).get("kind") != "hific":
    raise SodecError(f"discriminator_init {folder} is not a converted HiFiC folder; {fix}")
  arrays = converted.load_discriminator_arrays(folder)
  if arrays is None:
    raise SodecError(f"discriminator_init {folder} has no discriminator/ (the HiFiC checkpoint "
                     f"held none); {fix}")
  try:
    context = arrays["context_conv"]["kernel"].shape          # [3, 3, C, context]
    filters = [arrays[f"conv{k}"]["kernel"].shape[-1] for k in range(1, 5)]
  except (KeyError, AttributeError, IndexError) as e:
    raise SodecError(f"discriminator_init {folder}: unexpected discriminator layout ({e}); {fix}") from None
  if context[2] != latent_channels:
    raise SodecError(f"discriminator_init {folder} was trained with y_hat of {context[2]} "
                     f"channels, this model has {latent_channels} (model.latent_channels)")
  disc = nnx.eval_shape(lambda: Discriminator(latent_channels, filters=filters,
                                              context_channels=context[3], rngs=nnx.Rngs(0)))
  converted.load_discriminator(folder, disc)
  return disc


DATA_AXIS = "data"
_DISTRIBUTED = []  # set once jax.distributed is initialized (a pipeline calls train() per stage)


def init_distributed(config) -> bool:
  """Multi-host: jax.distributed.initialize() from config.distributed, else the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); neither set: one process.
  Must run before anything touches a JAX device; returns whether this is a multi-process run."""
  if _DISTRIBUTED:
    return True
  d = config.get("distributed") or ml_collections.ConfigDict()
  addr = d.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not addr:
    return False
  n = int(d.get("num_processes", 0) or os.environ.get("JAX_NUM_PROCESSES", 0))
  pid = int(d.get("process_id", -1))
  pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
  if n < 1 or not 0 <= pid < n:
    raise SodecError(f"multi-host training at {addr} needs the process count and this process's "
                     "id: --config.distributed.num_processes=N --config.distributed.process_id=I "
                     "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
  _DISTRIBUTED.append((addr, n, pid))
  return True


def _place(tree, sharding):
  """Host values -> global arrays with `sharding` (one, or a tree of them like `tree`), on every
  device of every process."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(np.shape(x), sh,
                                                 lambda idx, v=np.asarray(x): v[idx]),
      tree, sharding)


FSDP_AXIS = "fsdp"


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """A Mesh over all devices: axis 'data', or ('data', 'fsdp') when config.train.fsdp > 1
  (parameters and optimizer state sharded over 'fsdp', see param_sharding). The batch is split
  over every device either way: config.data.batch_size is the global batch and each device
  gets batch_size / device count of it (a SodecError when that does not divide)."""
  devices = jax.devices() if devices is None else list(devices)
  n, b = len(devices), int(config.data.batch_size)
  f = int(config.train.get("fsdp", 1))
  if f < 1 or n % f:
    raise SodecError(f"config.train.fsdp={f} must be >= 1 and divide the {n} devices")
  if b % n:
    raise SodecError(
        f"config.data.batch_size={b} is the global batch and must divide over the {n} devices "
        f"(per-device batch = global batch / device count): use a multiple of {n}, e.g. "
        f"--config.data.batch_size={max(n, b // n * n)}")
  if f == 1:
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))
  return jax.sharding.Mesh(np.asarray(devices).reshape(n // f, f), (DATA_AXIS, FSDP_AXIS))


def shardings(mesh: jax.sharding.Mesh):
  """(replicated, batch) NamedShardings: the step (and, without 'fsdp', params, optimizer state
  and constants) replicated on every device; a batch split over all devices on its leading axis."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  return NamedSharding(mesh, P()), NamedSharding(mesh, P(tuple(mesh.axis_names)))


def param_sharding(mesh: jax.sharding.Mesh, tree):
  """A tree of NamedShardings like `tree`: with an 'fsdp' axis each array is split over it along
  its largest dimension that divides evenly (arrays with none stay replicated); else replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  f = dict(mesh.shape).get(FSDP_AXIS, 1)

  def one(x):
    shape = np.shape(x)
    dims = [i for i in np.argsort(shape)[::-1] if shape[i] >= f and shape[i] % f == 0]
    if f == 1 or not dims:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[int(dims[0])] = FSDP_AXIS
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, tree)


def make_train_step(graphdef, tx, lr_schedule, config, lpips_graphdef=None, disc_graphdef=None,
                    disc_tx=None, mesh=None, state_sharding=None, consts_sharding=None):
  """The jitted update: (state, consts, batch, step) -> (state, metrics); `state` is donated.

  state = {'params': pure dict of the trainable nnx.Params, 'opt_state': optax state, and in
           stage 4 'disc': the discriminator's params, spectral-norm vectors and optax state}
  Stage 4 alternates within the step: the generator update uses the discriminator as it was
  (no power iteration), then the discriminator is updated on the new stop-gradient x_hat.
  consts = (the frozen nnx.Params, i.e. those outside config.train.trainable; the model's
            non-Param variables; the LPIPS state or None): never trained.
  batch: uint8 [B, H, W, 3]. The noise key of step s is fold_in(key(seed), s).
  A non-finite loss or gradient leaves the state unchanged (metrics['finite'] is False).
  mesh (make_mesh): explicit shardings, state/consts/step replicated (or state_sharding /
  consts_sharding, trees from param_sharding, with 'fsdp') and the batch split over the devices;
  the metrics come back replicated. None: plain jit on the default device.
  """

  def train_step(state, consts, batch, step):
    frozen, rest, lpips_state = consts
    lpips = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
    x = batch.astype(jnp.float32) / 255.0
    key = jax.random.fold_in(jax.random.key(config.seed), step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, frozen, rest)
      out = model(x, noise_key=key, train=True)
      if config.stage == 0:
        loss, terms = losses.pretrain_loss(out, x, config)
      elif config.stage == 1:
        loss, terms = losses.stage1_loss(out, x, step, config, lpips)
      else:
        g_loss = None
        if disc_graphdef is not None:
          disc = nnx.merge(disc_graphdef, state["disc"]["params"], state["disc"]["spectral"])
          _, fake = gan.real_fake_logits(disc, x, out["x_hat"], out["y_hat"], update_stats=False,
                                         train_generator=True)
          g_loss = gan.generator_loss(fake)
        loss, terms = losses.sodec_loss(out, x, step, config, lpips, g_loss)
      x_hat = jnp.clip(jax.lax.stop_gradient(out["x_hat"]), 0.0, 1.0)
      terms["psnr"] = jnp.mean(_psnr(x, x_hat))
      return loss, (terms, jax.lax.stop_gradient(out["x_hat"]), jax.lax.stop_gradient(out.get("y_hat")))

    params, opt_state = state["params"], state["opt_state"]
    (loss, (terms, x_hat, y_hat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = {"params": jax.tree.map(keep, new_params, params),
                 "opt_state": jax.tree.map(keep, new_opt_state, opt_state)}
    if disc_graphdef is not None:
      from sodec_jax.discriminator import SpectralState  # pylint: disable=import-outside-toplevel
      d = state["disc"]

      def disc_loss_fn(d_params):
        disc = nnx.merge(disc_graphdef, d_params, d["spectral"], copy=True)
        real, fake = gan.real_fake_logits(disc, x, x_hat, y_hat, update_stats=True,
                                          train_generator=False)
        return gan.discriminator_loss(real, fake), nnx.to_pure_dict(nnx.state(disc, SpectralState))

      (d_loss, spectral), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(d["params"])
      d_updates, d_opt = disc_tx.update(d_grads, d["opt_state"], d["params"])
      d_finite = finite & jnp.isfinite(d_loss)
      d_keep = lambda new, old: jnp.where(d_finite, new, old)
      new_state["disc"] = jax.tree.map(d_keep, {"params": optax.apply_updates(d["params"], d_updates),
                                                "spectral": spectral, "opt_state": d_opt}, d)
      terms = dict(terms, gan_d=d_loss)
    metrics = dict(terms, grad_norm=grad_norm, param_norm=optax.global_norm(new_state["params"]),
                   learning_rate=lr_schedule(step), finite=finite)
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rep, batch = shardings(mesh)
  state_sh = rep if state_sharding is None else state_sharding
  consts_sh = rep if consts_sharding is None else consts_sharding
  return jax.jit(train_step, donate_argnums=0, in_shardings=(state_sh, consts_sh, batch, rep),
                 out_shardings=(state_sh, rep))


SAMPLES_DIR = "samples"


def make_sample_fn(graphdef, config):
  """jitted (params, consts, uint8 batch) -> (x_f, x_hat) as uint8, the model at inference
  (train=False; the pretraining stage has no x_f and shows its reconstruction twice)."""

  def sample(params, consts, batch):
    frozen, rest, _ = consts
    model = nnx.merge(graphdef, params, frozen, rest)
    x = batch.astype(jnp.float32) / 255.0
    out = model(x, noise_key=jax.random.key(config.seed), train=False)
    to_u8 = lambda v: jnp.round(jnp.clip(v, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return to_u8(out.get("x_f", out["x_hat"])), to_u8(out["x_hat"])

  return jax.jit(sample)


def save_sample_grid(path: str, original, x_f, x_hat) -> str:
  """PNG with one row per image: original | x_f | x_hat (uint8 [B, H, W, 3] each)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rows = [np.concatenate([np.asarray(a[i]) for a in (original, x_f, x_hat)], axis=1)
          for i in range(len(original))]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
  os.replace(tmp, path)
  return path


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
  from sodec_jax.weights.lpips import load_lpips as _load  # pylint: disable=import-outside-toplevel
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


def _next_steps(workdir: str) -> str:
  return (f"outputs in {workdir}: config.json, checkpoints/, {METRICS_FILE}, TensorBoard events "
          f"(tensorboard --logdir {workdir})\n"
          "next:\n"
          f"  sodec compress photo.png out.sodec --checkpoint {workdir}\n"
          f"  sodec decompress out.sodec out.png --checkpoint {workdir}")


# --- the loop -----------------------------------------------------------------------------------

class Preempted(Exception):
  """SIGTERM (preemption) stopped training after a checkpoint at `step` was saved."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, workdir
    super().__init__(f"SIGTERM: saved a checkpoint at step {step} in {workdir} and stopped; "
                     "rerun the same command to resume")


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

  init_distributed(config)
  if config.get("pipeline") and config.pipeline.stages:
    return run_pipeline(config, workdir)
  validate_config(config)
  mesh = make_mesh(config)  # before anything is written: the batch must divide over the devices
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

  model = build_training_model(config)
  if config.init_from and not start:
    for line in checkpoints.init_from(model, config.init_from):
      print(line)
  trainable = trainable_filter(config)
  graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
  params, frozen, rest = (nnx.to_pure_dict(t) for t in (params, frozen, rest))
  n_train, n_frozen = _count(params), _count(frozen)
  if not n_train:
    raise SodecError(f"config.train.trainable={tuple(config.train.trainable)} matches no parameter "
                     "of this model; see the stage configs for the path patterns")
  print(f"{config.name} stage {config.stage}: training {n_train:,} parameters, {n_frozen:,} frozen")
  del model
  tx, lr_schedule = make_optimizer(config)
  opt_state = tx.init(params)
  disc_graphdef = disc_tx = None
  if config.stage == 4 and config.loss.beta > 0:
    disc_graphdef, disc_state, disc_tx = make_discriminator(config)
    opt_state = {"model": opt_state, "disc": disc_state}  # the checkpoint's opt_state item
  if start:
    full, opt_state, meta = checkpoints.restore(mngr, start, merge_pure(params, frozen), opt_state,
                                                workdir)
    params, frozen = split_pure(full, params)
    if meta.get("seed") != config.seed:
      warnings.warn(f"checkpoint {start} was written with seed {meta.get('seed')}")
  state = {"params": params, "opt_state": opt_state}
  if disc_graphdef is not None:
    state = {"params": params, "opt_state": opt_state["model"], "disc": opt_state["disc"]}

  _, batch_sharding = shardings(mesh)
  if mesh.size > 1:
    print(f"data parallel over {mesh.size} devices: {config.data.batch_size // mesh.size} "
          f"images per device (global batch {config.data.batch_size})"
          + (f"; parameters and optimizer state sharded over {mesh.shape[FSDP_AXIS]} (fsdp)"
             if FSDP_AXIS in mesh.axis_names else ""))
  consts = (frozen, rest, lpips_state)
  state_sharding, consts_sharding = param_sharding(mesh, state), param_sharding(mesh, consts)
  train_step = make_train_step(graphdef, tx, lr_schedule, config, lpips_graphdef, disc_graphdef,
                               disc_tx, mesh=mesh, state_sharding=state_sharding,
                               consts_sharding=consts_sharding)
  state = _place(state, state_sharding)
  consts = _place(consts, consts_sharding)
  frozen = consts[0]
  # each process loads its rows of every global batch; the arrays span all processes' devices
  batches = data.train_iterator(config, start, paths, jax.process_index(), jax.process_count())
  log = MetricsLog(workdir, start)
  bar = tqdm(total=num_steps, initial=start,
             disable=not config.train.progress or jax.process_index() != 0,
             dynamic_ncols=True, desc=f"{config.name} stage {config.stage}")
  sample_every = int(config.train.get("sample_every", 0)) if jax.process_count() == 1 else 0
  sample_fn = make_sample_fn(graphdef, config) if sample_every else None
  max_bad = int(config.train.get("max_nonfinite_steps", 3))
  bad, sums, count, times, row = 0, {}, 0, [], {"step": start}
  t_start = time.time()
  stop = _StopFlag()

  def save(done):
    extra = state["opt_state"] if "disc" not in state else \
        {"model": state["opt_state"], "disc": state["disc"]}
    checkpoints.save(mngr, done, merge_pure(state["params"], frozen), extra, config)

  try:
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
      bar.set_postfix(refresh=False, **{k: f"{float(metrics[k]):.4g}" for k in ("loss", "bpp", "psnr")
                                        if k in metrics})
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
        save_sample_grid(os.path.join(workdir, SAMPLES_DIR, f"step_{done}.png"), host_batch[:2],
                         x_f, x_hat)
      if done % config.train.checkpoint_every == 0 or done == num_steps:
        save(done)
  finally:
    stop.restore()
    bar.close()
    log.close()
    mngr.close()
  minutes, seconds = divmod(int(time.time() - t_start), 60)
  print(f"done: steps {start}..{num_steps} in {minutes}m{seconds:02d}s; last logged step "
        f"{row['step']}: loss {row.get('loss', float('nan')):.4g}, bpp "
        f"{row.get('bpp', float('nan')):.3f}, PSNR {row.get('psnr', float('nan')):.2f} dB\n"
        f"{_next_steps(workdir)}")
  return row


# --- pipelines (the tiny default runs every stage in sequence) -----------------------------------

def _deep_update(config, overrides) -> None:
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      _deep_update(config[k], v)
    else:
      config[k] = v


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one pipeline stage: the stage file's `apply` (configs/stage2.py, ...) on a
  copy of `config`, then the pipeline's own overrides `config.pipeline.<name>`."""
  import importlib  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict(config.to_dict())
  c.pipeline.stages = ()
  if name == "pretrain":
    c.stage, c.decoder, c.train.trainable = 0, "codec", (".*",)
  elif name != "stage1":
    try:
      importlib.import_module(f"configs.{name}").apply(c)
    except ModuleNotFoundError:
      raise SodecError(f"config.pipeline.stages names {name!r}, which has no configs/{name}.py") from None
  if name in config.pipeline:
    _deep_update(c, config.pipeline[name])
  return c


def run_pipeline(config, workdir: str) -> dict:
  """Runs config.pipeline.stages in WORKDIR/<i>_<stage>/, each starting from the ones before
  (init_from); WORKDIR/pipeline.json lists them, so `--checkpoint WORKDIR` means the last one.
  Rerunning the command resumes: finished stages are skipped, the current one resumes."""
  os.makedirs(workdir, exist_ok=True)
  names = list(config.pipeline.stages)
  dirs = [f"{i}_{n}" for i, n in enumerate(names)]
  with open(os.path.join(workdir, checkpoints.PIPELINE_FILE), "w") as f:
    json.dump({"stages": dirs, "config": config.name}, f, indent=2)
  t0, row = time.time(), {}
  for i, (name, sub) in enumerate(zip(names, dirs)):
    c = stage_config(config, name)
    earlier = [os.path.join(workdir, d) for d in dirs[:i]]
    c.init_from = ",".join(earlier) if c.stage >= 2 else ""  # stages 0 and 1 start from scratch
    print(f"=== pipeline stage {i + 1}/{len(names)}: {name} -> {os.path.join(workdir, sub)}")
    row = train(c, os.path.join(workdir, sub))
  minutes, seconds = divmod(int(time.time() - t0), 60)
  print(f"pipeline done in {minutes}m{seconds:02d}s: stages {', '.join(dirs)} in {workdir} "
        f"(each: config.json, checkpoints/, {METRICS_FILE}, TensorBoard events); --checkpoint "
        f"{workdir} means the last stage\nnext:\n"
        f"  sodec compress photo.png out.sodec --checkpoint {workdir}\n"
        f"  sodec decompress out.sodec out.png --checkpoint {workdir}\n"
        f"  python -m sodec_jax.evaluate --checkpoint {workdir} --images FOLDER --out eval/")
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
  return run(config, workdir)


def run(config, workdir: str) -> int:
  """train() with the command line's exit codes: 0 done or preempted (SIGTERM, checkpoint
  saved), 1 a SodecError, 130 Ctrl-C; messages go to stderr."""
  try:
    train(config, workdir)
  except SodecError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  except Preempted as err:
    print(str(err), file=sys.stderr)
    return 0
  except KeyboardInterrupt:
    print(f"\ninterrupted; rerun the same command to resume from the last checkpoint in "
          f"{workdir}", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())

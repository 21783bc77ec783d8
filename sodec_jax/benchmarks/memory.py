"""Training memory of one step: `python -m sodec_jax.bench --what memory --config FILE
[--random-weights] [--size 512] [--batch 2] [--skip-compile] [--config.a.b=v ...]`.

  --config FILE        an experiment config (configs/stage3.py: the paper-size stage-3 step); a
                       pipeline config (tiny) is measured at its last stage, e.g. tiny's stage 3
                       with --config.pipeline.stages="('stage3',)"
  --random-weights     random weights of the config's shapes, no weight files (the SD / ViT /
                       VGG paths are not needed nor checked); without it the config's weights
                       are loaded as training would
  --size N --batch B   crop side (default 512, bench's --size) and per-device batch (default:
                       the config's data.batch_size)
  --skip-compile       residuals and parameters only (cheap); compiled columns are nan
  --config.a.b=v       overrides, as the training command line takes them

The step is the one training runs (train/step.make_train_step, one device, donated state),
lowered from abstract arrays and compiled, never run (stage 4's discriminator update is left
out). Without an explicit --config.precision /
--config.memory.remat / --config.memory.remat_policy / --config.diffusion.remat override, a
table over fp32/bf16 x remat off/on (on: every part of REMAT_ALL) is printed; with one, only
the given configuration. Per row:

  compiled GiB   XLA's memory analysis of the compiled step on this backend: arguments,
                 outputs, temporaries and their total (arguments + outputs + temporaries -
                 aliased, the donated state counted once)
  residual GiB   bytes the backward pass keeps for the loss's gradient, backend-independent:
                 `jax.eval_shape` over `jax.vjp(loss_fn, params)`, summing the leaves of the
                 returned vjp function (its residual arrays) that are not the step's own inputs
                 (the weights are counted in params)
  params GiB     trainable + frozen parameters, the model's other variables (F) and LPIPS;
  opt GiB        the optimizer state

The last line is `memory: compiled_gib=X residual_gib=Y params_gib=Z` (GiB per device) for the
given configuration, or for the table's last row (bf16, remat on).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: The parts "remat on" rematerialises (config.memory.remat names).
REMAT_ALL = ("unet", "vae_decoder", "extractor", "fidelity_decoder", "lpips")
#: Overrides that make the run measure the given configuration only (no table).
_EXPLICIT = (
  "--config.precision",
  "--config.memory.remat",
  "--config.memory.remat_policy",
  "--config.diffusion.remat",
)
GIB = float(1 << 30)


def nbytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def residuals(fn, *args) -> list[jax.ShapeDtypeStruct]:
  """The arrays the backward pass of fn keeps (abstract, nothing runs): the leaves of
  `jax.vjp(fn, args[0])`'s vjp function that are not among `args` (the other args are closed
  over: constants). fn(args[0], *args[1:]) -> a scalar (or (scalar, aux): has_aux)."""

  def kept(primal, *rest):
    _, vjp_fn = jax.vjp(lambda p: fn(p, *rest), primal)
    inputs = {id(a) for a in jax.tree.leaves((primal, rest))}
    return [r for r in jax.tree.leaves(vjp_fn) if id(r) not in inputs]

  return jax.eval_shape(kept, *args)


def _random_lpips(config, dtype):
  """LPIPS with a random VGG16 / AlexNet trunk of the real shapes (memory does not depend on
  the values) and the shipped heads."""
  from sodec_jax.metrics.lpips import LPIPS, LPIPSAlex  # pylint: disable=import-outside-toplevel
  from sodec_jax.weights import lpips as lw  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  if config.loss.get("lpips_net", "vgg") == "alex":
    from sodec_jax.metrics.alexnet import ALEXNET_FEATURE_SHAPES as shapes  # noqa: N811

    cls, heads = LPIPSAlex, lw.load_shipped_heads("alex")
  else:
    from sodec_jax.metrics.vgg16 import VGG16_FEATURE_SHAPES as shapes  # noqa: N811

    cls, heads = LPIPS, lw.load_shipped_heads("vgg")
  state = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  return cls(state, heads, dtype=dtype, precision="default")


def build_parts(config, random_weights: bool):
  """(model, lpips or None): the training model of `config` with precision, remat and the
  frozen cast applied, as training builds it (random weights: abstract, nothing allocated)."""
  from sodec_jax import precision as precision_lib  # pylint: disable=import-outside-toplevel
  from sodec_jax import pretrained  # pylint: disable=import-outside-toplevel
  from sodec_jax import remat as remat_lib  # pylint: disable=import-outside-toplevel
  from sodec_jax.train import build  # pylint: disable=import-outside-toplevel

  if not random_weights:
    build.validate_config(config)
    lpips_graphdef, lpips_state = build.load_lpips(config)
    lpips = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
    return build.build_training_model(config), lpips
  from sodec_jax.benchmarks.codec import random_model  # pylint: disable=import-outside-toplevel

  pretrained.remat_parts(config), pretrained.remat_policy(config)  # one-line errors first

  def make():
    model = random_model(config) if config.stage else build.build_training_model(config)
    precision_lib.apply_precision(model, config.get("precision", "auto"))
    pretrained.apply_remat(model, config)
    build.cast_frozen(model, config)
    return model

  model = nnx.eval_shape(make)
  lpips = None
  if config.loss.k_P > 0:
    lpips = _random_lpips(config, precision_lib.compute_dtype(config.get("precision", "auto")))
    if "lpips" in pretrained.remat_parts(config):
      remat_lib.set_remat(lpips, pretrained.remat_policy(config))
  return model, lpips


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def measure(config, random_weights: bool = True, compile_step: bool = True) -> dict:
  """One configuration's numbers (bytes; see the module docstring)."""
  from sodec_jax import losses  # pylint: disable=import-outside-toplevel
  from sodec_jax import precision as precision_lib  # pylint: disable=import-outside-toplevel
  from sodec_jax.train import build, step  # pylint: disable=import-outside-toplevel

  model, lpips = build_parts(config, random_weights)
  graphdef, params, frozen, rest = nnx.split(model, build.trainable_filter(config), nnx.Param, ...)
  params, frozen, rest = (_abstract(nnx.to_pure_dict(t)) for t in (params, frozen, rest))
  lpips_graphdef, lpips_state = (None, None) if lpips is None else nnx.split(lpips)
  lpips_state = None if lpips is None else _abstract(nnx.to_pure_dict(lpips_state))
  tx, lr = build.make_optimizer(config)
  opt_state = jax.eval_shape(tx.init, params)
  side, b = int(config.data.crop_size), int(config.data.batch_size)
  batch = jax.ShapeDtypeStruct((b, side, side, 3), jnp.uint8)
  consts = (frozen, rest, lpips_state)

  def loss_fn(p, consts, batch):  # what make_train_step differentiates (stage 4's GAN aside)
    frozen, rest, lpips_state = consts
    model = nnx.merge(graphdef, p, frozen, rest)
    lp = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
    x = batch.astype(jnp.float32) / 255.0
    out = model(x, noise_key=jax.random.key(config.seed), train=True)
    if config.stage == 0:
      return losses.pretrain_loss(out, x, config)[0]
    if config.stage == 1:
      return losses.stage1_loss(out, x, 0, config, lp)[0]
    return losses.sodec_loss(out, x, 0, config, lp)[0]

  r = {
    "precision": precision_lib.config_precision(config),
    "remat": ",".join(_remat_names(config)) or "off",
    "params": nbytes((params, frozen, rest, lpips_state)),
    "trainable": nbytes(params),
    "opt_state": nbytes(opt_state),
    "residuals": nbytes(residuals(loss_fn, params, consts, batch)),
  }
  r.update(arguments=None, outputs=None, temporaries=None, compiled=None, compile_s=None)
  if compile_step:
    fn = step.make_train_step(graphdef, tx, lr, config, lpips_graphdef)
    t0 = time.perf_counter()
    state = {"params": params, "opt_state": opt_state}
    compiled = fn.lower(state, consts, batch, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    r["compile_s"] = time.perf_counter() - t0
    m = compiled.memory_analysis()
    r["arguments"] = int(m.argument_size_in_bytes)
    r["outputs"] = int(m.output_size_in_bytes)
    r["temporaries"] = int(m.temp_size_in_bytes)
    r["compiled"] = int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
  return r


def _remat_names(config) -> tuple[str, ...]:
  from sodec_jax import pretrained  # pylint: disable=import-outside-toplevel

  return pretrained.remat_parts(config)


def configurations(config, explicit: bool) -> list:
  """The configs to measure: `config` alone when explicit, else fp32/bf16 x remat off/on."""
  if explicit:
    return [config]
  out = []
  for precision in ("fp32", "bf16"):
    for remat in ((), REMAT_ALL):
      c = config.copy_and_resolve_references()
      c.precision = precision
      c.memory.remat = remat
      c.diffusion.remat = False
      out.append(c)
  return out


def _gib(v, digits: int = 2) -> str:
  return "nan" if v is None else f"{v / GIB:.{digits}f}"


def run_memory(args, overrides) -> list[dict]:
  """The `--what memory` command (see the module docstring)."""
  from sodec_jax.errors import SodecError  # pylint: disable=import-outside-toplevel
  from sodec_jax.train import cli  # pylint: disable=import-outside-toplevel

  if not args.config or not args.config.split(":")[0].endswith(".py"):
    raise SodecError("--what memory needs --config configs/<experiment>.py")
  argv = ["bench", "--config", args.config, *overrides, "--print_config"]  # argv[0]: a name
  try:
    config, _, _ = cli.parse_flags(argv)
  except cli.UsageError as err:
    raise SodecError(str(err)) from None
  config = config.copy_and_resolve_references()
  if config.pipeline.stages:  # a pipeline config (tiny): its last stage, as the pipeline runs it
    from sodec_jax.train import pipeline  # pylint: disable=import-outside-toplevel

    config = pipeline.stage_config(config, config.pipeline.stages[-1])
  config.pipeline.stages = ()
  if args.size:
    config.data.crop_size = int(args.size)
  if args.batch:
    config.data.batch_size = int(args.batch)
  if args.random_weights:
    config.diffusion.weights = config.guidance.extractor_weights = ""
  explicit = any(o.split("=")[0] in _EXPLICIT for o in overrides)
  print(
    f"training memory, {config.name} stage {config.stage}, crop {config.data.crop_size}, "
    f"batch {config.data.batch_size} per device, {jax.devices()[0].platform}"
    + (", random weights" if args.random_weights else "")
  )
  head = (
    f"{'precision':>9} {'remat':>5} {'args GiB':>8} {'out GiB':>7} {'temp GiB':>8} "
    f"{'compiled':>8} {'residual':>8} {'params':>7} {'opt':>6} {'compile s':>9}"
  )
  print(head)
  results = []
  for c in configurations(config, explicit):
    r = measure(c, args.random_weights, not args.skip_compile)
    results.append(r)
    print(
      f"{r['precision']:>9} {('on' if r['remat'] != 'off' else 'off'):>5} "
      f"{_gib(r['arguments']):>8} {_gib(r['outputs']):>7} {_gib(r['temporaries']):>8} "
      f"{_gib(r['compiled']):>8} {_gib(r['residuals']):>8} {_gib(r['params']):>7} "
      f"{_gib(r['opt_state']):>6} "
      + (f"{r['compile_s']:>9.1f}" if r["compile_s"] is not None else f"{'-':>9}"),
      flush=True,
    )
  last = results[-1]
  if explicit:
    print(f"remat: {last['remat']}")
  print(
    f"memory: compiled_gib={_gib(last['compiled'], 4)} residual_gib={_gib(last['residuals'], 4)} "
    f"params_gib={_gib(last['params'], 4)}"
  )
  sys.stdout.flush()
  return results

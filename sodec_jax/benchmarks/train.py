"""Training step throughput: `python -m sodec_jax.bench --what train --config configs/tiny.py`.

  --config FILE      an experiment config (configs/*.py); a pipeline config (tiny) is timed at its
                     own stage (config.stage), not as a pipeline
  --devices 1,4      device counts to time (a data-parallel Mesh over the first n devices, the
                     same global batch config.data.batch_size); default: 1 and all devices.
                     with config.train.fsdp > 1 in the config file, params are sharded too
  --peak_tflops X    one device's peak TFLOP/s, for MFU (unknown for CPUs: MFU is left out)
  --repeats N --warmup N

For each device count: compile time (`lower().compile()` of the jitted `train_step`), the median
step time over --repeats steps after --warmup steps (the same batch, the state carried over),
images/s (global batch / step time), the FLOPs per step from XLA's cost analysis of the lowered
step (the program as written, the same on every backend), achieved
TFLOP/s and MFU, and memory: XLA's memory analysis of the compiled step (arguments + outputs +
temporaries) and, where the backend reports it, the device's peak bytes in use.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
  except Exception:  # pylint: disable=broad-except
    return None


def bench_train(
  config,
  device_counts=None,
  repeats: int = 5,
  warmup: int = 1,
  peak_tflops: float = 0.0,
  *,
  model=None,
  batch=None,
) -> list[dict]:
  """One result dict per device count (see the module docstring). `model`: the model to train
  (default: the config's, built as training builds it); `batch`: uint8 [B, H, W, 3] (default:
  the config's data loader's first batch)."""
  from sodec_jax import data  # pylint: disable=import-outside-toplevel
  from sodec_jax.train import build, parallel, step  # pylint: disable=import-outside-toplevel

  if model is None:
    build.validate_config(config)
    model = build.build_training_model(config)
  devices = jax.devices()
  counts = device_counts or sorted({1, len(devices)})
  graphdef, params, frozen, rest = nnx.split(model, build.trainable_filter(config), nnx.Param, ...)
  params, frozen, rest = (nnx.to_pure_dict(t) for t in (params, frozen, rest))
  lpips_graphdef, lpips_state = build.load_lpips(config)
  tx, lr = build.make_optimizer(config)
  disc_graphdef = disc_tx = None
  host_state = {"params": params, "opt_state": tx.init(params)}
  if config.stage == 4 and config.loss.beta > 0:
    disc_graphdef, host_state["disc"], disc_tx = build.make_discriminator(config)
  if batch is None:
    batch = next(data.train_iterator(config, 0, data.list_images(config.data.train_dir)))
  results = []
  for n in counts:
    mesh = parallel.make_mesh(config, devices[:n])
    _, batch_sharding = parallel.shardings(mesh)
    consts = (frozen, rest, lpips_state)
    state_sh, consts_sh = (
      parallel.param_sharding(mesh, host_state),
      parallel.param_sharding(mesh, consts),
    )
    step_fn = step.make_train_step(
      graphdef,
      tx,
      lr,
      config,
      lpips_graphdef,
      disc_graphdef,
      disc_tx,
      mesh=mesh,
      state_sharding=state_sh,
      consts_sharding=consts_sh,
    )
    state = jax.device_put(jax.tree.map(np.array, host_state), state_sh)  # a copy: donated below
    consts = jax.device_put(consts, consts_sh)
    b = jax.device_put(batch, batch_sharding)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, consts, b, np.int32(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + repeats):
      t0 = time.perf_counter()
      state, metrics = compiled(state, consts, b, np.int32(i))
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    # FLOPs of the program as written (the lowered, unoptimised step: the same count on every
    # backend; the compiled count leaves out what a GPU compiles to library calls, e.g. cuDNN
    # convolutions, and of an SPMD-partitioned step counts one device's share)
    flops = float(_cost(lowered).get("flops", 0.0)) or None
    per_device = flops / n if flops else None
    r = {
      "devices": n,
      "global_batch": int(config.data.batch_size),
      "per_device_batch": int(config.data.batch_size) // n,
      "compile_s": compile_s,
      "step_s": step_s,
      "images_per_s": config.data.batch_size / step_s,
      "flops_per_step": flops,
      "flops_per_device": per_device,
      "tflops_per_s": flops / step_s / 1e12 if flops else None,
      "compiled_bytes": _memory(compiled),
      "peak_bytes": None,
      "mfu": None,
    }
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      r["peak_bytes"] = int(stats["peak_bytes_in_use"])
    if flops and peak_tflops > 0:
      r["mfu"] = r["tflops_per_s"] / (peak_tflops * n)
    results.append(r)
  return results


def _fmt(v, spec):
  return (
    format("n/a", spec.split(".")[0].rstrip("0123456789") + spec.split(".")[0].lstrip("<>^"))
    if v is None
    else format(v, spec)
  )


def run_train(args) -> list[dict]:
  if not args.config or not args.config.endswith(".py"):
    print("error: --what train needs --config configs/<experiment>.py", file=sys.stderr)
    raise SystemExit(2)
  from sodec_jax.train.cli import UsageError, load_config_file  # pylint: disable=import-outside-toplevel

  try:
    config = load_config_file(args.config)  # the training command line's reader
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  config.pipeline.stages = ()
  counts = [int(c) for c in args.devices.split(",")] if getattr(args, "devices", "") else None
  results = bench_train(
    config, counts, args.repeats, args.warmup, getattr(args, "peak_tflops", 0.0)
  )
  print(
    f"train step, {config.name} stage {config.stage}, crop {config.data.crop_size}, "
    f"global batch {config.data.batch_size}, {jax.devices()[0].platform} "
    f"(median of {args.repeats} after {args.warmup} warm-up)"
  )
  print(
    f"{'devices':>7} {'compile s':>9} {'step ms':>8} {'images/s':>9} {'GFLOP/step':>10} "
    f"{'TFLOP/s':>8} {'MFU':>6} {'XLA MiB':>8} {'peak MiB':>8}"
  )
  for r in results:
    mib = lambda v: None if v is None else v / 2**20
    print(
      f"{r['devices']:>7} {r['compile_s']:>9.2f} {1e3 * r['step_s']:>8.2f} "
      f"{r['images_per_s']:>9.1f} {_fmt(r['flops_per_step'] and r['flops_per_step'] / 1e9, '>10.3f')} "
      f"{_fmt(r['tflops_per_s'], '>8.4f')} {_fmt(r['mfu'], '>6.1%')} "
      f"{_fmt(mib(r['compiled_bytes']), '>8.1f')} {_fmt(mib(r['peak_bytes']), '>8.1f')}"
    )
  return results

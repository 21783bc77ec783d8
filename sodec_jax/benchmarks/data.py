"""Does the input pipeline keep up with the step?
`python -m sodec_jax.bench --what data --config configs/X.py [--config.a.b=v ...] [--step-ms MS]`

The loader (sodec_jax.data.train_iterator: decode, random crop, flip, batch; grain with
config.data.worker_count worker processes, 0 = threads) is timed over 10 x --repeats batches
after a warm-up of 2 x the read-ahead, with the config's data settings: its images/s. The step's
need is config.data.batch_size / step time, the step time being --step-ms when given (e.g. a
GPU's, read off `bench --what train` there) or else measured here by running the config's
jitted train step (benchmarks/train.py: --repeats steps after --warmup, all devices). One table,
then the line `data: loader_images_s=X step_images_s=Y` and whether the loader keeps up.

The loader runs on the host's CPU cores: a loader that does not keep up leaves the accelerator
idle. Raise --config.data.worker_count (processes: decoding in parallel) or shrink what each
image costs (smaller files, a cache: --config.data.cache_mb).
"""

from __future__ import annotations

import sys
import time

import jax

READ_AHEAD = 4  # grain's prefetch_buffer_size in data.train_iterator


def loader_images_per_s(config, batches: int) -> dict:
  """Times `batches` batches of data.train_iterator after a warm-up; {"images_s", "batch_ms",
  "batches", "images", "warmup"}. The first epoch decodes files (later ones may hit the cache),
  the warm-up fills grain's read-ahead so that the timed batches are produced, not buffered."""
  from sodec_jax import data  # pylint: disable=import-outside-toplevel

  paths = data.list_images(config.data.train_dir)
  warmup = 2 * READ_AHEAD
  config.train.num_steps = warmup + batches
  it = data.train_iterator(config, 0, paths)
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  return {
    "images_s": batches * config.data.batch_size / seconds,
    "batch_ms": 1e3 * seconds / batches,
    "batches": batches,
    "images": len(paths),
    "warmup": warmup,
  }


def step_seconds(config, repeats: int, warmup: int) -> float:
  """The median time of the config's jitted train step on all devices (benchmarks/train.py)."""
  from sodec_jax.benchmarks import train as train_benchmark  # pylint: disable=import-outside-toplevel

  cfg = config.copy_and_resolve_references()
  return train_benchmark.bench_train(cfg, [jax.device_count()], repeats, warmup)[0]["step_s"]


def run_data(args, overrides=()) -> dict:
  """The command (see the module docstring); returns the numbers it prints."""
  if not args.config or not args.config.endswith(".py"):
    print("error: --what data needs --config configs/<experiment>.py", file=sys.stderr)
    raise SystemExit(2)
  from sodec_jax.train.cli import UsageError, parse_flags  # pylint: disable=import-outside-toplevel

  try:  # the training command line's reader and overrides (--print_config: no --workdir needed)
    config, _, _ = parse_flags(["bench", "--config", args.config, *overrides, "--print_config"])
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  config.pipeline.stages = ()
  given = float(getattr(args, "step_ms", 0.0) or 0.0)
  loader = loader_images_per_s(config.copy_and_resolve_references(), 10 * args.repeats)
  step_s = given / 1e3 if given > 0 else step_seconds(config, args.repeats, args.warmup)
  b = int(config.data.batch_size)
  need = b / step_s
  workers = int(config.data.worker_count)
  print(
    f"input pipeline, {config.name} stage {config.stage}: {loader['images']} images, crop "
    f"{config.data.crop_size}, global batch {b}, worker_count {workers} "
    f"({'threads' if workers == 0 else 'processes'}), device prefetch "
    f"{config.data.get('prefetch', 2)}"
  )
  source = "--step-ms" if given > 0 else f"measured, {jax.devices()[0].platform}"
  print(f"{'':<34} {'images/s':>9} {'ms/batch':>9}")
  print(
    f"{'loader (decode+crop+flip+batch)':<34} {loader['images_s']:>9.1f} {loader['batch_ms']:>9.2f}"
  )
  print(f"{'train step (' + source + ')':<34} {need:>9.1f} {1e3 * step_s:>9.2f}")
  print(f"data: loader_images_s={loader['images_s']:.6g} step_images_s={need:.6g}")
  ratio = loader["images_s"] / need
  if ratio >= 1.0:
    print(f"the loader keeps up: {ratio:.2f}x what the step consumes")
  else:
    print(
      f"the loader does NOT keep up: {ratio:.2f}x what the step consumes; the accelerator "
      "waits for data: raise --config.data.worker_count (decoding processes) or --config."
      "data.cache_mb"
    )
  return {"loader": loader, "step_s": step_s, "step_images_s": need, "keeps_up": ratio >= 1.0}

"""Benchmarks. `python -m sodec_jax.bench --what entropy|unet|vae [options]`.

  --what entropy   range-coding throughput (symbols/s, encode and decode) on the latents of a
                   real 512x768 photo through a paper-size codec (random weights unless
                   --checkpoint is given).
  --what unet|vae  jitted SD 2.1 UNet / VAE decoder latency (sodec_jax.benchmarks.diffusion).
  --what codec     jitted codec encode/decode latency per stage, batch 1/8 throughput, optional
                   PyTorch reference (sodec_jax.benchmarks.codec).
  --what indexes   the exact scale indexes (host integer network) against float32-sigma indexes:
                   alone and inside api.compress / decompress (sodec_jax.benchmarks.indexes).
  --what train     one training step of --config configs/<experiment>.py on 1 and N devices:
                   compile time, step time, images/s, FLOPs, MFU, memory (sodec_jax.benchmarks.train).
  --what gpu-check the prepared accelerator check (sodec_jax.benchmarks.gpu_check): decode and
                   encode ms (bf16 and fp32), the stage-3 step and its MFU, peak memory, cuDNN
                   attention, a CPU-encoded file decoded on the accelerator; paper-size random
                   weights at 512x512 on a GPU/TPU, the tiny widths at 64x64 on the CPU.
                   --json OUT.json keeps the report; exit status 1 when a check failed.
  --what data      the input pipeline's images/s beside the step's need (batch / step time, the
                   step measured or --step-ms); takes --config.a.b=v overrides (benchmarks/data.py).
  --what memory    the training step's memory (compiled, backward residuals, params) over
                   fp32/bf16 x remat off/on, compiled only; --random-weights, --batch,
                   --config.a.b=v overrides (sodec_jax.benchmarks.memory).

Times are medians over --repeats calls after --warmup calls; compilation is reported apart.
A problem the user can fix (a missing checkpoint, a bad option value) is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from sodec_jax.benchmarks import diffusion as diffusion_benchmark
from sodec_jax.errors import SodecError


def _time(fn, repeats: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def run_entropy(args) -> dict:
  """Range encode/decode throughput on a realistic latent."""
  import skimage

  from sodec_jax import api
  from sodec_jax.benchmarks.codec import load_for_bench
  from sodec_jax.codec import bitstream
  from sodec_jax.images import read_image

  model = load_for_bench(args.checkpoint, None)  # the checkpoint, or the random paper-size one
  photo, _ = read_image(os.path.join(os.path.dirname(skimage.data.__file__), "motorcycle_left.png"))
  image = np.ascontiguousarray(
    np.pad(
      photo,
      ((0, max(0, 512 - photo.shape[0])), (0, max(0, 768 - photo.shape[1])), (0, 0)),
      mode="reflect",
    )[:512, :768]
  )
  lat = api.encode_latents(model, image)
  z_sym, z_ids = lat.z_hat[0].astype(np.int64), lat.z_indexes[0]
  y_sym, y_ids = lat.y_symbols[0].astype(np.int64), lat.indexes[0]
  results = {}
  for name, coder, sym, ids in (
    ("y", model.y_coder, y_sym, y_ids),
    ("z", model.z_coder, z_sym, z_ids),
  ):
    stream, over = coder.encode(sym, ids)
    enc = _time(lambda: coder.encode(sym, ids), args.repeats, args.warmup)
    dec = _time(
      lambda: coder.decode(stream, ids, bitstream.OverflowReader(bitstream.encode_overflow(over))),
      args.repeats,
      args.warmup,
    )
    n = sym.size
    results[name] = {
      "symbols": n,
      "bytes": len(stream),
      "encode_msym_s": n / statistics.median(enc) / 1e6,
      "decode_msym_s": n / statistics.median(dec) / 1e6,
      "encode_ms": 1e3 * statistics.median(enc),
      "decode_ms": 1e3 * statistics.median(dec),
    }
  n = sum(r["symbols"] for r in results.values())
  enc_s = sum(r["encode_ms"] for r in results.values()) / 1e3
  dec_s = sum(r["decode_ms"] for r in results.values()) / 1e3
  results["total"] = {
    "symbols": n,
    "bytes": sum(r["bytes"] for r in results.values()),
    "encode_msym_s": n / enc_s / 1e6,
    "decode_msym_s": n / dec_s / 1e6,
    "encode_ms": 1e3 * enc_s,
    "decode_ms": 1e3 * dec_s,
  }
  print(
    f"entropy coding, 512x768 photo, C={model.config.model.latent_channels}, "
    f"N={model.config.model.hyper_channels} (median of {args.repeats})"
  )
  print(
    f"{'latent':>6} {'symbols':>9} {'bytes':>8} {'enc Msym/s':>11} {'dec Msym/s':>11} {'enc ms':>8} {'dec ms':>8}"
  )
  for name, r in results.items():
    print(
      f"{name:>6} {r['symbols']:>9} {r['bytes']:>8} {r['encode_msym_s']:>11.1f} "
      f"{r['decode_msym_s']:>11.1f} {r['encode_ms']:>8.2f} {r['decode_ms']:>8.2f}"
    )
  return results


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m sodec_jax.bench",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--what",
    required=True,
    choices=["entropy", "unet", "vae", "codec", "indexes", "train", "gpu-check", "data", "memory"],
  )
  p.add_argument("--checkpoint", default="", help="a training workdir (default: random weights)")
  p.add_argument(
    "--size",
    type=int,
    default=None,
    help="image side (unet/vae/codec: default 512; gpu-check: 512 on an accelerator, 64 on CPU)",
  )
  p.add_argument("--json", default="", help="gpu-check: write the report to this JSON file")
  p.add_argument(
    "--sections", default="", help="gpu-check: a comma-separated subset of its sections"
  )
  p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | all")
  p.add_argument(
    "--reference", default="", choices=["", "torch"], help="also time the PyTorch reference"
  )
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument(
    "--config",
    default="",
    help="unet/vae: a diffusers-style config.json (default SD 2.1); "
    "train: an experiment config, configs/<name>.py; codec without --checkpoint: random "
    "weights of this experiment config (e.g. configs/stage2.py: the paper-size diffusion "
    "decoder; default configs/base.py)",
  )
  p.add_argument(
    "--no-batches",
    dest="batches",
    action="store_false",
    help="codec: skip the batch 1 / 8 throughput runs",
  )
  p.add_argument(
    "--devices", default="", help="train: device counts to time, e.g. 1,4 (default 1 and all)"
  )
  p.add_argument(
    "--peak_tflops", type=float, default=0.0, help="train: device peak TFLOP/s for MFU"
  )
  p.add_argument("--step-ms", type=float, default=0.0, help="data: the step time (0: measure)")
  p.add_argument(
    "--random-weights", action="store_true", help="memory: random weights, no weight files"
  )
  p.add_argument("--batch", type=int, default=0, help="memory: per-device batch (0: config's)")
  p.add_argument("--skip-compile", action="store_true", help="memory: residuals/params only")
  return p


def main(argv=None) -> int:
  parser = build_parser()
  diffusion_benchmark.add_arguments(parser)
  args, overrides = parser.parse_known_args(argv)  # --config.a.b=v overrides: data, memory
  if overrides and args.what not in ("data", "memory"):
    parser.error(f"unrecognized arguments: {' '.join(overrides)}")
  try:
    if args.what == "gpu-check":  # the prepared accelerator check (benchmarks/gpu_check.py)
      from sodec_jax.benchmarks import gpu_check

      return gpu_check.main_check(args)
    args.size = args.size or 512
    if args.what == "entropy":
      run_entropy(args)
    elif args.what == "train":  # one training step on 1 and N devices (benchmarks/train.py)
      from sodec_jax.benchmarks import train as train_benchmark

      train_benchmark.run_train(args)
    elif args.what == "data":  # the input pipeline against the step (benchmarks/data.py)
      from sodec_jax.benchmarks import data as data_benchmark

      data_benchmark.run_data(args, overrides)
    elif args.what == "memory":  # the training step's memory (benchmarks/memory.py)
      from sodec_jax.benchmarks import memory as memory_benchmark

      memory_benchmark.run_memory(args, overrides)
    elif args.what == "codec":  # jitted encode/decode latency per stage (benchmarks/codec.py)
      from sodec_jax.benchmarks import codec as codec_benchmark

      codec_benchmark.run_codec(args)
    elif args.what == "indexes":  # exact vs float scale indexes (benchmarks/indexes.py)
      from sodec_jax.benchmarks import indexes as indexes_benchmark

      indexes_benchmark.run_indexes(args)
    elif args.what == "unet":  # the SD 2.1 UNet / VAE decoder (benchmarks/diffusion.py)
      diffusion_benchmark.run_unet(args)
    else:
      diffusion_benchmark.run_vae(args)
  except SodecError as e:
    print(f"sodec_jax.bench: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

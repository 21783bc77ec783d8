"""What the exact scale indexes cost: `python -m sodec_jax.bench --what indexes [options]`.

  --checkpoint DIR   a training workdir (default: the paper-size codec, configs/base.py, random
                     weights)
  --size 512         side of the square test photo (a centre crop, as for --what codec)
  --repeats N --warmup N

Three ways to get the y scale indexes, each timed alone and inside the public calls:
  exact   `model.indexer(z_hat)`: P's scale synthesis in integer arithmetic on the host
          (codec/integer_prior.py), what .sodec version 2 uses;
  float   the indexes read off P's float32 sigma (version 1's method): alone, the jitted P plus
          the table lookup; in `compress`, the sigma that P computed anyway (lookup only); in
          `decompress`, P run before range decoding (a float decoder needs sigma first).
`api.compress` / `api.decompress` run end to end with either (the float files are version-2
containers whose indexes came from sigma, decoded the same way). Calls are interleaved (exact,
float, exact, ...) so both see the same background load; medians with the min-max spread.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np


def _float_index_model(loaded):
  """`loaded` with the indexes read off P's float32 sigma (version 1's method)."""
  from sodec_jax import api
  from sodec_jax.codec.entropy import scale_indexes

  def indexer(z_hat):
    return scale_indexes(np.asarray(api.prior(loaded, z_hat)[1]), loaded.scales)

  return dataclasses.replace(loaded, indexer=indexer)


def _compress_float(loaded, image: np.ndarray) -> bytes:
  """api.compress with the indexes of P's sigma, which encode_latents computes anyway."""
  from sodec_jax import api
  from sodec_jax.codec.entropy import scale_indexes

  none = dataclasses.replace(loaded, indexer=lambda z: None)  # indexes set below
  lat = api.encode_latents(none, image)
  lat = dataclasses.replace(lat, indexes=scale_indexes(lat.sigma, loaded.scales))
  return api.pack(loaded, lat, *image.shape[:2])


def bench_indexes(loaded, image: np.ndarray, repeats: int, warmup: int) -> dict:
  """{case: {median_ms, min_ms, max_ms}} for the exact and float indexes (see the module
  docstring) on one uint8 image [H, W, 3]; 'load' is the load average range during the run."""
  from sodec_jax import api

  floating = _float_index_model(loaded)
  data, data_f = api.compress(loaded, image), _compress_float(loaded, image)
  z_hat = api.encode_latents(loaded, image).z_hat
  cases = {
    "indexes, exact": lambda: loaded.indexer(z_hat),
    "indexes, float (P + lookup)": lambda: floating.indexer(z_hat),
    "compress, exact": lambda: api.compress(loaded, image),
    "compress, float": lambda: _compress_float(loaded, image),
    "decompress, exact": lambda: api.decompress(loaded, data),
    "decompress, float": lambda: api.decompress(floating, data_f),
  }
  for _ in range(max(warmup, 1)):  # the first calls compile
    for fn in cases.values():
      fn()
  times = {k: [] for k in cases}
  loads = []
  for _ in range(max(repeats, 1)):
    loads.append(os.getloadavg()[0])
    for k, fn in cases.items():
      t = time.perf_counter()
      fn()
      times[k].append(1e3 * (time.perf_counter() - t))
  out = {
    k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
    for k, v in times.items()
  }
  out["load"] = (min(loads), max(loads))
  out["bytes"] = {"exact": len(data), "float": len(data_f)}
  return out


def run_indexes(args) -> dict:
  """Entry point for `python -m sodec_jax.bench --what indexes`."""
  from sodec_jax.benchmarks.codec import load_for_bench, test_images

  loaded = load_for_bench(args.checkpoint, None)  # the checkpoint, or the random paper-size one
  image = test_images(args.size, 1)[0]
  r = bench_indexes(loaded, image, args.repeats, args.warmup)
  m = loaded.config.model
  print(
    f"scale indexes, {args.size}x{args.size} photo, C={m.latent_channels}, N={m.hyper_channels}"
    f" (median of {args.repeats}, interleaved; load average {r['load'][0]:.1f}-{r['load'][1]:.1f})"
  )
  for k, v in r.items():
    if k not in ("load", "bytes"):
      print(f"  {k:28s} {v['median_ms']:9.1f} ms  [{v['min_ms']:.1f}-{v['max_ms']:.1f}]")
  print(f"  file bytes: exact {r['bytes']['exact']}, float {r['bytes']['float']}")
  return r

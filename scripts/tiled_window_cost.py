"""What one window of each tiled decoder stage costs, image size by image size: the windows a
budget gives, the whole-image keys a window attends to, and the seconds one window call takes
once compiled (median of --repeat calls), without decoding the whole image. With the passes a
real decode took (`sodec -v decompress ...` logs them), windows x passes x seconds is that
stage's compute; a window's cost that stays flat as the image grows is what keeps the time per
megapixel flat.

  python scripts/tiled_window_cost.py --checkpoint runs/tiny --max-memory 100MiB \
      --sides 1024,2048,4096,8192

Latents are random (the cost does not depend on their values); nothing is range-coded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def window_seconds(stage, state, inputs, extra, repeat: int) -> float:
  """Median seconds of one call of the stage's compiled window program (the first window,
  whole-image context of the compiled shapes, zeros)."""
  from sodec_jax import tiling

  (r, c, w_base), (th, tw) = stage.grid.windows()[0], stage.grid.tile
  window = [x[:, r * k : (r + th) * k, c * k : (c + tw) * k] for x, k in zip(inputs, stage.factors)]
  stats = [(np.zeros(g, np.float32), np.ones(g, np.float32)) for g in stage.norms]
  kv = tuple(
    None if k is None else (np.zeros(tiling._pooled_shape(k), np.float32),) * 2
    for k in stage.kv_layers
  )
  use_global = np.bool_(stage.needs_passes)
  times = []
  for _ in range(repeat + 1):  # the first call warms up
    t = time.perf_counter()
    out = stage.compiled(state, *window, *extra, w_base, stats, kv, use_global)
    np.asarray(out[0])
    times.append(time.perf_counter() - t)
  return statistics.median(times[1:])


def main(argv=None) -> int:
  sys.path.insert(0, ROOT)
  import jax
  from flax import nnx

  from sodec_jax import api, tiling

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--max-memory", default="100MiB")
  p.add_argument("--sides", default="1024,2048,4096,8192")
  p.add_argument("--repeat", type=int, default=3)
  args = p.parse_args(argv)
  model = api.load_model(args.checkpoint)
  budget = tiling.parse_bytes(args.max_memory)
  rng = np.random.default_rng(0)
  m = nnx.merge(model._graphdef, model._state)
  channels = (model.config.model.latent_channels, model.config.model.hyper_channels)
  latent = m.unet.config.in_channels
  print("| side | stage | window / grid | windows | keys per attention | s per window |")
  print("|---|---|---|---|---|---|")
  for side in (int(s) for s in args.sides.split(",")):
    y = rng.normal(size=(1, side // 16, side // 16, channels[0])).astype(np.float32)
    z = rng.normal(size=(1, side // 64, side // 64, channels[1])).astype(np.float32)
    plan = tiling.plan_decode(model._graphdef, model._state, y.shape, z.shape, budget)
    x0 = rng.normal(size=(1, side // 8, side // 8, latent)).astype(np.float32)
    c_g = plan.guidance(model._state, np.zeros((1, 224, 224, 3), np.float32), z)
    inputs = {"fidelity": ([y], ()), "content": ([z, y], ()), "unet": ([x0], (c_g,))}
    inputs["vae"] = ([x0], ())
    for name, stage in plan.stages.items():
      keys = sorted({tiling._pooled_shape(k)[0] for k in stage.kv_layers if k}) or "-"
      seconds = window_seconds(stage, model._state, *inputs[name], args.repeat)
      print(
        f"| {side} | {name} | {stage.grid.tile[0]}/{stage.grid.n[0]} | "
        f"{len(stage.grid.windows())} | {keys} | {seconds:.2f} |",
        flush=True,
      )
    jax.clear_caches()
  return 0


if __name__ == "__main__":
  sys.exit(main())

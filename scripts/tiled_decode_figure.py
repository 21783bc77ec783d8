"""The tiled decoder next to the whole one: writes one PNG (whole | tiled | |difference| x 8)
and prints their PSNR and the seam metric (mean |difference| near window edges / elsewhere).

  python scripts/tiled_decode_figure.py --checkpoint runs/tiny --image photo.png \
      --max-memory 200MiB --out tiled.png [--size 1024]
  python scripts/tiled_decode_figure.py --micro --out tiled.png      (random micro SODEC, tests'
                                                                      config; needs tests/)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def seam_ratio(diff: np.ndarray, plan, width: int = 4) -> float:
  """Mean |difference| within `width` pixels of the windows' inner edges (every tiled stage's)
  over the mean elsewhere; diff [H', W', 3] at the padded size."""
  d = diff.mean(-1)
  near = np.zeros(d.shape, bool)
  for s in plan.stages.values():
    f = d.shape[0] // s.grid.n[0]
    (rs, cs), (th, tw) = s.grid.starts(), s.grid.tile
    for axis, starts, t in ((0, rs, th), (1, cs, tw)):
      for e in {e for r in starts for e in (r * f, (r + t) * f)}:
        if 0 < e < d.shape[axis]:
          sl = [slice(None), slice(None)]
          sl[axis] = slice(max(e - width, 0), e + width)
          near[tuple(sl)] = True
  if not near.any():
    return float("nan")
  return float(d[near].mean() / max(d[~near].mean(), 1e-9))


def main(argv=None) -> int:
  from PIL import Image

  from sodec_jax import api, images, tiling

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", default="", help="a training --workdir")
  p.add_argument("--micro", action="store_true", help="the tests' random micro SODEC instead")
  p.add_argument("--image", default="", help="default: scikit-image's astronaut")
  p.add_argument("--size", type=int, default=1024, help="resize the image to SIZE x SIZE")
  p.add_argument("--max-memory", default="200MiB")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.micro:
    from flax import nnx

    from sodec_jax.pretrained import build_model
    from tests.conftest import make_micro_sodec_config

    c = make_micro_sodec_config(2)
    model = api.prepare(c, build_model(c, nnx.Rngs(0)))
  else:
    model = api.load_model(args.checkpoint)
  if args.image:
    image = images.read_image(args.image)[0]
  else:
    from tests.conftest import load_photo

    image = load_photo("astronaut.png")
  image = np.asarray(Image.fromarray(image).resize((args.size, args.size), Image.BICUBIC))
  data = api.compress(model, image)
  _, y_hat, z_hat = api.decode_latents(model, data)
  t = time.perf_counter()
  whole = np.clip(np.asarray(api.reconstruct(model, y_hat, z_hat)[0])[0], 0, 1) * 255
  t_whole = time.perf_counter() - t
  t = time.perf_counter()
  tiled = np.clip(api.decode_within(model, y_hat, z_hat, args.max_memory)[0], 0, 1) * 255
  t_tiled = time.perf_counter() - t
  plan = model._plans[(y_hat.shape, z_hat.shape, tiling.parse_bytes(args.max_memory), ())]
  whole, tiled = np.round(whole), np.round(tiled)
  diff = np.abs(whole - tiled)
  psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-12))
  if isinstance(plan, tiling.Plan):
    print("windows:", plan.describe())
    print(f"seam ratio (edges / elsewhere): {seam_ratio(diff, plan):.3f}")
  else:
    print("the whole decoder fits the budget: one program")
  print(f"PSNR tiled vs whole: {psnr:.2f} dB, max |diff| {diff.max():.0f}")
  print(f"seconds (compile included): whole {t_whole:.1f}, tiled {t_tiled:.1f}")
  h, w = image.shape[:2]
  panel = np.concatenate(
    [whole[:h, :w], tiled[:h, :w], np.clip(diff[:h, :w] * 8, 0, 255)], axis=1
  ).astype(np.uint8)
  images.write_image(args.out, panel)
  print(f"{args.out}: whole | tiled | |difference| x 8")
  return 0


if __name__ == "__main__":
  sys.exit(main())

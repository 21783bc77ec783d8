"""Large images through the `sodec` command on a memory budget: time per megapixel and peak
resident memory of each `sodec compress --max-memory` / `sodec decompress --max-memory` process
(`--compress-whole`: compress without the budget, the encoder on the whole image).

  python scripts/large_image_timing.py --checkpoint runs/tiny --max-memory 8GiB \
      --sides 1024,2048,4096,8192 [--image photo.png] [--work /tmp/large]

The test image is photo-like: the photo (default: scikit-image's astronaut) resized to each
side with bicubic interpolation plus mild noise, so that it codes like a photo at every size.
Each command runs in a fresh process (compilation included, as a user sees it; the persistent
compilation cache is off so that every size compiles).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> tuple[float, int]:
  """Runs `cmd`; -> (wall seconds, peak resident bytes of that process). Prints the lines
  `sodec -v` logs (the tiled decoder's windows and passes per stage).

  The peak is the child's ru_maxrss, which on Linux starts from this process's own peak (exec
  keeps the high-water mark of the memory it replaces), so this process never holds an image:
  the test images are written by a separate process (make_image)."""
  env = dict(os.environ, SODEC_CACHE_DIR="off", PYTHONPATH=ROOT)
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  elapsed = time.perf_counter() - t
  err = proc.stderr.read().decode()
  if status != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
  for line in err.splitlines():
    if line.startswith("sodec: tiled"):
      print("  " + line, flush=True)
  return elapsed, usage.ru_maxrss * 1024  # Linux: KiB


def make_image(path: str, side: int, image: str = "") -> None:
  """Writes the photo-like test image of `side` x `side` to `path` (see the module docstring)."""
  from PIL import Image

  sys.path.insert(0, ROOT)
  from sodec_jax import data, images

  photo = image or os.path.join(data.skimage_photo_dir(), "astronaut.png")
  photo = images.read_image(photo)[0]
  x = np.asarray(Image.fromarray(photo).resize((side, side), Image.BICUBIC), np.float32)
  noise = np.random.default_rng(side).normal(0, 2.0, x.shape)
  Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8)).save(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", default="")
  p.add_argument("--max-memory", default="8GiB")
  p.add_argument("--sides", default="1024,2048,4096,8192")
  p.add_argument("--image", default="")
  p.add_argument("--work", default="/tmp/sodec_large")
  p.add_argument("--compress-whole", action="store_true", help="compress without the budget")
  p.add_argument("--make-image", default="", help=argparse.SUPPRESS)  # internal: one test image
  p.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.make_image:
    make_image(args.make_image, args.side, args.image)
    return 0
  if not args.checkpoint:
    p.error("--checkpoint is required")
  os.makedirs(args.work, exist_ok=True)
  sodec = [sys.executable, "-m", "sodec_jax.cli", "--verbose"]
  rows = []
  for side in (int(s) for s in args.sides.split(",")):
    src = os.path.join(args.work, f"{side}.png")
    subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--make-image", src, "--side", str(side)]
      + (["--image", args.image] if args.image else []),
      check=True,
    )
    f, out = os.path.join(args.work, f"{side}.sodec"), os.path.join(args.work, f"{side}_hat.png")
    ckpt = ["--checkpoint", args.checkpoint]
    budget = [] if args.compress_whole else ["--max-memory", args.max_memory]
    t_c, rss_c = run(sodec + ["compress", src, f] + ckpt + budget)
    t_d, rss_d = run(sodec + ["decompress", f, out] + ckpt + ["--max-memory", args.max_memory])
    mp = side * side / 1e6
    rows.append((side, mp, t_c, t_d, rss_c, rss_d, os.path.getsize(f)))
    print(
      f"{side}x{side} ({mp:.1f} MP): compress {t_c:.1f} s, decompress {t_d:.1f} s "
      f"({t_d / mp:.1f} s/MP), peak RSS {rss_c / 2**30:.2f} / {rss_d / 2**30:.2f} GiB",
      flush=True,
    )
  print("\n| side | MP | compress s | decompress s | decompress s/MP | peak RSS c / d GiB | bpp |")
  print("|---|---|---|---|---|---|---|")
  for side, mp, t_c, t_d, rss_c, rss_d, size in rows:
    print(
      f"| {side} | {mp:.1f} | {t_c:.1f} | {t_d:.1f} | {t_d / mp:.1f} | "
      f"{rss_c / 2**30:.2f} / {rss_d / 2**30:.2f} | {8 * size / (side * side):.4f} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())

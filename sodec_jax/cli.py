"""`sodec` command line: compress, decompress, info.

  sodec compress photo.png photo.sodec --checkpoint runs/tiny [--max-memory 2GiB]
  sodec decompress photo.sodec photo_hat.png --checkpoint runs/tiny [--dtype bf16]
  sodec decompress big.sodec big.png --checkpoint runs/tiny --max-memory 8GiB   (tiled decode)
  sodec info photo.sodec

Compiled programs are kept in a persistent compilation cache ($SODEC_CACHE_DIR, default
~/.cache/sodec_jax/xla; SODEC_CACHE_DIR=off disables it), so a second run on an image of the
same size loads the decoder instead of compiling it again.

Every user error is one line on stderr ("sodec: error: ...") and exit status 1; outputs are
written through a temporary file and a rename, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from sodec_jax.errors import SodecError


def _read_bytes(path: str) -> bytes:
  if not os.path.exists(path):
    raise SodecError(f"no such file: {path}")
  if os.path.isdir(path):
    raise SodecError(f"{path} is a directory, not a .sodec file")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise SodecError(f"cannot read {path}: {e.strerror}") from None


def cmd_compress(args) -> None:
  from sodec_jax import api, images, tiling

  image, notes = images.read_image(args.input)
  for note in notes:
    print(f"note: {args.input}: {note}", file=sys.stderr)
  images.check_writable(args.output)
  if args.max_memory is not None:
    tiling.parse_bytes(args.max_memory)  # a bad size fails before the model is loaded
  model = api.load_model(args.checkpoint)
  t = time.perf_counter()
  data = api.compress(model, image, max_memory=args.max_memory)
  elapsed = time.perf_counter() - t
  images.write_atomic(args.output, data)
  h, w = image.shape[:2]
  print(
    f"{args.output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp ({w}x{h}, "
    f"{elapsed:.2f} s)"
  )


def cmd_decompress(args) -> None:
  from sodec_jax import api, images, tiling

  data = _read_bytes(args.input)
  api.read_header(data)  # a bad file fails before the model is loaded
  images.image_format(args.output)
  images.check_writable(args.output)
  if args.max_memory is not None:
    tiling.parse_bytes(args.max_memory)  # a bad size fails before the model is loaded
  model = api.load_model(args.checkpoint, dtype=args.dtype, color_fix=args.color_fix)
  t = time.perf_counter()
  image = api.decompress(model, data, max_memory=args.max_memory)
  elapsed = time.perf_counter() - t
  images.write_image(args.output, image)
  print(f"{args.output}: {image.shape[1]}x{image.shape[0]} ({elapsed:.2f} s)")


def cmd_info(args) -> None:
  from sodec_jax.codec import bitstream

  data = _read_bytes(args.input)
  header = bitstream.unpack(data)[0]
  pixels = header.height * header.width
  print(f"file:         {args.input}")
  print(f"image:        {header.width}x{header.height}")
  print(f"size:         {len(data)} bytes, {8 * len(data) / pixels:.4f} bpp")
  print(
    f"format:       version {header.version}"
    + (
      "" if header.version >= 2 else " (float scale indexes: decodes on the platform that wrote it)"
    )
  )
  print(f"decoder:      {bitstream.DECODER_NAMES[header.decoder]}")
  print(f"fingerprint:  {header.fingerprint.hex()}")
  print(f"latents:      y {header.y_shape}, z {header.z_shape}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="sodec", description="SODEC image codec (JAX)")
  p.add_argument(
    "-v",
    "--verbose",
    action="store_true",
    help="log what the codec decides to stderr (e.g. with --max-memory: the windows, bands "
    "and passes of each stage)",
  )
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("compress", help="image file -> .sodec")
  c.add_argument("input")
  c.add_argument("output")
  c.add_argument("--checkpoint", required=True, help="the --workdir a training run wrote")
  c.add_argument(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="keep the encoder's compiled programs within SIZE (KiB/MiB/GiB, e.g. 2GiB): large "
    "images encode in bands of rows whose size the budget picks; the file is the same "
    "(default: one program for the whole image)",
  )
  c.set_defaults(func=cmd_compress)
  d = sub.add_parser("decompress", help=".sodec -> image file (format from the extension)")
  d.add_argument("input")
  d.add_argument("output")
  d.add_argument("--checkpoint", required=True, help="the --workdir a training run wrote")
  d.add_argument(
    "--dtype",
    default=None,
    choices=["auto", "fp32", "bf16", "float32", "bfloat16"],
    help="precision of the decoder networks (default: the checkpoint's config.precision, "
    "'auto' = bf16 on GPU/TPU, fp32 on CPU); the file decodes the same symbols either way",
  )
  d.add_argument(
    "--color-fix",
    default=None,
    choices=["none", "wavelet", "adain"],
    help="the diffusion decoder's colour correction against its fidelity decoder's image "
    "(default: the checkpoint's config.sodec.color_fix; 'none': the diffusion output as it is)",
  )
  d.add_argument(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="keep the decoder's compiled programs within SIZE (KiB/MiB/GiB, e.g. 8GiB): large "
    "images decode in overlapping tiles whose size the budget picks (default: one program for "
    "the whole image)",
  )
  d.set_defaults(func=cmd_decompress)
  i = sub.add_parser("info", help="describe a .sodec file (no model needed)")
  i.add_argument("input")
  i.set_defaults(func=cmd_info)
  return p


def enable_compilation_cache() -> str | None:
  """Points JAX's persistent compilation cache at $SODEC_CACHE_DIR (default
  ~/.cache/sodec_jax/xla; "off" disables it); returns the folder or None."""
  folder = os.environ.get("SODEC_CACHE_DIR", "") or os.path.join(
    os.path.expanduser("~"), ".cache", "sodec_jax", "xla"
  )
  if folder.lower() in ("off", "0", "none"):
    return None
  import jax  # deferred: `sodec info` and --help stay fast

  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return None  # an unwritable home: run without the cache
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  log, handler = logging.getLogger("sodec_jax"), None
  if args.verbose:  # a handler for this call only (main may run more than once in a process)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sodec: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
  if args.command in ("compress", "decompress"):
    enable_compilation_cache()
  try:
    args.func(args)
  except SodecError as e:
    print(f"sodec: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("sodec: interrupted", file=sys.stderr)
    return 130
  finally:
    if handler is not None:
      log.removeHandler(handler)
      log.setLevel(logging.NOTSET)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Fuzzing the decoder: `python -m sodec_jax.fuzz --checkpoint DIR --n N --seed S [--image PHOTO]`.

Compresses a real photo with the model, then decodes N mutated copies of the file: truncations,
bit flips, header bytes and whole header fields (with and without the CRC-32 trailer
recomputed, so field validation and the range decoder itself are reached), payload garbage with
a valid checksum, the other format version, and random streams. Every input must either decode
to an image or raise SodecError; anything else is a bug. Ends with exactly one line

  fuzz: N files, D decoded, E SodecError, O other, slowest T s

(the exit status is non-zero when O > 0, a file took longer than --max-seconds, or the peak
memory of the process grew by more than --max-growth-mib while decoding; the traceback of each
`other` goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import struct
import sys
import time
import traceback
import zlib
from typing import Iterator

import numpy as np

from sodec_jax import api
from sodec_jax.codec import bitstream
from sodec_jax.errors import SodecError

# (kind, weight): how often each mutation family is drawn
KINDS = (
  ("truncate", 3),
  ("bitflip", 6),
  ("header", 2),
  ("header+crc", 5),
  ("field+crc", 4),
  ("payload+crc", 5),
  ("version+crc", 1),
  ("random", 1),
  ("magic+random", 1),
)
# The header's fields after the magic (offset, struct format) as codec/bitstream.py writes them
_FIELDS = (
  (5, ">B"),
  (6, ">B"),
  (7, ">B"),
  (8, ">I"),
  (12, ">I"),
  (32, ">H"),
  (34, ">H"),
  (36, ">H"),
  (38, ">H"),
  (40, ">H"),
  (42, ">H"),
  (44, ">B"),
  (45, ">I"),
  (49, ">I"),
  (53, ">I"),
)


def fix_crc(data: bytes) -> bytes:
  """data with its CRC-32 trailer recomputed (so the container's checksum passes)."""
  body = data[:-4]
  return body + struct.pack(">I", zlib.crc32(body))


def _field_value(rng: np.random.Generator, fmt: str, old: int) -> int:
  bits = 8 * struct.calcsize(fmt)
  choice = int(rng.integers(0, 6))
  values = (0, 1, (1 << bits) - 1, old + 1, max(old - 1, 0), int(rng.integers(0, 1 << bits)))
  return min(values[choice], (1 << bits) - 1)


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
  """One mutation of the .sodec bytes `data` of the family `kind` (see KINDS)."""
  n = len(data)
  head = bitstream.HEADER_MIN - 4
  if kind == "truncate":
    return data[: int(rng.integers(0, n))]
  if kind == "bitflip":
    b = bytearray(data)
    for pos in rng.integers(0, n, int(rng.integers(1, 4))):
      b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)
  if kind in ("header", "header+crc"):
    b = bytearray(data)
    b[int(rng.integers(5, head))] = int(rng.integers(0, 256))
    return fix_crc(bytes(b)) if kind == "header+crc" else bytes(b)
  if kind == "field+crc":
    b = bytearray(data)
    offset, fmt = _FIELDS[int(rng.integers(0, len(_FIELDS)))]
    (old,) = struct.unpack_from(fmt, b, offset)
    struct.pack_into(fmt, b, offset, _field_value(rng, fmt, old))
    return fix_crc(bytes(b))
  if kind == "payload+crc":
    b = bytearray(data)
    for pos in rng.integers(head, n - 4, int(rng.integers(1, 16))):
      b[pos] = int(rng.integers(0, 256))
    return fix_crc(bytes(b))
  if kind == "version+crc":  # the same streams read as the other version
    b = bytearray(data)
    b[5] = bitstream.READABLE_VERSIONS[int(rng.integers(0, len(bitstream.READABLE_VERSIONS)))]
    return fix_crc(bytes(b))
  if kind == "random":
    return rng.bytes(int(rng.integers(0, 400)))
  if kind == "magic+random":
    version = bitstream.READABLE_VERSIONS[int(rng.integers(0, len(bitstream.READABLE_VERSIONS)))]
    return fix_crc(bitstream.MAGIC + bytes([version]) + rng.bytes(int(rng.integers(50, 400))))
  raise ValueError(f"unknown mutation kind {kind!r}")


def mutations(data: bytes, n: int, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
  """n (kind, bytes) mutations of `data`; the families are drawn with the weights of KINDS, and
  the first ones are the edge cases (empty, 1, 5 and header-size truncations)."""
  fixed = [("truncate", data[:k]) for k in (0, 1, 5, bitstream.HEADER_MIN - 4, len(data) - 1)]
  names = [k for k, _ in KINDS]
  p = np.asarray([w for _, w in KINDS], np.float64)
  for i in range(n):
    if i < len(fixed):
      yield fixed[i]
    else:
      kind = names[int(rng.choice(len(names), p=p / p.sum()))]
      yield kind, mutate(data, kind, rng)


@dataclasses.dataclass
class Result:
  files: int = 0
  decoded: int = 0
  sodec_errors: int = 0
  other: int = 0
  slowest: float = 0.0

  def line(self) -> str:
    return (
      f"fuzz: {self.files} files, {self.decoded} decoded, {self.sodec_errors} SodecError, "
      f"{self.other} other, slowest {self.slowest:.3f} s"
    )


def run(model: api.LoadedModel, data: bytes, n: int, seed: int, log=sys.stderr) -> Result:
  """Decodes n mutations of `data` (a file `model` wrote) with api.decompress; an exception
  other than SodecError, or an output that is not a uint8 image, counts as `other`."""
  api.decompress(model, data)  # compile the decoder first: the timings are per file
  result = Result()
  for kind, blob in mutations(data, n, np.random.default_rng(seed)):
    result.files += 1
    start = time.perf_counter()
    try:
      out = api.decompress(model, blob)
    except SodecError as e:
      result.sodec_errors += 1
      if not str(e) or "\n" in str(e):
        result.other += 1
        print(f"{kind}: SodecError without a one-line message: {e!r}", file=log)
    except Exception:  # noqa: BLE001 - what the fuzzer is looking for: report, keep going
      result.other += 1
      print(f"{kind} mutation raised:\n{traceback.format_exc()}", file=log)
    else:
      result.decoded += 1  # a mutated payload can still be a valid stream: it must give an image
      if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3):
        result.other += 1
        print(f"{kind}: decoded to {type(out).__name__} {getattr(out, 'shape', '')}", file=log)
    result.slowest = max(result.slowest, time.perf_counter() - start)
  return result


def _photo(path: str | None, max_side: int) -> np.ndarray:
  from sodec_jax import images

  if path is None:
    import os

    from sodec_jax import data

    path = os.path.join(data.skimage_photo_dir(), "astronaut.png")
  image = images.read_image(path)[0]
  return np.ascontiguousarray(image[:max_side, :max_side])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m sodec_jax.fuzz", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a training --workdir or converted codec")
  p.add_argument("--n", type=int, default=10000, help="number of mutated files to decode")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--image", default=None, help="photo to compress (default: scikit-image's astronaut)"
  )
  p.add_argument(
    "--max-side",
    type=int,
    default=128,
    help="crop the photo to at most this many pixels per side (decode time)",
  )
  p.add_argument(
    "--max-seconds",
    type=float,
    default=2.0,
    help="fail when one file takes longer than this to decode",
  )
  p.add_argument(
    "--max-growth-mib",
    type=float,
    default=512.0,
    help="fail when decoding the mutations raises the peak memory by more than this",
  )
  args = p.parse_args(argv)
  try:
    model = api.load_model(args.checkpoint)
    data = api.compress(model, _photo(args.image, args.max_side))
  except SodecError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  api.decompress(model, data)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB units)
  result = run(model, data, args.n, args.seed)
  growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak
  if growth > args.max_growth_mib:
    print(f"peak memory grew by {growth:.0f} MiB while decoding mutations", file=sys.stderr)
  print(result.line())
  bad = result.other or result.slowest >= args.max_seconds or growth > args.max_growth_mib
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())

"""Fuzzing the decoder: every malformed input raises SodecError, never anything else.

Mutations: truncations, bit flips, random header bytes, random data, and the same mutations
with the CRC recomputed (so they reach field validation and the range decoder itself).
"""
import struct
import zlib

import numpy as np
import pytest

from sodec_jax import api
from sodec_jax.codec import bitstream
from sodec_jax.errors import SodecError


def _fix_crc(data: bytes) -> bytes:
  body = data[:-4]
  return body + struct.pack(">I", zlib.crc32(body))


def _mutations(data: bytes, rng: np.random.Generator):
  n = len(data)
  for cut in sorted(set(rng.integers(0, n, 150).tolist()) | {0, 1, 4, 5, 44, n - 1}):
    yield "truncate", data[:cut]
  for _ in range(300):
    b = bytearray(data)
    for pos in rng.integers(0, n, rng.integers(1, 4)):
      b[pos] ^= 1 << int(rng.integers(0, 8))
    yield "bitflip", bytes(b)
  for _ in range(250):
    b = bytearray(data)
    pos = int(rng.integers(5, bitstream.HEADER_MIN - 4))
    b[pos] = int(rng.integers(0, 256))
    yield "header+crc", _fix_crc(bytes(b))
  for _ in range(250):  # payload garbage with a valid checksum: reaches the range decoder
    b = bytearray(data)
    lo = bitstream.HEADER_MIN - 4
    for pos in rng.integers(lo, n - 4, rng.integers(1, 16)):
      b[pos] = int(rng.integers(0, 256))
    yield "payload+crc", _fix_crc(bytes(b))
  for _ in range(60):
    yield "random", rng.bytes(int(rng.integers(0, 400)))
  for _ in range(40):
    yield "magic+random", _fix_crc(bitstream.MAGIC + bytes([1]) + rng.bytes(int(rng.integers(50, 400))))
  yield "empty", b""
  yield "not-bytes", "a string"


def test_fuzz_decoder_only_raises_sodec_error(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:60, :90]))
  rng = np.random.default_rng(1234)
  counts, decoded = {}, 0
  for kind, blob in _mutations(data, rng):
    counts[kind] = counts.get(kind, 0) + 1
    try:
      out = api.decompress(codec_model, blob)
    except SodecError as e:
      assert str(e), kind
      continue
    except Exception as e:  # pragma: no cover - this is the failure being tested for
      pytest.fail(f"{kind} mutation raised {type(e).__name__}: {e}")
    decoded += 1  # a payload mutation can still be a valid stream: it must decode to an image
    assert out.dtype == np.uint8 and out.ndim == 3
  assert sum(counts.values()) >= 1000, counts


def test_specific_messages(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:64, :64]))
  cases = {
      b"": "empty",
      b"SOD": "truncated",
      b"\x89PNG\r\n\x1a\n" + b"\0" * 100: "not a .sodec file",
      data[:-10]: "checksum|truncated|add up",
      data[:5] + bytes([9]) + data[6:]: "version",
  }
  for blob, pattern in cases.items():
    with pytest.raises(SodecError, match=pattern):
      api.decompress(codec_model, blob)


def test_huge_size_claim_is_refused_before_allocation(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:64, :64]))
  b = bytearray(data)
  struct.pack_into(">II", b, 8, 60000, 60000)
  with pytest.raises(SodecError, match="implausible image size|latent shapes"):
    api.decompress(codec_model, _fix_crc(bytes(b)))

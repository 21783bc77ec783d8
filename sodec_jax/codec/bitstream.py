"""The .sodec container and range coding of latents (constriction, vectorised per model).

File layout (version 2, big-endian integers):

  offset  size  field
  0       5     magic b"SODEC"
  5       1     version (2; 1 is still read, see below)
  6       1     decoder the file needs: 0 = codec (D_a), 1 = diffusion (SODEC's one-step decoder)
  7       1     reserved, 0
  8       4     image height (>= 1)
  12      4     image width (>= 1)
  16      16    model fingerprint (see sodec_jax.api.fingerprint)
  32      6     z shape (h, w, channels), uint16 each
  38      6     y shape (h, w, channels), uint16 each
  44      1     number of streams S (3: z, y, overflow)
  45      4*S   byte length of each stream
  ...           the streams, back to back
  end-4   4     CRC-32 of every byte before it

Versions: the layout is the same; they differ in how a y symbol's scale index (which Gaussian
codes it) is derived from z_hat. Version 2: by the integer network of
`codec/integer_prior.py` (integer arithmetic only: the same indexes on every machine). Version 1
(sodec-jax before the exact indexes): read off P's float32 sigma, so a file decodes only where
sigma rounds the same as where it was written (same backend and XLA version); still decoded.

Every field is validated (`unpack`) before anything is allocated from it; any problem raises
SodecError with a message saying what is wrong.

Range coding: each symbol has a model id (a Gaussian scale level for y, the channel for z).
Symbols are grouped by model id (a stable sort, in the file's order) and each group is coded
with one vectorised constriction call, so there is no Python loop per symbol. Values outside
a model's support are coded as an escape symbol plus a zig-zag varint in the overflow stream.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import constriction
import numpy as np

from sodec_jax.codec.entropy import CodingTable
from sodec_jax.errors import SodecError

MAGIC = b"SODEC"
VERSION = 2  # what `pack` writes
READABLE_VERSIONS = (1, 2)  # what `unpack` accepts (1: float scale indexes, see above)
DECODER_CODEC = 0
DECODER_DIFFUSION = 1
DECODER_NAMES = {
  DECODER_CODEC: "codec (fidelity decoder D_a)",
  DECODER_DIFFUSION: "diffusion (one-step SD decoder)",
}
NUM_STREAMS = 3
_FIXED = struct.Struct(">5sBBBII16s6HB")  # up to and including the stream count
HEADER_MIN = _FIXED.size + 4 * NUM_STREAMS + 4
MAX_SIDE = 1 << 16


@dataclasses.dataclass(frozen=True)
class Header:
  decoder: int
  height: int
  width: int
  fingerprint: bytes
  z_shape: tuple
  y_shape: tuple
  version: int = VERSION


def latent_shapes(
  height: int, width: int, latent_channels: int, hyper_channels: int, pad_multiple: int = 64
) -> tuple[tuple, tuple]:
  """(z_shape, y_shape) of an image of this size after padding to `pad_multiple`."""
  ph, pw = -(-height // pad_multiple) * pad_multiple, -(-width // pad_multiple) * pad_multiple
  return (ph // 64, pw // 64, hyper_channels), (ph // 16, pw // 16, latent_channels)


def pack(header: Header, streams: list[bytes]) -> bytes:
  if len(streams) != NUM_STREAMS or len(header.fingerprint) != 16:
    raise ValueError("pack: need 3 streams and a 16-byte fingerprint")
  if header.version not in READABLE_VERSIONS:
    raise ValueError(f"pack: unknown .sodec version {header.version}")
  head = _FIXED.pack(
    MAGIC,
    header.version,
    header.decoder,
    0,
    header.height,
    header.width,
    header.fingerprint,
    *header.z_shape,
    *header.y_shape,
    NUM_STREAMS,
  )
  body = head + struct.pack(f">{NUM_STREAMS}I", *(len(s) for s in streams)) + b"".join(streams)
  return body + struct.pack(">I", zlib.crc32(body))


def unpack(data: bytes, max_pixels: int = 1 << 28) -> tuple[Header, list[bytes]]:
  """Parses and validates a .sodec file. Raises SodecError on anything wrong."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise SodecError(f"expected the bytes of a .sodec file, got {type(data).__name__}")
  data = bytes(data)
  if len(data) == 0:
    raise SodecError("the .sodec data is empty (0 bytes)")
  if not MAGIC.startswith(data[:5]) and not data.startswith(MAGIC):
    raise SodecError("not a .sodec file (wrong magic bytes): was it written by `sodec compress`?")
  if len(data) < HEADER_MIN:
    raise SodecError(f"truncated .sodec file: {len(data)} bytes, a header alone needs {HEADER_MIN}")
  (
    magic,
    version,
    decoder,
    reserved,
    height,
    width,
    fingerprint,
    zh,
    zw,
    zc,
    yh,
    yw,
    yc,
    nstreams,
  ) = _FIXED.unpack_from(data, 0)
  if version not in READABLE_VERSIONS:
    raise SodecError(
      f"unsupported .sodec version {version} (this sodec-jax reads versions "
      f"{', '.join(map(str, READABLE_VERSIONS))}): decode it with the sodec-jax "
      "release that wrote it"
    )
  (crc,) = struct.unpack_from(">I", data, len(data) - 4)
  if zlib.crc32(data[:-4]) != crc:
    raise SodecError("corrupted .sodec file: checksum mismatch (the file was truncated or altered)")
  if decoder not in DECODER_NAMES or reserved != 0:
    raise SodecError(f"corrupted .sodec file: unknown decoder kind {decoder}")
  if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE) or height * width > max_pixels:
    raise SodecError(
      f"corrupted .sodec file: implausible image size {height}x{width} (limit {max_pixels} pixels)"
    )
  z_expect, y_expect = latent_shapes(height, width, zc, yc)
  if (zh, zw) != z_expect[:2] or (yh, yw) != y_expect[:2] or zc == 0 or yc == 0:
    raise SodecError(
      f"corrupted .sodec file: latent shapes {(zh, zw, zc)}/{(yh, yw, yc)} do not "
      f"match a {height}x{width} image"
    )
  if nstreams != NUM_STREAMS:
    raise SodecError(f"corrupted .sodec file: {nstreams} streams, expected {NUM_STREAMS}")
  lengths = struct.unpack_from(f">{NUM_STREAMS}I", data, _FIXED.size)
  start = _FIXED.size + 4 * NUM_STREAMS
  if start + sum(lengths) + 4 != len(data):
    raise SodecError("corrupted .sodec file: stream lengths do not add up to the file size")
  streams, pos = [], start
  for n in lengths:
    streams.append(data[pos : pos + n])
    pos += n
  header = Header(decoder, height, width, fingerprint, (zh, zw, zc), (yh, yw, yc), version)
  return header, streams


# --------------------------------------------------------------------------- range coding
class RangeCoder:
  """Codes integer symbols with per-symbol model ids under a CodingTable."""

  def __init__(self, table: CodingTable):
    self.table = table
    self.models = [constriction.stream.model.Categorical(p, perfect=False) for p in table.pmfs]

  def _groups(self, model_ids: np.ndarray):
    ids = np.asarray(model_ids).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= len(self.table)):
      raise ValueError("model id out of range")
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(len(self.table) + 1))
    return order, bounds

  def encode(self, symbols: np.ndarray, model_ids: np.ndarray) -> tuple[bytes, list[int]]:
    """symbols int [M], model_ids [M] -> (stream bytes, overflow values in coding order)."""
    symbols = np.asarray(symbols, np.int64).ravel()
    order, bounds = self._groups(model_ids)
    sorted_syms = symbols[order]
    encoder = constriction.stream.queue.RangeEncoder()
    overflow = []
    for r in np.flatnonzero(np.diff(bounds)):
      s = sorted_syms[bounds[r] : bounds[r + 1]] - self.table.offsets[r]
      size = self.table.sizes[r]
      out = (s < 0) | (s >= size)
      if out.any():
        overflow.extend((sorted_syms[bounds[r] : bounds[r + 1]][out]).tolist())
        s = np.where(out, size, s)
      encoder.encode(s.astype(np.int32), self.models[r])
    return encoder.get_compressed().astype("<u4").tobytes(), overflow

  def decode(self, stream: bytes, model_ids: np.ndarray, overflow: "OverflowReader") -> np.ndarray:
    """Inverse of `encode`: -> int32 symbols [M] in the original order."""
    if len(stream) % 4:
      raise SodecError("corrupted .sodec file: a range-coded stream is not a whole number of words")
    ids = np.asarray(model_ids).ravel()
    order, bounds = self._groups(ids)
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    sorted_syms = np.empty(ids.size, np.int64)
    for r in np.flatnonzero(np.diff(bounds)):
      n = int(bounds[r + 1] - bounds[r])
      s = np.asarray(decoder.decode(self.models[r], n), np.int64)
      esc = s == self.table.sizes[r]
      s = s + self.table.offsets[r]
      if esc.any():
        s[esc] = overflow.take(int(esc.sum()))
      sorted_syms[bounds[r] : bounds[r + 1]] = s
    symbols = np.empty_like(sorted_syms)
    symbols[order] = sorted_syms
    return symbols.astype(np.int32)


def encode_overflow(values: list[int]) -> bytes:
  """Zig-zag LEB128 varints."""
  out = bytearray()
  for v in values:
    u = (v << 1) ^ (v >> 63) if v < 0 else v << 1
    while True:
      b = u & 0x7F
      u >>= 7
      out.append(b | (0x80 if u else 0))
      if not u:
        break
  return bytes(out)


class OverflowReader:
  """Reads the zig-zag varints of the overflow stream; every value must be consumed."""

  def __init__(self, data: bytes):
    self.data, self.pos = data, 0

  def take(self, n: int) -> list[int]:
    vals = []
    for _ in range(n):
      u, shift = 0, 0
      while True:
        if self.pos >= len(self.data) or shift > 35:
          raise SodecError("corrupted .sodec file: bad overflow stream")
        b = self.data[self.pos]
        self.pos += 1
        u |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
          break
      vals.append((u >> 1) ^ -(u & 1))
    return vals

  def finish(self):
    if self.pos != len(self.data):
      raise SodecError("corrupted .sodec file: trailing bytes in the overflow stream")

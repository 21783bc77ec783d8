"""Fuzzing the decoder: every malformed input raises SodecError, never anything else.

The mutations live in `sodec_jax.fuzz` (`python -m sodec_jax.fuzz` runs them at scale): truncations,
bit flips, random header bytes and fields, random data, and the same with the CRC recomputed
(so they reach field validation and the range decoder itself).
"""

import io
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from sodec_jax import api, fuzz
from sodec_jax.codec import bitstream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fuzz_decoder_only_raises_sodec_error(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:60, :90]))
  log = io.StringIO()
  result = fuzz.run(codec_model, data, 1200, seed=1234, log=log)
  assert result.other == 0, log.getvalue()[-3000:]
  assert result.files == 1200 and result.decoded + result.sodec_errors == 1200
  assert result.decoded > 0 and result.sodec_errors > 0  # both outcomes are reached
  assert result.slowest < 2.0


def test_every_mutation_kind_is_drawn():
  rng = np.random.default_rng(0)
  data = bytes(range(256)) * 2
  kinds = {kind for kind, _ in fuzz.mutations(data, 400, rng)}
  assert kinds == {k for k, _ in fuzz.KINDS}
  b = fuzz.mutate(data, "version+crc", rng)
  assert b[5] in bitstream.READABLE_VERSIONS and fuzz.fix_crc(b) == b


def test_fuzz_command(micro_workdir):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sodec_jax.fuzz",
      "--checkpoint",
      micro_workdir,
      "--n",
      "60",
      "--seed",
      "3",
      "--max-side",
      "64",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
    r"fuzz: 60 files, \d+ decoded, \d+ SodecError, 0 other, slowest \d+\.\d+ s", lines[0]
  )


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
    with pytest.raises(api.SodecError, match=pattern):
      api.decompress(codec_model, blob)


def test_huge_size_claim_is_refused_before_allocation(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:64, :64]))
  b = bytearray(data)
  struct.pack_into(">II", b, 8, 60000, 60000)
  with pytest.raises(api.SodecError, match="implausible image size|latent shapes"):
    api.decompress(codec_model, fuzz.fix_crc(bytes(b)))

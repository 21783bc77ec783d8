"""The `sodec` command line on real files: round trip, info, and every user error as one line."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sodec_jax import api, tiling
from tests.conftest import ROOT, load_photo, make_micro_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A real training workdir: the micro config trained for 2 steps by the real train loop."""
  from sodec_jax.train import train

  wd = str(tmp_path_factory.mktemp("run"))
  train(make_micro_config(**{"train.num_steps": 2}), wd)
  return wd


class _Result:
  def __init__(self, returncode, stdout, stderr):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def sodec(capsys, monkeypatch):
  """Runs `sodec ARGS` in this process (fast); the console-script test below runs a real one.
  The persistent compilation cache stays off here (it would serve the whole test process)."""
  from sodec_jax import cli

  monkeypatch.setenv("SODEC_CACHE_DIR", "off")

  def run(*args, check=True):
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    if check:
      assert code == 0, err
    return _Result(code, out, err)

  return run


def test_console_script_in_a_subprocess(workdir, tmp_path):
  """Real processes: compress, then decompress twice; the second decompress of the same size
  finds its programs in the persistent compilation cache (no new cache entries)."""
  src = tmp_path / "p.png"
  Image.fromarray(load_photo("astronaut.png")[:64, :64]).save(src)
  cache = tmp_path / "xla-cache"
  env = dict(os.environ, SODEC_CACHE_DIR=str(cache))

  def sodec_process(*args):
    return subprocess.run(
      [sys.executable, "-m", "sodec_jax.cli", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
    )

  r = sodec_process("compress", str(src), str(tmp_path / "p.sodec"), "--checkpoint", workdir)
  assert r.returncode == 0 and "bpp" in r.stdout, r.stderr
  entries = []
  for k in range(2):
    out = tmp_path / f"p{k}.png"
    r = sodec_process("decompress", str(tmp_path / "p.sodec"), str(out), "--checkpoint", workdir)
    assert r.returncode == 0, r.stderr
    entries.append(sorted(os.listdir(cache)))
  assert entries[0] and entries[1] == entries[0], entries
  a, b = (np.asarray(Image.open(tmp_path / f"p{k}.png")) for k in range(2))
  np.testing.assert_array_equal(a, b)
  r = subprocess.run(
    [sys.executable, "-m", "sodec_jax.cli", "info", str(tmp_path / "nothing.sodec")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


def assert_one_line_error(r, pattern):
  assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
  lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("note:")]
  assert len(lines) == 1 and lines[0].startswith("sodec: error:"), r.stderr
  assert pattern in lines[0], lines[0]


def test_compress_info_decompress(workdir, tmp_path, sodec):
  src = tmp_path / "cat.png"
  Image.fromarray(load_photo("chelsea.png")[:100, :150]).save(src)
  r = sodec("compress", str(src), str(tmp_path / "cat.sodec"), "--checkpoint", workdir)
  assert "bpp" in r.stdout
  info = sodec("info", str(tmp_path / "cat.sodec")).stdout
  assert "150x100" in info and "codec" in info and "fingerprint" in info
  sodec(
    "decompress",
    str(tmp_path / "cat.sodec"),
    str(tmp_path / "cat_hat.png"),
    "--checkpoint",
    workdir,
  )
  out = np.asarray(Image.open(tmp_path / "cat_hat.png"))
  assert out.shape == (100, 150, 3) and out.dtype == np.uint8
  # the bf16 decoder: same symbols, the reconstruction within bf16 rounding of float32's
  sodec(
    "decompress",
    str(tmp_path / "cat.sodec"),
    str(tmp_path / "cat_bf16.png"),
    "--checkpoint",
    workdir,
    "--dtype",
    "bf16",
  )
  bf16 = np.asarray(Image.open(tmp_path / "cat_bf16.png")).astype(int)
  assert 0 < np.abs(bf16 - out).max() <= 24 and np.abs(bf16 - out).mean() < 2.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK"])
def test_other_image_modes_are_converted_with_a_note(workdir, tmp_path, mode, sodec):
  rgb = Image.fromarray(load_photo("coffee.png")[:64, :80])
  img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
  src = tmp_path / ("in.tif" if mode in ("I;16", "CMYK") else "in.png")
  img.save(src)
  r = sodec("compress", str(src), str(tmp_path / "o.sodec"), "--checkpoint", workdir)
  assert "note:" in r.stderr and ("converted" in r.stderr or "alpha" in r.stderr), r.stderr


def test_user_errors_are_one_line(workdir, tmp_path, sodec):
  (tmp_path / "text.png").write_text("not an image")
  (tmp_path / "bad.sodec").write_bytes(b"SODEC\x01garbage")
  good = tmp_path / "p.png"
  Image.fromarray(load_photo("astronaut.png")[:64, :64]).save(good)
  cases = [
    (
      (
        "compress",
        str(tmp_path / "missing.png"),
        str(tmp_path / "o.sodec"),
        "--checkpoint",
        workdir,
      ),
      "no such file",
    ),
    (
      ("compress", str(tmp_path / "text.png"), str(tmp_path / "o.sodec"), "--checkpoint", workdir),
      "not an image",
    ),
    (("compress", str(tmp_path), str(tmp_path / "o.sodec"), "--checkpoint", workdir), "directory"),
    (
      ("compress", str(good), str(tmp_path / "nodir" / "o.sodec"), "--checkpoint", workdir),
      "does not exist",
    ),
    (
      ("compress", str(good), str(tmp_path / "o.sodec"), "--checkpoint", str(tmp_path / "nope")),
      "does not exist",
    ),
    (
      ("compress", str(good), str(tmp_path / "o.sodec"), "--checkpoint", str(tmp_path)),
      "config.json",
    ),
    (
      ("decompress", str(tmp_path / "bad.sodec"), str(tmp_path / "o.png"), "--checkpoint", workdir),
      "truncated",
    ),
    (
      ("decompress", str(good), str(tmp_path / "o.png"), "--checkpoint", workdir),
      "not a .sodec file",
    ),
    (("info", str(tmp_path / "missing.sodec")), "no such file"),
  ]
  for args, pattern in cases:
    assert_one_line_error(sodec(*args, check=False), pattern)
  # nothing half-written: no output files and no temporaries appeared
  leftovers = {p for p in os.listdir(tmp_path)} - {"text.png", "bad.sodec", "p.png"}
  assert not leftovers, leftovers


def test_unknown_output_extension(workdir, tmp_path, sodec):
  src = tmp_path / "p.png"
  Image.fromarray(load_photo("astronaut.png")[:64, :64]).save(src)
  sodec("compress", str(src), str(tmp_path / "p.sodec"), "--checkpoint", workdir)
  r = sodec(
    "decompress",
    str(tmp_path / "p.sodec"),
    str(tmp_path / "p.xyz"),
    "--checkpoint",
    workdir,
    check=False,
  )
  assert_one_line_error(r, "unknown image extension")
  assert not (tmp_path / "p.xyz").exists()


def test_max_memory(workdir, tmp_path, sodec):
  """--max-memory: a bad size is one line (before the model loads); a budget the whole decoder
  fits decodes as without one; one below the whole encoder encodes in bands to the same file;
  one below the encoder's smallest band says what it needs; -v logs the tiled decoder's plan."""
  src = tmp_path / "cat.png"
  Image.fromarray(load_photo("chelsea.png")[:64, :96]).save(src)
  f, out = str(tmp_path / "cat.sodec"), str(tmp_path / "cat.png")
  r = sodec("compress", str(src), f, "--checkpoint", workdir, "--max-memory", "8GB", check=False)
  assert_one_line_error(r, "GiB")
  r = sodec("compress", str(src), f, "--checkpoint", workdir, "--max-memory", "1KiB", check=False)
  assert_one_line_error(r, "smallest band")
  sodec("compress", str(src), f, "--checkpoint", workdir)
  plain_file = (tmp_path / "cat.sodec").read_bytes()
  model = api.load_model(workdir)  # a budget below the whole encoder's program: E in bands
  x = api.pad_image(model, load_photo("chelsea.png")[:64, :96])
  budget = str(tiling.program_bytes(model._lower_analysis(x).compile()) - 1)
  sodec("compress", str(src), f, "--checkpoint", workdir, "--max-memory", budget)
  assert (tmp_path / "cat.sodec").read_bytes() == plain_file
  r = sodec("decompress", f, out, "--checkpoint", workdir, "--max-memory", "2 lots", check=False)
  assert_one_line_error(r, "GiB")
  sodec("decompress", f, out, "--checkpoint", workdir)
  plain = np.asarray(Image.open(out)).astype(int)
  sodec("decompress", f, out, "--checkpoint", workdir, "--max-memory", "16GiB")
  assert np.abs(np.asarray(Image.open(out)).astype(int) - plain).max() <= 1
  whole = model._lower_synthesis(*api.decode_latents(model, plain_file)[1:]).compile()
  whole = tiling.program_bytes(whole)
  r = sodec("-v", "decompress", f, out, "--checkpoint", workdir, "--max-memory", str(whole - 1))
  assert "sodec: tiled decode of y" in r.stderr and "fidelity" in r.stderr, r.stderr  # -v: the plan
  assert np.abs(np.asarray(Image.open(out)).astype(int) - plain).max() <= 2

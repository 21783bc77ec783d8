"""The layering contracts in pyproject.toml ([tool.importlinter]): imports point down only and
no module imports one that imports it back (function-level imports included). Checked with
import-linter, as CI does; and the check itself is shown to fail on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("importlinter")


def _lint(cwd: str) -> subprocess.CompletedProcess:
  code = (
    "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
  )
  env = dict(os.environ, PYTHONPATH=cwd)
  return subprocess.run(
    [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )


def test_contracts_are_kept():
  res = _lint(ROOT)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
  assert "BROKEN" not in res.stdout


@pytest.mark.parametrize(
  "module, line, contract",
  [
    ("layers.py", "from sodec_jax import api  # upward\n", "Layers"),
    ("weights/strict.py", "from sodec_jax.converters import output  # upward\n", "Layers"),
    ("codec/entropy.py", "from sodec_jax.codec import bitstream  # cycle\n", "cycles"),
  ],
)
def test_a_violation_breaks_a_contract(tmp_path, module, line, contract):
  """The same contracts on a copy of the package with one bad import: lint-imports fails and
  names the broken contract."""
  shutil.copytree(
    os.path.join(ROOT, "sodec_jax"),
    tmp_path / "sodec_jax",
    ignore=shutil.ignore_patterns("__pycache__", "*.npz"),
  )
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
  with open(tmp_path / "sodec_jax" / module, "a") as f:
    f.write(line)
  res = _lint(str(tmp_path))
  assert res.returncode != 0
  broken = [l for l in res.stdout.splitlines() if l.endswith("BROKEN")]
  assert broken and contract in broken[0], res.stdout[-3000:]

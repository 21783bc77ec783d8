"""Fixtures for the converter tests: tests/reference on sys.path, seeded torch, error helpers."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference"))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed_torch():
  import torch

  torch.manual_seed(0)
  yield


def errors(a, b) -> tuple[float, float]:
  """(relative L2 error, max abs error), printed (see with pytest -s)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  mx = float(np.max(np.abs(a - b)))
  test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
  print(f"[convert err] {test}: rel {rel:.2e} max abs {mx:.2e}")
  return rel, mx


def assert_out_clean(out: str) -> None:
  """Nothing at --out and no temporary folder left beside it."""
  assert not os.path.exists(out), f"{out} was left behind"
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(parent):
    left = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(out)}.tmp-")]
    assert not left, left

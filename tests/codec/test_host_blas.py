"""host_blas: the exact indexes' GEMMs run with a lowered OpenBLAS thread count, restored after
(see sodec_jax/codec/host_blas.py for why)."""

import threading

import numpy as np
import pytest

from sodec_jax.codec import host_blas, integer_prior


@pytest.fixture
def blas():
  fns = host_blas.openblas()
  if fns is None:
    pytest.skip("numpy here is not linked against OpenBLAS")
  get, put = fns
  saved = get()
  put(2)
  yield get
  put(saved)


def test_limited_lowers_and_restores_nested_and_on_error(blas):
  with host_blas.limited(1):
    assert blas() == 1
    with host_blas.limited(1):
      assert blas() == 1
    assert blas() == 1  # the inner exit does not restore
  assert blas() == 2
  with pytest.raises(KeyError), host_blas.limited(1):
    raise KeyError
  assert blas() == 2
  with host_blas.limited(8):  # never raises the count
    assert blas() == 2


def test_concurrent_blocks_restore_once_the_last_exits(blas):
  inside, release = threading.Event(), threading.Event()

  def hold():
    with host_blas.limited(1):
      inside.set()
      release.wait(10)

  t = threading.Thread(target=hold)
  t.start()
  inside.wait(10)
  with host_blas.limited(1):
    pass
  assert blas() == 1  # the other block is still running
  release.set()
  t.join()
  assert blas() == 2


def test_indexer_runs_its_layers_with_the_spare_cpus_left(blas, monkeypatch):
  seen = []

  def probe(a):
    seen.append(blas())
    return a

  ix = integer_prior.IntegerScaleIndexer((probe, probe), 9, np.asarray([1, 2]), 0, 1)
  monkeypatch.setattr(host_blas, "cpu_count", lambda: 3)
  assert ix(np.ones((1, 2, 2, 1))).tolist() == [[[[1], [1]], [[1], [1]]]]
  assert seen == [1, 1] and blas() == 2

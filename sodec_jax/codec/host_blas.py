"""How many threads numpy's BLAS may use, for a block of host code (the exact scale indexes).

Why: OpenBLAS (the BLAS of numpy's pip wheels) runs a large GEMM on all cores, and after each
call its worker threads busy-wait for the next one for a while. On a machine with few cores
that spin takes CPU from XLA's threads (P runs while the indexes are computed, the decoder right
after), and under load a GEMM stalls whenever one worker is descheduled. Measured on 2 shared
cores (docs/PERFORMANCE.md, "Exact scale indexes"): the exact indexes of the tiny trained model
took 22.6 ms with 2 OpenBLAS threads and 2.7 ms with 1; the paper-size ones 182 vs 103 ms.

`limited(n)` lowers OpenBLAS's thread count to n inside a `with` block and restores it after
(nested and concurrent blocks: the first entry lowers, the last exit restores). OpenBLAS is
found among the libraries this process loaded (/proc/self/maps) and called through its
documented `openblas_set_num_threads` / `openblas_get_num_threads` (also as numpy's wheels
name them, `scipy_openblas_*64_`). With another BLAS (MKL, Accelerate, BLIS) or no /proc it
does nothing. The results of a GEMM never depend on this: only its speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import numpy  # noqa: F401  (loads numpy's BLAS, the library looked up below)

# (prefix, suffix) of the thread-count functions in the OpenBLAS builds numpy ships or links
_NAMES = (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", ""))
_lock = threading.Lock()
_state = {"depth": 0, "saved": None}


@functools.cache
def openblas():
  """(get_num_threads, set_num_threads) of the OpenBLAS loaded in this process, or None."""
  try:
    with open("/proc/self/maps") as f:
      fields = [line.split(None, 5) for line in f]  # address perms offset dev inode [path]
  except OSError:  # not Linux
    return None
  paths = sorted(
    {f[5].strip() for f in fields if len(f) == 6 and "openblas" in os.path.basename(f[5]).lower()}
  )
  for path in paths:
    try:
      lib = ctypes.CDLL(path)  # already loaded: the same instance numpy calls
    except OSError:
      continue
    for prefix, suffix in _NAMES:
      get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
      put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
      if get is not None and put is not None:
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return get, put
  return None


def cpu_count() -> int:
  """CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


@contextlib.contextmanager
def limited(n: int):
  """At most n (>= 1) OpenBLAS threads inside the block (no-op without OpenBLAS)."""
  fns = openblas()
  if fns is None:
    yield
    return
  get, put = fns
  with _lock:
    if _state["depth"] == 0:
      _state["saved"] = get()
      put(max(1, min(n, _state["saved"])))
    _state["depth"] += 1
  try:
    yield
  finally:
    with _lock:
      _state["depth"] -= 1
      if _state["depth"] == 0:
        put(_state["saved"])

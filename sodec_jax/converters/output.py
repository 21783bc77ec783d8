"""The output of every converter: a folder written atomically, with its manifest.

    with output(out, kind="unet", dtype="float32") as o:
      o.write_json("unet", "config.json", config)
      o.save_params("unet", pure_dict)                # an orbax checkpoint in OUT/unet/params
      o.add_sources([src])                            # path, size and sha256 in the manifest

    OUT/manifest.json       {"format": "sodec-jax-converted", "format_version": 1,
                             "converter_version", "kind", "dtype", "components": [...],
                             "source": [{"path", "size", "sha256"}, ...], "created", ...}
    OUT/<component>/config.json    what rebuilds the module
    OUT/<component>/params/        orbax checkpoint of the module's variables as a pure dict

Components go to a temporary sibling folder renamed to OUT at the end, so a failure leaves
nothing at OUT. Read back by `sodec_jax.weights.converted` (the format constants live in
`sodec_jax.weights.formats`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Iterable

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.weights.formats import (
  CONVERTER_VERSION,
  DTYPES,
  FORMAT,
  FORMAT_VERSION,
  MANIFEST,
  PARAMS_DIR,
  sha256_file,
)


def source_entries(paths: Iterable[str]) -> list[dict]:
  out = []
  for p in paths:
    p = os.path.abspath(p)
    out.append({"path": p, "size": os.path.getsize(p), "sha256": sha256_file(p)})
  return out


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise SodecError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  return dtype


class Output:
  """The output folder, written atomically: components go to a temporary sibling folder that is
  renamed to `out` by `commit()`; anything else (an exception) removes it."""

  def __init__(self, out: str, kind: str, dtype: str):
    self.out = os.path.abspath(out)
    self.kind, self.dtype = kind, dtype
    self.components: list[str] = []
    self.sources: list[dict] = []
    self.extra: dict = {}
    if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)):
      raise SodecError(
        f"--out {out} already exists and is not empty; choose a new folder (nothing was written)"
      )
    parent = os.path.dirname(self.out)
    try:
      os.makedirs(parent, exist_ok=True)
      self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=parent)
    except OSError as e:
      raise SodecError(f"cannot write --out {out}: {e.strerror or e}") from None

  def component(self, name: str) -> str:
    path = os.path.join(self.tmp, name)
    os.makedirs(path, exist_ok=True)
    if name not in self.components:
      self.components.append(name)
    return path

  def write_json(self, component: str, name: str, obj) -> None:
    with open(os.path.join(self.component(component), name), "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)

  def save_params(self, component: str, tree) -> None:
    save_tree(os.path.join(self.component(component), PARAMS_DIR), tree)

  def add_sources(self, paths: Iterable[str]) -> None:
    self.sources.extend(source_entries(paths))

  def hash_sources_in_background(self, paths: Iterable[str]) -> None:
    """Hash `paths` in a thread while the conversion runs (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    self._pending = pool.submit(source_entries, list(paths))
    pool.shutdown(wait=False)

  def commit(self) -> str:
    if getattr(self, "_pending", None) is not None:
      self.sources.extend(self._pending.result())
      self._pending = None
    manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "converter_version": CONVERTER_VERSION,
      "kind": self.kind,
      "dtype": self.dtype,
      "components": self.components,
      "source": self.sources,
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      **self.extra,
    }
    with open(os.path.join(self.tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, default=_json_default)
    try:
      if os.path.isdir(self.out):
        os.rmdir(self.out)  # an empty folder given as --out
      os.rename(self.tmp, self.out)
    except OSError as e:
      raise SodecError(f"cannot move the result into --out {self.out}: {e.strerror or e}") from None
    os.chmod(self.out, 0o755)
    return self.out

  def abort(self) -> None:
    shutil.rmtree(self.tmp, ignore_errors=True)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  return str(o)


@contextlib.contextmanager
def atomic_folder(out: str):
  """with atomic_folder(out) as tmp: ...write files into tmp...; on success tmp (a temporary
  sibling of `out`) is renamed to `out`, on any exception it is removed. `out` must not exist or
  be an empty folder; an OSError is one SodecError line naming `out`."""
  path = os.path.abspath(out)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise SodecError(f"--out {out} already exists and is not empty; choose a new folder")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
  except OSError as e:
    raise SodecError(f"cannot write {out}: {e.strerror or e}") from None
  try:
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)
    os.rename(tmp, path)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise SodecError(f"cannot write {out}: {e.strerror or e}") from None
    raise


@contextlib.contextmanager
def output(out: str, kind: str, dtype: str):
  """with output(out, kind, dtype) as o: ...write components...; renamed into place on success."""
  o = Output(out, kind, dtype)
  try:
    yield o
    o.commit()
  except BaseException:
    o.abort()
    raise


def save_tree(path: str, tree) -> None:
  """An orbax checkpoint of a pure dict of arrays at `path` (synchronous)."""
  import orbax.checkpoint as ocp

  # Synchronous, no defensive copy of host arrays, at most 1 GB in flight, no compression
  # (weights do not compress): keeps converting the full UNet within memory and time budgets.
  registry = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
  )
  import jax

  tree = jax.tree.map(lambda a: a if isinstance(a, np.ndarray) else np.asarray(a), tree)
  handler = ocp.PyTreeCheckpointHandler(
    save_concurrent_gb=1, use_compression=False, type_handler_registry=registry
  )
  try:
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
  except OSError as e:
    raise SodecError(f"cannot write {path}: {e.strerror or e}") from None

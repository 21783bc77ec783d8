"""THE strict loader: every key map (diffusers, transformers, CLIP, HiFiC codec and
discriminator, LDM single files, LPIPS, DISTS) reports a state dict that does not fit its module
with this one message format:

    "<what>: the weights do not match: missing N: a, b | unexpected N: c | mis-shaped N: d: ...
     [. Hint: ...]"

`fill` does the whole job for a key map given as rows; `check` raises the message for key maps
that collect the three lists themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from sodec_jax.errors import SodecError

LIMIT = 30


def mismatch_summary(missing, unexpected, mis_shaped, limit: int = LIMIT) -> str:
  """'missing N: a, b | unexpected N: ... | mis-shaped N: ...' (empty parts left out)."""
  parts = []
  for title, items, sep in (
    ("missing", missing, ", "),
    ("unexpected", unexpected, ", "),
    ("mis-shaped", mis_shaped, "; "),
  ):
    items = list(items)
    if items:
      more = " ..." if len(items) > limit else ""
      parts.append(f"{title} {len(items)}: {sep.join(items[:limit])}{more}")
  return " | ".join(parts)


def check(
  what: str,
  missing: Sequence[str] = (),
  unexpected: Sequence[str] = (),
  mis_shaped: Sequence[str] = (),
  hint: str = "",
  limit: int = LIMIT,
) -> None:
  """Raises THE SodecError when any list is non-empty (see the module docstring); each list
  shows at most `limit` names after its count."""
  if missing or unexpected or mis_shaped:
    tail = f". Hint: {hint}" if hint else ""
    raise SodecError(
      f"{what}: the weights do not match: "
      f"{mismatch_summary(missing, unexpected, mis_shaped, limit)}{tail}"
    )


def _shape(source, key) -> tuple:
  return (
    tuple(source.shape(key))
    if hasattr(source, "shape") and callable(source.shape)
    else tuple(np.shape(source[key]))
  )


def _get(source, key) -> np.ndarray:
  if hasattr(source, "get") and hasattr(source, "shape") and callable(source.shape):
    return source.get(key)
  v = source[key]
  if hasattr(v, "detach"):
    from sodec_jax.weights.formats import to_numpy

    return to_numpy(v)
  return np.asarray(v)


def fill(
  rows: Iterable[tuple[Sequence[str], Any, Callable, tuple]],
  source,
  *,
  what: str,
  ignore: Callable[[str], bool] = lambda k: False,
  hint: Callable[[list, list], str] | str = "",
) -> dict:
  """Strictly maps `source` (a dict of arrays/tensors or a `formats.TensorSource`) through `rows`.

  rows: (source keys (the first present one is used: aliases), target, transform (torch layout
  -> ours, e.g. a transpose), our expected shape). Shapes are checked on an empty probe before
  any tensor is read. Every key of `source` must be used unless `ignore(key)`. Returns
  {target: our array}; any problem -> one SodecError (`check`), `hint(missing, unexpected)`
  appended.
  """
  keys = list(source.keys())
  used, missing, bad, out = set(), [], [], {}
  for names, target, transform, shape in rows:
    names = (names,) if isinstance(names, str) else tuple(names)
    key = next((n for n in names if n in source), None)
    if key is None:
      missing.append(names[0])
      continue
    used.add(key)
    got = _shape(source, key)
    probe = transform(np.empty(got, np.uint8)) if np.prod(got) < 1 << 31 else None
    if probe is None or tuple(probe.shape) != tuple(shape):
      bad.append(f"{key}: {got} does not convert to {tuple(shape)}")
      continue
    out[target] = transform(_get(source, key))
  unexpected = sorted(k for k in keys if k not in used and not ignore(k))
  text = hint(missing, unexpected) if callable(hint) else hint
  check(what, sorted(missing), unexpected, bad, text if (missing or unexpected or bad) else "")
  return out


__all__ = ["check", "fill", "mismatch_summary"]

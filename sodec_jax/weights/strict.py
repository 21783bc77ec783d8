"""The one message every strict key map gives when a state dict does not fit a module."""
from __future__ import annotations


def mismatch_summary(missing, unexpected, mis_shaped, limit: int = 20) -> str:
  """'missing N: a, b | unexpected N: ... | mis-shaped N: ...' (empty parts left out)."""
  parts = []
  if missing:
    parts.append(f"missing {len(missing)}: {', '.join(list(missing)[:limit])}")
  if unexpected:
    parts.append(f"unexpected {len(unexpected)}: {', '.join(list(unexpected)[:limit])}")
  if mis_shaped:
    parts.append(f"mis-shaped {len(mis_shaped)}: {'; '.join(list(mis_shaped)[:limit])}")
  return " | ".join(parts)

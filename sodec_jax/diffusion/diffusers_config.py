"""diffusers config.json dicts <-> our model config dataclasses (UNetConfig, VAEConfig)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sodec_jax.errors import SodecError


def from_diffusers_dict(
  cls, d: Mapping[str, Any], *, unsupported: Mapping[str, Any], ignored: tuple[str, ...], what: str
):
  """cls(**d) for a diffusers config dict, strictly: keys starting with "_" and `ignored` are
  skipped; a key of `unsupported` must hold its one supported value; any other key must be a
  field of `cls`. Every problem is reported in one SodecError; lists become tuples; the result
  is validated (cls.validate())."""
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs, bad = {}, []
  for key, value in d.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in unsupported:
      if value != unsupported[key]:
        bad.append(f"{key}={value!r} (supported: {unsupported[key]!r})")
      continue
    if key not in fields:
      bad.append(f"{key} (unknown key)")
      continue
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  if bad:
    raise SodecError(
      f"{what} config has settings this {what} does not implement: " + "; ".join(bad)
    )
  cfg = cls(**kwargs)
  cfg.validate()
  return cfg


def to_diffusers_dict(cfg) -> dict:
  """The dataclass as a diffusers-style dict (tuples as lists)."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


class DiffusersConfig:
  """Mixin for the frozen config dataclasses mirroring a diffusers config.json: lists become
  tuples (hashable, static module attributes), `from_dict` / `to_dict` as above. Subclasses set
  WHAT (the model's name in messages), UNSUPPORTED and IGNORED (class attributes, not fields)."""

  WHAT = "model"
  UNSUPPORTED: Mapping[str, Any] = {}
  IGNORED: tuple[str, ...] = ()

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):
        object.__setattr__(
          self, f.name, tuple(tuple(v) if isinstance(v, list) else v for v in value)
        )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    """Build from a diffusers config.json dict; unsupported features raise SodecError."""
    return from_diffusers_dict(
      cls, d, unsupported=cls.UNSUPPORTED, ignored=cls.IGNORED, what=cls.WHAT
    )

  def to_dict(self) -> dict:
    return to_diffusers_dict(self)

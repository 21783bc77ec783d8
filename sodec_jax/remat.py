"""Rematerialisation (activation checkpointing) as a run-time switch of built modules.

A module that can rematerialise its blocks keeps a `remat` attribute (False: off; "nothing" or
"dots": the policy below) that it reads at call time, like the compute dtype: `set_remat`
rewrites it on every module under a part, so a built (or loaded) model is switched without
touching weights, and remat never changes values (the backward pass recomputes the same forward).

  "nothing"  only each block's inputs are kept for the backward pass (jax's default policy,
             `nothing_saveable`): the fewest residual bytes, one extra forward of the block
  "dots"     matmul outputs without batch dimensions are kept too
             (`dots_with_no_batch_dims_saveable`): less recomputation, more residual bytes
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

POLICIES = {
  "nothing": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def policy_name(remat) -> str | None:
  """False/None/"" -> None (off); True -> "nothing"; a POLICIES name -> itself."""
  if remat is True:
    return "nothing"
  if not remat:
    return None
  if remat not in POLICIES:
    raise ValueError(f"remat policy {remat!r}: use one of {', '.join(POLICIES)}")
  return str(remat)


def call(fn: Callable[..., Any], remat, *args):
  """fn(*args), rematerialised in the backward pass when `remat` is on (see POLICIES).

  Functional: modules among `args` are split into (graphdef, state) and merged again inside
  `jax.checkpoint`, arrays go in as they are, anything else is closed over; so the modules'
  variables may come from any trace (a model merged outside the loss's grad, frozen weights
  closed over), and nothing is written back (the blocks have no mutable state)."""
  name = policy_name(remat)
  if name is None:
    return fn(*args)
  kinds, dynamic = [], []
  for a in args:
    if isinstance(a, nnx.Module):
      graphdef, state = nnx.split(a)
      kinds.append(("module", graphdef))
      dynamic.append(state)
    elif isinstance(a, jax.Array):
      kinds.append(("array", None))
      dynamic.append(a)
    else:
      kinds.append(("static", a))
      dynamic.append(None)

  def pure(dynamic):
    rebuilt = []
    for (kind, extra), d in zip(kinds, dynamic):
      rebuilt.append(nnx.merge(extra, d) if kind == "module" else d if kind == "array" else extra)
    return fn(*rebuilt)

  return jax.checkpoint(pure, policy=POLICIES[name])(dynamic)


def _apply(module, *args):
  return module(*args)


def call_module(module: nnx.Module, remat, *args):
  """module(*args), rematerialised when `remat` is on."""
  return call(_apply, remat, module, *args)


def set_remat(module: nnx.Module, remat) -> int:
  """Sets `remat` (False | True | a POLICIES name) on every module under `module` (itself
  included) that has a `remat` attribute; returns how many were set."""
  value = policy_name(remat) or False
  n = 0
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module) and hasattr(node, "remat"):
      node.remat = value
      n += 1
  return n

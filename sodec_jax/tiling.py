"""Tiled decoding on bounded memory: the decoder run on overlapping windows of one size.

(A little over 450 lines: the windows, their weights, the whole-image statistics and the stage
programs depend on one another's conventions and read best in one place.)

    plan = tiling.plan_decode(graphdef, state, y_shape, z_shape, budget)   # None: fits whole
    x_hat = tiling.decode_tiled(plan, y_hat, z_hat)    # float32 [1, H', W', 3] (host numpy)

Every stage is a convolutional network run window by window; a window's output is blended into
the whole image's with weights that, at each side it shares with a neighbour (not at the
image's own border), are ~0 over the outer third of the overlap (where the window's receptive
field is cut short), then ramp linearly to 1 over its middle third; normalised so that they
sum to 1 at every pixel. The stages, each with its own base grid ("base" units below) and its own
window size (all windows of a stage have one shape, so one compiled program per stage):
  D_a    y_hat [1, h, w, C] (base: h, w) -> x_f [1, 16h, 16w, 3]         (codec: the output)
  c_g    F_p(F(x_f)) once for the whole image (F sees it resized to its 224x224 view anyway)
  T_s    (z_hat at h/4, y_hat at h) (base: h/4) -> y_t [1, 2h, 2w, 4]
  UNet   y_t (base: 2h) -> x0 = predict_x0(y_t, UNet(y_t, t, c_g))      (two passes, see below)
  D_m    x0 / s (base: 2h) -> (D_m(.) + 1) / 2 [1, 16h, 16w, 3]         (two passes)
D_a and T_s hold only per-pixel ChannelNorms: a window equals the whole image's result wherever
the receptive field stays inside it, and the blending ramps hide the rest. The UNet and D_m
hold GroupNorms whose statistics span the whole image: a first pass over the windows records
each GroupNorm's per-group count, mean and centred sum of squares (weighted by the window's
share of each position, so every position counts once; combined on the host in float64), and
the second pass normalises every window with those whole-image statistics (the first pass's
own normalisation is per window, so the deeper layers' statistics are approximate, to second
order). What stays approximate: self-attention (the UNet's transformer blocks, D_m's mid-block)
sees only its window's tokens, and receptive fields are cut at window borders (hidden by the
blending). The windows of the UNet start on multiples of its total downsampling, so a window's
strided convolutions sample the same grid as the whole image's.

The window sizes come from a memory budget (`plan_decode`): for each stage, the largest window
whose compiled program (`jax.jit(f).lower(...).compile().memory_analysis()`: arguments, which
include every weight, + outputs + temporaries) fits. Images whose whole decoder fits the budget
take the one-jit path (`plan_decode` returns None). What the budget does not bound: the host
arrays holding the whole x_f and output (12 bytes a pixel each) and the guidance program (x_f
resized to the extractor's input).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.diffusion.blocks import GroupNorm
from sodec_jax.errors import SodecError

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text) -> int:
  """'8GiB', '512MiB', '64KiB', '1024' (bytes) -> int bytes; an int passes through."""
  if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
    value = int(text)
  else:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
      raise SodecError(
        f"memory size {text!r} not understood: write a number with KiB, MiB or GiB (e.g. 8GiB)"
      )
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if value <= 0:
    raise SodecError(f"memory size {text!r} must be positive (e.g. 8GiB)")
  return value


def format_bytes(n: int) -> str:
  """Bytes -> '1.50 GiB' (for messages)."""
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


# --------------------------------------------------------------------------- windows and weights
def window_starts(n: int, tile: int, overlap: int, align: int = 1) -> list[int]:
  """Starts of windows of `tile` (<= n) covering [0, n): steps of the largest multiple of `align`
  <= tile - overlap, the last window flush with the end. n and tile multiples of align."""
  if tile >= n:
    return [0]
  stride = max(align, (tile - overlap) // align * align)
  starts = list(range(0, n - tile, stride))
  return starts + [n - tile]


def _ramps(n: int, tile: int, starts: list[int], overlap: int) -> np.ndarray:
  """[len(starts), tile] float64: at each side a window shares with a neighbour, (almost) zero
  over the outer third of `overlap` (where the window's receptive field is cut), then a linear
  ramp to 1 over the middle third; 1 elsewhere. Normalised so that the windows' weights sum to
  1 at every sample."""
  i = np.arange(tile) + 0.5
  margin = overlap // 3
  ramp = max(overlap - 2 * margin, 1)
  w = np.empty((len(starts), tile))
  total = np.zeros(n)
  for k, s in enumerate(starts):
    left = np.clip((i - margin) / ramp, 1e-6, 1.0) if s > 0 else 1.0
    right = np.clip((tile - i - margin) / ramp, 1e-6, 1.0) if s + tile < n else 1.0
    w[k] = np.ones(tile) * left * right
    total[s : s + tile] += w[k]
  for k, s in enumerate(starts):
    w[k] /= total[s : s + tile]
  return w


@dataclasses.dataclass(frozen=True)
class Grid:
  """Windows over a base grid of n = (rows, cols): window size `tile` = (th, tw) (each <= n),
  neighbours overlapping by at least `overlap` base units, starts aligned to `align`."""

  n: tuple[int, int]
  tile: tuple[int, int]
  overlap: int
  align: int = 1

  @classmethod
  def make(cls, n, tile: int, overlap: int, align: int = 1) -> "Grid":
    t = tuple(min(tile, k) for k in n)
    return cls(tuple(n), t, min(overlap, max(t) - 1) if max(t) > 1 else 0, align)

  def starts(self):
    return [window_starts(self.n[a], self.tile[a], self.overlap, self.align) for a in (0, 1)]

  def windows(self):
    """[(row start, col start, weights at base resolution [th, tw] float32)] in raster order."""
    (rs, cs), (th, tw) = self.starts(), self.tile
    wr = _ramps(self.n[0], th, rs, self.overlap)
    wc = _ramps(self.n[1], tw, cs, self.overlap)
    return [
      (r, c, np.outer(wr[i], wc[j]).astype(np.float32))
      for i, r in enumerate(rs)
      for j, c in enumerate(cs)
    ]

  def weights_at(self, factor: int):
    """Per window, the blending weights at `factor` x the base resolution [th*f, tw*f] (ramps
    over overlap*f samples: smoother than repeating the base weights)."""
    (rs, cs), (th, tw) = self.starts(), self.tile
    ramp = self.overlap * factor
    wr = _ramps(self.n[0] * factor, th * factor, [r * factor for r in rs], ramp)
    wc = _ramps(self.n[1] * factor, tw * factor, [c * factor for c in cs], ramp)
    return [
      np.outer(wr[i], wc[j]).astype(np.float32) for i in range(len(rs)) for j in range(len(cs))
    ]


# --------------------------------------------------------------------------- whole-image GroupNorm
def _resize_weights(w: jax.Array, hw) -> jax.Array:
  """Base-resolution window weights [th, tw] -> [h, w] (nearest up by an integer factor, or the
  mean over factor x factor blocks down)."""
  (th, tw), (h, wd) = w.shape, hw
  if h >= th:
    if h % th or wd % tw or h // th != wd // tw:
      raise ValueError(f"GroupNorm input {hw} is not an integer multiple of the window {w.shape}")
    f = h // th
    return jnp.repeat(jnp.repeat(w, f, axis=0), f, axis=1)
  if th % h or tw % wd or th // h != tw // wd:
    raise ValueError(f"GroupNorm input {hw} does not divide the window {w.shape}")
  f = th // h
  return w.reshape(h, f, wd, f).mean(axis=(1, 3))


class TileNorm:
  """The hook GroupNorm.tile_norm calls in a window: records this window's weighted statistics
  (count, mean, centred sum of squares per group) and returns either the window's own statistics
  (pass 1) or the whole image's (pass 2, `use_global` true), shaped [1, 1, G, 1]."""

  def __init__(self, weights: jax.Array, stats, use_global: jax.Array):
    self.weights, self.stats, self.use_global = weights, stats, use_global
    self.recorded = []

  def __call__(self, norm: GroupNorm, xg: jax.Array, hw):
    if xg.shape[0] != 1:
      raise ValueError("tiled GroupNorm statistics are for batch 1")
    w = _resize_weights(self.weights, hw).reshape(1, -1, 1, 1)
    count = jnp.sum(w) * xg.shape[3]
    mean_w = jnp.sum(w * xg, axis=(1, 3), keepdims=True) / jnp.maximum(count, 1e-12)
    m2 = jnp.sum(w * jnp.square(xg - mean_w), axis=(1, 3))
    if self.recorded:
      raise ValueError("a GroupNorm ran twice in one window; tiled statistics need one call")
    self.recorded.append((count, mean_w.reshape(-1), m2.reshape(-1)))
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    g = xg.shape[2]
    gmean, gvar = (s.reshape(1, 1, g, 1) for s in self.stats)
    return jnp.where(self.use_global, gmean, mean), jnp.where(self.use_global, gvar, var)


def group_norms(module) -> list[GroupNorm]:
  """The GroupNorms of `module`, in a fixed (graph) order."""
  return [m for _, m in nnx.iter_modules(module) if isinstance(m, GroupNorm)]


class StatsAccumulator:
  """Combines the windows' (count, mean, M2) per GroupNorm and group in float64 (Chan et al.'s
  parallel variance) -> [(mean [G], var [G]) float32] in group_norms order."""

  def __init__(self, groups: list[int]):
    self.n = [np.zeros(()) for _ in groups]
    self.mean = [np.zeros(g) for g in groups]
    self.m2 = [np.zeros(g) for g in groups]

  def add(self, recorded) -> None:
    for k, (count, mean, m2) in enumerate(recorded):
      count, mean, m2 = float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
      if count <= 0:
        continue
      total = self.n[k] + count
      delta = mean - self.mean[k]
      self.m2[k] = self.m2[k] + m2 + delta**2 * self.n[k] * count / total
      self.mean[k] = self.mean[k] + delta * count / total
      self.n[k] = total

  def stats(self):
    return [
      (m.astype(np.float32), (m2 / max(float(n), 1e-12)).astype(np.float32))
      for n, m, m2 in zip(self.n, self.mean, self.m2)
    ]


# --------------------------------------------------------------------------- the stage programs
@dataclasses.dataclass
class Stage:
  """One tiled stage: `fn(state, *inputs, weights, stats, use_global) -> (output window,
  recorded statistics)` jitted; inputs at `factors` x the base grid, output at `out_factor`."""

  name: str
  fn: Callable
  factors: tuple[int, ...]
  out_factor: int
  grid: Grid
  norms: list[int]  # groups of each GroupNorm (empty: no statistics passes)
  compiled: Any = None
  bytes: int = 0


def _stage_fns(graphdef):
  """The per-window programs of the decoder stages (see the module docstring)."""

  def with_norms(module_of, body):
    def fn(state, *args):
      *inputs, weights, stats, use_global = args
      m = nnx.merge(graphdef, state)
      norms = group_norms(module_of(m))
      hooks = [TileNorm(weights, s, use_global) for s in stats]
      for n, h in zip(norms, hooks):
        n.tile_norm = h
      out = body(m, *inputs)
      return out, [h.recorded[0] for h in hooks]

    return fn

  def fidelity(m, y):
    return m.fidelity_reconstruction(y)

  def content(m, z, y):
    return m.content_variable(y, z)

  def unet(m, y_t, c_g):
    t = jnp.full((1,), m.timestep, jnp.int32)
    eps = m.unet(y_t, t, c_g).astype(jnp.float32)
    return m.schedule.predict_x0(y_t, eps, t)

  def vae(m, x0):
    image = m.vae_decoder.decode(x0 / m.scaling_factor)
    return (image.astype(jnp.float32) + 1.0) / 2.0

  return {
    "fidelity": with_norms(lambda m: m.codec.fidelity_decoder, fidelity),
    "content": with_norms(lambda m: m.transform, content),
    "unet": with_norms(lambda m: m.unet, unet),
    "vae": with_norms(lambda m: m.vae_decoder, vae),
  }


#: Overlap of neighbouring windows per stage, in base units (D_a: y = H/16; T_s: z = H/64; UNet
#: and D_m: the diffusion latent, H/8).
OVERLAP = {"fidelity": 8, "content": 3, "unet": 32, "vae": 16}


@dataclasses.dataclass
class Plan:
  """How one image size decodes in tiles: the stages in order and the guidance program."""

  graphdef: Any
  state: Any
  stages: dict[str, Stage]
  guidance: Callable | None
  budget: int | None

  def describe(self) -> str:
    parts = [
      f"{s.name} {s.grid.tile[0]}x{s.grid.tile[1]}/{s.grid.n[0]}x{s.grid.n[1]}"
      + (f" ({format_bytes(s.bytes)})" if s.bytes else "")
      for s in self.stages.values()
    ]
    return ", ".join(parts)


def program_bytes(compiled) -> int:
  """argument + output + temporary bytes of a compiled program (its memory_analysis)."""
  a = compiled.memory_analysis()
  return int(a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes)


def _spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _compile(stage: Stage, state, channels: tuple[int, ...], extra=(), cache=None):
  """Compiles the stage's window program at its grid's window size (or takes it from `cache`,
  keyed by stage and window shape); sets compiled and bytes."""
  key = (stage.name, stage.grid.tile)
  if cache is not None and key in cache:
    stage.compiled, stage.bytes = cache[key]
    return stage
  th, tw = stage.grid.tile
  inputs = [_spec((1, th * f, tw * f, c)) for f, c in zip(stage.factors, channels)]
  stats = [(_spec((g,)), _spec((g,))) for g in stage.norms]
  args = (state, *inputs, *extra, _spec((th, tw)), stats, _spec((), jnp.bool_))
  stage.compiled = jax.jit(stage.fn).lower(*args).compile()
  stage.bytes = program_bytes(stage.compiled)
  if cache is not None:
    cache[key] = (stage.compiled, stage.bytes)
  return stage


def _tile_candidates(n: tuple[int, int], align: int, overlap: int) -> list[int]:
  """Window sides to try, largest first: the whole grid, then halvings down to 1.5 x overlap
  (smaller windows would mostly recompute their neighbours)."""
  biggest = max(n)
  sizes, t = [], biggest
  floor = overlap + max(align, overlap // 2)
  while t >= floor:
    sizes.append(int(math.ceil(t / align) * align))
    t //= 2
  if not sizes or sizes[-1] > floor:
    sizes.append(int(math.ceil(floor / align) * align))
  return sorted(set(sizes), reverse=True)


def _fit_stage(stage: Stage, state, channels, extra, budget, tile, overlap, align, cache):
  """The stage with its window: `tile` if given, else the largest candidate whose compiled
  program fits `budget` (SodecError when none does)."""
  if tile is not None:
    stage.grid = Grid.make(stage.grid.n, int(math.ceil(tile / align) * align), overlap, align)
    return _compile(stage, state, channels, extra, cache)

  def measure(t):
    stage.grid = Grid.make(stage.grid.n, t, overlap, align)
    return _compile(stage, state, channels, extra, cache).bytes

  fit(
    _tile_candidates(stage.grid.n, align, overlap),
    measure,
    budget,
    f"the {stage.name} stage needs at its smallest window",
  )
  return stage


def fit(candidates, measure: Callable[[Any], int], budget: int | None, what: str):
  """The first of `candidates` (largest first) whose program fits `budget` (bytes; None: the
  first): `measure(c)` compiles candidate c and returns its program_bytes, and the last one
  measured is the one returned (callers keep its program). SodecError naming what the smallest
  candidate needs when none fits; `what` says who needs it ("the D_a stage needs at its smallest
  window")."""
  need = None
  for c in candidates:
    need = measure(c)
    if budget is None or need <= budget:
      return c
  raise SodecError(
    f"--max-memory {format_bytes(budget)} is below what {what} ({format_bytes(need)}): "
    "raise --max-memory"
  )


def plan_decode(
  graphdef,
  state,
  y_shape,
  z_shape,
  budget: int | None,
  *,
  tiles: dict | None = None,
  overlap: dict | None = None,
  cache: dict | None = None,
) -> Plan:
  """The tiled decoder for latents y [1, h, w, C], z [1, h/4, w/4, N] of the model
  `nnx.merge(graphdef, state)`: window sizes from `budget` (bytes; each stage's largest window
  whose program fits), or per stage from `tiles` ({"fidelity": 16, "unet": 32, ...} in base
  units; a stage not named is fitted to the budget, or whole without one). `cache`: a dict kept
  by the caller for one model and latent size, so that a window shape compiles once whatever
  the budget."""
  m = nnx.merge(graphdef, state)
  tiles, ov = tiles or {}, {**OVERLAP, **(overlap or {})}
  fns = _stage_fns(graphdef)
  (_, h, w, c), (_, zh, zw, n) = y_shape, z_shape
  up = 16  # D_a: 4 stride-2 transposed convs
  stages = {}

  def add(name, factors, out_factor, base, channels, module, extra=(), align=1):
    norms = [g.num_groups for g in group_norms(module)]
    stage = Stage(name, fns[name], factors, out_factor, Grid.make(base, 1, 0), norms)
    stages[name] = _fit_stage(
      stage, state, channels, extra, budget, tiles.get(name), ov[name], align, cache
    )

  add("fidelity", (1,), up, (h, w), (c,), m.codec.fidelity_decoder)
  guidance = None
  if m.decoder_kind == "diffusion":
    latent = m.unet.config.in_channels
    add("content", (1, 4), 8, (zh, zw), (n, c), m.transform)
    c_g = jax.eval_shape(
      lambda s, x, z: nnx.merge(graphdef, s).guidance(x, z),
      state,
      _spec((1, h * up, w * up, 3)),
      _spec(z_shape),
    )
    down = 2 ** (len(m.unet.config.block_out_channels) - 1)
    lh, lw = 2 * h, 2 * w
    add("unet", (1,), 1, (lh, lw), (latent,), m.unet, (c_g,), down)
    vae_up = 2 ** (len(m.vae_decoder.config.block_out_channels) - 1)
    add("vae", (1,), vae_up, (lh, lw), (latent,), m.vae_decoder)
    guidance = jax.jit(lambda s, x, z: nnx.merge(graphdef, s).guidance(x, z))
  return Plan(graphdef, state, stages, guidance, budget)


def _run(stage: Stage, state, inputs, extra=(), stats=None, use_global=False):
  """One pass of a stage over its windows; returns the blended output (host float32 numpy) and,
  with norms, the accumulated whole-image statistics of this pass."""
  grid, f = stage.grid, stage.out_factor
  (nh, nw), (th, tw) = grid.n, grid.tile
  out, acc = None, StatsAccumulator(stage.norms)
  if stats is None:
    stats = [(np.zeros(g, np.float32), np.ones(g, np.float32)) for g in stage.norms]
  for (r, c, w_base), w_out in zip(grid.windows(), grid.weights_at(f)):
    window = [
      x[:, r * k : (r + th) * k, c * k : (c + tw) * k] for x, k in zip(inputs, stage.factors)
    ]
    y, recorded = stage.compiled(state, *window, *extra, w_base, stats, np.bool_(use_global))
    y = np.asarray(y, np.float32)
    if out is None:
      out = np.zeros((1, nh * f, nw * f, y.shape[-1]), np.float32)
    out[:, r * f : (r + th) * f, c * f : (c + tw) * f] += y * w_out[None, :, :, None]
    acc.add(recorded)
  return out, acc.stats()


def _run_normalised(stage: Stage, state, inputs, extra=()) -> np.ndarray:
  """Two passes when the stage holds GroupNorms (whole-image statistics, see above), else one."""
  out, stats = _run(stage, state, inputs, extra)
  if not stage.norms or stage.grid.tile == stage.grid.n:  # one window: its statistics are global
    return out
  return _run(stage, state, inputs, extra, stats, True)[0]


def decode_tiled(plan: Plan, y_hat, z_hat) -> tuple[np.ndarray, np.ndarray]:
  """(y_hat [1, h, w, C], z_hat [1, h/4, w/4, N]) -> (x_hat, x_f) float32 [1, 16h, 16w, 3] host
  arrays (unclamped), computed window by window as `plan` says."""
  y_hat, z_hat = np.asarray(y_hat, np.float32), np.asarray(z_hat, np.float32)
  state, st = plan.state, plan.stages
  x_f = _run(st["fidelity"], state, [y_hat])[0]
  if plan.guidance is None:
    return x_f, x_f
  c_g = plan.guidance(state, x_f, z_hat)
  y_t = _run(st["content"], state, [z_hat, y_hat])[0]
  x0 = _run_normalised(st["unet"], state, [y_t], (c_g,))
  x_hat = _run_normalised(st["vae"], state, [x0])
  return x_hat, x_f

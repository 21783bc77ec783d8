"""Tiled decoding on bounded memory: the decoder run on overlapping windows of one size.

(A little over 450 lines: the windows, their weights, the stage programs and their passes depend
on one another's conventions and read best in one place; the whole-image context the windows
share is in sodec_jax/tile_context.py.)

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
  UNet   y_t (base: 2h) -> x0 = predict_x0(y_t, UNet(y_t, t, c_g))      (passes, see below)
  D_m    x0 / s (base: 2h) -> (D_m(.) + 1) / 2 [1, 16h, 16w, 3]         (passes)
  then `sodec.color_fix` against x_f on the whole host image (sodec_jax/color_fix.py)
D_a and T_s hold only per-pixel ChannelNorms: a window equals the whole image's result wherever
the receptive field stays inside it, and the blending ramps hide the rest. The UNet and D_m hold
GroupNorms whose statistics span the whole image and self-attention over every position (the
UNet's transformer blocks, D_m's mid-block): a first pass over the windows records each
GroupNorm's statistics and each self-attention's keys and values, weighted by the window's share
of each position (sodec_jax/tile_context.py); the next pass normalises every window with the
whole-image statistics and lets its queries attend to the whole-image keys and values (as they
are up to 128x128 positions; beyond that average-pooled to at most 4 x a window's tokens, or 1 x
when only that fits the budget: KV_LIMITS, kv_pool; a window then attends to its own keys as
they are and to the pooled ones, each weighted by how many positions outside the window it
stands for: tile_context.near_far_bias). What the first pass recorded is itself approximate (its
windows used their own statistics and attention), so passes repeat until the output stops
changing (MAX_PASSES, PASS_TOLERANCE), the UNet's damped (DAMPING: repeated as they are, its
passes flipped the image's mean colour from pass to pass on a trained model). What stays
approximate: receptive fields cut at window borders (hidden by the blending), the convergence
left after the last pass, and pooled keys on large images. The windows of the UNet start on
multiples of its total downsampling, so a window's strided convolutions sample the same grid as
the whole image's.

The window sizes come from a memory budget (`plan_decode`): for each stage, the largest window
(with the least pooling of the whole-image keys at that size) whose compiled program
(`jax.jit(f).lower(...).compile().memory_analysis()`: arguments, which include every weight, +
outputs + temporaries) fits. Images whose whole decoder fits the budget take the one-jit path
(`plan_decode` returns None). What the budget does not bound: the host arrays holding the whole
x_f and output (12 bytes a pixel each) and the guidance program (x_f resized to the extractor's
input).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError
from sodec_jax.tile_context import (
  KVAccumulator,
  StatsAccumulator,
  TileAttention,
  TileNorm,
  attentions,
  group_norms,
  near_far_bias,
)

_log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the stage programs
@dataclasses.dataclass
class Stage:
  """One tiled stage: `fn(state, *inputs, weights, stats, kv, use_global) -> (output window,
  recorded statistics, recorded keys and values)` jitted (tile_context); inputs at `factors` x
  the base grid, output at `out_factor`."""

  name: str
  fn: Callable
  factors: tuple[int, ...]
  out_factor: int
  grid: Grid
  norms: list[int]  # groups of each GroupNorm (empty: no statistics passes)
  # per attention layer (tile_context.attentions order): None, or a self-attention's whole-image
  # (H, W, C, pool) at its resolution (set by _compile for the window size)
  kv_layers: list = dataclasses.field(default_factory=list)
  compiled: Any = None
  bytes: int = 0

  @property
  def needs_passes(self) -> bool:
    """Whether a window sees less than the whole image's statistics or keys."""
    whole = self.grid.tile == self.grid.n
    return not whole and (bool(self.norms) or any(k is not None for k in self.kv_layers))


def _stage_fns(graphdef):
  """The per-window programs of the decoder stages (see the module docstring). `kv` None: shape
  probing (every self-attention on its window's own keys); (): no self-attention hooks (a
  whole-grid window)."""

  def with_norms(module_of, body):
    def fn(state, *args):
      *inputs, weights, stats, kv, use_global = args
      m = nnx.merge(graphdef, state)
      module = module_of(m)
      hooks = [TileNorm(weights, s, use_global) for s in stats]
      for n, h in zip(group_norms(module), hooks):
        n.tile_norm = h
      layers = attentions(module)
      if kv == ():  # a whole-grid window: attention as without windows
        layers = []
      kv_hooks = [TileAttention(weights, a, use_global) for a in kv or [None] * len(layers)]
      for a, h in zip(layers, kv_hooks):
        a.tile_kv = h
      out = body(m, *inputs)
      return out, [h.recorded[0] for h in hooks], [(h.recorded or [None])[0] for h in kv_hooks]

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
#: and D_m: the diffusion latent, H/8). The UNet's was 32 until 2026-12-01: on the trained tiny
#: model at 1024x1024 in 64/128 windows, 16 leaves x0 6.6e-3 (RMS relative) from the whole
#: decode after 4 passes against 5.2e-3 with 32, and needs half the windows on large images.
OVERLAP = {"fidelity": 8, "content": 3, "unet": 16, "vae": 16}
#: Passes over a stage's windows (tile_context): until the output changes by less than
#: PASS_TOLERANCE (RMS of the change / RMS of the output) or MAX_PASSES. 1e-2 (1e-3 until
#: 2026-12-01, which the passes seldom reached: 8 passes of every stage at 1024x1024): on the
#: trained tiny model the UNet's change falls to 5.7e-3 at its 4th pass (x0 then 5.2e-3 from the
#: whole decode; 1.8e-3 after 8), D_m's to 9.4e-3 at its 6th (45 dB against the whole decode of
#: the same x0; 61 dB after 8): docs/PERFORMANCE.md, "Tiled decoding from 1 to 64 megapixels".
MAX_PASSES, PASS_TOLERANCE = 8, 1e-2
#: Per stage: each pass after the second uses (1 - d) x the context the pass before used + d x
#: what that pass recorded (a damped fixed-point iteration); stages not named: d = 1.
DAMPING = {"unet": 0.5}
#: The whole-image keys and values a window's self-attention sees, least pooled first: (ratio,
#: floor) average-pools them 2x2, 4x4, ... until at most max(ratio x the window's tokens, floor)
#: remain (kv_pool); a window takes the first that fits the budget. The floor keeps every key of
#: a latent up to 128x128 (a 1024x1024 image) as it is; beyond it the keys grow with the window,
#: not the image, so the time per megapixel stays flat (unpooled, a 2048x2048 image's windows
#: attended to 65,536 keys each: 234 s/MP against 88 at 1024x1024).
KV_LIMITS = ((4, 128 * 128), (1, 0))


def kv_pool(whole: tuple[int, int], window: tuple[int, int], kv_limit: tuple[int, int]) -> int:
  """The pooling (1, 2, 4, ...) of a self-attention's whole-image keys, [H, W] positions
  (`whole`), that leaves at most max(ratio x window tokens, floor) of them (ceil(H / pool) x
  ceil(W / pool): partial blocks at the edge count as one), for `window` [h, w] and `kv_limit`
  (ratio, floor) as in KV_LIMITS."""
  ratio, floor = kv_limit
  limit = max(ratio * window[0] * window[1], floor, 1)
  pool = 1
  while -(-whole[0] // pool) * -(-whole[1] // pool) > limit:
    pool *= 2
  return pool


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


def _kv_layers(stage: Stage, state, inputs, extra, weights, stats, kv_limit) -> list:
  """Per attention layer of the stage: None, or (H, W, C, pool) of a self-attention's
  whole-image keys at its resolution, pooled as `kv_limit` says (kv_pool; found by tracing the
  window program's shapes; [] for a whole-grid window)."""
  if stage.grid.tile == stage.grid.n:
    return []
  _, _, recorded = jax.eval_shape(stage.fn, state, *inputs, *extra, weights, stats, None, False)
  (nh, nw), (th, tw) = stage.grid.n, stage.grid.tile
  layers = []
  for rec in recorded:
    if rec is None:
      layers.append(None)
      continue
    h, w, c = rec[0].shape
    hh, ww = nh * h // th, nw * w // tw
    layers.append((hh, ww, c, kv_pool((hh, ww), (h, w), kv_limit)))
  return layers


def _pooled_shape(layer) -> tuple[int, int]:
  """(H, W, C, pool) -> the pooled keys' shape [S, C]."""
  h, w, c, pool = layer
  return (-(-h // pool) * -(-w // pool), c)


def _compile(stage: Stage, state, channels: tuple[int, ...], extra, cache, kv_limit):
  """Compiles the stage's window program at its grid's window size with the whole-image keys
  pooled as `kv_limit` (ratio, floor) says (kv_pool), or takes it from `cache` (keyed by stage,
  window shape and kv_limit); sets kv_layers, compiled and bytes."""
  key = (stage.name, stage.grid.tile, kv_limit)
  if cache is not None and key in cache:
    stage.kv_layers, stage.compiled, stage.bytes = cache[key]
    return stage
  th, tw = stage.grid.tile
  inputs = [_spec((1, th * f, tw * f, c)) for f, c in zip(stage.factors, channels)]
  stats = [(_spec((g,)), _spec((g,))) for g in stage.norms]
  stage.kv_layers = _kv_layers(stage, state, inputs, extra, _spec((th, tw)), stats, kv_limit)
  kv = tuple(
    None
    if not k
    else (_spec(_pooled_shape(k)),) * 2 + ((_spec(_pooled_shape(k)[:1]),) * (k[3] > 1))
    for k in stage.kv_layers
  )
  args = (state, *inputs, *extra, _spec((th, tw)), stats, kv, _spec((), jnp.bool_))
  stage.compiled = jax.jit(stage.fn).lower(*args).compile()
  stage.bytes = program_bytes(stage.compiled)
  if cache is not None:
    cache[key] = (stage.kv_layers, stage.compiled, stage.bytes)
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
  """The stage with its window (`tile` if given, else the largest candidate) and, at that size,
  the least pooling of the whole-image keys (KV_LIMITS) whose compiled program fits `budget`
  (SodecError when none does)."""

  def measure(candidate):
    t, kv_limit = candidate
    stage.grid = Grid.make(stage.grid.n, t, overlap, align)
    return _compile(stage, state, channels, extra, cache, kv_limit).bytes

  # per window size (largest first) the least pooling of the whole-image keys that fits
  if tile is not None:
    tiles = [int(math.ceil(tile / align) * align)]
  else:
    tiles = _tile_candidates(stage.grid.n, align, overlap)
  fit(
    [(t, k) for t in tiles for k in (KV_LIMITS[-1:] if t >= max(stage.grid.n) else KV_LIMITS)],
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
  plan = Plan(graphdef, state, stages, guidance, budget)
  within = format_bytes(budget) if budget else "no budget"
  _log.info("tiled decode of y %s within %s: %s", tuple(y_shape), within, plan.describe())
  return plan


def _run(stage: Stage, state, inputs, extra=(), context=None):
  """One pass of a stage over its windows: returns the blended output (host float32 numpy) and
  the whole-image context this pass recorded ((GroupNorm statistics, self-attention keys and
  values), tile_context). `context` given: every window uses it (use_global); None: its own."""
  grid, f = stage.grid, stage.out_factor
  (nh, nw), (th, tw) = grid.n, grid.tile
  out, acc, kv_acc = None, StatsAccumulator(stage.norms), KVAccumulator(stage.kv_layers)
  use_global = context is not None
  if context is None:
    stats = [(np.zeros(g, np.float32), np.ones(g, np.float32)) for g in stage.norms]
    kv = [
      None if k is None else (np.zeros(_pooled_shape(k), np.float32),) * 2 for k in stage.kv_layers
    ]
    context = (stats, kv)
  stats, kv = context
  for (r, c, w_base), w_out in zip(grid.windows(), grid.weights_at(f)):
    window = [
      x[:, r * k : (r + th) * k, c * k : (c + tw) * k] for x, k in zip(inputs, stage.factors)
    ]
    y, recorded, kv_rec = stage.compiled(
      state, *window, *extra, w_base, stats, _window_kv(stage, kv, r, c), np.bool_(use_global)
    )
    y = np.asarray(y, np.float32)
    if out is None:
      out = np.zeros((1, nh * f, nw * f, y.shape[-1]), np.float32)
    out[:, r * f : (r + th) * f, c * f : (c + tw) * f] += y * w_out[None, :, :, None]
    acc.add(recorded)
    kv_acc.add(r, c, th, kv_rec)
  return out, (acc.stats(), kv_acc.kv())


def _window_kv(stage: Stage, kv, r: int, c: int) -> tuple:
  """The whole-image keys and values as the window at base (r, c) takes them: (k, v) per
  self-attention as they are, and with a pooled layer's the window's logit bias (near_far_bias)."""
  (nh, nw), (th, tw) = stage.grid.n, stage.grid.tile
  out = []
  for layer, x in zip(stage.kv_layers, kv):
    if x is None or layer[3] == 1:
      out.append(x)
      continue
    hh, ww, _, pool = layer
    h, w = hh * th // nh, ww * tw // nw
    bias = near_far_bias((hh, ww), pool, (r * h // th, c * h // th), (h, w))
    out.append((*x[:2], bias))
  return tuple(out)


def _run_normalised(stage: Stage, state, inputs, extra=()) -> np.ndarray:
  """Passes over the windows until the output stops changing (at most MAX_PASSES), when a window
  sees less than the whole image's GroupNorm statistics or self-attention keys; else one pass.

  The whole-image context x (tile_context) is the fixed point of x = g(x), g(x) the context a
  pass records when its windows use x. Pass 2 uses what pass 1 recorded with the windows' own
  statistics and keys; each later pass uses (1 - d) x + d g(x) of the pass before (d =
  DAMPING[stage], 1 when not named: plain repetition)."""
  out, context = _run(stage, state, inputs, extra)
  if not stage.needs_passes:
    return out
  damping = DAMPING.get(stage.name, 1.0)
  passes = 1
  while passes < MAX_PASSES:
    passes += 1
    new, recorded = _run(stage, state, inputs, extra, context)
    change = float(np.sqrt(np.mean((new - out) ** 2) / max(np.mean(new**2), 1e-30)))
    out = new
    if change < PASS_TOLERANCE:
      break
    context = blend_context(context, recorded, damping)
  _log.info(
    "tiled %s: %d passes over %d windows, last change %.1e",
    stage.name,
    passes,
    len(stage.grid.windows()),
    change,
  )
  return out


def blend_context(old, new, weight: float):
  """(1 - weight) * old + weight * new for two contexts as _run returns them ((GroupNorm
  (mean, var) per layer, self-attention (k, v) or None per layer))."""
  mix = lambda a, b: ((1.0 - weight) * a + weight * b).astype(np.float32)
  (stats_old, kv_old), (stats_new, kv_new) = old, new
  stats = [tuple(mix(a, b) for a, b in zip(so, sn)) for so, sn in zip(stats_old, stats_new)]
  kv = [
    None if kn is None else tuple(mix(a, b) for a, b in zip(ko, kn))
    for ko, kn in zip(kv_old, kv_new)
  ]
  return stats, kv


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
  # sodec.color_fix on the host, over the whole image (as the one-jit decoder applies it)
  return nnx.merge(plan.graphdef, state).fix_colors(np.asarray(x_hat), np.asarray(x_f)), x_f

"""Banded encoding on bounded memory: E, H_a and P run on bands of rows (the whole width) whose
halo covers their receptive field, so every row kept from a band is the whole image's row.

    plan = banding.plan_encode(graphdef, state, x_shape, latent_multiple, budget)
    y, z = banding.analyse(plan, x, latent_multiple)   # x float32 [B, H', W', 3], padded
    mu, sigma = banding.run(plan.stages["P"], plan.state, z_hat)

The stages (each a stack of convolutions with per-pixel operations between them: ChannelNorm,
ReLU), each over its own base grid of rows, the coarser of its input's and its output's:
  E    x [B, H', W', 3] (16 rows a base row) -> y [B, h, w, C] (base: h = H'/16)
  H_a  y, padded to the latent multiple (4 rows a base row) -> z [B, hz, wz, N] (base: hz)
  P    z_hat (1 row a base row) -> (mu, sigma) [B, 4hz, 4wz, C] (base: hz)
A band keeps `rows` base rows [s, e) and computes them in a window of `rows + 2 halo` base rows
placed around them, shifted inside the image at its top and bottom (every window has one shape:
one compiled program per stage). The halo is the stack's receptive field (`halo`, from each
module's conv_stack: kernel, stride and padding of every convolution), so a kept row reads only
rows inside its window; where the window's edge is not the image's, the window's own padding
(reflect or zeros) reaches only rows the band drops. Windows start on whole base rows (multiples
of 16 image rows for E), so each strided convolution samples the whole image's grid. Bands span
the whole width, so columns see the whole image's left and right padding: a kept row is computed
by the same arithmetic as the whole image's. Not always in the same order: XLA:CPU sums a
reduction (ChannelNorm's mean and variance over channels) in an order that depends on the
array's shape, so y differs from the whole image's by float32 rounding (|dy| ~1e-6); a symbol
round(y - mu) then flips only where y - mu lies within that of a half-integer (none in the tests,
tests/codec/test_banded_encode.py, nor on a 2048x2048 photo: docs/PERFORMANCE.md).

`plan_encode` picks each stage's `rows` from the budget: the whole grid when its compiled
program (`tiling.program_bytes`: arguments, outputs, temporaries) fits, else the most rows that
fit, predicted from the programs of the whole grid and of one row, then checked (`tiling.fit`).
Not bounded by the budget: the host arrays (the padded image, 12 bytes a pixel; the latents).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax import tiling
from sodec_jax.codec import padding
from sodec_jax.layers import ConvTranspose2d


def _rows_read(conv, lo: int, hi: int) -> tuple[int, int]:
  """The input rows (unpadded coordinates) that output rows [lo, hi] of `conv` read."""
  if isinstance(conv, ConvTranspose2d):  # output o = s i - p + t, tap t in [0, k)
    s, p, k = conv.stride, conv.padding, conv.kernel_size
    return -((k - 1 - lo - p) // s), (hi + p) // s
  k, s, top = conv.kernel.shape[0], conv.stride, conv.padding[0]
  return s * lo - top, s * hi - top + k - 1


def halo(convs, fin: int, fout: int) -> int:
  """Base rows of context a band needs on each side so that its kept rows read only rows inside
  its window: `convs` in call order, `fin` / `fout` input / output rows per base row."""
  scale = 1.0
  for conv in convs:
    scale *= 1 / conv.stride if isinstance(conv, ConvTranspose2d) else conv.stride
  if scale * fout != fin:
    raise ValueError(f"the stack scales rows by {scale}, not {fin}/{fout}")
  b = 1 << 12  # a base row far from the image's edges
  lo, hi = b * fout, (b + 1) * fout - 1
  for conv in reversed(convs):
    lo, hi = _rows_read(conv, lo, hi)
  top = -((lo - b * fin) // fin)  # ceil((b fin - lo) / fin)
  bottom = -(-(hi - (b + 1) * fin + 1) // fin)
  return max(top, bottom, 0)


@dataclasses.dataclass
class Banded:
  """One banded stage: `fn(state, x window) -> output window or tuple of them` over a base grid
  of `n` rows (`fin` input and `fout` output rows each), `rows` kept base rows per band."""

  name: str
  fn: Callable
  n: int
  fin: int
  fout: int
  halo: int
  rows: int = 0
  compiled: Any = None
  bytes: int = 0

  @property
  def window(self) -> int:
    """Base rows each band computes (all bands: one shape)."""
    return min(self.n, self.rows + 2 * self.halo)

  def spans(self) -> list[tuple[int, int, int]]:
    """[(first kept base row, end, window start)]: kept rows partition [0, n)."""
    t = self.window
    return [
      (s, min(s + self.rows, self.n), min(max(s - self.halo, 0), self.n - t))
      for s in range(0, self.n, self.rows)
    ]


@dataclasses.dataclass
class EncodePlan:
  """The banded stages of one input size and budget (those not planned run whole elsewhere)."""

  state: Any
  stages: dict[str, Banded]
  budget: int | None

  def describe(self) -> str:
    return ", ".join(
      f"{s.name} {s.rows}/{s.n} rows ({tiling.format_bytes(s.bytes)})" for s in self.stages.values()
    )


def _compile(stage: Banded, state, shape, cache) -> int:
  """Compiles the stage's window program for input `shape` (B, rows, ...), or takes it from
  `cache`; sets compiled and bytes."""
  key = (stage.name, tuple(shape))
  if cache is None or key not in cache:
    compiled = jax.jit(stage.fn).lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    value = (compiled, tiling.program_bytes(compiled))
    if cache is None:
      stage.compiled, stage.bytes = value
      return stage.bytes
    cache[key] = value
  stage.compiled, stage.bytes = cache[key]
  return stage.bytes


def _fit(stage: Banded, state, in_shape, budget, rows, cache) -> Banded:
  """The stage with `rows` if given, else with the most rows whose window program fits
  `budget`: the whole grid when it fits; else, after one band row (the smallest; SodecError
  naming what it needs when even that does not fit), the rows a straight line through those two
  programs' sizes predicts (a program grows about linearly with its rows), lowered along the line
  through one row and each guess that misses, so that a few compilations choose."""
  b, _, *rest = in_shape
  what = f"the encoder's {stage.name} needs at its smallest band"

  def measure(r):
    stage.rows = r
    return _compile(stage, state, (b, stage.window * stage.fin, *rest), cache)

  if rows is not None:
    measure(min(int(rows), stage.n))
    return stage
  whole = measure(stage.n)
  if budget is None or whole <= budget or stage.n == 1:
    tiling.fit([stage.n], measure, budget, what)
    return stage
  one = measure(1)
  tiling.fit([1], measure, budget, what)

  def guesses():  # rows where the line through (1, one) and the last measured (g, size) meets
    g, size = stage.n, whole  # the budget; each miss lowers the next guess
    while True:
      g = min(g - 1, 1 + (budget - one) * (g - 1) // max(size - one, 1))
      if g <= 1:
        break
      yield g
      size = stage.bytes  # measured by tiling.fit before it asks for the next guess
    yield 1

  tiling.fit(guesses(), measure, budget, what)
  return stage


def plan_encode(
  graphdef,
  state,
  x_shape,
  latent_multiple: int,
  budget: int | None,
  *,
  stages=("E", "H_a", "P"),
  rows: dict | None = None,
  cache: dict | None = None,
) -> EncodePlan:
  """Banded programs for a padded image x [B, H', W', 3] (H', W' multiples of 16) of the model
  `nnx.merge(graphdef, state)`: for each of `stages`, the most rows whose program fits `budget`
  (bytes), or `rows` ({"E": 2, ...} base rows per band; for tests). `cache`: a dict the caller
  keeps for one model and image size, so a window shape compiles once whatever the budget."""
  m = nnx.merge(graphdef, state)
  b, hh, ww, _ = x_shape
  if hh % 16 or ww % 16:
    raise ValueError(f"the padded image {x_shape} is not a multiple of 16")
  c, n = m.codec.encoder.conv_out.kernel.shape[-1], m.codec.hyper_analysis.conv3.kernel.shape[-1]
  hp, wp = (-(-k // 16 // latent_multiple) * latent_multiple for k in (hh, ww))
  prior = m.codec.prior
  specs = {
    "E": (
      lambda s, x: nnx.merge(graphdef, s).codec.encode(x),
      hh // 16,
      16,
      1,
      [m.codec.encoder.conv_stack()],
      x_shape,
    ),
    "H_a": (
      lambda s, y: nnx.merge(graphdef, s).codec.hyper_analysis(y),
      hp // 4,
      4,
      1,
      [m.codec.hyper_analysis.conv_stack()],
      (b, hp, wp, c),
    ),
    "P": (
      lambda s, z: nnx.merge(graphdef, s).prior_parameters(z),
      hp // 4,
      1,
      4,
      [prior.mean_synthesis.conv_stack(), prior.scale_synthesis.conv_stack()],
      (b, hp // 4, wp // 4, n),
    ),
  }
  planned = {}
  for name in stages:
    fn, base, fin, fout, stacks, in_shape = specs[name]
    stage = Banded(name, fn, base, fin, fout, max(halo(s, fin, fout) for s in stacks))
    planned[name] = _fit(stage, state, in_shape, budget, (rows or {}).get(name), cache)
  return EncodePlan(state, planned, budget)


def run(stage: Banded, state, x) -> list[np.ndarray]:
  """The stage over its bands: x [B, n fin, W, K] -> [outputs [B, n fout, ...] float32 host]."""
  x = np.asarray(x, np.float32)
  t, outs = stage.window, None
  for s, e, ws in stage.spans():
    got = stage.compiled(state, x[:, ws * stage.fin : (ws + t) * stage.fin])
    got = got if isinstance(got, tuple) else (got,)
    if outs is None:
      outs = [np.empty((g.shape[0], stage.n * stage.fout, *g.shape[2:]), np.float32) for g in got]
    for out, g in zip(outs, got):
      out[:, s * stage.fout : e * stage.fout] = np.asarray(g)[
        :, (s - ws) * stage.fout : (e - ws) * stage.fout
      ]
  return outs


def analyse(plan: EncodePlan, x, latent_multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """E and H_a in bands: x float32 [B, H', W', 3] -> (y [B, h, w, C] padded to the latent
  multiple, z [B, h/4, w/4, N]) host float32, as the model's `analysis`."""
  (y,) = run(plan.stages["E"], plan.state, x)
  y = np.asarray(padding.pad_latent(y, latent_multiple), np.float32)
  (z,) = run(plan.stages["H_a"], plan.state, y)
  return y, z

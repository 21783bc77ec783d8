"""F_p: the guidance condition c_g [B, 77, 1024] for the UNet's cross-attention.

Modes (config `guidance.mode`; the rows of the paper's Table 2):
  fidelity    c_g = F_p(F(x_f)): extractor tokens [B, T, D] -> Linear D -> width, then a learned
              token map T -> 77 (initialised as adaptive average pooling). The paper's module.
  hyperprior  features from z_hat (as DiffEIC): z_hat [B, h, w, N] resized to a 7 x 11 grid
              (77 tokens, area-averaging), then Linear N -> width.
  text        a fixed prompt embedding [77, width] given as a .npy file (as PerCo); no parameters.
  none        a learned context [77, width] initialised to zero, the same for every image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sodec_jax.errors import SodecError

MODES = ("fidelity", "hyperprior", "text", "none")
HYPERPRIOR_GRID = (7, 11)  # 77 tokens


class GuidanceConstant(nnx.Variable):
  """A fixed, non-trainable array (the text embedding)."""


def pooling_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] rows averaging contiguous chunks: adaptive average pooling over tokens."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = max(-(-((i + 1) * n_in) // n_out), lo + 1)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


class GuidanceProjection(nnx.Module):
  """`__call__(features) -> c_g [B, tokens, width]`; `features` depends on the mode:
  fidelity: extractor tokens [B, T, D]; hyperprior: z_hat [B, h, w, N]; text/none: any array
  whose leading axis is the batch."""

  def __init__(
    self,
    mode: str,
    *,
    width: int = 1024,
    tokens: int = 77,
    in_tokens: int = 0,
    in_features: int = 0,
    text_embedding: str = "",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if mode not in MODES:
      raise SodecError(f"guidance.mode={mode!r} is not one of {MODES}")
    self.mode, self.width, self.tokens, self.dtype = mode, width, tokens, dtype
    if mode in ("fidelity", "hyperprior"):
      bound = 1.0 / np.sqrt(in_features)
      self.kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (in_features, width), param_dtype, -bound, bound)
      )
      self.bias = nnx.Param(jnp.zeros((width,), param_dtype))
    if mode == "fidelity":
      self.token_map = nnx.Param(jnp.asarray(pooling_matrix(tokens, in_tokens), param_dtype))
    elif mode == "hyperprior" and tokens != HYPERPRIOR_GRID[0] * HYPERPRIOR_GRID[1]:
      raise SodecError(
        f"guidance.mode='hyperprior' makes {HYPERPRIOR_GRID[0] * HYPERPRIOR_GRID[1]} "
        f"tokens; set guidance.tokens to that (got {tokens})"
      )
    elif mode == "text":
      self.embedding = GuidanceConstant(
        jnp.asarray(load_text_embedding(text_embedding, tokens, width))
      )
    elif mode == "none":
      self.context = nnx.Param(jnp.zeros((tokens, width), param_dtype))

  def __call__(self, features: jax.Array) -> jax.Array:
    b = features.shape[0]
    if self.mode == "fidelity":
      h = features.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
      h = jnp.einsum("ot,btd->bod", self.token_map[...].astype(self.dtype), h)
      return h + self.bias[...].astype(self.dtype)
    if self.mode == "hyperprior":
      grid = jax.image.resize(
        features.astype(jnp.float32),
        (b,) + HYPERPRIOR_GRID + features.shape[-1:],
        method="linear",
        antialias=True,
      )
      h = grid.reshape(b, -1, features.shape[-1]).astype(self.dtype)
      return h @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
    table = self.embedding[...] if self.mode == "text" else self.context[...]
    return jnp.broadcast_to(table.astype(self.dtype), (b, self.tokens, self.width))


def load_text_embedding(path: str, tokens: int, width: int) -> np.ndarray:
  """A [tokens, width] float array from a .npy file (e.g. a CLIP text encoder's output)."""
  if not path:
    raise SodecError(
      "guidance.mode='text' needs guidance.text_embedding=/path/prompt.npy: a "
      f"[{tokens}, {width}] float array (the prompt's text-encoder hidden states)"
    )
  try:
    arr = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise SodecError(f"guidance.text_embedding: no such file {path}") from None
  except (OSError, ValueError) as e:
    raise SodecError(f"guidance.text_embedding: cannot read {path} as .npy ({e})") from None
  arr = np.squeeze(arr)
  if arr.shape != (tokens, width) or not np.issubdtype(arr.dtype, np.floating):
    raise SodecError(
      f"guidance.text_embedding {path} has shape {arr.shape} {arr.dtype}; "
      f"expected float [{tokens}, {width}]"
    )
  return arr.astype(np.float32)

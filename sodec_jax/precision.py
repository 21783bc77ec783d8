"""Mixed precision as configuration: `config.precision = "auto" | "fp32" | "bf16"`.

One setting decides the compute dtype of the reconstruction path; everything that decides bits
stays float32:

  part                                         fp32        bf16
  E, H_a, P (entropy path, likelihoods)        float32     float32 (never changed by the
                                                                    precision: files and
                                                                    fingerprints do not depend
                                                                    on it; model.dtype, default
                                                                    float32, is their own knob)
  D_a, H_s, T_s, UNet, D_m, F, F_p, LPIPS      float32     bfloat16 compute
  parameters, optimizer state                  float32     float32 (master weights; each
                                                                    layer casts its kernel)
  norms (ChannelNorm, GroupNorm, LayerNorm),   float32     float32 (the layers compute their
  softmax, losses, x_hat/x_f outputs                                statistics in float32)

"auto" resolves to "bf16" on GPU and TPU and to "fp32" on the CPU (`resolve`). The layers keep
their compute dtype in a `dtype` attribute that they read at call time, so the precision is
applied to a built model by rewriting those attributes (`apply_precision`); no weights change.
For decoding, `cast_params` also stores the reconstruction path's weights in the compute dtype
once (api.load_model(dtype=...)), instead of casting every kernel on every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.errors import SodecError

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}

#: SODEC attributes on the reconstruction path (precision-dependent); the codec's D_a too.
RECONSTRUCTION_PARTS = (
  "hyper_synthesis",
  "transform",
  "unet",
  "vae_decoder",
  "guidance_extractor",
  "guidance_projection",
)


def resolve(precision: str, backend: str | None = None) -> str:
  """ "auto" -> "bf16" on GPU/TPU, "fp32" on CPU; "float32"/"bfloat16" are accepted as aliases.
  SodecError naming the choices for anything else."""
  p = _ALIASES.get(str(precision), str(precision))
  if p not in PRECISIONS:
    raise SodecError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
  if p == "auto":
    backend = backend or jax.default_backend()
    return "fp32" if backend == "cpu" else "bf16"
  return p


def compute_dtype(precision: str, backend: str | None = None):
  """The reconstruction path's compute dtype for `precision` (jnp.float32 or jnp.bfloat16)."""
  return _DTYPES[resolve(precision, backend)]


def config_precision(config) -> str:
  """The resolved precision of an experiment config (`config.precision`, default "auto")."""
  return resolve(config.get("precision", "auto"))


def set_compute_dtype(module: nnx.Module, dtype) -> None:
  """Sets the compute dtype of every layer under `module` (each nnx.Module with a `dtype`
  attribute). For bfloat16, float32 matmul precisions (HIGHEST, asked for float32 parity with
  torch) go back to the backend default."""
  dtype = jnp.dtype(dtype)
  for _, node in nnx.iter_graph(module):
    if not isinstance(node, nnx.Module):
      continue
    if hasattr(node, "dtype") and not isinstance(getattr(type(node), "dtype", None), property):
      node.dtype = dtype
    if dtype != jnp.float32 and getattr(node, "precision", None) == jax.lax.Precision.HIGHEST:
      node.precision = jax.lax.Precision.DEFAULT


def reconstruction_modules(model) -> list[nnx.Module]:
  """The reconstruction-path modules of a SODEC model that exist (D_a first)."""
  parts = [model.codec.fidelity_decoder]
  parts += [getattr(model, n) for n in RECONSTRUCTION_PARTS if getattr(model, n, None) is not None]
  return parts


def apply_precision(model, precision: str) -> str:
  """Sets the compute dtype of a SODEC model's reconstruction path for `precision` (see the
  module docstring); the entropy path (E, H_a, P) is left as built (config.model.dtype, float32
  by default). Returns the resolved precision. Parameters are not touched."""
  resolved = resolve(precision)
  for part in reconstruction_modules(model):
    set_compute_dtype(part, _DTYPES[resolved])
  return resolved


def cast_params(module: nnx.Module, dtype, filter_=nnx.Variable) -> None:
  """Stores every floating-point array variable under `module` matching `filter_` in `dtype`,
  in place (inference: weights cast once at load instead of on every call)."""
  dtype = jnp.dtype(dtype)
  for _, var in nnx.iter_graph(module):
    if not isinstance(var, nnx.Variable) or not _matches(filter_, var):
      continue
    value = var.value
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating):
      if value.dtype != dtype:
        var.value = value.astype(dtype)


def _matches(filter_, var) -> bool:
  return nnx.filterlib.to_predicate(filter_)((), var)


def cast_reconstruction_params(model, dtype) -> None:
  """Inference only: stores the reconstruction path's weights in `dtype` (the entropy path's
  stay float32, so mu, the indexes and the fingerprint do not change)."""
  if jnp.dtype(dtype) == jnp.float32:
    return
  for part in reconstruction_modules(model):
    cast_params(part, dtype)

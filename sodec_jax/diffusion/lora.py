"""LoRA adapters for the UNet (and any module built from our Linear / Conv2d).

    apply_lora(unet, LoRAConfig(rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out")),
               rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(unet, optax.adamw(1e-4), wrt=LoRAParam)   # trains the adapters only
    merge_lora(unet)                                               # fold into the base weights

A Linear gets y += scale * (x @ A) @ B, A [in, r], B [r, out]; a Conv2d gets
y += scale * conv(x, A) @ B, A [kh, kw, in, r] (the layer's stride and padding), B [r, out]
(peft's conv LoRA: a kxk down-projection then a 1x1 up-projection). scale = alpha / rank.
B starts at zero, so a freshly adapted model computes exactly what the base model does.
The adapters are `LoRAParam` variables (flax's `nnx.LoRAParam`, a subclass of `nnx.Param`):
`nnx.state(model, LoRAParam)` selects them; `nnx.All(nnx.Param, nnx.Not(LoRAParam))` the base.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sodec_jax.diffusion.blocks import Conv2d, Linear
from sodec_jax.errors import SodecError

LoRAParam = nnx.LoRAParam

# Target names: a segment of the layer's dotted path ('to_q', 'attn2', 'ff', 'proj_in',
# 'time_emb_proj', ...) or 'conv' for every Conv2d.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 4
  alpha: float = 4.0
  targets: tuple = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoRAAdapter(nnx.Module):
  """The low-rank update of one Linear or Conv2d. Output scale * (x A) B, shaped like the layer's."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    rank: int,
    alpha: float,
    kernel_size: int = 0,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    a_shape = (kernel_size, kernel_size, in_features, rank) if kernel_size else (in_features, rank)
    fan_in = in_features * max(kernel_size, 1) ** 2
    bound = (1.0 / fan_in) ** 0.5  # peft: kaiming_uniform(a=sqrt(5)) on A
    self.lora_a = LoRAParam(
      jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound).astype(param_dtype)
    )
    self.lora_b = LoRAParam(jnp.zeros((rank, out_features), param_dtype))
    self.scale = alpha / rank

  def __call__(self, x: jax.Array, conv: Conv2d | None = None) -> jax.Array:
    a = self.lora_a[...].astype(x.dtype)
    h = conv.conv(x, a) if conv is not None else x @ a
    return (h @ self.lora_b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)

  def delta(self) -> jax.Array:
    """scale * A B in the layer's kernel layout ([in, out] or [kh, kw, in, out]), float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.scale * jnp.einsum("...r,ro->...o", a, b)


def _matches(path: str, module, target: str) -> bool:
  if target == "conv":
    return isinstance(module, Conv2d)
  return f".{target}." in f".{path}."


def apply_lora(
  model: nnx.Module,
  config: LoRAConfig | None = None,
  *,
  rank: int | None = None,
  alpha: float | None = None,
  targets=None,
  rngs: nnx.Rngs,
  param_dtype=jnp.float32,
) -> list[str]:
  """Attach LoRA adapters to every Linear / Conv2d whose path matches a target; returns the paths.

  Give a LoRAConfig, or rank / alpha / targets directly. Raises SodecError when a target matches
  no layer (a typo would otherwise silently train nothing) or a layer already has an adapter.
  """
  config = config or LoRAConfig()
  config = dataclasses.replace(
    config,
    **{k: v for k, v in dict(rank=rank, alpha=alpha, targets=targets).items() if v is not None},
  )
  if config.rank < 1:
    raise SodecError(f"LoRA rank must be >= 1, got {config.rank}")
  chosen, hits = [], {t: 0 for t in config.targets}
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, (Linear, Conv2d)):
      continue
    dotted = ".".join(str(p) for p in path)
    matched = [t for t in config.targets if _matches(dotted, module, t)]
    for t in matched:
      hits[t] += 1
    if matched:
      chosen.append((dotted, module))
  unused = [t for t, n in hits.items() if n == 0]
  if unused:
    raise SodecError(f"LoRA targets {unused} match no Linear/Conv2d layer of the model")
  for dotted, module in chosen:
    if module.lora is not None:
      raise SodecError(f"{dotted} already has a LoRA adapter (merge_lora it first)")
    if isinstance(module, Conv2d):
      module.lora = LoRAAdapter(
        module.in_channels,
        module.out_channels,
        rank=config.rank,
        alpha=config.alpha,
        kernel_size=module.kernel_size,
        param_dtype=param_dtype,
        rngs=rngs,
      )
    else:
      module.lora = LoRAAdapter(
        module.in_features,
        module.out_features,
        rank=config.rank,
        alpha=config.alpha,
        param_dtype=param_dtype,
        rngs=rngs,
      )
  return [d for d, _ in chosen]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Fold every adapter into its layer's kernel (kernel += scale * A B) and remove the adapters."""
  for _, module in list(nnx.iter_modules(model)):
    if isinstance(module, (Linear, Conv2d)) and module.lora is not None:
      kernel = module.kernel[...]
      module.kernel.value = (kernel.astype(jnp.float32) + module.lora.delta()).astype(kernel.dtype)
      module.lora = None
  return model


def lora_state(model: nnx.Module) -> nnx.State:
  """The adapters' parameters only (what a LoRA checkpoint needs)."""
  return nnx.state(model, LoRAParam)

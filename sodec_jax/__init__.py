"""sodec-jax: SODEC (one-step diffusion image compression) in JAX / Flax NNX."""
from sodec_jax.errors import SodecError

__all__ = ["SodecError"]

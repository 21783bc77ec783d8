"""sodec-jax: SODEC (one-step diffusion image compression) in JAX / Flax NNX.

import sodec_jax
model = sodec_jax.load_model("runs/tiny")        # a training --workdir
data = sodec_jax.compress(model, image)          # uint8 [H, W, 3] -> .sodec bytes
image_hat = sodec_jax.decompress(model, data)    # -> uint8 [H, W, 3]
"""

from sodec_jax.errors import SodecError


def __getattr__(name):  # lazy: importing the package stays cheap (no jax import for `sodec info`)
  if name in ("load_model", "compress", "decompress", "read_header", "LoadedModel"):
    from sodec_jax import api

    return getattr(api, name)
  raise AttributeError(f"module 'sodec_jax' has no attribute {name!r}")


__all__ = ["SodecError", "load_model", "compress", "decompress", "read_header", "LoadedModel"]

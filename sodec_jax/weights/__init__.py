"""The reading side of weights: tensor formats (`formats`: safetensors, safe torch pickles), THE
strict loader (`strict`), the key maps (`diffusers`, `ldm`, `transformers`, `clip`, `hific`,
`lpips`, `dists`) and the reader of our converted folders (`converted`). The writing side (the
converters) is `sodec_jax.converters`; nothing here imports it."""

"""Benchmarks behind `python -m sodec_jax.bench`: codec (+ its torch_reference), diffusion
(the SD 2.1 UNet / VAE decoder), train."""

"""Benchmarks behind `python -m sodec_jax.bench` (codec: `sodec_jax.benchmarks.codec`)."""

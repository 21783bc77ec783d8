"""`python -m sodec_jax.bench --what memory` (sodec_jax/benchmarks/memory.py): the residual
measure on toy functions with a known answer, and the command on the tiny stage-3 config."""

import re

import jax
import jax.numpy as jnp

from sodec_jax import bench
from sodec_jax.benchmarks import memory

TINY = ["--config", "configs/tiny.py", "--config.pipeline.stages=('stage3',)", "--random-weights"]


def test_residuals_of_known_functions():
  x = jax.ShapeDtypeStruct((7,), jnp.float32)
  # d/dx sum(sin x) keeps cos(x): one array of x's size
  got = memory.residuals(lambda x: jnp.sum(jnp.sin(x)), x)
  assert [(r.shape, r.dtype) for r in got] == [((7,), jnp.float32)]
  # sum(tanh(x @ W)) over W: x itself is an input (not counted), tanh's output is kept
  x, w = jax.ShapeDtypeStruct((3, 4), jnp.float32), jax.ShapeDtypeStruct((4, 5), jnp.float32)
  got = memory.residuals(lambda w, x: jnp.sum(jnp.tanh(x @ w)), w, x)
  assert got and all(r.shape == (3, 5) for r in got)
  # rematerialised: only the input is needed, so nothing beyond the inputs is kept
  f = jax.checkpoint(lambda w, x: jnp.sum(jnp.tanh(x @ w)))
  assert memory.nbytes(memory.residuals(f, w, x)) < memory.nbytes(got)


def test_command_prints_the_last_line_and_remat_cuts_residuals(capsys):
  lines = {}
  for remat in ("()", "('unet','vae_decoder','extractor','fidelity_decoder')"):
    argv = ["--what", "memory", *TINY, "--size", "64", "--batch", "1", "--skip-compile"]
    assert bench.main([*argv, "--config.precision=fp32", f"--config.memory.remat={remat}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"memory: compiled_gib=(\S+) residual_gib=(\S+) params_gib=(\S+)", out[-1])
    assert m, out[-1]
    assert m.group(1) == "nan"  # --skip-compile
    lines[remat] = float(m.group(2))
  off, on = lines.values()
  assert 0 < on < off


def test_unknown_remat_part_is_one_line(capsys):
  argv = ["--what", "memory", *TINY, "--skip-compile", "--config.memory.remat=('vae',)"]
  assert bench.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "vae_decoder" in err[0]

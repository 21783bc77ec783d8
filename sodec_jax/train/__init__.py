"""Training: python -m sodec_jax.train --config configs/stage1.py --workdir DIR [--config.a.b=v ...]

loop.py holds `train(config, workdir)`, the loop read top to bottom; the pieces sit beside it:
build.py (config checks, model, optimizer, discriminator, LPIPS), step.py (the jitted update),
parallel.py (multi-host, mesh, shardings), pipeline.py (stage configs, pipelines), logs.py
(config.json, metrics, sample grids) and cli.py (the command line: `main`, `run`).
"""

from sodec_jax.train.cli import main, run
from sodec_jax.train.loop import train

__all__ = ["train", "main", "run"]

"""The README's first command, run whole (`-m slow`: ~15 minutes on 2 CPU cores), and the floor
that the tiny default must reach on the photos it never trained on (astronaut, coffee), measured
by the pipeline's own summary through real .sodec files:

- the final stage: PSNR >= 20 dB at <= 0.5 bpp,
- within 2 dB of stage 1's PSNR, at the same or a lower bpp,
- colours kept: each channel's mean of the final decode within 12 grey levels of the original's.

    python -m pytest -m slow tests/test_quickstart_floor.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR_DB, MAX_BPP, STAGE1_GAP_DB, COLOUR_LEVELS = 20.0, 0.5, 2.0, 12.0


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart") / "tiny")
  cmd = [sys.executable, "-m", "sodec_jax.train", "--config", "configs/tiny.py"]
  subprocess.run(cmd + ["--workdir", workdir], cwd=ROOT, check=True)
  with open(os.path.join(workdir, "summary.json")) as f:
    return workdir, {r["stage"]: r for r in json.load(f)["stages"]}


def test_final_stage_floor(quickstart):
  _, rows = quickstart
  final = rows[list(rows)[-1]]
  assert final["bpp"] <= MAX_BPP, final
  assert final["psnr"] >= FLOOR_DB, final


def test_final_stage_close_to_stage1(quickstart):
  _, rows = quickstart
  stage1 = next(r for name, r in rows.items() if name.endswith("stage1"))
  final = rows[list(rows)[-1]]
  assert final["bpp"] <= stage1["bpp"] * 1.001, (final, stage1)
  assert final["psnr"] >= stage1["psnr"] - STAGE1_GAP_DB, (final, stage1)


def test_final_stage_keeps_colours(quickstart):
  import sodec_jax
  from configs import tiny
  from sodec_jax import validation

  workdir, _ = quickstart
  model = sodec_jax.load_model(workdir)
  for image in validation.holdout_images(tiny.get_config()):
    decoded, _ = validation.code_one(model, image)
    shift = np.abs(image.mean((0, 1)) - decoded.mean((0, 1)))
    assert shift.max() <= COLOUR_LEVELS, shift

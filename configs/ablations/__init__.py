"""The paper's ablations (Tables 2-4) as its experiments: "By default, the models are trained
for 50K steps in the pre-training process, and 40K steps in the SODEC end-to-end training
process for a fair comparison."

configs/ablations/stage1_50k.py is the one 50K stage 1 they share (HiFiC's lambda/target schedule
and the lr decay scaled from 1M steps to 50K, so stage 1 leaves HiFiC's x2 lambda phase and
stage 3 starts at the lambda stage 1 ended with). Every row file is a pipeline stage 2 ->
stage 3 that starts from it; a Table 2 row changes guidance in both (each guidance variant
trains its own F_p in its own stage 2), Table 3 and 4 rows change stage 3 only:

  python -m sodec_jax.train --config configs/ablations/stage1_50k.py --workdir runs/abl/stage1_50k ...
  python -m sodec_jax.train --config configs/ablations/guidance_text.py \\
      --workdir runs/abl/guidance_text --config.init_from=runs/abl/stage1_50k ...

(the usual --config.diffusion.weights, guidance.extractor_weights, lpips.vgg_weights and
data.train_dir as for configs/paper.py). Each table's final rate is its rows' (rate target,
losses.targeted_lambda): Table 2 ~0.04 bpp, Table 3 ~0.02, Table 4 0.06.
"""

import ml_collections

from configs import stage1, stage3

PAPER_STEPS = 1_000_000  # base.py's train.num_steps, on which HiFiC's schedules are laid out
STAGE1_STEPS = 50_000  # the paper's "50K steps in the pre-training process"
STAGE2_STEPS = 10_000  # not given by the paper (our choice: a fifth of stage 1's)
STAGE3_STEPS = 40_000  # "40K steps in the SODEC end-to-end training process"
TABLE_TARGET_BPP = {2: 0.04, 3: 0.02, 4: 0.06}  # the rows' rates: 0.037-0.042, 0.020-0.023, 0.06


def _scaled(steps, total):
  return tuple(int(s * total / PAPER_STEPS) for s in steps)


def short_stage1() -> ml_collections.ConfigDict:
  """configs/stage1.py in 50K steps: HiFiC's schedule steps and the lr decay scaled by 50K/1M."""
  c = stage1.get_config()
  c.name = "ablation/stage1"
  c.train.num_steps = STAGE1_STEPS
  c.loss.lambda_schedule_steps = _scaled(c.loss.lambda_schedule_steps, STAGE1_STEPS)
  c.loss.target_schedule_steps = _scaled(c.loss.target_schedule_steps, STAGE1_STEPS)
  c.optim.lr_decay_steps = _scaled(c.optim.lr_decay_steps, STAGE1_STEPS)
  return c


def stage3_anneal() -> tuple[float, float]:
  """(start, end) of stage 3's rate anneal after the 50K stage 1."""
  c = stage3.apply(short_stage1())
  return c.loss.anneal.start, c.loss.anneal.end


def row(name: str, table: int, stage3_changes=None) -> ml_collections.ConfigDict:
  """The pipeline stage 2 -> stage 3 of one row, from the 50K stage 1 (--config.init_from):
  stage 2 in STAGE2_STEPS, stage 3 in STAGE3_STEPS (anneal over its first half, lr decay at
  its half), rate target TABLE_TARGET_BPP[table]; `stage3_changes` (nested dict) on stage 3."""
  c = short_stage1()
  c.name = f"ablation/{name}"
  c.loss.anneal.target_rate = TABLE_TARGET_BPP[table]
  c.pipeline.stages = ("stage2", "stage3")
  c.pipeline.summary = False
  c.pipeline.stage2 = ml_collections.ConfigDict(
    {
      "train": {"num_steps": STAGE2_STEPS},
      "optim": {"lr_decay_steps": _scaled((PAPER_STEPS // 2,), STAGE2_STEPS)},
    }
  )
  s3 = {
    "train": {"num_steps": STAGE3_STEPS},
    "optim": {"lr_decay_steps": _scaled((PAPER_STEPS // 2,), STAGE3_STEPS)},
    "loss": {"anneal": {"steps": STAGE3_STEPS // 2}},
  }
  for group, values in (stage3_changes or {}).items():
    if isinstance(values, dict) and isinstance(s3.get(group), dict):
      for k, v in values.items():
        if isinstance(v, dict) and isinstance(s3[group].get(k), dict):
          s3[group][k] = {**s3[group][k], **v}
        else:
          s3[group][k] = v
    else:
      s3[group] = values
  c.pipeline.stage3 = ml_collections.ConfigDict(s3)
  return c

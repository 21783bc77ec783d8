"""The paper's operating points as one family: the whole paper-size pipeline (stage 1 at the
paper's ~0.07 bpp, stage 2, stage 3 annealed to a final rate, the GAN finetune) for the final
rate given after the colon, in bpp:

  python -m sodec_jax.train --config configs/paper.py:0.03 --workdir runs/paper_0.03 \\
      --config.diffusion.weights=/weights/sd21 --config.guidance.extractor_weights=/weights/vit \\
      --config.lpips.vgg_weights=/weights/vgg16.pth --config.data.train_dir=/data/LSDIR

The paper's points: 0.02, 0.03, 0.045, 0.06 (OPERATING_POINTS; any rate below stage 1's is
accepted). Stages 1 and 2 do not depend on the point: train them once (--config.pipeline.stages=
"('stage1','stage2')"), then each point from there with --config.pipeline.stages=
"('stage3','finetune')" --config.init_from=runs/shared/1_stage2.
"""

from configs import stage1, stage3

OPERATING_POINTS = (0.02, 0.03, 0.045, 0.06)  # final bpp (the paper's curves: 0.02-0.06)


def get_config(target_bpp: str = str(stage3.DEFAULT_TARGET_BPP)):
  try:
    target = float(target_bpp)
  except ValueError:
    raise ValueError(
      f"configs/paper.py:{target_bpp}: the final rate must be a number (bpp)"
    ) from None
  if not 0 < target < stage1.STAGE1_TARGET_BPP:
    raise ValueError(
      f"configs/paper.py:{target_bpp}: the final rate must lie in (0, "
      f"{stage1.STAGE1_TARGET_BPP}) bpp, below stage 1's; the paper's: {OPERATING_POINTS}"
    )
  c = stage1.get_config()
  c.name = f"paper_{target:g}"
  c.loss.anneal.target_rate = target
  c.pipeline.stages = ("stage1", "stage2", "stage3", "finetune")
  c.pipeline.summary = False  # no held-out photos at paper size: use sodec_jax.evaluate
  return c

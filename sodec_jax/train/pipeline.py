"""Pipelines: config.pipeline.stages run one after another, each stage's config made by
`stage_config` (configs/tiny.py runs pretrain, stage1, stage2, stage3 and finetune this way).
"""

from __future__ import annotations

import importlib
import json
import os
import time
from typing import Callable

import jax
import ml_collections

from sodec_jax import api, checkpoints, validation
from sodec_jax.errors import SodecError
from sodec_jax.train.logs import METRICS_FILE


def _deep_update(config, overrides) -> None:
  """Writes every leaf of the ConfigDict `overrides` into `config` (nested groups merged)."""
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      _deep_update(config[k], v)
    else:
      config[k] = v


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one pipeline stage: the stage file's `apply` (configs/stage2.py, ...) on a
  copy of `config`, then the pipeline's own overrides `config.pipeline.<name>`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.pipeline.stages = ()
  if name == "pretrain":
    c.stage, c.decoder, c.train.trainable = 0, "codec", (".*",)
  elif name != "stage1":
    try:
      importlib.import_module(f"configs.{name}").apply(c)
    except ModuleNotFoundError:
      raise SodecError(
        f"config.pipeline.stages names {name!r}, which has no configs/{name}.py"
      ) from None
  if name in config.pipeline:
    _deep_update(c, config.pipeline[name])
  return c


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(stage name, its config as stage_config makes it)] for each of config.pipeline.stages."""
  return [(name, stage_config(config, name)) for name in config.pipeline.stages]


def run_pipeline(config, workdir: str, train: Callable[..., dict]) -> dict:
  """Runs config.pipeline.stages in WORKDIR/<i>_<stage>/ (i counted from
  config.pipeline.first_index) with `train(stage config, stage dir)`
  (the loop, handed in), each starting from the ones before (init_from); WORKDIR/pipeline.json
  lists them, so `--checkpoint WORKDIR` means the last one. Rerunning the command resumes:
  finished stages are skipped, the current one resumes. Returns the last stage's metrics row."""
  os.makedirs(workdir, exist_ok=True)
  names = list(config.pipeline.stages)
  first = int(config.pipeline.get("first_index", 0))
  dirs = [f"{first + i}_{n}" for i, n in enumerate(names)]
  with open(os.path.join(workdir, checkpoints.PIPELINE_FILE), "w") as f:
    json.dump({"stages": dirs, "config": config.name}, f, indent=2)
  t0, row = time.time(), {}
  for i, ((name, c), sub) in enumerate(zip(stage_configs(config), dirs)):
    earlier = [os.path.join(workdir, d) for d in dirs[:i]]
    # stages 0 and 1 start from scratch; a later one from the stages before it, or, when it is
    # the first stage run here, from the config's own init_from (e.g. a shared stage 2)
    if c.stage < 2:
      c.init_from = ""
    elif earlier:
      c.init_from = ",".join(earlier)
    print(f"=== pipeline stage {i + 1}/{len(names)}: {name} -> {os.path.join(workdir, sub)}")
    row = train(c, os.path.join(workdir, sub))
  if config.pipeline.get("summary", True):
    summary(config, workdir)
  minutes, seconds = divmod(int(time.time() - t0), 60)
  print(
    f"pipeline done in {minutes}m{seconds:02d}s: stages {', '.join(dirs)} in {workdir} "
    f"(each: config.json, checkpoints/, {METRICS_FILE}, TensorBoard events); --checkpoint "
    f"{workdir} means the last stage\nnext:\n"
    f"  sodec compress photo.png out.sodec --checkpoint {workdir}\n"
    f"  sodec decompress out.sodec out.png --checkpoint {workdir}\n"
    f"  python -m sodec_jax.evaluate --checkpoint {workdir} --images FOLDER --out eval/"
  )
  return row


SUMMARY_JSON, SUMMARY_PNG = "summary.json", "summary.png"


def summary(config, workdir: str) -> list[dict] | None:
  """What the pipeline made, measured on the held-out photos (config.data.holdout, full size,
  through real .sodec files of each coding stage's output, best.json's step where present):
  prints a table stage | step | bpp | PSNR | MS-SSIM, writes WORKDIR/summary.json (those rows)
  and WORKDIR/summary.png (original | each stage's decode of the first two photos, centre crops
  of the decodes measured, captioned with the whole photo's numbers). When the final
  stage corrects its colours against x_f (sodec.color_fix), one more row gives the same files
  decoded without the correction (the diffusion output as it is; summary.json's
  "final_without_color_fix", not one of its "stages"). Returns the stages' rows, or None
  (with a note) when data.holdout is empty or the run has several processes."""
  if not tuple(config.data.get("holdout", ())):
    print("no held-out summary: config.data.holdout is empty (name photos kept out of training)")
    return None
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      print("no held-out summary in a multi-process run: run python -m sodec_jax.evaluate")
    return None
  images = validation.holdout_images(config)
  models = validation.pipeline_models(workdir)

  keys = ("bpp", "psnr", "ms_ssim", "images")

  def measure(name, model):  # -> (the table's row, [(decode, metrics)] of each photo)
    r = validation.validate(model, images, return_decoded=True)
    row = {"stage": name, "step": model.step, **{k: r[k] for k in keys}}
    return row, list(zip(r["decoded"], r["images"]))

  measured = [measure(name, model) for name, model in models]
  rows = [row for row, _ in measured]
  record = {"holdout": list(config.data.holdout), "stages": rows}
  name, final = models[-1]
  shown = rows
  if final.color_fix != "none":
    # the final stage's files decoded without its colour correction: the diffusion output as is
    raw = api.prepare(final.config, final.model, final.step, color_fix="none")
    record["final_without_color_fix"] = measure(f"{name} (color_fix none)", raw)[0]
    shown = rows + [record["final_without_color_fix"]]
  with open(os.path.join(workdir, SUMMARY_JSON), "w") as f:
    json.dump(record, f, indent=2)
  coded = [decodes[:2] for _, decodes in measured]  # summary.png crops these, codes nothing
  validation.summary_png(os.path.join(workdir, SUMMARY_PNG), models, images[:2], coded)
  width = max(len("stage"), *(len(r["stage"]) for r in shown))
  lines = [
    f"held-out photos ({', '.join(config.data.holdout)}), full size, through .sodec files:",
    f"{'stage':<{width}}  {'step':>6}  {'bpp':>6}  {'PSNR':>6}  {'MS-SSIM':>7}",
  ]
  for r in shown:
    ssim = "-" if r["ms_ssim"] is None else f"{r['ms_ssim']:.4f}"
    lines.append(
      f"{r['stage']:<{width}}  {r['step']:>6}  {r['bpp']:>6.3f}  {r['psnr']:>6.2f}  {ssim:>7}"
    )
  lines.append(
    f"(also {os.path.join(workdir, SUMMARY_JSON)}; original | each stage: "
    f"{os.path.join(workdir, SUMMARY_PNG)})"
  )
  print("\n".join(lines))
  return rows

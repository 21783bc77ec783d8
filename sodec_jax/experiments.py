"""Small experiments that check a claim of the paper end to end at tiny scale.

  python -m sodec_jax.experiments rate_annealing --from runs/tiny --out runs/rate_annealing \\
      [--config configs/tiny.py] [--target-bpp 0.2] [--steps 150] [--seeds 0,1,2] \\
      [--vgg-weights vgg16.pth] [--alexnet-weights alexnet.pth]

rate_annealing (paper, Table 4 (ii) against (iv)): from the same stage 2 (the `*_stage2` stage of
the pipeline workdir given by --from, e.g. the quickstart's runs/tiny), stage 3 is trained two
ways toward the same final rate, with the same steps and seed:
  direct     (ii) joint training at the final rate weight from the first step
             (loss.anneal.shape = "none": lambda = anneal.end throughout)
  annealing  (iv) the paper's rate annealing: lambda goes linearly from stage 1's weight
             (anneal.start) to the final one (anneal.end) over the steps
Both are steered to --target-bpp by HiFiC's target-rate rule (loss.anneal.target_rate), so they
are compared near the same bpp as the paper does. Each run's last step is measured on the
held-out photos (config.data.holdout, full size) through real .sodec files: bpp, PSNR,
MS-SSIM, and LPIPS when its weights are given.

  python -m sodec_jax.experiments rate_targets --from runs/tiny --out runs/rate_targets \
      [--targets 0.12,0.2] [--steps 150] [--seeds 0]

rate_targets (the rate target of configs/paper.py at tiny scale): stage 3 with the paper's
annealing from the same stage 2, once per --targets value (loss.anneal.target_rate); each row
gives the held-out bpp it landed at and `off` = bpp / target - 1.

OUT/results.csv has one row per run and seed, OUT/results.json the same plus the means per run;
the table is printed. Runs already finished in OUT are measured again, not retrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

from sodec_jax import api, checkpoints, validation
from sodec_jax.errors import SodecError

SCHEMES = ("direct", "annealing")
COLUMNS = (
  "run",
  "seed",
  "step",
  "target_bpp",
  "bpp",
  "off",
  "psnr",
  "ms_ssim",
  "lpips",
  "lpips_vgg",
  "seconds",
)
MEANS = ("bpp", "off", "psnr", "ms_ssim", "lpips", "lpips_vgg")


def stage2_dir(workdir: str) -> str:
  """The stage-2 folder of a pipeline workdir (pipeline.json's `*_stage2`), or a SodecError
  naming the command that makes one."""
  path = os.path.join(workdir, checkpoints.PIPELINE_FILE)
  make = "python -m sodec_jax.train --config configs/tiny.py --workdir runs/tiny"
  if not os.path.isfile(path):
    raise SodecError(
      f"--from {workdir} is not a pipeline workdir (no pipeline.json); make one: {make}"
    )
  with open(path) as f:
    names = [n for n in json.load(f)["stages"] if n.endswith("_stage2")]
  done = [n for n in names if checkpoints.latest_step(os.path.join(workdir, n)) is not None]
  if not done:
    raise SodecError(f"--from {workdir} has no finished stage 2; run the pipeline first: {make}")
  return os.path.join(workdir, done[-1])


def scheme_config(base, scheme: str, *, init_from: str, target_bpp: float, steps: int, seed: int):
  """The stage-3 config of one run: the pipeline's stage 3 (configs/stage3.py + the config's
  pipeline.stage3 overrides) from `init_from`, `steps` steps, rate target `target_bpp`, anneal
  shape by scheme; no held-out validation inside (the experiment measures the last step)."""
  from sodec_jax.train.pipeline import stage_config

  if scheme not in SCHEMES:
    raise SodecError(f"scheme {scheme!r} is not one of {SCHEMES}")
  c = stage_config(base, "stage3")
  c.init_from = init_from
  c.seed = int(seed)
  c.train.num_steps = int(steps)
  c.train.checkpoint_every = int(steps)
  c.train.validate_every = 0
  c.train.sample_every = 0
  c.train.progress = False
  c.loss.anneal.target_rate = float(target_bpp)
  c.loss.anneal.steps = int(steps)
  c.loss.anneal.shape = "none" if scheme == "direct" else "linear"
  return c


def _lpips_metrics(args):
  """evaluate.Metrics with the paper protocol's names (lpips = AlexNet, lpips_vgg), or None
  when no LPIPS weights are given."""
  if not (args.alexnet_weights or args.vgg_weights):
    return None
  from sodec_jax.evaluate import Metrics

  return Metrics(args.vgg_weights, alexnet_weights=args.alexnet_weights, protocol="paper")


def measure(run_dir: str, step: int, images, metrics=None) -> dict:
  """bpp / PSNR / MS-SSIM (and the LPIPS columns of `metrics`) of the run's `step` on
  `images` (uint8 [H, W, 3] each), through real .sodec files."""
  model = api.load_model(run_dir, step=step)
  r = validation.validate(model, images, return_decoded=metrics is not None)
  row = {"step": model.step, "bpp": r["bpp"], "psnr": r["psnr"], "ms_ssim": r["ms_ssim"]}
  if metrics is not None:
    per = [metrics(a, b) for a, b in zip(images, r["decoded"])]
    for name in ("lpips", "lpips_vgg"):
      if name in metrics.names:
        row[name] = float(np.nanmean([p[name] for p in per]))
  return row


def rate_annealing(
  base, from_dir: str, out: str, *, target_bpp: float, steps: int, seeds, metrics=None
) -> dict:
  """Table 4 (ii) against (iv): both schemes toward `target_bpp` for each seed (see the module
  docstring); returns the results.json dict ({"runs": rows, "means": {run: {...}}, ...})."""
  runs = [(scheme, scheme, target_bpp) for scheme in SCHEMES]
  info = {"experiment": "rate_annealing", "target_bpp": target_bpp}
  return run_experiment(base, from_dir, out, runs, info, steps=steps, seeds=seeds, metrics=metrics)


def rate_targets(base, from_dir: str, out: str, *, targets, steps: int, seeds, metrics=None):
  """Stage 3 (annealing) once per target bpp; rows say where each landed (`off`)."""
  runs = [(f"target_{t:g}", "annealing", float(t)) for t in targets]
  info = {"experiment": "rate_targets", "targets": list(targets)}
  return run_experiment(base, from_dir, out, runs, info, steps=steps, seeds=seeds, metrics=metrics)


def run_experiment(base, from_dir, out, runs, info, *, steps, seeds, metrics=None) -> dict:
  """Trains (or, when finished in OUT, only measures) each (label, scheme, target) of `runs`
  for each seed from the stage 2 of the pipeline workdir `from_dir` (`base`: the pipeline's
  config, configs/tiny.py); prints the rows and the means, writes OUT/results.csv and
  OUT/results.json; returns the results.json dict."""
  from sodec_jax.train.loop import train

  init = stage2_dir(from_dir)
  images = validation.holdout_images(base)
  if not images:
    raise SodecError("the config holds no photos out of training (config.data.holdout is empty)")
  os.makedirs(out, exist_ok=True)
  rows = []
  for seed in seeds:
    for label, scheme, target in runs:
      c = scheme_config(base, scheme, init_from=init, target_bpp=target, steps=steps, seed=seed)
      run_dir = os.path.join(out, f"{label}_seed{seed}")
      t0 = time.time()
      if checkpoints.latest_step(run_dir) != steps:
        print(f"=== {label}, seed {seed}: {steps} steps from {init} -> {run_dir}")
        train(c, run_dir)
      row = {"run": label, "seed": seed, "target_bpp": target}
      row.update(measure(run_dir, steps, images, metrics))
      row["off"] = row["bpp"] / target - 1.0
      row["seconds"] = round(time.time() - t0, 1)
      rows.append(row)
      print(_format(row))
  info = {**info, "from": from_dir, "steps": steps, "seeds": list(seeds)}
  return _write(out, info, [label for label, _, _ in runs], rows)


def _format(row: dict) -> str:
  cells = []
  for k in COLUMNS:
    v = row.get(k)
    cells.append(f"{k}={'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}")
  return "  ".join(cells)


def _write(out: str, info: dict, labels: list[str], rows: list[dict]) -> dict:
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k) for k in COLUMNS})
  means = {}
  for label in labels:
    mine = [r for r in rows if r["run"] == label]
    means[label] = {
      k: float(np.mean([r[k] for r in mine])) if all(r.get(k) is not None for r in mine) else None
      for k in MEANS
    }
  summary = {
    **info,
    "holdout": "config.data.holdout, full size, real .sodec files",
    "runs": rows,
    "means": means,
  }
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  width = max(len("run"), *(len(label) for label in labels))
  print(f"{info['experiment']}: means over seeds {info['seeds']} ({info['steps']} steps each):")
  print(f"{'run':<{width}}  {'bpp':>6}  {'off':>6}  {'PSNR':>6}  {'MS-SSIM':>7}  {'LPIPS':>6}")
  for label, m in means.items():
    ssim = "-" if m["ms_ssim"] is None else f"{m['ms_ssim']:.4f}"
    lp = "-" if m["lpips"] is None else f"{m['lpips']:.4f}"
    print(
      f"{label:<{width}}  {m['bpp']:>6.3f}  {m['off']:>+6.1%}  {m['psnr']:>6.2f}  {ssim:>7}  "
      f"{lp:>6}"
    )
  print(f"(also {os.path.join(out, 'results.csv')} and results.json)")
  return summary


def _seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds wants integers like 0,1,2, got {text!r}") from None
  if not seeds:
    raise argparse.ArgumentTypeError("--seeds needs at least one seed")
  return seeds


def _positive(kind):
  def parse(text):
    try:
      v = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v

  return parse


def _targets(text: str) -> list[float]:
  try:
    targets = [float(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--targets wants bpp values like 0.12,0.2, got {text!r}"
    ) from None
  if len(targets) < 1 or min(targets) <= 0:
    raise argparse.ArgumentTypeError(f"--targets wants positive bpp values, got {text!r}")
  return targets


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m sodec_jax.experiments",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="experiment", required=True)
  ra = sub.add_parser("rate_annealing", help="Table 4 (ii) vs (iv) at tiny scale")
  rt = sub.add_parser("rate_targets", help="stage 3 steered to several final rates")
  ra.add_argument("--target-bpp", type=_positive(float), default=0.2)
  ra.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
  rt.add_argument("--targets", type=_targets, default=[0.12, 0.2])
  rt.add_argument("--seeds", type=_seeds, default=[0])
  for q in (ra, rt):
    q.add_argument("--from", required=True, help="pipeline workdir with a finished stage 2")
    q.add_argument("--out", required=True)
    q.add_argument("--config", default="configs/tiny.py")
    q.add_argument("--steps", type=_positive(int), default=150)
    q.add_argument("--vgg-weights", default="")
    q.add_argument("--alexnet-weights", default="")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from sodec_jax.train.cli import UsageError, load_config_file

  try:
    base = load_config_file(args.config)
    kw = dict(steps=args.steps, seeds=args.seeds, metrics=_lpips_metrics(args))
    where = (base, getattr(args, "from"), args.out)
    if args.experiment == "rate_annealing":
      rate_annealing(*where, target_bpp=args.target_bpp, **kw)
    else:
      rate_targets(*where, targets=args.targets, **kw)
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except SodecError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

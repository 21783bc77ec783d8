"""Evaluation on an image folder: real bpp from .sodec files, full- and no-reference metrics.

(Over 450 lines: the metric set, the per-image loop and the command line of one evaluation
stay together so a result row can be traced in one file; figures live in figures.py.)

  python -m sodec_jax.evaluate --checkpoint runs/a runs/b --images /data/kodak --out eval/kodak \\
      [--protocol default|paper] [--center-crop 512] [--limit 24] [--vgg-weights vgg16.pth] \\
      [--alexnet-weights alexnet.pth] [--dists-weights weights.pt] \\
      [--niqe-params modelparameters.mat] [--clip-iqa converted/clip_iqa]

--protocol paper is the paper's: every image (Kodak included) centre-cropped to 512x512, bpp over
that crop, and the columns bpp (whole .sodec file), bpp_payload (the coded streams z, y and the
overflow escapes only: no container header or CRC), psnr, ms_ssim, lpips_vgg (LPIPS-VGG, empty
without --vgg-weights), lpips (LPIPS-AlexNet, the metric of the paper's peers, with
--alexnet-weights) and dists (with --vgg-weights and --dists-weights). The default protocol is
unchanged: no crop unless --center-crop, `lpips` = LPIPS-VGG (and lpips_alex with
--alexnet-weights), no bpp_payload.

For every checkpoint and every image: compress to a real `.sodec` file (kept under
OUT/sodec/<checkpoint>/), decode it, and score the decoded image against the original. bpp is
8 * file bytes / (H * W) of the image that was coded (after --center-crop).

Outputs in --out:
  results.csv   one row per image per checkpoint (checkpoint, image, height, width, bytes, bpp,
                psnr, ms_ssim[, lpips][, dists][, niqe][, clip_iqa], encode_s, decode_s); the times are wall
                seconds of compress / decompress without compilation (the first image of each
                padded size is coded once, untimed, before its timed run)
  summary.json  per checkpoint: means, fingerprint, step, decoder, config; protocol; skipped
                images; notes (metrics left out and why)
  rd_<metric>.png  bpp vs metric: each checkpoint's images (dots) and means (large marker),
                   the means joined in bpp order (the RD curve across checkpoints)
  grid_<image>.png original | each checkpoint's x_f and x_hat, full view and a zoomed crop

Metrics: PSNR (dB, on the uint8 images) and MS-SSIM (images with both sides >= 161 px; empty
otherwise) always; LPIPS-VGG and DISTS when --vgg-weights (torchvision VGG16) is given, DISTS
also needing --dists-weights (alpha/beta, the dists-pytorch wheel's weights.pt). A metric without
its weights is left out with a note (never an error). No-reference, on the decoded image: NIQE
(lower is better) with --niqe-params (the pristine model), CLIP-IQA (higher is better) with
--clip-iqa (a converted CLIP checkpoint). Weights that are given but unreadable are an error
before anything is written.
Unreadable images are skipped and listed in summary.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from sodec_jax.errors import SodecError
from sodec_jax.figures import grid_plot, rd_plots
from sodec_jax.images import list_images

MS_SSIM_MIN_SIDE = 161
BASE_COLUMNS = ["checkpoint", "image", "height", "width", "bytes", "bpp"]
PROTOCOLS = ("default", "paper")
PAPER_CROP = 512  # "We center-crop all images in the validation datasets to 512x512"
TIME_COLUMNS = ["encode_s", "decode_s"]
_COLUMN_ORDER = ["psnr", "ms_ssim", "lpips", "lpips_vgg", "lpips_alex", "dists", "niqe", "clip_iqa"]


# ----------------------------------------------------------------------------- inputs


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window (each side capped at the image's side)."""
  h, w = image.shape[:2]
  ch, cw = min(h, size), min(w, size)
  top, left = (h - ch) // 2, (w - cw) // 2
  return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def image_name(path: str, root: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, "/")


def _label(checkpoint: str, taken: set) -> str:
  base = os.path.basename(os.path.normpath(checkpoint)) or "checkpoint"
  label, k = base, 2
  while label in taken:
    label, k = f"{base}_{k}", k + 1
  taken.add(label)
  return label


# ----------------------------------------------------------------------------- metrics


class Metrics:
  """Jitted metric functions on uint8 pairs; LPIPS / DISTS / NIQE / CLIP-IQA only when their
  weights are given (NIQE and CLIP-IQA score the decoded image alone)."""

  def __init__(
    self,
    vgg_weights: str = "",
    dists_weights: str = "",
    niqe_params: str = "",
    clip_iqa: str = "",
    *,
    alexnet_weights: str = "",
    protocol: str = "default",
  ):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sodec_jax.metrics import ms_ssim, psnr
    from sodec_jax.metrics.alexnet import ALEXNET_MIN_SIDE

    self.alex_min_side = ALEXNET_MIN_SIDE

    self.notes: list[str] = []
    self.names = ["psnr", "ms_ssim"]
    # the paper's protocol: `lpips` is LPIPS-AlexNet, LPIPS-VGG is `lpips_vgg` (always a column)
    vgg_name, alex_name = ("lpips_vgg", "lpips") if protocol == "paper" else ("lpips", "lpips_alex")
    self.empty = [vgg_name] if protocol == "paper" and not vgg_weights else []
    fns: dict[str, Callable] = {"psnr": jax.jit(psnr), "ms_ssim": jax.jit(ms_ssim)}
    if alexnet_weights:
      from sodec_jax.weights.lpips import load_lpips_alex

      fns[alex_name] = self._jit_module(load_lpips_alex(alexnet_weights), jax, nnx)
      self.names.append(alex_name)
    elif protocol == "paper":
      self.notes.append(
        "LPIPS-AlexNet (lpips) skipped: no --alexnet-weights (torchvision AlexNet ImageNet "
        "weights, .pth or .safetensors)"
      )
    if vgg_weights:
      from sodec_jax.weights.lpips import load_lpips

      fns[vgg_name] = self._jit_module(load_lpips(vgg_weights), jax, nnx)
      self.names.append(vgg_name)
      if dists_weights:
        from sodec_jax.weights.dists import load_dists

        fns["dists"] = self._jit_module(load_dists(vgg_weights, dists_weights), jax, nnx)
        self.names.append("dists")
      else:
        self.notes.append(
          "DISTS skipped: no --dists-weights (alpha/beta: the weights.pt of the "
          "dists-pytorch wheel)"
        )
    else:
      self.notes.append(
        "LPIPS and DISTS skipped: no --vgg-weights (torchvision VGG16 ImageNet "
        "weights, .pth or .safetensors)"
      )
    if niqe_params:
      from sodec_jax.metrics.niqe import load_niqe_params, niqe

      params = load_niqe_params(niqe_params)
      fns["niqe"] = lambda x, y: niqe(y, params)
      self.names.append("niqe")
    else:
      self.notes.append(
        "NIQE skipped: no --niqe-params (the pristine model: modelparameters.mat "
        "of the MATLAB niqe_release, or BasicSR's niqe_pris_params.npz)"
      )
    if clip_iqa:
      from sodec_jax.weights.clip import load_clip_iqa

      module = load_clip_iqa(clip_iqa)
      graphdef, state = nnx.split(module)
      score = jax.jit(lambda s, y: nnx.merge(graphdef, s)(y))
      fns["clip_iqa"] = lambda x, y: score(state, jnp.asarray(y[None] / np.float32(255.0)))
      self.names.append("clip_iqa")
    else:
      self.notes.append(
        "CLIP-IQA skipped: no --clip-iqa (a `convert/from_torch.py clip-iqa` "
        "folder made from a transformers CLIP checkpoint)"
      )
    self._fns = fns

  @staticmethod
  def _jit_module(module, jax, nnx):
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y))
    return lambda x, y: fn(state, x, y)

  def __call__(self, original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    x = (original.astype(np.float32) / 255.0)[None]
    y = (decoded.astype(np.float32) / 255.0)[None]
    out = {name: float("nan") for name in self.empty}
    for name in self.names:
      if name == "ms_ssim" and min(original.shape[:2]) < MS_SSIM_MIN_SIDE:
        out[name] = float("nan")
      elif name in ("lpips", "lpips_vgg", "dists") and min(original.shape[:2]) < 16:
        out[name] = float("nan")
      elif name in ("lpips", "lpips_alex") and min(original.shape[:2]) < self.alex_min_side:
        out[name] = float("nan")
      elif name == "niqe":
        try:
          out[name] = float(self._fns[name](None, decoded))
        except SodecError:  # smaller than one 96x96 NIQE block: empty, as MS-SSIM
          out[name] = float("nan")
      elif name == "clip_iqa":
        out[name] = float(np.asarray(self._fns[name](None, decoded))[0])
      else:
        out[name] = float(np.asarray(self._fns[name](x, y))[0])
    return out


# ----------------------------------------------------------------------------- coding


def payload_bytes(data: bytes) -> int:
  """Bytes of the coded streams of a .sodec file (z, y, overflow): the file less its container
  header (fixed fields, stream lengths) and CRC."""
  from sodec_jax.codec import bitstream

  _, streams = bitstream.unpack(data)
  return sum(len(s) for s in streams)


def code_image(model, image: np.ndarray, want_x_f: bool, max_memory=None) -> dict[str, Any]:
  """Compress + decompress one image through the real file format; times both (`max_memory`:
  see api.compress and api.decompress).

  Returns data (bytes), x_hat (uint8, the decoder's output) and, when `want_x_f`, x_f: the
  fidelity decoder's output D_a(y_hat). For the codec decoder x_f is x_hat; for a diffusion
  decoder it is computed apart (one extra D_a call, not timed)."""
  from sodec_jax import api
  from sodec_jax.codec import bitstream

  t0 = time.perf_counter()
  data = api.compress(model, image, max_memory=max_memory)
  t1 = time.perf_counter()
  x_hat = api.decompress(model, data, max_memory=max_memory)
  t2 = time.perf_counter()
  out = {"data": data, "x_hat": x_hat, "encode_s": t1 - t0, "decode_s": t2 - t1}
  if want_x_f:
    if model.decoder == bitstream.DECODER_CODEC:
      out["x_f"] = x_hat
    else:
      header, y_hat, _ = api.decode_latents(model, data)
      out["x_f"] = api.to_uint8(np.asarray(api.fidelity(model, y_hat)), header.height, header.width)
  return out


# ----------------------------------------------------------------------------- outputs


def _mean(values) -> float | None:
  v = [x for x in values if x is not None and not math.isnan(x)]
  return float(np.mean(v)) if v else None


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
  from sodec_jax.images import write_atomic

  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow(
      {
        k: (
          ""
          if isinstance(v, float) and math.isnan(v)
          else (f"{v:.6g}" if isinstance(v, float) else v)
        )
        for k, v in r.items()
      }
    )
  write_atomic(path, buf.getvalue().encode())


def evaluate(
  checkpoints: list[str],
  images: str,
  out: str,
  *,
  center_crop_size: int = 0,
  limit: int = 0,
  protocol: str = "default",
  alexnet_weights: str = "",
  vgg_weights: str = "",
  dists_weights: str = "",
  niqe_params: str = "",
  clip_iqa: str = "",
  grids: int = 3,
  plots: bool = True,
  progress: bool | None = None,
  log=print,
  max_memory=None,
) -> dict:
  """Runs the evaluation and writes every output; returns the summary dict. `max_memory`
  (bytes or "8GiB"): the encoder's and the decoder's memory budget (api.compress and
  api.decompress; None: no limit)."""
  from tqdm import tqdm

  from sodec_jax import api
  from sodec_jax import checkpoints as ckpt_lib
  from sodec_jax.codec import bitstream
  from sodec_jax.images import read_image, write_atomic
  from sodec_jax.model import PAD_MULTIPLE

  if protocol not in PROTOCOLS:
    raise SodecError(f"--protocol {protocol}: use one of {', '.join(PROTOCOLS)}")
  if max_memory is not None:
    from sodec_jax import tiling

    tiling.parse_bytes(max_memory)  # a bad size fails before any work
  if protocol == "paper":
    if center_crop_size not in (0, PAPER_CROP):
      raise SodecError(f"--protocol paper crops to {PAPER_CROP}: drop --center-crop")
    center_crop_size = PAPER_CROP
  paths = list_images(images, "--images")
  metrics = Metrics(  # bad weights: before any output
    vgg_weights,
    dists_weights,
    niqe_params,
    clip_iqa,
    alexnet_weights=alexnet_weights,
    protocol=protocol,
  )
  os.makedirs(out, exist_ok=True)
  for note in metrics.notes:
    log(f"note: {note}")
  sized = ["bpp_payload"] if protocol == "paper" else []
  metric_columns = sorted(metrics.names + metrics.empty, key=_COLUMN_ORDER.index)
  columns = BASE_COLUMNS + sized + metric_columns + TIME_COLUMNS
  rows: list[dict] = []
  skipped: dict[str, str] = {}
  summary_ckpts: list[dict] = []
  grid_data: dict[str, dict] = {}  # image name -> {"original": ..., "panels": [...]}
  labels: set = set()
  label_order: list[str] = []
  for checkpoint in checkpoints:
    label = _label(checkpoint, labels)
    label_order.append(label)
    model = api.load_model(checkpoint)
    sodec_dir = os.path.join(out, "sodec", label)
    os.makedirs(sodec_dir, exist_ok=True)
    done = 0
    ckpt_rows = []
    compiled: set = set()
    bar = tqdm(
      paths,
      desc=label,
      unit="img",
      disable=(not progress) if progress is not None else None,
      total=min(len(paths), limit) if limit else len(paths),
    )
    for path in bar:
      if limit and done >= limit:
        break
      name = image_name(path, images)
      if name in skipped:
        continue
      try:
        image, _ = read_image(path)
      except SodecError as e:
        skipped[name] = str(e)
        continue
      if center_crop_size:
        image = center_crop(image, center_crop_size)
      want_grid = name in grid_data or len(grid_data) < grids
      padded = tuple(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE for n in image.shape[:2])
      if padded not in compiled:  # first image of this padded size: compile outside the timing
        api.decompress(model, api.compress(model, image, max_memory), max_memory=max_memory)
        compiled.add(padded)
      r = code_image(model, image, want_x_f=want_grid, max_memory=max_memory)
      stem = os.path.splitext(name)[0].replace("/", "__")
      write_atomic(os.path.join(sodec_dir, stem + ".sodec"), r["data"])
      h, w = image.shape[:2]
      row = {
        "checkpoint": label,
        "image": name,
        "height": h,
        "width": w,
        "bytes": len(r["data"]),
        "bpp": 8.0 * len(r["data"]) / (h * w),
      }
      if sized:
        row["bpp_payload"] = 8.0 * payload_bytes(r["data"]) / (h * w)
      row.update(metrics(image, r["x_hat"]))
      row.update(encode_s=r["encode_s"], decode_s=r["decode_s"])
      rows.append(row)
      ckpt_rows.append(row)
      done += 1
      if want_grid:
        g = grid_data.setdefault(name, {"original": image, "panels": []})
        tag = f"{row['bpp']:.3f} bpp, {row['psnr']:.2f} dB"
        if model.decoder == bitstream.DECODER_CODEC:
          g["panels"].append((f"{label}: x_hat = x_f (codec decoder)\n{tag}", r["x_hat"]))
        else:
          g["panels"] += [
            (f"{label}: x_f = D_a(y_hat)", r["x_f"]),
            (f"{label}: x_hat\n{tag}", r["x_hat"]),
          ]
    bar.close()
    means = {
      k: _mean(r[k] for r in ckpt_rows) for k in ["bpp"] + sized + metrics.names + TIME_COLUMNS
    }
    counts = {k: sum(1 for r in ckpt_rows if not math.isnan(r[k])) for k in metrics.names}
    summary_ckpts.append(
      {
        "label": label,
        "checkpoint": os.path.abspath(checkpoint),
        "step": model.step,
        "fingerprint": model.fingerprint.hex(),
        "decoder": bitstream.DECODER_NAMES[model.decoder],
        "images": len(ckpt_rows),
        "mean": means,
        "metric_counts": counts,
        "config": ckpt_lib.config_to_dict(model.config),
      }
    )
    log(
      f"{label}: {len(ckpt_rows)} images, "
      + ", ".join(
        f"{k} {v:.4f}" for k, v in means.items() if v is not None and k not in TIME_COLUMNS
      )
    )
    del model

  notes = list(metrics.notes)
  if any(min(r["height"], r["width"]) < MS_SSIM_MIN_SIDE for r in rows):
    notes.append(f"MS-SSIM left empty for images with a side under {MS_SSIM_MIN_SIDE} px")
  if "niqe" in metrics.names and any(math.isnan(r["niqe"]) for r in rows):
    notes.append("NIQE left empty for images smaller than one 96x96 block")
  if skipped:
    log(f"note: {len(skipped)} unreadable image(s) skipped (listed in summary.json)")
  write_csv(os.path.join(out, "results.csv"), rows, columns)
  outputs = {
    "results": "results.csv",
    "sodec_files": "sodec/<checkpoint>/",
    "rd_plots": [],
    "grids": [],
  }
  if plots and rows:
    outputs["rd_plots"] = [
      os.path.basename(p) for p in rd_plots(out, rows, label_order, metrics.names)
    ]
    for name, g in grid_data.items():
      fname = "grid_" + os.path.splitext(name)[0].replace("/", "__") + ".png"
      grid_plot(os.path.join(out, fname), name, g["original"], g["panels"])
      outputs["grids"].append(fname)
  import jax

  summary = {
    "protocol": {
      "images": os.path.abspath(images),
      "name": protocol,
      "center_crop": center_crop_size or None,
      "limit": limit or None,
      "listed": len(paths),
      "bpp": "8 * bytes of the .sodec file / (height * width of the coded image)",
    },
    "metrics": metrics.names,
    "checkpoints": summary_ckpts,
    "skipped": [{"image": k, "reason": v} for k, v in skipped.items()],
    "notes": notes,
    "outputs": outputs,
    "environment": {
      "jax": jax.__version__,
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.devices()[0].platform,
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    },
  }
  write_atomic(
    os.path.join(out, "summary.json"),
    (json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n").encode(),
  )
  log(
    f"wrote {out}/results.csv ({len(rows)} rows), summary.json, "
    f"{len(outputs['rd_plots'])} RD plots, {len(outputs['grids'])} grids"
  )
  return summary


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m sodec_jax.evaluate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--checkpoint",
    nargs="+",
    required=True,
    metavar="DIR",
    help="one or more training workdirs (or converted checkpoints)",
  )
  p.add_argument("--images", required=True, metavar="FOLDER", help="folder of images (recursive)")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
  p.add_argument(
    "--protocol",
    choices=PROTOCOLS,
    default="default",
    help="paper: centre crop 512 for every image, bpp_payload, lpips = LPIPS-AlexNet and "
    "lpips_vgg columns (see above); default: as before",
  )
  p.add_argument(
    "--center-crop",
    type=int,
    default=0,
    metavar="N",
    help="code the central NxN crop (--protocol paper: 512 for every dataset); 0 = full images",
  )
  p.add_argument("--limit", type=int, default=0, metavar="N", help="at most N images (0 = all)")
  p.add_argument(
    "--vgg-weights",
    default="",
    metavar="PATH",
    help="torchvision VGG16 weights (.pth/.safetensors) for LPIPS and DISTS",
  )
  p.add_argument(
    "--alexnet-weights",
    default="",
    metavar="PATH",
    help="torchvision AlexNet weights (.pth/.safetensors) for LPIPS-AlexNet",
  )
  p.add_argument(
    "--dists-weights",
    default="",
    metavar="PATH",
    help="DISTS alpha/beta (the dists-pytorch wheel's weights.pt, or .npz/.safetensors)",
  )
  p.add_argument(
    "--niqe-params",
    default="",
    metavar="PATH",
    help="NIQE pristine model: the MATLAB niqe_release's modelparameters.mat or "
    "BasicSR's niqe_pris_params.npz",
  )
  p.add_argument(
    "--clip-iqa",
    default="",
    metavar="DIR",
    help="a `convert/from_torch.py clip-iqa` folder (from a transformers CLIP checkpoint)",
  )
  p.add_argument(
    "--grids", type=int, default=3, metavar="N", help="side-by-side grids for the first N images"
  )
  p.add_argument(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="encode and decode within SIZE (KiB/MiB/GiB): banded encoding and tiled decoding as "
    "`sodec compress/decompress --max-memory`",
  )
  p.add_argument("--no-plots", action="store_true", help="write results.csv and summary.json only")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.center_crop < 0 or args.limit < 0 or args.grids < 0:
    print(
      "sodec_jax.evaluate: error: --center-crop, --limit and --grids must be >= 0", file=sys.stderr
    )
    return 1
  try:
    evaluate(
      args.checkpoint,
      args.images,
      args.out,
      center_crop_size=args.center_crop,
      limit=args.limit,
      protocol=args.protocol,
      alexnet_weights=args.alexnet_weights,
      vgg_weights=args.vgg_weights,
      dists_weights=args.dists_weights,
      niqe_params=args.niqe_params,
      clip_iqa=args.clip_iqa,
      grids=args.grids,
      plots=not args.no_plots,
      progress=False if args.no_progress else None,
      max_memory=args.max_memory,
    )
  except SodecError as e:
    print(f"sodec_jax.evaluate: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

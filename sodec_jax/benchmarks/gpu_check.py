"""The prepared GPU check: `python -m sodec_jax.bench --what gpu-check --json OUT.json`.

One command that answers, on one accelerator and with random weights (no downloads), whether
this build is fit for the GPU: decode and encode latency, the training step's speed and MFU,
memory, fused attention and cross-machine decoding. On a GPU/TPU it runs the paper-size model
(configs/stage3.py's shapes: HiFiC codec C=220, SD 2.1 UNet and VAE, ViT-L/16 F) on 512x512
photo crops; on the CPU the same program runs at the tiny default's widths on 64x64 crops, so
CI exercises every line of it (`--size` overrides the image side).

Sections, each written to the JSON as soon as it is measured (a failing section records its
error and the command exits 1 after the others ran):
  device      backend, device kind and count, the peak bf16 TFLOP/s used for MFU (known kinds)
  decode      per precision (bf16, fp32): ms per component (D_a, F + F_p, H_s + T_s, the UNet at
              t = 999, x0 + D_m), the whole decoder after range decoding (one jit), the symbols ->
              uint8 program `decompress` runs, `api.decompress` end to end, compile seconds
  encode      ms of E + H_a and P (the networks), range encoding and range decoding (host)
  attention   whether the compiled bf16 decoder holds cuDNN's fused attention (custom call
              `__cudnn$fmha`), and how many attention calls it has
  cross       a file encoded on the CPU (float32, the same weights copied to the host) decoded on
              the accelerator: same fingerprint, the range-decoded symbols equal to those the CPU
              coded, and the accelerator's own encoding of the same image range-decodes too
  train       the stage-3 training step (batch 2 at the check's size, bf16 on GPU/TPU): compile
              s, step ms, images/s, FLOPs (XLA's count), MFU, compiled memory
  memory      the device's peak bytes in use (`memory_stats()`), where the backend reports it

The table printed at the end is the README's / docs/PERFORMANCE.md's record of a run.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np

from sodec_jax.errors import SodecError

#: Peak dense bf16 TFLOP/s by device kind (vendor data sheets; SXM parts), for MFU.
PEAK_BF16_TFLOPS = {
  "H200": 989.4,
  "H100": 989.4,
  "A100": 312.0,
  "L40S": 362.1,
  "RTX A6000": 154.8,
  "A6000": 154.8,
  "TPU v5p": 459.0,
  "TPU v5 lite": 197.0,
  "TPU v4": 275.0,
}


def peak_tflops(device_kind: str) -> float | None:
  """The table's entry whose name occurs in jax's device_kind (e.g. 'NVIDIA H200'), else None."""
  for name, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in device_kind.lower():
      return tflops
  return None


def _median_ms(fn, repeats: int) -> dict:
  """codec.measure of `fn` with its jax outputs waited for: median ms and the first call's s."""
  import jax

  from sodec_jax.benchmarks.codec import measure

  m = measure(lambda: jax.block_until_ready(fn()), repeats, warmup=1)
  return {"ms": m["median_ms"], "first_s": m["first_call_ms"] / 1e3}


def check_config(paper_size: bool):
  """The stage-3 config the check runs: paper-size (configs/stage3.py), or the tiny default's
  stage 3. LPIPS off (k_P = 0: its VGG weights are a file)."""
  if paper_size:
    from configs import stage3

    config = stage3.get_config()
  else:
    from configs import tiny
    from sodec_jax.train.pipeline import stage_config

    config = stage_config(tiny.get_config(), "stage3")
  config.loss.k_P = 0.0
  config.data.batch_size = 2
  config.diffusion.weights = config.guidance.extractor_weights = ""
  return config


SECTIONS = ("decode_bf16", "attention", "encode", "train", "cross", "decode_fp32", "memory")


def run_gpu_check(
  json_path: str = "",
  size: int = 0,
  repeats: int = 5,
  log=print,
  paper_size: bool | None = None,
  sections=SECTIONS,
) -> dict:
  """Runs the `sections` (module docstring; attention, encode and cross need decode_bf16);
  returns the report and writes it to `json_path`. `paper_size`: the paper-size model (None: on
  an accelerator) or the tiny widths."""
  import jax

  backend = jax.default_backend()
  accelerator = backend != "cpu"
  paper_size = accelerator if paper_size is None else paper_size
  size = size or (512 if paper_size else 64)
  report: dict = {"size": size, "paper_size": paper_size, "errors": {}}

  def save():
    if json_path:
      tmp = json_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=float)
      os.replace(tmp, json_path)

  def section(name, fn):
    if name not in sections and name != "build":
      return
    t = time.perf_counter()
    try:
      report[name] = fn()
    except Exception as e:  # pylint: disable=broad-except  # recorded, reported, exit 1
      report["errors"][name] = f"{type(e).__name__}: {e}"
      log(f"gpu-check: section {name} failed:\n{traceback.format_exc()}")
    report.setdefault("section_s", {})[name] = time.perf_counter() - t
    save()

  dev = jax.devices()[0]
  report["device"] = {
    "backend": backend,
    "kind": dev.device_kind,
    "count": jax.device_count(),
    "jax": jax.__version__,
    "peak_bf16_tflops": peak_tflops(dev.device_kind) if accelerator else None,
  }
  save()
  config = check_config(paper_size)
  state = {}

  def build():
    from sodec_jax.benchmarks.codec import random_model, test_images

    t = time.perf_counter()
    state["model"] = random_model(config)
    state["images"] = test_images(size, 2)
    return {"build_s": time.perf_counter() - t}

  section("build", build)
  if "model" not in state:
    return report
  # the most telling first: a run cut short by a time limit keeps what it measured
  section("decode_bf16", lambda: _decode(config, state, "bf16", repeats))
  section("attention", lambda: _attention(state))
  section("encode", lambda: _encode(state, repeats))
  section("train", lambda: _train(config, state, report["device"]["peak_bf16_tflops"], repeats))
  section("cross", lambda: _cross(config, state))
  section("decode_fp32", lambda: _decode(config, state, "fp32", repeats))
  section("memory", lambda: _memory_stats(dev))
  print_table(report, log)
  return report


def _decode(config, state, precision: str, repeats: int) -> dict:
  from sodec_jax import api
  from sodec_jax.benchmarks.codec import decode_stages

  loaded = api.prepare(config, state["model"], dtype=precision)
  state[f"loaded_{precision}"] = loaded
  image = state["images"][0]
  data = api.compress(loaded, image)
  state.setdefault("data", data)
  out = {"bytes": len(data), "precision": loaded.precision}
  for stage in decode_stages(loaded, data):
    if stage.name in ("range decode", "total"):
      continue
    out[stage.name] = _median_ms(stage.jax, repeats)
  sym = api.decode_symbols(loaded, data)
  h, w = image.shape[:2]
  out["symbols -> uint8 (one jit)"] = _median_ms(
    lambda: loaded._decode_image(sym[1], sym[2], h, w), repeats
  )
  out["api.decompress"] = _median_ms(lambda: api.decompress(loaded, data), repeats)
  x = api.decompress(loaded, data).astype(np.float64)
  out["psnr_vs_input_db"] = float(10 * np.log10(255.0**2 / max(np.mean((x - image) ** 2), 1e-10)))
  state[f"image_{precision}"] = x
  if "image_fp32" in state and "image_bf16" in state:
    diff = state["image_bf16"] - state["image_fp32"]
    out["bf16_vs_fp32_max_abs_uint8"] = float(np.abs(diff).max())
    out["bf16_vs_fp32_psnr_db"] = float(10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-10)))
  return out


def _attention(state) -> dict:
  """Whether XLA's compiled bf16 decoder holds cuDNN's fused attention."""
  import jax.numpy as jnp

  from sodec_jax import api

  loaded = state["loaded_bf16"]
  sym = api.decode_symbols(loaded, state["data"])
  y_hat = jnp.asarray(sym[1])  # the symbols stand in for y_hat: only the program matters here
  text = loaded._lower_synthesis(y_hat, jnp.asarray(sym[2])).compile().as_text()
  return {
    "cudnn_fused_attention_calls": text.count("__cudnn$fmha"),
    "custom_calls": text.count("custom-call"),
    "dot_general_ops": text.count(" dot("),
  }


def _encode(state, repeats: int) -> dict:
  import jax.numpy as jnp

  from sodec_jax import api

  loaded = state["loaded_bf16"]
  image = state["images"][0]
  x = jnp.asarray(api.pad_image(loaded, image))
  lat = api.encode_latents(loaded, image)
  z_hat = jnp.asarray(lat.z_hat)
  h, w = image.shape[:2]
  data = api.pack(loaded, lat, h, w)
  return {
    "E + H_a": _median_ms(lambda: api.analysis(loaded, x), repeats),
    "P": _median_ms(lambda: api.prior(loaded, z_hat), repeats),
    "range encode (host)": _median_ms(lambda: api.pack(loaded, lat, h, w), repeats),
    "range decode (host)": _median_ms(lambda: api.decode_symbols(loaded, data), repeats),
    "api.compress": _median_ms(lambda: api.compress(loaded, image), repeats),
    "bpp": 8 * len(data) / (h * w),
  }


def _cross(config, state) -> dict:
  """Encode on the CPU, decode on the default device (and the reverse for the symbols)."""
  import jax
  from flax import nnx

  from sodec_jax import api

  cpu = jax.devices("cpu")[0]
  graphdef, params = nnx.split(state["model"])
  cpu_model = nnx.merge(graphdef, jax.device_put(params, cpu))
  on_cpu = api.prepare(config, cpu_model, winograd=False, dtype="fp32")
  accel = state["loaded_bf16"]
  image = state["images"][1]
  h, w = image.shape[:2]
  with jax.default_device(cpu):
    lat_cpu = api.encode_latents(on_cpu, image)
  data_cpu = api.pack(on_cpu, lat_cpu, h, w)
  out = {"same_fingerprint": on_cpu.fingerprint == accel.fingerprint}
  _, y_sym, z_hat = api.decode_symbols(accel, data_cpu)
  out["cpu_file_symbols_equal"] = bool(
    np.array_equal(y_sym, lat_cpu.y_symbols) and np.array_equal(z_hat, lat_cpu.z_hat)
  )
  x = api.decompress(accel, data_cpu).astype(np.float64)
  out["cpu_file_decoded_psnr_db"] = float(
    10 * np.log10(255.0**2 / max(np.mean((x - image) ** 2), 1e-10))
  )
  lat_acc = api.encode_latents(accel, image)
  out["accelerator_vs_cpu_y_symbols_differing"] = int(
    np.sum(lat_acc.y_symbols != lat_cpu.y_symbols)
  )
  out["accelerator_vs_cpu_z_symbols_differing"] = int(np.sum(lat_acc.z_hat != lat_cpu.z_hat))
  data_acc = api.pack(accel, lat_acc, h, w)
  _, y2, _ = api.decode_symbols(on_cpu, data_acc)  # range decoding: host integers only
  out["accelerator_file_symbols_equal_on_cpu"] = bool(np.array_equal(y2, lat_acc.y_symbols))
  out["ok"] = bool(
    out["same_fingerprint"]
    and out["cpu_file_symbols_equal"]
    and out["accelerator_file_symbols_equal_on_cpu"]
  )
  return out


def _train(config, state, peak, repeats: int) -> dict:
  from sodec_jax.benchmarks import train as train_benchmark

  images = state["images"]
  batch = np.stack([images[k % len(images)] for k in range(int(config.data.batch_size))])
  config = config.copy_and_resolve_references()
  config.data.crop_size = batch.shape[1]
  (r,) = train_benchmark.bench_train(
    config,
    device_counts=[1],
    repeats=repeats,
    warmup=1,
    peak_tflops=peak or 0.0,
    model=state["model"],  # the check's model: bench_train splits and copies, never mutates it
    batch=batch,
  )
  r["precision"] = config.get("precision", "auto")
  return r


def _memory_stats(dev) -> dict:
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if not stats:
    return {"peak_bytes_in_use": None}
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def print_table(report: dict, log=print) -> None:
  d = report.get("device", {})
  log(
    f"\ngpu-check: {d.get('kind')} ({d.get('backend')}, jax {d.get('jax')}), "
    f"{report['size']}x{report['size']}, random weights"
  )
  rows = []
  for p in ("bf16", "fp32"):
    for name, v in report.get(f"decode_{p}", {}).items():
      if isinstance(v, dict):
        rows.append((f"decode {p}: {name}", f"{v['ms']:.2f} ms", f"first {v['first_s']:.1f} s"))
  for name, v in report.get("encode", {}).items():
    if isinstance(v, dict):
      rows.append((f"encode: {name}", f"{v['ms']:.2f} ms", f"first {v['first_s']:.1f} s"))
  t = report.get("train") or {}
  if t:
    mfu = f"MFU {100 * t['mfu']:.1f}%" if t.get("mfu") else "MFU n/a"
    rows.append(("train: stage-3 step, batch 2", f"{1e3 * t['step_s']:.1f} ms", mfu))
  a = report.get("attention") or {}
  if a:
    rows.append(
      ("cuDNN fused attention calls (bf16 decoder)", str(a["cudnn_fused_attention_calls"]), "")
    )
  c = report.get("cross") or {}
  if c:
    rows.append(("CPU-encoded file decodes here (symbols equal)", str(c.get("ok")), ""))
  m = report.get("memory") or {}
  if m.get("peak_bytes_in_use"):
    rows.append(("peak device memory", f"{m['peak_bytes_in_use'] / 2**30:.2f} GiB", ""))
  width = max((len(r[0]) for r in rows), default=10)
  for r in rows:
    log(f"{r[0]:<{width}}  {r[1]:>12}  {r[2]}")
  if report["errors"]:
    log(f"failed sections: {', '.join(report['errors'])}")


def main_check(args) -> int:
  """`bench --what gpu-check`: exit status 1 when a section failed or the cross check did not
  hold."""
  sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise SodecError(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
  report = run_gpu_check(args.json, args.size or 0, args.repeats, sections=sections)
  ok = not report["errors"] and report.get("cross", {"ok": True}).get("ok", False)
  return 0 if ok else 1

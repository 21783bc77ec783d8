"""Codec encode/decode latency: `python -m sodec_jax.bench --what codec [options]`.

(Over 450 lines: every stage of encode and decode is timed beside its PyTorch twin in one
report, with the parity check of the two decodes; the twins themselves are torch_reference.py
(the codec) and sodec_torch.py (the one-step diffusion decoder).)

  --checkpoint DIR   a training workdir (default: the paper-size codec, configs/base.py, with
                     random weights: the neural timings are the same, the range-coding ones are
                     not representative because random latents code differently)
  --size 512         side of the square test image (centre crops of the photos bundled with
                     scikit-image, reflect-padded when smaller)
  --dtype float32|bfloat16|all   precision of the reconstruction path (api.load_model(dtype=):
                     D_a and the diffusion decoder; E, H_a and P stay float32)
  --config FILE      without --checkpoint: random weights of this experiment config instead of
                     configs/base.py (e.g. configs/stage2.py: the paper-size diffusion decoder,
                     SD 2.1 UNet / VAE shapes and a ViT-L/16 F, all random)
  --reference torch  also run the same weights through the PyTorch twin in this process: the
                     HiFiC-layout codec (`sodec_jax.benchmarks.torch_reference`) and, for a
                     diffusion model, the whole SODEC decoder (`sodec_torch`: diffusers UNet and
                     VAE, transformers ViT, torch H_s / T_s / F_p); as many torch threads as
                     JAX's CPU client uses; JAX/PyTorch per stage. The parity line decodes the
                     same .sodec file on both sides and fails (SodecError, exit status 1) when
                     the images differ by more than PARITY_TOLERANCE uint8 levels
  --repeats N --warmup N

Per stage, the time is the median over --repeats calls after --warmup calls, with the min-max
spread; the first call (compilation + one run) is reported apart. With the reference, JAX and
torch calls alternate (a, b, a, b, ...) so both see the same background load. The stages are a
list of named steps (`encode_stages` / `decode_stages`, the public steps of `sodec_jax.api`):
the one-step diffusion decoder adds its own (extractor F, projection F_p, H_s/T_s, UNet, D_m)
after D_a there. "exact indexes" is the host integer network that picks each y symbol's model
(codec/integer_prior.py), timed apart from the range coding it feeds. "total" is the public API call
(`sodec_jax.api.compress` / `decompress`) end to end, host glue included. Throughput runs whole
batches (1 and 8 images) through `api.compress_batch` / `decompress_batch`: the neural pieces
batched in one jitted call, range coding per image.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

BATCH_SIZES = (1, 8)
# Parity of the two decodes of one .sodec file (max |x_jax - x_torch|, uint8 levels): float32
# differs by rounding only (1 level where a value sits on a rounding boundary); bfloat16 keeps
# 8 mantissa bits on both sides, in different orders of operations.
PARITY_TOLERANCE = {"float32": 2, "bfloat16": 48}


@dataclasses.dataclass
class Stage:
  """One named step of the coding path; `jax` and `torch` run it once (blocking)."""

  name: str
  side: str  # "encode" | "decode"
  jax: Callable[[], Any]
  torch: Optional[Callable[[], Any]] = None
  shared: bool = False  # the same host code on both sides (range coding)


def measure(fn: Callable[[], Any], repeats: int, warmup: int) -> dict:
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  for _ in range(max(warmup - 1, 0)):
    fn()
  times = []
  for _ in range(max(repeats, 1)):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {
    "median_ms": 1e3 * statistics.median(times),
    "min_ms": 1e3 * min(times),
    "max_ms": 1e3 * max(times),
    "first_call_ms": 1e3 * first,
    "repeats": len(times),
  }


def measure_pair(
  fa: Callable[[], Any], fb: Callable[[], Any], repeats: int, warmup: int
) -> tuple[dict, dict]:
  """`measure` for two functions with their calls interleaved (a, b, a, b, ...), so that on a
  shared machine both see the same background load."""

  def run(fn, out):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)

  firsts, ta, tb = [], [], []
  run(fa, firsts)
  run(fb, firsts)
  for _ in range(max(warmup - 1, 0)):
    fa()
    fb()
  for _ in range(max(repeats, 1)):
    run(fa, ta)
    run(fb, tb)

  def stats(times, first):
    return {
      "median_ms": 1e3 * statistics.median(times),
      "min_ms": 1e3 * min(times),
      "max_ms": 1e3 * max(times),
      "first_call_ms": 1e3 * first,
      "repeats": len(times),
    }

  return stats(ta, firsts[0]), stats(tb, firsts[1])


def cpu_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- inputs and model


def test_images(size: int, n: int) -> list[np.ndarray]:
  """n different size x size uint8 photos (centre crops of scikit-image's bundled photos)."""
  from sodec_jax import data
  from sodec_jax.images import read_image

  out = []
  paths = data.skimage_photos()
  for k in range(n):
    img, _ = read_image(paths[k % len(paths)])
    img = data.pad_to(img, size)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    out.append(np.ascontiguousarray(img[top : top + size, left : left + size]))
  return out


# transformers' google/vit-large-patch16-224-in21k: the paper's F (random weights here).
VIT_LARGE = dict(
  hidden_size=1024,
  num_hidden_layers=24,
  num_attention_heads=16,
  intermediate_size=4096,
  image_size=(224, 224),
  patch_size=(16, 16),
)


def random_model(config):
  """`config`'s SODEC with random weights and no files: for a diffusion config the UNet and VAE
  at their configured shapes (random init) and, with fidelity guidance, a random ViT (the tiny
  one for extractor_config='tiny', else ViT-L/16 at 224, the paper's F)."""
  import jax.numpy as jnp
  from flax import nnx

  from sodec_jax.errors import SodecError
  from sodec_jax.model import SODEC
  from sodec_jax.precision import apply_precision
  from sodec_jax.pretrained import (
    build_model,
    build_unet,
    build_vae,
    random_tiny_extractor,
    randomize_extractor,
  )

  if config.get("decoder", "codec") != "diffusion":
    return build_model(config, nnx.Rngs(0))
  d, g = config.diffusion, config.guidance
  config = config.copy_and_resolve_references()
  config.diffusion.weights = config.guidance.extractor_weights = ""
  rngs = nnx.Rngs(0)
  parts = dict(
    unet=build_unet(config.diffusion, rngs, False), vae=build_vae(config.diffusion, rngs, False)
  )
  dtype = jnp.dtype(d.dtype)
  if g.mode == "fidelity" and g.extractor_config == "tiny":
    parts["extractor"] = random_tiny_extractor(g.extractor, dtype, config.seed)
  elif g.mode == "fidelity":
    from sodec_jax.guidance.vit import ViT, ViTSpec

    if g.extractor != "vit":
      raise SodecError(f"random weights are built for the ViT extractor only, not {g.extractor!r}")
    parts["extractor"] = randomize_extractor(ViT(ViTSpec(**VIT_LARGE), dtype=dtype), config.seed)
  model = SODEC(config, rngs=rngs, **parts)
  apply_precision(model, config.get("precision", "auto"))  # as pretrained.build_model does
  return model


def load_for_bench(checkpoint: str, dtype: str, config_path: str = "", winograd=None):
  """LoadedModel from `checkpoint` (or random weights of the experiment config at
  `config_path`, default configs/base.py: the paper-size codec), its reconstruction path
  computing in `dtype` (a precision: sodec_jax/precision.py)."""
  from sodec_jax import api

  if checkpoint:
    return api.load_model(checkpoint, winograd=winograd, dtype=dtype)
  else:
    if config_path:
      from sodec_jax.errors import SodecError
      from sodec_jax.train.cli import UsageError, load_config_file

      try:
        config = load_config_file(config_path)
      except UsageError as e:
        raise SodecError(str(e)) from None
    else:
      from configs import base

      config = base.get_config()
    return api.prepare(config, random_model(config), winograd=winograd, dtype=dtype)


# ----------------------------------------------------------------------------- stages


def _block(out):
  import jax

  return jax.block_until_ready(out)


def encode_stages(loaded, image: np.ndarray, ref=None) -> list[Stage]:
  import jax.numpy as jnp

  from sodec_jax import api

  x = jnp.asarray(api.pad_image(loaded, image))  # device arrays: the stages time the networks alone
  lat = api.encode_latents(loaded, image)
  z_hat = jnp.asarray(lat.z_hat)
  h, w = image.shape[:2]

  def indexes():  # the exact scale indexes (host integer network, codec/integer_prior.py)
    return loaded.indexer(lat.z_hat)

  def range_encode():  # range coding alone (the indexes given)
    return api.pack(loaded, lat, h, w)

  t = {}
  if ref is not None:
    import torch

    from sodec_jax.benchmarks import torch_reference as tr

    dtype = next(ref.parameters()).dtype
    xt = tr._nchw(np.asarray(x), dtype)
    zt = tr._nchw(lat.z_hat, dtype)

    def no_grad(f):
      def g():
        with torch.inference_mode():
          return f()

      return g

    t = {
      "E + H_a": no_grad(lambda: ref.analysis(xt)),
      "P": no_grad(lambda: ref.prior(zt)),
      "total": lambda: tr.compress(ref, loaded, image),
    }
  return [
    Stage("E + H_a", "encode", lambda: _block(api.analysis(loaded, x)), t.get("E + H_a")),
    Stage("P", "encode", lambda: _block(api.prior(loaded, z_hat)), t.get("P")),
    Stage("exact indexes", "encode", indexes, indexes if ref is not None else None, shared=True),
    Stage(
      "range encode", "encode", range_encode, range_encode if ref is not None else None, shared=True
    ),
    Stage("total", "encode", lambda: api.compress(loaded, image), t.get("total")),
  ]


def decode_stages(loaded, data: bytes, ref=None, winograd=None) -> list[Stage]:
  import jax.numpy as jnp

  from sodec_jax import api
  from sodec_jax.codec import bitstream

  _, y_hat_np, z_hat_np = api.decode_latents(loaded, data)
  z_hat, y_hat = jnp.asarray(z_hat_np), jnp.asarray(y_hat_np)
  mu_sigma = tuple(np.asarray(a) for a in api.prior(loaded, z_hat))
  given_indexes = loaded.indexer(z_hat_np)
  given = dataclasses.replace(loaded, indexer=lambda _: given_indexes)

  def indexes():  # the exact scale indexes (host integer network, codec/integer_prior.py)
    return loaded.indexer(z_hat_np)

  def range_decode():  # the container and both streams; P's output and the indexes given (each
    return api.decode_latents(given, data, lambda _: mu_sigma)  # is timed apart)

  t = {}
  if ref is not None:
    from sodec_jax.benchmarks import torch_reference as tr

    codec = codec_of(ref)
    dtype = next(ref.parameters()).dtype
    zt, yt = tr._nchw(z_hat_np, dtype), tr._nchw(y_hat_np, dtype)
    t = {
      "P": _no_grad(lambda: codec.prior(zt)),
      "D_a": _no_grad(lambda: codec.synthesis(yt)),
      "total": lambda: torch_decompress(ref, loaded, data),
    }
  stages = [
    Stage("exact indexes", "decode", indexes, indexes if ref is not None else None, shared=True),
    Stage(
      "range decode", "decode", range_decode, range_decode if ref is not None else None, shared=True
    ),
    Stage("P", "decode", lambda: _block(api.prior(loaded, z_hat)), t.get("P")),
    Stage("D_a", "decode", lambda: _block(api.fidelity(loaded, y_hat)), t.get("D_a")),
  ]
  if loaded.decoder == bitstream.DECODER_DIFFUSION:
    stages += diffusion_stages(loaded, y_hat, z_hat, ref, winograd)
  stages.append(Stage("total", "decode", lambda: api.decompress(loaded, data), t.get("total")))
  return stages


def _no_grad(f):
  def g():
    import torch

    with torch.inference_mode():
      return f()

  return g


def codec_of(ref):
  """The HiFiC torch codec of a reference (itself, or the SODEC decoder's `codec`)."""
  return getattr(ref, "codec", ref)


def torch_decompress(ref, loaded, data: bytes) -> np.ndarray:
  """The torch twin of api.decompress for `ref` (the codec, or the whole SODEC decoder)."""
  if hasattr(ref, "codec"):
    from sodec_jax.benchmarks import sodec_torch

    return sodec_torch.decompress(ref, loaded, data)
  from sodec_jax.benchmarks import torch_reference as tr

  return tr.decompress(ref, loaded, data)


def diffusion_stages(loaded, y_hat, z_hat, ref=None, winograd=None) -> list[Stage]:
  """The one-step decoder's components, each jitted alone on the decoding model the API runs
  (api.decoding_model: the same inference kernels), fed the previous component's real output:
  F + F_p (guidance tokens from x_f), H_s + T_s (y_t), the UNet at t = 999, x0 + D_m; then the
  whole decoder after range decoding as the API runs it (one jit, D_a included). `winograd`:
  as the LoadedModel was prepared with (api.decoding_model; None: on CPU). With `ref`
  (sodec_torch.SODECDecoder) each has its torch twin, fed the same (JAX-computed) inputs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sodec_jax import api

  graphdef, state = nnx.split(api.decoding_model(loaded.model, winograd, loaded.precision))

  def jitted(fn):
    f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
    return lambda *a: f(state, *a)

  guidance = jitted(lambda m, x_f, z: m.guidance(x_f, z))
  content = jitted(lambda m, y, z: m.content_variable(y, z))

  def eps_fn(m, y_t, c_g):
    return m.unet(y_t, jnp.full((y_t.shape[0],), m.timestep, jnp.int32), c_g)

  def image_fn(m, y_t, eps):
    t = jnp.full((y_t.shape[0],), m.timestep, jnp.int32)
    return m.vae_decoder.decode(m.schedule.predict_x0(y_t, eps, t) / m.scaling_factor)

  unet, decode = jitted(eps_fn), jitted(image_fn)
  x_f = api.fidelity(loaded, y_hat)
  c_g = guidance(x_f, z_hat)
  y_t = content(y_hat, z_hat)
  eps = unet(y_t, c_g)
  t = {}
  if ref is not None:
    from sodec_jax.benchmarks.torch_reference import _nchw

    dt = next(ref.parameters()).dtype
    x_ft, y_ht, z_ht = (_nchw(np.asarray(a), dt) for a in (x_f, y_hat, z_hat))
    y_tt, epst = _nchw(np.asarray(y_t), dt), _nchw(np.asarray(eps), dt)
    import torch

    c_gt = torch.from_numpy(np.array(c_g, np.float32)).to(dt)
    t = {
      "F + F_p (guidance)": _no_grad(lambda: ref.guidance(x_ft)),
      "H_s + T_s": _no_grad(lambda: ref.content_variable(y_ht, z_ht)),
      "UNet (t=999)": _no_grad(lambda: ref.eps(y_tt, c_gt)),
      "x0 + D_m": _no_grad(lambda: ref.image(y_tt, epst)),
      "decoder (one jit)": _no_grad(lambda: ref.reconstruct(y_ht, z_ht)),
    }
  return [
    Stage(
      "F + F_p (guidance)",
      "decode",
      lambda: _block(guidance(x_f, z_hat)),
      t.get("F + F_p (guidance)"),
    ),
    Stage("H_s + T_s", "decode", lambda: _block(content(y_hat, z_hat)), t.get("H_s + T_s")),
    Stage("UNet (t=999)", "decode", lambda: _block(unet(y_t, c_g)), t.get("UNet (t=999)")),
    Stage("x0 + D_m", "decode", lambda: _block(decode(y_t, eps)), t.get("x0 + D_m")),
    Stage(
      "decoder (one jit)",
      "decode",
      lambda: _block(api.reconstruct(loaded, y_hat, z_hat)),
      t.get("decoder (one jit)"),
    ),
  ]


# ----------------------------------------------------------------------------- the benchmark


def bench_codec(
  checkpoint: str,
  size: int,
  dtype: str,
  reference: str,
  repeats: int,
  warmup: int,
  batch_sizes=BATCH_SIZES,
  log=print,
  config_path: str = "",
  winograd=None,
) -> dict:
  import jax

  from sodec_jax import api
  from sodec_jax.codec import bitstream

  loaded = load_for_bench(checkpoint, dtype, config_path, winograd)
  images = test_images(size, max(batch_sizes, default=1))
  ref = None
  threads = cpu_threads()
  if reference == "torch":
    import torch

    from sodec_jax.benchmarks import torch_reference as tr

    if loaded.decoder == bitstream.DECODER_DIFFUSION:
      from sodec_jax.benchmarks import sodec_torch

      ref = sodec_torch.build_sodec_reference(loaded, getattr(torch, dtype))
    else:
      ref = tr.build_reference(loaded, getattr(torch, dtype))
  data = api.compress(loaded, images[0])
  torch_threads = {}
  if ref is not None:
    # As many threads as JAX's CPU client uses; on a shared (loaded) machine torch's OpenMP
    # barriers can stall badly with several threads, so 1 thread is tried too and the faster
    # end-to-end decode picks the count (the reference is never handicapped).
    for n in sorted({threads, 1}, reverse=True):
      torch.set_num_threads(n)
      torch_threads[n] = measure(lambda: torch_decompress(ref, loaded, data), 1, 0)["median_ms"]
    torch.set_num_threads(min(torch_threads, key=torch_threads.get))
  codec_ref = None if ref is None else codec_of(ref)
  stages = encode_stages(loaded, images[0], codec_ref) + decode_stages(loaded, data, ref, winograd)
  cfg = loaded.config.model
  dev = jax.devices()[0]
  result: dict[str, Any] = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "size": size,
    "dtype": dtype,
    "checkpoint": checkpoint or f"random weights, {config_path or 'configs/base.py'}",
    "winograd": "auto (on for CPU)" if winograd is None else ("on" if winograd else "off"),
    "decoder": "diffusion" if loaded.decoder == bitstream.DECODER_DIFFUSION else "codec",
    "model": {
      "C": cfg.latent_channels,
      "N": cfg.hyper_channels,
      "encoder_filters": list(cfg.encoder_filters),
      "decoder_filters": list(cfg.decoder_filters),
      "residual_blocks": cfg.decoder_residual_blocks,
    },
    "bpp": 8 * len(data) / size**2,
    "cpu_threads": threads,
    "stages": [],
    "throughput": {},
  }
  if ref is not None:
    result["torch_threads"] = {
      "used": torch.get_num_threads(),
      "decode_ms_by_threads": {str(k): v for k, v in torch_threads.items()},
    }
  try:
    result["load_avg"] = list(os.getloadavg())
  except OSError:
    pass
  for st in stages:
    row = {"name": st.name, "side": st.side}
    if st.torch is None or st.shared:
      row["jax"] = measure(st.jax, repeats, warmup)
    else:
      row["jax"], row["torch"] = measure_pair(st.jax, st.torch, repeats, warmup)
    if st.torch is not None:
      row["torch"] = row["jax"] if st.shared else row["torch"]
      row["ratio"] = row["jax"]["median_ms"] / row["torch"]["median_ms"]
      row["shared"] = st.shared
    result["stages"].append(row)
    if log is print:  # progress on stderr: a long (paper-size) run shows what it has measured
      t = f", torch {row['torch']['median_ms']:.1f} ms" if "torch" in row else ""
      done = f"{st.side} {st.name}: JAX {row['jax']['median_ms']:.1f} ms{t}"
      print(f"measured {done}", file=sys.stderr, flush=True)
  if ref is not None:
    from sodec_jax.benchmarks import torch_reference as tr

    # like with like: the same .sodec file decoded by the same decoder on both sides
    diff = np.abs(api.decompress(loaded, data).astype(int) - torch_decompress(ref, loaded, data))
    result["parity"] = {
      "same_bytes": tr.compress(codec_ref, loaded, images[0]) == data,
      "decoder": result["decoder"],
      "max_abs_uint8_diff": int(diff.max()),
      "mean_abs_uint8_diff": float(diff.mean()),
      "tolerance": PARITY_TOLERANCE[dtype],
    }
  for b in batch_sizes:
    batch = images[:b]
    enc = measure(lambda: api.compress_batch(loaded, batch), repeats, warmup)
    files = api.compress_batch(loaded, batch)
    dec = measure(lambda: api.decompress_batch(loaded, files), repeats, warmup)
    result["throughput"][b] = {
      "encode_img_s": 1e3 * b / enc["median_ms"],
      "decode_img_s": 1e3 * b / dec["median_ms"],
      "encode": enc,
      "decode": dec,
    }
  print_report(result, log)
  p = result.get("parity")
  if p and p["max_abs_uint8_diff"] > p["tolerance"]:
    from sodec_jax.errors import SodecError

    raise SodecError(
      f"parity failed: the JAX and PyTorch {p['decoder']} decoders decode the same .sodec file "
      f"{p['max_abs_uint8_diff']} uint8 levels apart (tolerance {p['tolerance']}, {dtype}); "
      "the torch reference no longer computes what the model does"
    )
  return result


def _fmt(m: dict) -> str:
  return f"{m['median_ms']:9.2f} [{m['min_ms']:.2f}-{m['max_ms']:.2f}]"


def print_report(r: dict, log=print) -> None:
  m = r["model"]
  log(
    f"codec {r['size']}x{r['size']}, {r['dtype']}, {r['device']}, jax {r['jax']}, "
    f"C={m['C']} N={m['N']} ({r['checkpoint']}), {r['decoder']} decoder, "
    f"winograd {r['winograd']}, {r['bpp']:.3f} bpp; "
    f"{r['cpu_threads']} CPU threads"
    + (f", load avg {r['load_avg'][0]:.1f}" if "load_avg" in r else "")
  )
  has_t = any("torch" in s for s in r["stages"])
  head = f"{'side':6} {'stage':18} {'JAX ms median [min-max]':>28} {'first call ms':>14}"
  if has_t:
    head += f" {'torch ms median [min-max]':>28} {'JAX/torch':>9}"
  log(head)
  for s in r["stages"]:
    line = f"{s['side']:6} {s['name']:18} {_fmt(s['jax']):>28} {s['jax']['first_call_ms']:14.1f}"
    if "torch" in s:
      t = "(same host code)" if s["shared"] else _fmt(s["torch"])
      line += f" {t:>28} {s['ratio']:9.2f}"
    log(line)
  for b, t in r["throughput"].items():
    log(
      f"batch {b}: encode {t['encode_img_s']:.2f} img/s, decode {t['decode_img_s']:.2f} img/s "
      f"(first call incl. compile: {t['encode']['first_call_ms']:.0f} / {t['decode']['first_call_ms']:.0f} ms)"
    )
  if "torch_threads" in r:
    t = r["torch_threads"]
    log(
      f"torch threads: {t['used']} (decode ms by thread count: "
      + ", ".join(f"{k}: {v:.1f}" for k, v in t["decode_ms_by_threads"].items())
      + ")"
    )
  if "parity" in r:
    p = r["parity"]
    log(
      f"torch vs JAX: same .sodec bytes from E + H_a + P: {p['same_bytes']}; that file decoded "
      f"by the {p['decoder']} decoder on both sides: max |x_jax - x_torch| = "
      f"{p['max_abs_uint8_diff']} (mean {p['mean_abs_uint8_diff']:.4f}) uint8 levels, "
      f"tolerance {p['tolerance']}"
    )


def run_codec(args) -> dict:
  """Entry point for `python -m sodec_jax.bench --what codec`."""
  dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
  out = {}
  for dtype in dtypes:
    out[dtype] = bench_codec(
      args.checkpoint,
      args.size,
      dtype,
      args.reference,
      args.repeats,
      args.warmup,
      batch_sizes=BATCH_SIZES if args.batches else (),
      config_path="" if args.checkpoint else (args.config or ""),
      winograd={"on": True, "off": False}.get(getattr(args, "winograd", "auto")),
    )
  return out

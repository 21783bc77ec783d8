"""SD 2.1 UNet / VAE-decoder latency: `python -m sodec_jax.bench --what unet|vae [--reference torch]`.

The whole call is one `jax.jit` of the split module (parameters are arguments, not constants).
Reported per dtype: milliseconds per call (median of --repeats after --warmup calls), compile
seconds, parameter count, XLA's memory for one call (arguments + temporaries + outputs, from the
compiled executable), the process's peak RSS, and with --reference torch the diffusers model on the
same weights in the same process (same thread count), timed interleaved with the JAX calls (one
JAX call, one PyTorch call, ...) so that load from other processes affects both alike, and the
ratio of the medians JAX / PyTorch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

import numpy as np

from sodec_jax.errors import SodecError


def add_arguments(parser) -> None:
  """Options of the unet/vae benchmarks (the common ones are declared by sodec_jax.bench)."""
  g = parser.add_argument_group("unet / vae benchmark")
  g.add_argument("--sd-batch", type=int, default=1, help="batch size of the UNet / VAE call")
  g.add_argument("--context-length", type=int, default=77, help="UNet text tokens (x 1024)")
  g.add_argument(
    "--query-chunk",
    type=int,
    default=-1,
    help="attention query chunk (-1: backend default, 0: whole sequence)",
  )
  g.add_argument("--timestep", type=int, default=999, help="UNet timestep")
  g.add_argument(
    "--winograd",
    choices=["auto", "on", "off"],
    default="auto",
    help="3x3 convs (float32, >= 192 channels) as Winograd F(4x4, 3x3), as the "
    "decoder runs them (auto: on the CPU backend; sodec_jax.layers.use_winograd)",
  )


def _dtypes(name: str) -> list[str]:
  if name == "all":
    return ["float32", "bfloat16"]
  if name not in ("float32", "bfloat16"):
    raise SodecError(f"--dtype must be float32, bfloat16 or all, not {name!r}")
  return [name]


def _seconds(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load_config(path: str):
  if not path:
    return None
  with open(path) as f:
    return json.load(f)


def _query_chunk(args):
  return None if getattr(args, "query_chunk", -1) < 0 else args.query_chunk


def _torch_weights(torch_model) -> dict:
  return {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}


def _bench(name, args, build_ours, build_theirs, make_inputs, call_ours, call_theirs):
  """Shared driver: for each dtype build both models on the same weights, compile, time, compare."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sodec_jax.diffusion.unet import count_params
  from sodec_jax.weights.diffusers import abstract_module, load_state_dict_into

  use_torch = getattr(args, "reference", "") == "torch"
  rows = []
  for dtype_name in _dtypes(args.dtype):
    dtype = jnp.dtype(dtype_name)
    row = {"model": name, "dtype": dtype_name, "size": args.size, "batch": args.sd_batch}
    theirs = None
    if use_torch:
      import torch

      torch.manual_seed(0)
      theirs = build_theirs().eval()
      model = load_state_dict_into(
        abstract_module(lambda: build_ours(dtype)), _torch_weights(theirs)
      )
      if dtype_name == "bfloat16":
        theirs = theirs.to(torch.bfloat16)
    else:
      model = nnx.jit(lambda: build_ours(dtype))()
    row["params"] = count_params(model)
    winograd = getattr(args, "winograd", "auto")
    if winograd == "on" or (winograd == "auto" and jax.default_backend() == "cpu"):
      from sodec_jax.layers import use_winograd

      row["winograd_convs"] = use_winograd(model)
    inputs = make_inputs(np.random.default_rng(0))
    graphdef, state = nnx.split(model)
    del model
    fn = jax.jit(lambda st, *a: call_ours(nnx.merge(graphdef, st), *a))
    jax_inputs = [jnp.asarray(a) for a in inputs]
    t = time.perf_counter()
    compiled = fn.lower(state, *jax_inputs).compile()
    row["compile_s"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    if mem is not None:
      row["xla_memory_mb"] = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      ) / 2**20
    run_jax = lambda: compiled(state, *jax_inputs).block_until_ready()
    out = run_jax()
    for _ in range(args.warmup):
      run_jax()
    row["peak_rss_mb_jax"] = _peak_rss_mb()
    row["threads_jax"] = os.cpu_count() if jax.default_backend() == "cpu" else None
    jax_times, torch_times = [], []
    if theirs is None:
      jax_times = [_seconds(run_jax) for _ in range(max(args.repeats, 1))]
    else:
      import torch

      tdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
      t_inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
      with torch.inference_mode():
        run_torch = lambda: call_theirs(theirs, tdtype, *t_inputs)
        ref = run_torch()
        for _ in range(args.warmup):
          run_torch()
        for _ in range(max(args.repeats, 1)):  # interleaved: a load change hits both alike
          jax_times.append(_seconds(run_jax))
          torch_times.append(_seconds(run_torch))
      row["torch_ms"] = 1e3 * statistics.median(torch_times)
      row["threads_torch"] = torch.get_num_threads()
      a = np.asarray(out, np.float64)
      b = ref.float().numpy().astype(np.float64)
      row["rel_err_vs_torch"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
      del theirs
    row["jax_ms"] = 1e3 * statistics.median(jax_times)
    if torch_times:
      row["ratio_jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
    row["peak_rss_mb"] = _peak_rss_mb()
    rows.append(row)
    state = compiled = fn = run_jax = None  # free the device buffers before the next dtype
  _print_table(rows)
  return {"rows": rows, "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})"}


def _print_table(rows) -> None:
  head = (
    f"{'model':<6} {'dtype':<9} {'size':>5} {'ms/call':>9} {'compile s':>9} {'params':>12} "
    f"{'XLA MB':>8} {'RSS MB':>8} {'torch ms':>9} {'JAX/torch':>9} {'rel err':>9} {'winograd':>8}"
  )
  print(head)
  for r in rows:
    torch_ms = f"{r['torch_ms']:9.1f}" if "torch_ms" in r else f"{'-':>9}"
    ratio = f"{r['ratio_jax_over_torch']:9.2f}" if "torch_ms" in r else f"{'-':>9}"
    err = f"{r['rel_err_vs_torch']:9.1e}" if "rel_err_vs_torch" in r else f"{'-':>9}"
    print(
      f"{r['model']:<6} {r['dtype']:<9} {r['size']:>5} {r['jax_ms']:9.1f} {r['compile_s']:9.1f} "
      f"{r['params']:>12,} {r.get('xla_memory_mb', float('nan')):8.0f} "
      f"{r['peak_rss_mb']:8.0f} {torch_ms} {ratio} {err} {r.get('winograd_convs', 0):8d}"
    )


def run_unet(args) -> dict:
  """SD 2.1 UNet (or --config) on a [B, size/8, size/8, 4] latent, 77 x 1024 context, t = 999."""
  from flax import nnx

  from sodec_jax.diffusion.unet import UNet2DConditionModel, UNetConfig, sd21_unet_config

  cfg_dict = _load_config(getattr(args, "config", ""))
  cfg = UNetConfig.from_dict(cfg_dict) if cfg_dict else sd21_unet_config()
  side = args.size // 8
  b = args.sd_batch
  ctx_dim = cfg.per_block(cfg.cross_attention_dim)[0]

  def build_ours(dtype):
    return UNet2DConditionModel(
      cfg, dtype=dtype, param_dtype=dtype, query_chunk=_query_chunk(args), rngs=nnx.Rngs(0)
    )

  def build_theirs():
    from diffusers import UNet2DConditionModel as TUNet

    return TUNet(**cfg.to_dict())

  def make_inputs(rng):
    return (
      rng.standard_normal((b, side, side, cfg.in_channels)).astype(np.float32),
      np.full((b,), args.timestep, np.int32),
      rng.standard_normal((b, args.context_length, ctx_dim)).astype(np.float32),
    )

  def call_theirs(m, tdtype, x, t, ctx):
    out = m(x.permute(0, 3, 1, 2).to(tdtype), t, ctx.to(tdtype)).sample
    return out.permute(0, 2, 3, 1)

  return _bench(
    "unet", args, build_ours, build_theirs, make_inputs, lambda m, x, t, c: m(x, t, c), call_theirs
  )


def run_vae(args) -> dict:
  """SD VAE decoder (or --config) from a [B, size/8, size/8, 4] latent to a size x size image."""
  from flax import nnx

  from sodec_jax.diffusion.autoencoder import AutoencoderKL, VAEConfig, sd21_vae_config

  cfg_dict = _load_config(getattr(args, "config", ""))
  cfg = VAEConfig.from_dict(cfg_dict) if cfg_dict else sd21_vae_config()
  factor = 2 ** (len(cfg.block_out_channels) - 1)
  side = args.size // factor

  def build_ours(dtype):
    return AutoencoderKL(
      cfg, dtype=dtype, param_dtype=dtype, query_chunk=_query_chunk(args), rngs=nnx.Rngs(0)
    )

  def build_theirs():
    from diffusers import AutoencoderKL as TVAE

    return TVAE(**cfg.to_dict())

  def make_inputs(rng):
    return (
      rng.standard_normal((args.sd_batch, side, side, cfg.latent_channels)).astype(np.float32),
    )

  def call_theirs(m, tdtype, z):
    return m.decode(z.permute(0, 3, 1, 2).to(tdtype)).sample.permute(0, 2, 3, 1)

  return _bench(
    "vae", args, build_ours, build_theirs, make_inputs, lambda m, z: m.decode(z), call_theirs
  )

"""python -m sodec_jax.bench --what codec on a real (micro) training workdir, with and without the
PyTorch reference; the reference's weights (inverse HiFiC key map) and the batched coding path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SIZE = 128  # HiFiC's hyper-analysis needs y >= 8x8 in torch (its reflect pad 2 needs a side > 2)


@pytest.fixture(scope="module")
def loaded(micro_workdir):
  from sodec_jax import api

  return api.load_model(micro_workdir)


def _bench(capsys, *args):
  from sodec_jax import bench

  capsys.readouterr()
  code = bench.main(
    ["--what", "codec", "--size", str(SIZE), "--repeats", "1", "--warmup", "1", *args]
  )
  out = capsys.readouterr().out
  assert code == 0
  return out


def test_bench_codec_without_reference(micro_workdir, capsys):
  out = _bench(capsys, "--checkpoint", micro_workdir)
  for stage in ("E + H_a", "P", "exact indexes", "range encode", "range decode", "D_a", "total"):
    assert stage in out
  assert "batch 1: encode" in out and "batch 8: encode" in out
  assert "JAX/torch" not in out and "first call" in out


def test_bench_codec_with_torch_reference(micro_workdir):
  from sodec_jax.benchmarks import codec

  lines = []
  r = codec.bench_codec(
    micro_workdir,
    SIZE,
    "float32",
    "torch",
    repeats=1,
    warmup=0,
    batch_sizes=(1, 2),
    log=lines.append,
  )
  out = "\n".join(lines)
  assert "JAX/torch" in out and "(same host code)" in out and "torch threads:" in out
  assert "same .sodec bytes" in out
  ratios = {(s["side"], s["name"]): s["ratio"] for s in r["stages"]}
  assert set(ratios) == {
    ("encode", "E + H_a"),
    ("encode", "P"),
    ("encode", "exact indexes"),
    ("encode", "range encode"),
    ("encode", "total"),
    ("decode", "exact indexes"),
    ("decode", "range decode"),
    ("decode", "P"),
    ("decode", "D_a"),
    ("decode", "total"),
  }
  assert all(np.isfinite(v) and v > 0 for v in ratios.values())
  assert r["parity"]["max_abs_uint8_diff"] <= 1
  assert set(r["throughput"]) == {1, 2} and r["throughput"][2]["decode_img_s"] > 0


def test_bench_indexes_times_exact_and_float(micro_workdir, capsys):
  from sodec_jax import bench

  capsys.readouterr()
  argv = ["--what", "indexes", "--checkpoint", micro_workdir, "--size", "64", "--repeats", "1"]
  assert bench.main(argv) == 0
  out = capsys.readouterr().out
  for case in ("indexes, exact", "indexes, float", "compress, exact", "decompress, float"):
    assert case in out
  assert "load average" in out and "file bytes: exact" in out


def test_bench_codec_bfloat16_runs(micro_workdir, capsys):
  out = _bench(capsys, "--checkpoint", micro_workdir, "--dtype", "bfloat16")
  assert "bfloat16" in out and "batch 8" in out


def test_torch_reference_weights_are_the_inverse_key_map(loaded):
  """state_dict_from_jax fills the HiFiC torch reference (sodec_jax/benchmarks/hific_torch.py)
  strictly, converts back to identical parameters, and the torch codec computes what the JAX
  model does."""
  import jax.numpy as jnp
  from flax import nnx

  from sodec_jax import api
  from sodec_jax.benchmarks import torch_reference as tr
  from sodec_jax.pretrained import build_model
  from sodec_jax.weights.hific import load_hific_state_dict

  cfg = loaded.config.model
  sd = tr.state_dict_from_jax(loaded.model, cfg)
  gate = f"Hyperprior.hyperlatent_likelihood.a_{len(cfg.factorized_filters)}"
  assert not np.any(sd.pop(gate))  # a native model has no last gate: zeros fill upstream's
  fresh = build_model(loaded.config, nnx.Rngs(1))
  load_hific_state_dict(sd, fresh, cfg)
  a = dict(nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)))
  b = dict(nnx.to_flat_state(nnx.state(fresh, nnx.Param)))
  assert a.keys() == b.keys() and all(np.array_equal(a[k].value, b[k].value) for k in a)

  ours = tr.build_reference(loaded)
  x = np.random.default_rng(0).uniform(size=(1, SIZE, SIZE, 3)).astype(np.float32)
  y_j, z_j = (np.asarray(v) for v in api.analysis(loaded, x))
  with torch.inference_mode():
    y_t, z_t = ours.analysis(tr._nchw(x, torch.float32))
    mu_t, sigma_t = ours.prior(tr._nchw(np.round(z_j), torch.float32))
    x_t = ours.synthesis(tr._nchw(y_j, torch.float32))
    density = ours.Hyperprior.hyperlatent_likelihood
    lik_t = density.likelihood(tr._nchw(np.round(z_j), torch.float32))
  mu_j, sigma_j = (np.asarray(v) for v in api.prior(loaded, np.round(z_j)))
  x_j = np.asarray(api.fidelity(loaded, y_j))
  lik_j = np.asarray(loaded.model.codec.prior.hyperlatent.likelihood(jnp.asarray(np.round(z_j))))
  for got, want in (
    (tr._nhwc(y_t), y_j),
    (tr._nhwc(z_t), z_j),
    (tr._nhwc(mu_t), mu_j),
    (tr._nhwc(sigma_t), sigma_j),
    (tr._nhwc(x_t), x_j),
    (tr._nhwc(lik_t), lik_j),
  ):
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_batched_coding_equals_the_api(loaded):
  from sodec_jax import api
  from sodec_jax.benchmarks import codec

  images = codec.test_images(SIZE, 3)
  assert len({im.tobytes() for im in images}) == 3
  # Batched XLA convolutions may round differently from batch 1, so files and images are compared
  # through decoding (within 1/255), not bit for bit.
  files = api.compress_batch(loaded, images)
  decoded = api.decompress_batch(loaded, files)
  for im, f, d in zip(images, files, decoded):
    want = api.decompress(loaded, api.compress(loaded, im))
    assert np.abs(api.decompress(loaded, f).astype(int) - want).max() <= 1
    assert np.abs(d.astype(int) - api.decompress(loaded, f)).max() <= 1


def test_torch_reference_codes_through_the_api(loaded):
  """The torch twin's file decodes with the JAX API (and vice versa) within 1/255."""
  from sodec_jax import api
  from sodec_jax.benchmarks import codec
  from sodec_jax.benchmarks import torch_reference as tr

  ref = tr.build_reference(loaded)
  image = codec.test_images(SIZE, 1)[0]
  t_data, j_data = tr.compress(ref, loaded, image), api.compress(loaded, image)
  assert api.read_header(t_data) == api.read_header(j_data)
  for data in (t_data, j_data):
    a, b = api.decompress(loaded, data), tr.decompress(ref, loaded, data)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bench_user_error_is_one_line(tmp_path, capsys):
  from sodec_jax import bench

  capsys.readouterr()
  code = bench.main(["--what", "codec", "--checkpoint", str(tmp_path / "missing")])
  err = capsys.readouterr().err
  assert code == 1
  assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
  assert bench.main(["--what", "unet", "--dtype", "float16"]) == 1
  assert "--dtype must be" in capsys.readouterr().err


def test_diffusion_decoder_components():
  """A diffusion model's decode stages time F + F_p, H_s + T_s, the UNet and D_m apart, and the
  components chained give the decoder's own output."""
  import jax.numpy as jnp
  from flax import nnx

  from sodec_jax import api
  from sodec_jax.benchmarks.codec import decode_stages
  from sodec_jax.pretrained import build_model
  from tests.conftest import load_photo, make_micro_sodec_config

  c = make_micro_sodec_config(2)
  loaded = api.prepare(c, build_model(c, nnx.Rngs(0)))
  data = api.compress(loaded, load_photo("chelsea.png")[:64, :96])
  stages = decode_stages(loaded, data)
  names = [s.name for s in stages]
  assert names == [
    "exact indexes",
    "range decode",
    "P",
    "D_a",
    "F + F_p (guidance)",
    "H_s + T_s",
    "UNet (t=999)",
    "x0 + D_m",
    "decoder (one jit)",
    "total",
  ]
  out = {s.name: s.jax() for s in stages}
  x_hat, _ = out["decoder (one jit)"]
  chained = (jnp.asarray(out["x0 + D_m"], jnp.float32) + 1.0) / 2.0
  np.testing.assert_allclose(np.asarray(chained), np.asarray(x_hat), atol=1e-5)
  assert out["UNet (t=999)"].shape == out["H_s + T_s"].shape


def test_bench_entropy_codes_the_model_latents(micro_workdir, capsys):
  from sodec_jax import bench

  capsys.readouterr()
  assert (
    bench.main(
      ["--what", "entropy", "--checkpoint", micro_workdir, "--repeats", "1", "--warmup", "0"]
    )
    == 0
  )
  out = capsys.readouterr().out
  rows = {line.split()[0] for line in out.splitlines()[2:]}
  assert rows == {"y", "z", "total"} and "Msym/s" in out


def _gpu_check(tmp_path, capsys, *args):
  import json

  from sodec_jax import bench

  path = tmp_path / "check.json"
  capsys.readouterr()
  assert bench.main(["--what", "gpu-check", "--json", str(path), "--repeats", "1", *args]) == 0
  report = json.loads(path.read_text())
  assert not report["errors"] and not report["paper_size"] and report["size"] == 64
  assert report["cross"]["ok"] and report["cross"]["cpu_file_symbols_equal"]
  assert report["decode_bf16"]["UNet (t=999)"]["ms"] > 0
  assert "decode bf16: decoder (one jit)" in capsys.readouterr().out
  return report


def test_gpu_check_runs_on_the_cpu_at_tiny_size(tmp_path, capsys):
  """`bench --what gpu-check` on the CPU at the tiny widths (64x64): the decode, attention,
  encode, cross-machine and memory sections, the report in the JSON, exit status 0 (the
  training step and the fp32 decode are the same code as `bench --what train` and the bf16
  decode: all sections run in the -m slow twin below)."""
  sections = "decode_bf16,attention,encode,cross,memory"
  report = _gpu_check(tmp_path, capsys, "--sections", sections)
  assert set(sections.split(",")) <= set(report) and "train" not in report


@pytest.mark.slow
def test_gpu_check_every_section_on_the_cpu(tmp_path, capsys):
  from sodec_jax.benchmarks.gpu_check import SECTIONS

  report = _gpu_check(tmp_path, capsys)
  assert set(SECTIONS) <= set(report)
  assert report["decode_fp32"]["bf16_vs_fp32_max_abs_uint8"] > 0  # bf16 really ran
  assert report["train"]["flops_per_step"] > 0 and report["train"]["step_s"] > 0

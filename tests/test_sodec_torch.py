"""The whole SODEC decoder in PyTorch (sodec_jax/benchmarks/sodec_torch.py: torch H_s / T_s /
F_p, transformers ViTModel, diffusers UNet2DConditionModel and AutoencoderKL, the LoRA merged)
loaded from a trained workdir through the inverse key maps (sodec_jax/weights/export.py)
computes what our decoder does: component by component and end to end on a real photo, float32.
Mutating one name of the inverse key map makes the export fail or parity fail."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sodec_jax.errors import SodecError
from tests.conftest import load_photo, make_micro_sodec_config

# Stated tolerances (relative L2 error, float32): the components are the same functions up to
# the order of float operations; x0 divides by sqrt(abar_999) = 0.068, amplifying eps 15x.
TOL = {"x_f": 1e-5, "H_s": 1e-5, "y_t": 1e-5, "c_g": 1e-5, "eps": 2e-5, "x0": 2e-5, "image": 1e-5}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save_workdir(config, model, workdir: str) -> None:
  from sodec_jax import checkpoints

  checkpoints.save_config(workdir, config)
  mngr = checkpoints.manager(workdir)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpoints.save(mngr, 0, params, {"count": np.zeros((), np.int32)}, config)
  mngr.close()


@pytest.fixture(scope="module")
def built():
  """(config, model): the micro diffusion SODEC (tiny UNet / VAE / random ViT) whose LoRA B
  matrices, norms, biases and F_p are non-trivial, so a LoRA left unmerged or a mis-mapped
  tensor shows."""
  from sodec_jax.pretrained import build_model

  c = make_micro_sodec_config(2)
  m = build_model(c, nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    names = "/".join(map(str, path))
    if path[-1] in ("lora_b", "gamma", "beta", "bias") or "guidance_projection" in names:
      shape = var.value.shape
      base = 1.0 if path[-1] == "gamma" else 0.0
      var.value = base + 0.05 * jax.random.normal(next(keys), shape)
  return c, m


@pytest.fixture(scope="module")
def workdir(built, tmp_path_factory):
  """The model saved as a training workdir (what a PyTorch user of a run here starts from)."""
  wd = str(tmp_path_factory.mktemp("sodec_torch") / "run")
  _save_workdir(*built, wd)
  return wd


@pytest.fixture(scope="module")
def loaded(built):
  from sodec_jax import api

  return api.prepare(*built)


@pytest.fixture(scope="module")
def ref(loaded):
  from sodec_jax.benchmarks.sodec_torch import build_sodec_reference

  return build_sodec_reference(loaded)


@pytest.fixture(scope="module")
def coded(loaded):
  """(.sodec bytes, y_hat, z_hat) of the astronaut photo, downscaled to 128 x 128."""
  from sodec_jax import api

  img = np.ascontiguousarray(load_photo("astronaut.png")[::4, ::4][:128, :128])
  data = api.compress(loaded, img)
  _, y_hat, z_hat = api.decode_latents(loaded, data)
  return data, y_hat, z_hat


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().float().permute(0, 2, 3, 1).numpy()


def components(m, ref, y_hat, z_hat) -> dict:
  """{name: rel error} of each decoder component, each side fed the same (JAX) inputs."""
  y, z = jnp.asarray(y_hat), jnp.asarray(z_hat)
  t = jnp.full((1,), m.timestep, jnp.int32)
  x_f = m.fidelity_reconstruction(y)
  y_t = m.content_variable(y, z)
  c_g = m.guidance(x_f, z)
  eps = m.unet(y_t, t, c_g)
  x0 = m.schedule.predict_x0(y_t, eps, t)
  image = (m.vae_decoder.decode(x0 / m.scaling_factor) + 1.0) / 2.0
  yt_t, eps_t = _nchw(y_t), _nchw(eps)
  with torch.inference_mode():
    return {
      "x_f": rel(_nhwc(ref.codec.synthesis(_nchw(y))), x_f),
      "H_s": rel(_nhwc(ref.hyper_synthesis(_nchw(z))), m.hyper_synthesis(z)),
      "y_t": rel(_nhwc(ref.content_variable(_nchw(y), _nchw(z))), y_t),
      "c_g": rel(ref.guidance(_nchw(x_f)).numpy(), c_g),
      "eps": rel(_nhwc(ref.eps(yt_t, torch.from_numpy(np.array(c_g)))), eps),
      "x0": rel(_nhwc(ref.predict_x0(yt_t, eps_t)), x0),
      "image": rel(_nhwc(ref.image(yt_t, eps_t)), image),
    }


def test_components_match(loaded, ref, coded):
  _, y_hat, z_hat = coded
  errors = components(loaded.model, ref, y_hat, z_hat)
  print(errors)
  for name, err in errors.items():
    assert err <= TOL[name], f"{name}: relative error {err:.2e} > {TOL[name]:.0e}"


@pytest.mark.slow  # 12 s; test_components_match keeps parity in the default suite
def test_end_to_end_on_a_photo(loaded, ref, coded):
  """The same .sodec file decoded by both whole decoders: float images within 1e-5, uint8 within
  one level (a value on a rounding boundary)."""
  from sodec_jax import api
  from sodec_jax.benchmarks import sodec_torch

  data, y_hat, z_hat = coded
  x_jax, _ = api.reconstruct(loaded, y_hat, z_hat)
  assert rel(sodec_torch.reconstruct(ref, y_hat, z_hat), x_jax) <= 1e-5
  a, b = api.decompress(loaded, data), sodec_torch.decompress(ref, loaded, data)
  assert a.shape == b.shape == (128, 128, 3)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_schedule_is_diffusers_ddpm():
  """Our abar_t (SD 2.1: scaled_linear 0.00085 .. 0.012, 1000 steps) is DDPMScheduler's."""
  from diffusers import DDPMScheduler

  from sodec_jax.diffusion.schedule import sd21_schedule

  theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  ours = sd21_schedule().alphas_cumprod
  np.testing.assert_allclose(ours, theirs.alphas_cumprod.numpy(), rtol=1e-5)


def test_lora_is_merged_into_the_export(loaded):
  """The exported to_q weight is W + (alpha / rank) A B, not W: the adapters are trained here."""
  from sodec_jax.weights.export import diffusers_state_dict

  unet = loaded.model.unet
  sd = diffusers_state_dict(unet)
  layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
  base = np.asarray(layer.kernel[...]).T
  a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
  np.testing.assert_allclose(sd[key], base + (layer.lora.scale * a @ b).T, rtol=1e-6, atol=1e-7)
  assert np.abs(sd[key] - base).max() > 1e-4


def test_mutated_unet_name_fails_the_export(loaded, monkeypatch):
  """One diffusers name changed in the inverse map (to_out.0 -> to_out) -> one SodecError naming
  the missing and unexpected keys."""
  from sodec_jax.benchmarks import sodec_torch
  from sodec_jax.weights import export

  real = export.diffusers_state_dict

  def mutated(module):
    return {k.replace("attn1.to_out.0.", "attn1.to_out."): v for k, v in real(module).items()}

  monkeypatch.setattr(sodec_torch, "diffusers_state_dict", mutated)
  with pytest.raises(SodecError, match=r"missing \d+: .*attn1\.to_out\.0\.weight.*unexpected"):
    sodec_torch.torch_unet(loaded.model.unet)


def test_mutated_vit_name_fails_parity(loaded, coded, monkeypatch):
  """query and key swapped in the ViT's name map: the shapes agree, so loading succeeds, and the
  guidance parity fails."""
  from sodec_jax.benchmarks import sodec_torch
  from sodec_jax.weights import transformers as tw

  names = [
    (p.replace("q_proj", "k_proj") if "q_proj" in p else p.replace("k_proj", "q_proj"), r)
    if ("q_proj" in p or "k_proj" in p)
    else (p, r)
    for p, r in tw._VIT_V5_NAMES
  ]
  monkeypatch.setattr(tw, "_VIT_V5_NAMES", tuple(names))
  vit = sodec_torch.torch_extractor(loaded.model.guidance_extractor)
  f = loaded.model.guidance_extractor
  x = jnp.asarray(load_photo("astronaut.png")[:256:4, :256:4][None] / 255.0, jnp.float32)
  with torch.inference_mode():
    got = vit(pixel_values=_nchw(f.preprocess(x))).last_hidden_state.numpy()
  assert rel(got, f(f.preprocess(x))) > 100 * TOL["c_g"]


@pytest.mark.slow  # 7 s; the default suite's budget is tight
def test_exported_folder_rebuilds_the_decoder(loaded, ref, coded, tmp_path):
  """export_torch -> load_exported (torch, diffusers and transformers only): the same tensors
  and the same image as the in-process reference."""
  from sodec_jax.benchmarks import sodec_torch
  from sodec_jax.converters.torch_export import export_torch

  out = export_torch(loaded, str(tmp_path / "sodec_torch"))
  again = sodec_torch.load_exported(out)
  a, b = ref.state_dict(), again.state_dict()
  assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
  _, y_hat, z_hat = coded
  np.testing.assert_array_equal(
    sodec_torch.reconstruct(again, y_hat, z_hat), sodec_torch.reconstruct(ref, y_hat, z_hat)
  )
  with pytest.raises(SodecError, match="not empty"):
    export_torch(loaded, out)


@pytest.mark.slow
def test_workdir_decodes_in_torch(workdir, loaded, coded, tmp_path):
  """A training workdir -> api.load_model -> the torch decoder: the same image as our decoder
  (and as the in-memory model's torch twin)."""
  from sodec_jax import api
  from sodec_jax.benchmarks import sodec_torch

  from_disk = api.load_model(workdir)
  ref = sodec_torch.build_sodec_reference(from_disk)
  data = coded[0]
  a, b = api.decompress(from_disk, data), sodec_torch.decompress(ref, from_disk, data)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  assert np.array_equal(a, api.decompress(loaded, data))
  from convert.from_torch import main

  assert main(["export-torch", "--src", workdir, "--out", str(tmp_path / "t")]) == 0
  b2 = sodec_torch.reconstruct(sodec_torch.load_exported(str(tmp_path / "t")), *coded[1:])
  np.testing.assert_array_equal(b2, sodec_torch.reconstruct(ref, *coded[1:]))


@pytest.mark.slow
def test_bench_times_both_whole_decoders(workdir):
  """bench --what codec --reference torch on a diffusion checkpoint: every decode component and
  the whole decoder timed on both sides; parity compares the same decoder on both sides."""
  from sodec_jax.benchmarks import codec

  lines = []
  r = codec.bench_codec(workdir, 128, "float32", "torch", 1, 0, batch_sizes=(), log=lines.append)
  ratios = {s["name"]: s.get("ratio") for s in r["stages"] if s["side"] == "decode"}
  for name in ("F + F_p (guidance)", "H_s + T_s", "UNet (t=999)", "x0 + D_m", "decoder (one jit)"):
    assert ratios[name] > 0, name
  assert r["parity"]["decoder"] == "diffusion" and r["parity"]["max_abs_uint8_diff"] <= 1
  assert "decoded by the diffusion decoder on both sides" in "\n".join(lines)


@pytest.mark.slow
def test_bench_parity_failure_is_loud(workdir, monkeypatch, capsys):
  """A torch decoder that computes something else -> exit status 1 and one line saying so."""
  from sodec_jax import bench
  from sodec_jax.benchmarks import sodec_torch

  real = sodec_torch.reconstruct
  monkeypatch.setattr(sodec_torch, "reconstruct", lambda r, y, z: real(r, y, z) * 0.5)
  code = bench.main(
    ["--what", "codec", "--checkpoint", workdir, "--size", "128", "--reference", "torch"]
    + ["--repeats", "1", "--warmup", "0", "--no-batches"]
  )
  err = capsys.readouterr().err
  assert code == 1 and err.count("\n") == 1 and "parity failed" in err and "diffusion" in err


@pytest.mark.slow
def test_paper_size_random_weights_parity():
  """The paper-size decoder (configs/stage2.py: SD 2.1 UNet and VAE, ViT-L/16 F, random weights)
  on the astronaut photo at 512 x 512 (so F's input is resized 512 -> 224 on both sides): every
  component and the whole decoder within the stated tolerances (measured 2026-11-30: x_f 1.3e-6,
  H_s 1.4e-7, y_t 8.2e-7, c_g 5.5e-7, eps 2.0e-6, x0 5.5e-7, image 5.0e-7; ~8 min, ~15 GB)."""
  from configs import stage2
  from sodec_jax import api
  from sodec_jax.benchmarks import sodec_torch
  from sodec_jax.benchmarks.codec import random_model

  config = stage2.get_config()
  loaded = api.prepare(config, random_model(config), winograd=False)  # memory: 24 GB machine
  ref = sodec_torch.build_sodec_reference(loaded)
  data = api.compress(loaded, np.ascontiguousarray(load_photo("astronaut.png")))
  _, y_hat, z_hat = api.decode_latents(loaded, data)
  errors = components(loaded.model, ref, y_hat, z_hat)
  print(errors)
  for name, err in errors.items():
    assert err <= TOL[name], f"{name}: relative error {err:.2e} > {TOL[name]:.0e}"
  a, b = api.decompress(loaded, data), sodec_torch.decompress(ref, loaded, data)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.parametrize("upsample", ["resize", "transposed", "transposed4", "transposed4_blur"])
def test_transform_both_upsamplers_match_torch(upsample):
  """T_s alone, random weights (norms and biases too), each 2x up: ours vs the torch twin
  (F.interpolate nearest + Conv2d, or ConvTranspose2d 3x3 / 4x4, the last then blurred by a
  depthwise [1, 2, 1] x [1, 2, 1] / 16 conv on replicate padding), float32; and a workdir made
  before the option (no sodec.transform_upsample in its config) builds the transposed conv."""
  from sodec_jax.benchmarks.sodec_torch import Transform as TorchTransform
  from sodec_jax.benchmarks.sodec_torch import conv_state_dict
  from sodec_jax.model import Transform

  ours = Transform(6, 5, 8, 1, 4, upsample=upsample, rngs=nnx.Rngs(0))
  theirs = TorchTransform(6, 5, 8, 1, 4, upsample=upsample)
  rng = np.random.default_rng(1)
  for _, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
    noise = 0.1 * rng.standard_normal(var[...].shape).astype(np.float32)
    var.value = jnp.asarray(np.asarray(var[...]) + noise)
  state = {k: torch.from_numpy(v) for k, v in conv_state_dict(ours).items()}
  theirs.load_state_dict(state, strict=True)
  y = rng.standard_normal((1, 5, 7, 6)).astype(np.float32)
  w = rng.standard_normal((1, 5, 7, 5)).astype(np.float32)
  got = ours(jnp.asarray(y), jnp.asarray(w))
  with torch.no_grad():
    want = (
      theirs(torch.from_numpy(y.transpose(0, 3, 1, 2)), torch.from_numpy(w.transpose(0, 3, 1, 2)))
      .numpy()
      .transpose(0, 2, 3, 1)
    )
  assert got.shape == (1, 10, 14, 4) and rel(got, want) <= 1e-5

  from sodec_jax.pretrained import build_model

  c = make_micro_sodec_config(2)
  del c.sodec["transform_upsample"]
  assert nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0))).transform.upsample == "transposed"

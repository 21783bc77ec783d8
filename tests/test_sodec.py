"""SODEC end to end (issue #6): the one-step diffusion decoder's shapes, the stage table as
trainable sets, stop-gradient, rate annealing, guidance, and a tiny pipeline that compresses
and decompresses a real photo through the diffusion decoder."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sodec_jax import api, checkpoints, losses
from sodec_jax.codec import bitstream
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax.train import train
from tests.conftest import load_photo, make_micro_sodec_config


@pytest.mark.parametrize(
  "hw,latent", [((64, 128), 4), pytest.param((192, 64), 16, marks=pytest.mark.slow)]
)  # 16 latent channels: ~32 s, -m slow
def test_shapes_through_the_diffusion_decoder(hw, latent):
  """The latent has SD's 4 channels, or diffusion.tiny_latent_channels for the tiny stand-in."""
  c = make_micro_sodec_config(2, **{"diffusion.tiny_latent_channels": latent})
  m = build_model(c, nnx.Rngs(0))
  x = jnp.asarray(load_photo("coffee.png")[: hw[0], : hw[1]][None] / 255.0, jnp.float32)
  out = m(x, noise_key=jax.random.key(0))
  h, w = hw
  assert out["x_hat"].shape == (1, h, w, 3) and out["x_hat"].dtype == jnp.float32
  assert out["x_f"].shape == (1, h, w, 3)
  assert m.content_variable(out["y_hat"], out["z_hat"]).shape == (1, h // 8, w // 8, latent)
  assert m.unet.config.in_channels == m.unet.config.out_channels == latent
  assert m.vae_decoder.config.latent_channels == latent
  c_g = m.guidance(out["x_f"], out["z_hat"])
  assert c_g.shape == (1, 77, m.unet.config.cross_attention_dim)
  assert np.all(np.isfinite(np.asarray(out["x_hat"])))


@pytest.mark.parametrize("mode", ["noisy", "round"])
def test_what_z_the_hyper_synthesis_sees_in_training(mode):
  """sodec.diffusion_z: "noisy" hands H_s z + U(-1/2, 1/2) (as P), "round" the straight-through
  round(z) (integers forward); P's z and the rate are the same either way."""
  c = make_micro_sodec_config(3, **{"sodec.diffusion_z": mode})
  m = build_model(c, nnx.Rngs(0))
  x = jnp.asarray(load_photo("coffee.png")[:128, :128][None] / 255.0, jnp.float32)
  out = m(x, noise_key=jax.random.key(0))
  z = np.asarray(out["z_hat"])
  assert np.array_equal(z, np.round(z)) == (mode == "round")
  _, z_true = m.analysis(x)
  if mode == "round":
    assert np.array_equal(z, np.round(np.asarray(z_true)))
  like = {k: np.asarray(v) for k, v in out["likelihoods"].items()}
  c.sodec.diffusion_z = "round" if mode == "noisy" else "noisy"
  other = build_model(c, nnx.Rngs(0))(x, noise_key=jax.random.key(0))
  for k, v in other["likelihoods"].items():
    np.testing.assert_array_equal(np.asarray(v), like[k])


def test_diffusion_z_must_be_named():
  with pytest.raises(SodecError, match="diffusion_z"):
    build_model(make_micro_sodec_config(2, **{"sodec.diffusion_z": "soft"}), nnx.Rngs(0))


def test_fidelity_guidance_depends_on_x_f():
  m = build_model(make_micro_sodec_config(2), nnx.Rngs(0))
  z = jnp.zeros((1, 1, 1, 4))
  a = m.guidance(jnp.full((1, 64, 64, 3), 0.2), z)
  b = m.guidance(jnp.asarray(load_photo("astronaut.png")[:64, :64][None] / 255.0, jnp.float32), z)
  assert not np.allclose(a, b)


def test_rate_annealing_schedule_values():
  from ml_collections import ConfigDict

  a = ConfigDict({"start": 1.0, "end": 5.0, "steps": 100, "shape": "linear"})
  assert [float(losses.annealed_lambda(s, a)) for s in (0, 50, 100, 1000)] == [1.0, 3.0, 5.0, 5.0]
  a.shape = "cosine"
  assert math.isclose(float(losses.annealed_lambda(50, a)), 3.0, rel_tol=1e-6)
  assert math.isclose(
    float(losses.annealed_lambda(25, a)), 1 + 4 * (1 - math.cos(math.pi / 4)) / 2, rel_tol=1e-6
  )
  a.shape = "step"
  assert [float(losses.annealed_lambda(s, a)) for s in (0, 99, 100)] == [1.0, 1.0, 5.0]
  a.shape = "none"
  assert float(losses.annealed_lambda(0, a)) == 5.0


def test_stage2_stop_gradient_reaches_no_encoder_parameter():
  c = make_micro_sodec_config(2)
  m = build_model(c, nnx.Rngs(0))
  x = jnp.asarray(load_photo("chelsea.png")[:64, :64][None] / 255.0, jnp.float32)

  def loss(model):
    return losses.sodec_loss(model(x, noise_key=jax.random.key(0)), x, 0, c)[0]

  grads = nnx.jit(nnx.grad(loss))(m)  # one program (eager: ~1,600 small compiles, 4x slower)
  flat = {"/".join(map(str, k)): np.asarray(v.value) for k, v in nnx.to_flat_state(grads)}
  for name in ("codec/encoder", "codec/hyper_analysis", "codec/prior"):
    assert all(not np.any(g) for k, g in flat.items() if k.startswith(name)), name
  for name in ("codec/fidelity_decoder", "transform", "hyper_synthesis", "guidance_projection"):
    assert any(np.any(g) for k, g in flat.items() if k.startswith(name)), name


def _params(workdir, config):
  m = build_model(config, nnx.Rngs(7))
  checkpoints.restore_params(workdir, m)
  return {
    "/".join(map(str, k)): np.asarray(v.value)
    for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
  }


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])  # 2: -m slow
def test_trainable_set_is_the_stage_table(tmp_path, stage):
  """One step of stage `stage` from a saved start: exactly the table's parameters change."""
  c = make_micro_sodec_config(stage, **{"train.num_steps": 1, "train.checkpoint_every": 1})
  start = tmp_path / "start"  # a checkpoint of the initial weights (what init_from copies)
  c0 = make_micro_sodec_config(stage, **{"train.num_steps": 0})
  m0 = build_model(c0, nnx.Rngs(c0.seed))
  mngr = checkpoints.manager(str(start))
  checkpoints.save(mngr, 0, nnx.to_pure_dict(nnx.state(m0, nnx.Param)), {"unused": np.zeros(1)}, c0)
  mngr.close()
  checkpoints.save_config(str(start), c0)
  c.init_from = str(start)
  train(c, str(tmp_path / "run"))
  before, after = _params(str(start), c0), _params(str(tmp_path / "run"), c)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  lora = {k for k in before if "/lora/" in k}
  unet_base = {k for k in before if k.startswith("unet/") and k not in lora}
  vae = {k for k in before if k.startswith("vae_decoder/")}
  frozen_codec = {
    k for k in before if k.startswith(("codec/encoder", "codec/hyper_analysis", "codec/prior"))
  }
  assert not changed & (unet_base | vae)  # never trained
  assert {k for k in lora if k.endswith("lora_b")} <= changed  # LoRA trains (B starts at zero)
  assert any(k.startswith("transform/") for k in changed)
  if stage == 2:
    assert not changed & frozen_codec
  else:
    assert changed & frozen_codec


def test_paper_config_without_weights_is_one_line(tmp_path):
  import subprocess
  import sys

  from tests.conftest import ROOT

  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sodec_jax.train",
      "--config",
      "configs/stage2.py",
      "--workdir",
      str(tmp_path / "w"),
      "--config.loss.k_P=0",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "convert/from_torch.py sd21" in lines[0], r.stderr
  assert not (tmp_path / "w").exists()  # nothing written


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A micro pipeline: pretrain -> stage1 -> stage2 -> finetune, 2 steps each."""
  c = make_micro_sodec_config(1)
  c.pipeline.stages = ("pretrain", "stage1", "stage2", "finetune")
  small = {
    "data": {"crop_size": 64, "batch_size": 2},
    "train": {"num_steps": 2, "checkpoint_every": 2},
  }
  from ml_collections import ConfigDict

  for name in c.pipeline.stages:
    c.pipeline[name] = ConfigDict(small)
  wd = str(tmp_path_factory.mktemp("pipe"))
  train(c, wd)
  return wd


def test_pipeline_compresses_through_the_diffusion_decoder(pipeline_dir):
  assert os.path.isfile(os.path.join(pipeline_dir, checkpoints.PIPELINE_FILE))
  model = api.load_model(pipeline_dir)  # resolves to the final stage
  assert model.decoder == bitstream.DECODER_DIFFUSION and model.config.stage == 4
  image = load_photo("rocket.jpg")[:70, :90].copy()
  data = api.compress(model, image)
  assert api.read_header(data).decoder == bitstream.DECODER_DIFFUSION
  out = api.decompress(model, data)
  assert out.shape == (70, 90, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, api.decompress(model, data))  # deterministic


def test_load_model_restores_exactly_what_a_randomly_built_model_restores(pipeline_dir):
  """load_model builds the model abstractly (no random init) and fills it from the checkpoint;
  every weight, the frozen random tiny extractor F included, equals the old path's: a concrete
  random build, then the same restore."""
  from sodec_jax.pretrained import build_model_to_restore, check_restored

  loaded = api.load_model(pipeline_dir)
  final = checkpoints.resolve_workdir(pipeline_dir)
  config = checkpoints.load_config(final)
  concrete = build_model(config, nnx.Rngs(0), pretrained=False)
  checkpoints.restore_params(final, concrete)
  ours = dict(nnx.to_flat_state(nnx.state(loaded.model)))
  theirs = nnx.to_flat_state(nnx.state(concrete))
  assert len(ours) == len(theirs) and any("guidance_extractor" in map(str, k) for k, _ in theirs)
  for path, var in theirs:
    np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(var.get_value()))
  assert loaded.fingerprint == api.prepare(config, concrete, loaded.step).fingerprint
  # a variable the checkpoint does not fill is named, not used abstract
  shell = build_model_to_restore(config)
  with pytest.raises(SodecError, match="holds no value for .* weight"):
    check_restored(shell, final)


def test_a_stage_from_a_whole_model_initialises_nothing_at_random(pipeline_dir, monkeypatch):
  """build_initialised_model: the finetune (init_from: stages 0-2, which hold every weight of its
  model) is built abstract and filled, without build_training_model's random initialisers;
  stage 2 (init_from: stages 0-1, so H_s, T_s, F_p and the LoRA are new) falls back to the random
  build. Either way the weights, the structure and the report equal the old path's: a random
  build, then init_from."""
  from sodec_jax.train import build

  random_build = build.build_training_model
  for stage, abstract in (("3_finetune", True), ("2_stage2", False)):
    config = checkpoints.load_config(os.path.join(pipeline_dir, stage))
    calls = []
    monkeypatch.setattr(build, "build_training_model", lambda c: calls.append(c) or random_build(c))
    ours, report = build.build_initialised_model(config)
    assert (not calls) == abstract, stage
    monkeypatch.setattr(build, "build_training_model", random_build)
    old = random_build(config)
    assert report == checkpoints.init_from(old, config.init_from)
    assert nnx.graphdef(ours) == nnx.graphdef(old)
    theirs = nnx.to_flat_state(nnx.state(old))
    mine = dict(nnx.to_flat_state(nnx.state(ours)))
    assert len(mine) == len(theirs)
    for path, var in theirs:
      a, b = np.asarray(mine[path].get_value()), np.asarray(var.get_value())
      assert a.dtype == b.dtype, path
      np.testing.assert_array_equal(a, b)


def test_stages_of_one_structure_share_compiled_programs(pipeline_dir, caplog):
  """Stage 2 and the finetune decode with one model structure (stage 2's training-only
  stop-gradient is off in decoding models), so the second loaded model compiles no decoder of
  its own (api._coding_programs): the pipeline's validations and summary load every stage."""
  import logging

  stage2 = api.load_model(os.path.join(pipeline_dir, "2_stage2"))
  final = api.load_model(pipeline_dir)
  assert final.config.stage == 4 and stage2.config.stage == 2
  assert stage2._graphdef == final._graphdef
  image = load_photo("coffee.png")[:64, :80].copy()
  api.decompress(stage2, api.compress(stage2, image))
  data = api.compress(final, image)
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    api.decompress(final, data)
  compiled = [r.getMessage() for r in caplog.records if "compilation of" in r.getMessage()]
  assert not [m for m in compiled if "decode_image" in m], compiled


def test_codec_model_refuses_a_diffusion_file(pipeline_dir, tmp_path):
  model = api.load_model(pipeline_dir)
  data = api.compress(model, load_photo("astronaut.png")[:64, :64].copy())
  codec_only = api.load_model(os.path.join(pipeline_dir, "1_stage1"))
  with pytest.raises(SodecError, match="different model|diffusion"):
    api.decompress(codec_only, data)


def _save_start(workdir, config):
  m = build_model(config, nnx.Rngs(config.seed))
  mngr = checkpoints.manager(str(workdir))
  state = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  checkpoints.save(mngr, 0, state, {"unused": np.zeros(1)}, config)
  mngr.close()
  checkpoints.save_config(str(workdir), config)


@pytest.mark.slow  # ~55 s on 2 shared cores: builds and saves three micro SODEC models
def test_hyperprior_variant_initialises_from_stage1_not_from_another_guidance(tmp_path):
  """Table 2 (iii) runs its own stage 2 from stage 1 (configs/ablations/guidance_hyperprior.py):
  that init copies the codec and leaves F_p (z_hat's N channels -> D) fresh; a fidelity stage 2,
  whose F_p maps the extractor's width, is refused in one line naming the parameter."""
  stage1_dir, fidelity_dir = tmp_path / "stage1", tmp_path / "fidelity_stage2"
  _save_start(stage1_dir, make_micro_sodec_config(1))
  _save_start(fidelity_dir, make_micro_sodec_config(2))
  c = make_micro_sodec_config(2, **{"guidance.mode": "hyperprior"})
  m = build_model(c, nnx.Rngs(3))
  report = checkpoints.init_from(m, str(stage1_dir))
  assert len(report) == 1 and "init_from" in report[0]
  with pytest.raises(SodecError) as err:
    checkpoints.init_from(m, str(fidelity_dir))
  msg = str(err.value)
  assert "\n" not in msg and "guidance_projection" in msg and "own stage 2" in msg, msg


@pytest.mark.slow  # ~15 s of compiling window programs on 2 cores
def test_pipeline_decodes_in_windows(pipeline_dir):
  """The tiled diffusion decoder end to end (D_a, T_s, the UNet and D_m in windows, GroupNorm
  statistics over the whole image) on a small image, against the one-program decoder. The
  windows are far smaller than the networks' receptive fields here, so the bound is loose;
  tests/test_tiling.py (-m slow) measures 1024x1024."""
  model = api.load_model(pipeline_dir)
  image = load_photo("rocket.jpg")[:128, :128].copy()
  data = api.compress(model, image)
  whole = api.decompress(model, data).astype(float)
  _, y_hat, z_hat = api.decode_latents(model, data)
  tiles = {"fidelity": 4, "content": 1, "unet": 8, "vae": 8}
  out = api.to_uint8(api.decode_within(model, y_hat, z_hat, None, tiles=tiles), 128, 128)
  plan = model._plans[(y_hat.shape, z_hat.shape, None, tuple(sorted(tiles.items())))]
  assert all(s.grid.tile < s.grid.n for s in plan.stages.values())
  psnr = 10 * np.log10(255.0**2 / np.mean((out - whole) ** 2))
  assert out.shape == (128, 128, 3) and psnr >= 20.0, psnr  # measured: 21.8 dB


def test_summary_adds_the_final_stage_without_its_colour_fix(
  pipeline_dir, tmp_path, monkeypatch, capsys
):
  """A final stage with sodec.color_fix: the summary's table and summary.json's
  "final_without_color_fix" give its files decoded without the correction too (same files, so
  the same bpp; the PSNR of the diffusion output as it is), and "stages" stay the stages."""
  import json

  from sodec_jax import validation
  from sodec_jax.images import write_image
  from sodec_jax.train import pipeline

  photos = tmp_path / "photos"
  os.makedirs(photos)
  for name in ("astronaut", "coffee"):
    write_image(str(photos / f"{name}.png"), load_photo(f"{name}.png")[:64, :80])
  c = make_micro_sodec_config(1, **{"data.train_dir": str(photos)})
  c.data.holdout = ("astronaut", "coffee")
  fixed = api.load_model(pipeline_dir, color_fix="wavelet")
  monkeypatch.setattr(validation, "pipeline_models", lambda wd: [("3_finetune", fixed)])
  rows = pipeline.summary(c, str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    record = json.load(f)
  assert [r["stage"] for r in record["stages"]] == ["3_finetune"] and rows == record["stages"]
  raw = record["final_without_color_fix"]
  want = validation.validate(api.load_model(pipeline_dir), validation.holdout_images(c))
  assert raw["psnr"] == pytest.approx(want["psnr"], abs=1e-9) and raw["bpp"] == rows[0]["bpp"]
  assert abs(raw["psnr"] - rows[0]["psnr"]) > 0.01  # the correction changed the decode
  assert "3_finetune (color_fix none)" in capsys.readouterr().out
  # the CLI decodes with the checkpoint's setting, or the one --color-fix names
  from sodec_jax import cli
  from sodec_jax.images import read_image

  image = load_photo("coffee.png")[:64, :80].copy()
  data = api.compress(fixed, image)
  (tmp_path / "c.sodec").write_bytes(data)
  for flag, model in ((["--color-fix", "wavelet"], fixed), ([], api.load_model(pipeline_dir))):
    out = str(tmp_path / f"out{len(flag)}.png")
    assert (
      cli.main(["decompress", str(tmp_path / "c.sodec"), out, "--checkpoint", pipeline_dir, *flag])
      == 0
    )
    np.testing.assert_array_equal(read_image(out)[0], api.decompress(model, data))

"""sd21 / unet / vae converters: random diffusers models saved for real, converted, loaded, compared;
the single-file (LDM) layout; and the errors users see."""

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TVAE
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import nchw, nhwc, randomize_
from flax import nnx
from ldm_layout import ldm_unet, ldm_vae
from safetensors.numpy import save_file

from sodec_jax import converters as convert
from sodec_jax import pretrained
from sodec_jax.diffusion.autoencoder import tiny_vae_config
from sodec_jax.diffusion.unet import tiny_unet_config
from sodec_jax.errors import SodecError
from sodec_jax.weights import converted, ldm
from tests.convert.conftest import ROOT, assert_out_clean, errors

TOL = 1e-5


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """A diffusers SD-style folder: unet/, vae/, scheduler/ (tiny, random, v-prediction)."""
  root = tmp_path_factory.mktemp("sd")
  torch.manual_seed(0)
  unet = randomize_(TUNet(**tiny_unet_config().to_dict()), seed=6).eval()
  vae = randomize_(TVAE(**tiny_vae_config().to_dict()), seed=7).eval()
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  DDIMScheduler(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
  ).save_pretrained(root / "scheduler")
  return str(root), unet, vae


def _unet_inputs():
  rng = np.random.default_rng(8)
  return (
    rng.standard_normal((1, 16, 16, 4)).astype(np.float32),
    np.array([999]),
    rng.standard_normal((1, 5, 32)).astype(np.float32),
  )


def check_unet(ours, theirs, tol=TOL):
  x, t, ctx = _unet_inputs()
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  rel, _ = errors(out, ref)
  assert rel <= tol


def check_vae(ours, theirs, tol=TOL):
  rng = np.random.default_rng(9)
  z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
  x = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dec = nhwc(theirs.decode(nchw(z)).sample)
    mean = nhwc(theirs.encode(nchw(x)).latent_dist.mean)
  assert errors(ours.decode(jnp.asarray(z)), dec)[0] <= tol
  enc = ours.encode(jnp.asarray(x))
  enc = enc[0] if isinstance(enc, tuple) else getattr(enc, "mean", enc)
  if enc.shape[-1] == 2 * mean.shape[-1]:
    enc = enc[..., : mean.shape[-1]]
  assert errors(enc, mean)[0] <= tol


def test_sd21_folder(pipeline, tmp_path):
  root, unet, vae = pipeline
  out = convert.convert_sd21(root, str(tmp_path / "sd21"))
  m = converted.read_manifest(out)
  assert m["kind"] == "sd21" and m["components"] == ["scheduler", "unet", "vae"]
  assert m["format"] == "sodec-jax-converted" and m["converter_version"]
  names = sorted(os.path.relpath(s["path"], root) for s in m["source"])
  assert "unet/diffusion_pytorch_model.safetensors" in names
  for s in m["source"]:
    assert s["size"] == os.path.getsize(s["path"]) and len(s["sha256"]) == 64
  check_unet(converted.load_unet(out), unet)
  check_vae(converted.load_vae(out), vae)
  sched = converted.load_schedule(out)
  assert sched.prediction_type == "v_prediction"
  assert m["prediction_type"] == "v_prediction"
  assert m["prediction_type_from"].endswith("scheduler/scheduler_config.json")
  np.testing.assert_allclose(
    sched.alphas_cumprod,
    DDIMScheduler.from_pretrained(os.path.join(root, "scheduler")).alphas_cumprod.numpy(),
    rtol=1e-5,
  )
  assert [n for n in os.listdir(tmp_path) if n != "sd21"] == []  # no temporaries left


def test_unet_vae_subcommands_and_raw_folders(pipeline, tmp_path):
  root, unet, vae = pipeline
  u = convert.convert_unet(os.path.join(root, "unet"), str(tmp_path / "u"))
  v = convert.convert_vae(os.path.join(root, "vae"), str(tmp_path / "v"))
  check_unet(converted.load_unet(u), unet)
  check_vae(converted.load_vae(v), vae)
  # users may skip conversion: the raw diffusers folders load through the same functions
  check_unet(converted.load_unet(root), unet)
  check_vae(converted.load_vae(os.path.join(root, "vae")), vae)
  assert converted.load_schedule(root).prediction_type == "v_prediction"
  with pytest.raises(SodecError, match="'vae' weights, not sd21 / unet"):
    converted.load_unet(v)


def test_bfloat16_storage(pipeline, tmp_path):
  root, unet, _ = pipeline
  out = convert.convert_unet(os.path.join(root, "unet"), str(tmp_path / "u"), dtype="bfloat16")
  assert converted.read_manifest(out)["dtype"] == "bfloat16"
  ours = converted.load_unet(out, dtype=jnp.bfloat16)
  assert ours.conv_in.kernel.value.dtype == jnp.bfloat16
  ours32 = converted.load_unet(out)  # bf16 storage restored into float32
  check_unet(ours32, unet, tol=2e-2)


# ----------------------------------------------------------------------------- single file (LDM)


def _ldm_state_dict(unet, vae):
  """The single file's tensors: LDM names from `ldm_layout` (written from the original CompVis
  modules and checked there by diffusers' own convert_ldm_*_checkpoint), not from our tables."""
  sd = {k: v.numpy() for k, v in {**ldm_unet(unet), **ldm_vae(vae)}.items()}
  sd["cond_stage_model.model.token_embedding.weight"] = np.zeros((8, 4), np.float32)
  sd["alphas_cumprod"] = np.linspace(1, 0, 10).astype(np.float32)
  return sd


def _flat_params(model) -> dict:
  return {
    "/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model))
  }


def test_ldm_table_known_names():
  cfg = dict(ldm.default_configs()[0])
  assert (
    ldm.unet_ldm_name("down_blocks.0.attentions.0.proj_in.weight", cfg)
    == "model.diffusion_model.input_blocks.1.1.proj_in.weight"
  )
  assert (
    ldm.unet_ldm_name("down_blocks.1.resnets.1.conv1.weight", cfg)
    == "model.diffusion_model.input_blocks.5.0.in_layers.2.weight"
  )
  assert (
    ldm.unet_ldm_name("down_blocks.2.downsamplers.0.conv.bias", cfg)
    == "model.diffusion_model.input_blocks.9.0.op.bias"
  )
  assert (
    ldm.unet_ldm_name("up_blocks.0.upsamplers.0.conv.weight", cfg)
    == "model.diffusion_model.output_blocks.2.1.conv.weight"
  )
  assert (
    ldm.unet_ldm_name("up_blocks.1.upsamplers.0.conv.weight", cfg)
    == "model.diffusion_model.output_blocks.5.2.conv.weight"
  )
  assert ldm.unet_ldm_name(
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight", cfg
  ) == ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight")
  assert (
    ldm.unet_ldm_name("mid_block.resnets.1.time_emb_proj.weight", cfg)
    == "model.diffusion_model.middle_block.2.emb_layers.1.weight"
  )
  assert (
    ldm.unet_ldm_name("time_embedding.linear_2.bias", cfg)
    == "model.diffusion_model.time_embed.2.bias"
  )
  vcfg = dict(ldm.default_configs()[1])
  assert (
    ldm.vae_ldm_name("decoder.up_blocks.0.resnets.0.conv_shortcut.weight", vcfg)
    == "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight"
  )
  assert (
    ldm.vae_ldm_name("encoder.mid_block.attentions.0.to_out.0.weight", vcfg)
    == "first_stage_model.encoder.mid.attn_1.proj_out.weight"
  )
  assert (
    ldm.vae_ldm_name("decoder.conv_norm_out.bias", vcfg)
    == "first_stage_model.decoder.norm_out.bias"
  )


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_sd21_single_file(pipeline, tmp_path, fmt):
  root, unet, vae = pipeline
  sd = _ldm_state_dict(unet, vae)
  path = str(tmp_path / f"model.{fmt}")
  if fmt == "safetensors":
    save_file(sd, path)
  else:
    torch.save(
      {"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 1}, path
    )
  out = convert.convert_sd21(path, str(tmp_path / "out"), config_dir=root)
  m = converted.read_manifest(out)
  assert m["layout"] == "ldm-single-file" and m["ignored_prefixes"] == [
    "alphas_cumprod",
    "cond_stage_model",
  ]
  ours_unet, ours_vae = converted.load_unet(out), converted.load_vae(out)
  # the same parameters as the diffusers folders read directly (exactly: float32 both ways)
  for ours, direct in (
    (ours_unet, converted.load_unet(root)),
    (ours_vae, converted.load_vae(os.path.join(root, "vae"))),
  ):
    a, b = _flat_params(ours), _flat_params(direct)
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  check_unet(ours_unet, unet)
  check_vae(ours_vae, vae)
  assert converted.load_schedule(out).prediction_type == "v_prediction"


def _d(weights, prediction_type):
  """The config.diffusion fields pretrained.build_unet reads."""
  return SimpleNamespace(
    weights=weights,
    prediction_type=prediction_type,
    dtype="float32",
    remat=False,
    unet="tiny",
    vae="tiny",
  )


def test_prediction_type_recorded_and_checked(pipeline, tmp_path):
  """A converted (or raw diffusers) v-prediction model under config.diffusion.prediction_type=
  'epsilon' is one line naming both and the flag; the matching type loads."""
  root, unet, _ = pipeline
  out = convert.convert_sd21(root, str(tmp_path / "sd21"))
  for folder in (out, root):
    assert converted.recorded_prediction_type(folder)[0] == "v_prediction"
    with pytest.raises(SodecError) as e:
      pretrained.build_unet(_d(folder, "epsilon"), nnx.Rngs(0))
    msg = str(e.value)
    assert "\n" not in msg and "is a v_prediction model" in msg
    assert "prediction_type='epsilon'" in msg
    assert msg.endswith("set --config.diffusion.prediction_type=v_prediction")
    with pytest.raises(SodecError, match="prediction_type=v_prediction$"):
      pretrained.build_unet(_d(folder, "epsilon"), nnx.Rngs(0), load=False)
  check_unet(pretrained.build_unet(_d(out, "v_prediction"), nnx.Rngs(0)), unet)
  # --prediction-type overrides the scheduler's, and is what the manifest records
  eps = convert.convert_sd21(root, str(tmp_path / "eps"), prediction_type="epsilon")
  assert converted.recorded_prediction_type(eps) == ("epsilon", os.path.join(eps, "manifest.json"))
  assert converted.load_schedule(eps).prediction_type == "epsilon"
  with pytest.raises(SodecError, match="set --config.diffusion.prediction_type=epsilon"):
    pretrained.build_unet(_d(eps, "v_prediction"), nnx.Rngs(0))
  # the unet subcommand takes it from ../scheduler beside --src; alone it records none (warning)
  u = convert.convert_unet(os.path.join(root, "unet"), str(tmp_path / "u"))
  assert converted.recorded_prediction_type(u)[0] == "v_prediction"
  alone = tmp_path / "alone"
  shutil.copytree(os.path.join(root, "unet"), alone / "unet")
  u2 = convert.convert_unet(str(alone / "unet"), str(tmp_path / "u2"))
  assert converted.recorded_prediction_type(u2)[0] is None
  with pytest.warns(UserWarning, match="cannot check config.diffusion.prediction_type"):
    pretrained.build_unet(_d(u2, "epsilon"), nnx.Rngs(0))


def test_folder_without_scheduler_needs_the_flag(pipeline, tmp_path):
  root, _, _ = pipeline
  bare = tmp_path / "bare"
  for sub in ("unet", "vae"):
    shutil.copytree(os.path.join(root, sub), bare / sub)
  with pytest.raises(
    SodecError,
    match="no scheduler/scheduler_config.json.*pass --prediction-type epsilon .*v_prediction",
  ):
    convert.convert_sd21(str(bare), str(tmp_path / "out"))
  assert_out_clean(str(tmp_path / "out"))
  out = convert.convert_sd21(str(bare), str(tmp_path / "out"), prediction_type="v_prediction")
  assert converted.read_manifest(out)["prediction_type_from"] == "--prediction-type"


V_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
"""
EPS_YAML = V_YAML.replace('    parameterization: "v"\n', "")


def test_single_file_prediction_type(pipeline, tmp_path):
  """A single file without a scheduler config needs --prediction-type or an original .yaml
  beside it (model.params.parameterization: "v" -> v_prediction, absent -> epsilon)."""
  root, unet, vae = pipeline
  configs = tmp_path / "configs"  # architecture only: no scheduler/
  for sub in ("unet", "vae"):
    (configs / sub).mkdir(parents=True)
    shutil.copy(os.path.join(root, sub, "config.json"), configs / sub / "config.json")
  path = tmp_path / "model.safetensors"
  save_file(_ldm_state_dict(unet, vae), str(path))
  with pytest.raises(SodecError) as e:
    convert.convert_sd21(str(path), str(tmp_path / "out"), config_dir=str(configs))
  assert "cannot be read from its tensors" in str(e.value)
  assert "no original config model.yaml" in str(e.value)
  assert str(e.value).endswith("--prediction-type v_prediction (SD 2.1, 768)")
  assert_out_clean(str(tmp_path / "out"))
  out = convert.convert_sd21(
    str(path), str(tmp_path / "flag"), config_dir=str(configs), prediction_type="epsilon"
  )
  assert converted.load_schedule(out).prediction_type == "epsilon"
  for text, want in ((V_YAML, "v_prediction"), (EPS_YAML, "epsilon")):
    (tmp_path / "model.yaml").write_text(text)
    dest = str(tmp_path / want)
    out = convert.convert_sd21(str(path), dest, config_dir=str(configs))
    m = converted.read_manifest(out)
    assert m["prediction_type"] == want and m["prediction_type_from"].endswith("model.yaml")
    assert converted.load_schedule(out).prediction_type == want
  (tmp_path / "model.yaml").write_text("model:\n  target: something.else\n")
  with pytest.raises(SodecError, match="not an original Stable Diffusion config"):
    convert.convert_sd21(str(path), str(tmp_path / "bad"), config_dir=str(configs))


def test_single_file_missing_and_extra_keys(pipeline, tmp_path):
  root, unet, vae = pipeline
  sd = _ldm_state_dict(unet, vae)
  del sd["model.diffusion_model.out.2.weight"]
  sd["model.diffusion_model.extra.weight"] = np.zeros(3, np.float32)
  save_file(sd, str(tmp_path / "m.safetensors"))
  with pytest.raises(
    SodecError,
    match=r"missing 1: conv_out.weight.*unexpected 1: "
    r"model.diffusion_model.extra.weight",
  ):
    convert.convert_sd21(str(tmp_path / "m.safetensors"), str(tmp_path / "out"), config_dir=root)
  assert_out_clean(str(tmp_path / "out"))


# ----------------------------------------------------------------------------- bad inputs


def test_truncated_safetensors(pipeline, tmp_path):
  root, _, _ = pipeline
  bad = tmp_path / "unet"
  bad.mkdir()
  data = open(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"), "rb").read()
  (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
  (bad / "config.json").write_text(open(os.path.join(root, "unet", "config.json")).read())
  with pytest.raises(SodecError, match="could not read .* as safetensors"):
    convert.convert_unet(str(bad), str(tmp_path / "out"))
  assert_out_clean(str(tmp_path / "out"))


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch /tmp/sodec_convert_pwned",))


def test_code_running_pickle_refused(pipeline, tmp_path):
  root, _, _ = pipeline
  folder = tmp_path / "unet"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(root, "unet", "config.json")).read())
  torch.save({"conv_in.weight": _Evil()}, folder / "diffusion_pytorch_model.bin")
  if os.path.exists("/tmp/sodec_convert_pwned"):
    os.remove("/tmp/sodec_convert_pwned")
  with pytest.raises(SodecError, match="refused to load .*could run arbitrary code"):
    convert.convert_unet(str(folder), str(tmp_path / "out"))
  assert not os.path.exists("/tmp/sodec_convert_pwned")
  assert_out_clean(str(tmp_path / "out"))


def test_wrong_model_folder(pipeline, tmp_path):
  root, _, _ = pipeline
  with pytest.raises(SodecError, match="holds a AutoencoderKL"):
    convert.convert_unet(os.path.join(root, "vae"), str(tmp_path / "out"))
  # a VAE's weights under a UNet config: one error listing the keys, with a hint
  folder = tmp_path / "mixed"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(root, "unet", "config.json")).read())
  os.link(
    os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"),
    folder / "diffusion_pytorch_model.safetensors",
  )
  with pytest.raises(
    SodecError,
    match=r"missing \d+: .*unexpected \d+: .*Hint: these weights look like "
    r"a diffusers VAE",
  ):
    convert.convert_unet(str(folder), str(tmp_path / "out"))
  with pytest.raises(SodecError, match="not a diffusers Stable Diffusion folder"):
    convert.convert_sd21(os.path.join(root, "unet"), str(tmp_path / "out"))
  assert_out_clean(str(tmp_path / "out"))


def test_missing_and_misshaped_keys(pipeline, tmp_path):
  root, unet, _ = pipeline
  sd = {k: v.numpy() for k, v in unet.state_dict().items()}
  del sd["conv_in.bias"]
  sd["conv_out.weight"] = sd["conv_out.weight"][:, :-1]
  folder = tmp_path / "unet"
  folder.mkdir()
  save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text(open(os.path.join(root, "unet", "config.json")).read())
  with pytest.raises(SodecError) as e:
    convert.convert_unet(str(folder), str(tmp_path / "out"))
  assert "missing 1: conv_in.bias" in str(e.value)
  assert "mis-shaped 1: conv_out.weight" in str(e.value)
  assert_out_clean(str(tmp_path / "out"))


def test_output_folder_rules(pipeline, tmp_path):
  root, _, _ = pipeline
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "x").write_text("keep me")
  with pytest.raises(SodecError, match="already exists and is not empty"):
    convert.convert_unet(os.path.join(root, "unet"), str(busy))
  assert (busy / "x").read_text() == "keep me"
  empty = tmp_path / "empty"
  empty.mkdir()
  convert.convert_unet(os.path.join(root, "unet"), str(empty))  # an empty folder is fine
  assert os.path.isfile(empty / "manifest.json")


def test_loader_errors_name_the_command(tmp_path):
  with pytest.raises(
    SodecError,
    match=r"python convert/from_torch.py sd21 --src "
    r"/path/to/stable-diffusion-2-1 --out .*nowhere",
  ):
    converted.load_unet(str(tmp_path / "nowhere"))
  with pytest.raises(SodecError, match="from_torch.py hific"):
    converted.load_codec_config(str(tmp_path / "nowhere"))


def test_cli_one_line_errors(pipeline, tmp_path):
  """Through the real script: success, then a truncated file and an unwritable --out."""
  root, _, _ = pipeline
  script = os.path.join(ROOT, "convert", "from_torch.py")
  ok = subprocess.run(
    [
      sys.executable,
      script,
      "vae",
      "--src",
      os.path.join(root, "vae"),
      "--out",
      str(tmp_path / "v"),
    ],
    capture_output=True,
    text=True,
  )
  assert ok.returncode == 0, ok.stderr
  assert converted.read_manifest(str(tmp_path / "v"))["kind"] == "vae"
  blocker = tmp_path / "a_file"  # --out below a regular file cannot be created
  blocker.write_text("")
  r = subprocess.run(
    [
      sys.executable,
      script,
      "unet",
      "--src",
      os.path.join(root, "unet"),
      "--out",
      str(blocker / "u"),
    ],
    capture_output=True,
    text=True,
  )
  assert r.returncode == 1
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("from_torch: error: cannot write"), (
    r.stderr
  )
  assert "Traceback" not in r.stderr
  assert sorted(os.listdir(tmp_path)) == ["a_file", "v"]


def test_cli_main_in_process(pipeline, tmp_path, capsys):
  from convert.from_torch import main

  root, _, _ = pipeline
  assert main(["unet", "--src", os.path.join(root, "vae"), "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("from_torch: error: ") and err.count("\n") == 1
  assert_out_clean(str(tmp_path / "o"))

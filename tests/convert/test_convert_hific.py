"""hific: a checkpoint as the HiFiC PyTorch implementation's utils.save_model writes it
(sodec_jax/benchmarks/hific_torch.py, whose state_dict() has upstream's keys, plus optimizer
states, args, epoch/steps and the spectral-norm Discriminator) -> our codec; outputs compared
with the torch modules, and the key map with upstream's own key list (tests/data)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sodec_jax import converters as convert
from sodec_jax.benchmarks import hific_torch
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax.weights import converted
from tests.codec.conftest import load_photo, micro_codec_config
from tests.convert.conftest import ROOT, assert_out_clean, errors

TOL = 1e-5
MANIFEST = os.path.join(ROOT, "tests", "data", "hific_upstream_keys.json")


def save_upstream_checkpoint(ref: hific_torch.HiFiC, path: str, args: dict) -> None:
  """torch.save of the dict upstream's src/helpers/utils.py save_model writes (one Adam step
  taken, so the optimizer states hold tensors)."""
  hyper = list(ref.Hyperprior.hyperlatent_likelihood.parameters())
  hyper_ids = {id(p) for p in hyper}
  disc_ids = {id(p) for p in ref.Discriminator.parameters()}
  amort = [p for p in ref.parameters() if id(p) not in hyper_ids | disc_ids]
  opts = {
    "amort": torch.optim.Adam(amort, lr=1e-4),
    "hyper": torch.optim.Adam(hyper, lr=1e-4),
    "disc": torch.optim.Adam(ref.Discriminator.parameters(), lr=1e-4),
  }
  for opt in opts.values():
    for group in opt.param_groups:
      for p in group["params"]:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
  torch.save(
    {
      "model_state_dict": ref.state_dict(),
      "compression_optimizer_state_dict": opts["amort"].state_dict(),
      "hyperprior_optimizer_state_dict": opts["hyper"].state_dict(),
      "epoch": 3,
      "steps": 1234,
      "args": args,
      "discriminator_state_dict": ref.Discriminator.state_dict(),
      "discriminator_optimizer_state_dict": opts["disc"].state_dict(),
    },
    path,
  )


def upstream_args(m) -> dict:
  """The kind of `args` dict save_model stores (default_config.hific_args fields)."""
  return {
    "name": "hific_v0.1",
    "latent_channels": m.latent_channels,
    "n_residual_blocks": m.decoder_residual_blocks,
    "regime": "low",
    "lambda_B": 2**-4,
    "normalize_input_image": False,
    "use_channel_norm": True,
    "likelihood_type": "gaussian",
    "model_type": "compression_gan",
    "model_mode": "training",
    "image_dims": (3, 256, 256),
    "lambda_schedule": {"vals": [2.0, 1.0], "steps": [50000]},
    "sample_noise": False,
    "timestamp": "2020_08_30_12:00",
  }


def perturbed(ref: hific_torch.HiFiC) -> hific_torch.HiFiC:
  """Norms and density gates away from their 1/0 init (so a wrong map shows); one power
  iteration of the spectral norms (so u/v are not their init values)."""
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith((".gamma", ".beta")) or ".a_" in name:
        p.add_(0.1 * torch.randn_like(p))
    if hasattr(ref, "Discriminator"):
      ref.Discriminator.train()
      ref.Discriminator.conv1(torch.zeros(1, 3 + 12, 8, 8))
  return ref.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  m = micro_codec_config().model
  torch.manual_seed(0)
  ref = perturbed(
    hific_torch.HiFiC(
      m.latent_channels,
      m.hyper_channels,
      m.encoder_filters,
      m.decoder_filters,
      m.decoder_residual_blocks,
      discriminator_filters=(8, 8, 16, 16),
    )
  )
  path = str(tmp_path_factory.mktemp("hific") / "hific_low.pt")
  save_upstream_checkpoint(ref, path, upstream_args(m))
  return path, ref


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_hific_codec(checkpoint, tmp_path):
  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  manifest = converted.read_manifest(out)
  assert manifest["kind"] == "hific" and manifest["components"] == ["codec", "discriminator"]
  assert manifest["hific_args"]["regime"] == "low" and manifest["discriminator"] is True
  cfg = converted.load_codec_config(out)
  micro = micro_codec_config()
  for k in (
    "latent_channels",
    "hyper_channels",
    "encoder_filters",
    "decoder_filters",
    "decoder_residual_blocks",
    "factorized_filters",
  ):
    assert tuple(np.atleast_1d(cfg[k])) == tuple(np.atleast_1d(micro.model[k])), k
  assert cfg["padding"] == "hific" and cfg["factorized_last_gate"] is True
  assert cfg["normalize_input_image"] is False  # upstream_args: HiFiC's default
  micro.model.factorized_last_gate = True
  ours = build_model(micro, nnx.Rngs(5))
  converted.load_codec_params(out, ours)

  x = load_photo("astronaut.png")[128:256, 192:384].astype(np.float32)[None] / 255.0
  with torch.no_grad():
    y_ref = ref.Encoder(_nchw(x))
    z_ref = ref.Hyperprior.analysis_net(y_ref)
    mu_ref, sigma_ref = ref.Hyperprior.prior(torch.round(z_ref))
    y_hat = torch.round(y_ref - mu_ref) + mu_ref
    x_ref = ref.Generator(y_hat)
    lik_z = ref.Hyperprior.hyperlatent_likelihood.likelihood(torch.round(z_ref))
  y, z = ours.analysis(jnp.asarray(x))
  assert errors(y, _nhwc(y_ref))[0] < TOL
  assert errors(z, _nhwc(z_ref))[0] < TOL
  mu, sigma = ours.prior_parameters(jnp.asarray(_nhwc(torch.round(z_ref))))
  assert errors(mu, _nhwc(mu_ref))[0] < TOL and errors(sigma, _nhwc(sigma_ref))[0] < TOL
  x_f = ours.fidelity_reconstruction(jnp.asarray(_nhwc(y_hat)))
  assert errors(x_f, _nhwc(x_ref))[0] < TOL
  lz = ours.codec.prior.hyperlatent.likelihood(jnp.asarray(_nhwc(torch.round(z_ref))), 1e-9)
  assert errors(lz, _nhwc(lik_z))[0] < TOL


def test_hific_discriminator_arrays(checkpoint, tmp_path):
  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  disc = converted.load_discriminator_arrays(out)
  d = ref.Discriminator
  assert sorted(disc) == ["context_conv", "conv1", "conv2", "conv3", "conv4", "conv_out"]
  np.testing.assert_array_equal(
    disc["context_conv"]["kernel"], d.context_conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  )
  assert set(disc["conv1"]) == {"kernel", "bias", "sn_u", "sn_v"}
  with torch.no_grad():
    d.conv1(torch.zeros(1, 15, 8, 8))  # eval: the normalised weight from the stored u, v
    w_eval = d.conv1.weight.numpy()
  k = disc["conv1"]["kernel"]  # [kh, kw, I, O]
  w_mat = k.transpose(3, 2, 0, 1).reshape(k.shape[3], -1)
  sigma = disc["conv1"]["sn_u"] @ w_mat @ disc["conv1"]["sn_v"]
  rel, _ = errors((k / sigma).transpose(3, 2, 0, 1), w_eval)
  assert rel < TOL


def test_hific_normalize_input_image_comes_from_args(checkpoint, tmp_path):
  path, _ = checkpoint
  obj = torch.load(path, weights_only=True)
  obj["args"]["normalize_input_image"] = True
  torch.save(obj, tmp_path / "normalized.pt")
  out = convert.convert_hific(str(tmp_path / "normalized.pt"), str(tmp_path / "o"))
  assert converted.load_codec_config(out)["normalize_input_image"] is True


def test_hific_errors(checkpoint, tmp_path):
  path, ref = checkpoint
  obj = torch.load(path, weights_only=True)
  obj["args"]["n_residual_blocks"] = 9
  torch.save(obj, tmp_path / "inconsistent.pt")
  with pytest.raises(SodecError, match="n_residual_blocks=9 but its tensors have 1"):
    convert.convert_hific(str(tmp_path / "inconsistent.pt"), str(tmp_path / "o"))
  obj = torch.load(path, weights_only=True)
  del obj["model_state_dict"]["Generator.conv_block_out.1.bias"]
  obj["model_state_dict"]["Encoder.extra"] = torch.zeros(2)
  torch.save(obj, tmp_path / "missing.pt")
  with pytest.raises(
    SodecError,
    match=r"missing 1: Generator.conv_block_out.1.bias \| "
    r"unexpected 1: Encoder.extra",
  ):
    convert.convert_hific(str(tmp_path / "missing.pt"), str(tmp_path / "o"))
  # another model's checkpoint: a hint
  torch.save(
    {"model_state_dict": {"time_embedding.linear_1.weight": torch.zeros(2, 2)}},
    tmp_path / "unet.pt",
  )
  with pytest.raises(SodecError, match="not a HiFiC checkpoint.*looks like a diffusers UNet"):
    convert.convert_hific(str(tmp_path / "unet.pt"), str(tmp_path / "o"))

  class Evil:
    def __reduce__(self):
      return (os.system, ("touch /tmp/sodec_hific_pwned",))

  torch.save({"model_state_dict": {}, "args": Evil()}, tmp_path / "evil.pt")
  with pytest.raises(SodecError, match="refused to load"):
    convert.convert_hific(str(tmp_path / "evil.pt"), str(tmp_path / "o"))
  assert not os.path.exists("/tmp/sodec_hific_pwned")
  data = open(path, "rb").read()
  (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
  with pytest.raises(SodecError, match="could not read .* as a torch file"):
    convert.convert_hific(str(tmp_path / "trunc.pt"), str(tmp_path / "o"))
  assert_out_clean(str(tmp_path / "o"))
  # a model of another shape cannot take the converted codec
  out = convert.convert_hific(path, str(tmp_path / "ok"))
  other = micro_codec_config()
  other.model.latent_channels = 24
  with pytest.raises(SodecError, match="latent_channels=16"):
    converted.load_codec_params(out, build_model(other, nnx.Rngs(0)))


def test_converted_hific_is_a_complete_codec(checkpoint, tmp_path):
  """`--checkpoint CONVERTED_DIR` works directly and reproduces the PyTorch code's reconstruction
  (an image whose sides are multiples of 64, so no padding is involved)."""
  from sodec_jax import api

  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  model = api.load_model(out)
  image = np.ascontiguousarray(load_photo("astronaut.png")[128:256, 192:384])
  decoded = api.decompress(model, api.compress(model, image))
  x = image.astype(np.float32)[None] / 255.0
  with torch.no_grad():
    y = ref.Encoder(_nchw(x))
    mu, _ = ref.Hyperprior.prior(torch.round(ref.Hyperprior.analysis_net(y)))
    x_ref = ref.Generator(torch.round(y - mu) + mu).clamp(0, 1)
  want = np.round(_nhwc(x_ref)[0] * 255.0)
  assert np.abs(decoded.astype(np.float64) - want).max() <= 1.0
  import json

  from sodec_jax.errors import SodecError

  manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
  other = tmp_path / "vit"
  other.mkdir()
  (other / "manifest.json").write_text(json.dumps(dict(manifest, kind="vit", components=[])))
  with pytest.raises(SodecError, match="not a codec"):
    api.load_model(str(other))


def test_converted_discriminator_loads_into_ours(checkpoint, tmp_path):
  """The converted discriminator/ fills our Discriminator exactly as the torch state dict does."""
  from sodec_jax.discriminator import Discriminator
  from sodec_jax.weights.hific import load_hific_discriminator

  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  c = micro_codec_config().model.latent_channels
  via_file = Discriminator(c, filters=(8, 8, 16, 16), rngs=nnx.Rngs(0))
  converted.load_discriminator(out, via_file)
  direct = Discriminator(c, filters=(8, 8, 16, 16), rngs=nnx.Rngs(1))
  load_hific_discriminator({k: v.numpy() for k, v in ref.state_dict().items()}, direct)
  a, b = nnx.to_flat_state(nnx.state(via_file)), dict(nnx.to_flat_state(nnx.state(direct)))
  for k, v in a:
    np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[k].get_value()))


def test_stage4_discriminator_starts_from_a_converted_folder(checkpoint, tmp_path):
  """--config.loss.discriminator_init=DIR: make_discriminator (sodec_jax/train/build.py) starts from the converted
  HiFiC discriminator (widths read from it), the same values as a direct torch load."""
  from sodec_jax.discriminator import Discriminator, SpectralState
  from sodec_jax.errors import SodecError
  from sodec_jax.train.build import make_discriminator
  from sodec_jax.weights.hific import load_hific_discriminator

  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  config = micro_codec_config()
  config.loss.discriminator_init = out
  _, state, _ = make_discriminator(config)
  direct = Discriminator(config.model.latent_channels, filters=(8, 8, 16, 16), rngs=nnx.Rngs(1))
  load_hific_discriminator({k: v.numpy() for k, v in ref.state_dict().items()}, direct)
  want = {
    "params": nnx.to_pure_dict(nnx.state(direct, nnx.Param)),
    "spectral": nnx.to_pure_dict(nnx.state(direct, SpectralState)),
  }
  for part in ("params", "spectral"):
    got, exp = jax.tree.leaves(state[part]), jax.tree.leaves(want[part])
    assert len(got) == len(exp) > 0
    for a, b in zip(got, exp):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.model.latent_channels = 8
  with pytest.raises(SodecError, match="16 channels, this model has 8"):
    make_discriminator(config)
  config.loss.discriminator_init = str(tmp_path / "nowhere")
  with pytest.raises(SodecError, match="does not exist.*convert/from_torch.py hific"):
    make_discriminator(config)


# ----------------------------------------------------------------------------- upstream's keys


def _manifest() -> dict:
  with open(MANIFEST) as f:
    doc = json.load(f)
  assert doc["source"]["commit"] == "7d4e9e785932c039df7fb436159600ed8b474a83"
  return {k: tuple(shape) for k, shape in doc["model_state_dict"]}


def test_key_map_covers_upstream_keys_exactly():
  """Every key of upstream's paper-size model_state_dict is mapped by hific_key_map (with its
  shape in our layout) or is a Discriminator key the discriminator map takes; nothing else."""
  from configs import base
  from sodec_jax.weights.hific import _to_ours, hific_discriminator_key_map, hific_key_map

  upstream = _manifest()
  config = base.get_config()
  config.model.factorized_last_gate = True  # as hific_model_config sets it
  rows = hific_key_map(config.model)
  mapped = [r[0] for r in rows]
  assert len(mapped) == len(set(mapped))
  disc = {k for k in upstream if k.startswith("Discriminator.")}
  assert sorted(set(upstream) - disc) == sorted(mapped)
  assert disc == {"Discriminator." + k for k, _, _ in hific_discriminator_key_map()}
  shapes = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0), pretrained=False))
  flat = dict(nnx.to_flat_state(nnx.state(shapes, nnx.Param)))
  for key, path, kind in rows:
    got = _to_ours(np.zeros(upstream[key], np.float32), kind).shape
    assert got == tuple(flat[path].value.shape), (key, got, flat[path].value.shape)


def test_reference_modules_have_upstream_keys():
  """hific_torch.HiFiC at paper size (Discriminator included) has upstream's keys, shapes and
  key order."""
  with torch.device("meta"):
    ref = hific_torch.HiFiC(discriminator_filters=hific_torch.DISCRIMINATOR_FILTERS)
  assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == list(_manifest().items())


def test_wrong_names_are_listed_with_the_likely_cause(checkpoint, tmp_path):
  path, _ = checkpoint
  obj = torch.load(path, weights_only=True)
  sd = obj["model_state_dict"]
  for leaf in ("weight", "bias"):  # the name an earlier layout guessed for upstream's last conv
    sd[f"Encoder.conv_out.1.{leaf}"] = sd.pop(f"Encoder.conv_block_out.1.{leaf}")
  torch.save(obj, tmp_path / "renamed.pt")
  with pytest.raises(SodecError) as e:
    convert.convert_hific(str(tmp_path / "renamed.pt"), str(tmp_path / "o"))
  msg = str(e.value)
  assert (
    "missing 2: Encoder.conv_block_out.1.bias, Encoder.conv_block_out.1.weight | "
    "unexpected 2: Encoder.conv_out.1.bias, Encoder.conv_out.1.weight"
  ) in msg
  assert "Hint: likely cause: it was saved by another version or fork of that code" in msg
  assert "not a HiFiC" not in msg and "looks like" not in msg and "\n" not in msg
  obj["model_state_dict"] = {
    f"module.{k}": v for k, v in torch.load(path, weights_only=True)["model_state_dict"].items()
  }
  obj["model_state_dict"]["Encoder.conv_block1.1.weight"] = torch.zeros(1)
  torch.save(obj, tmp_path / "dp.pt")
  with pytest.raises(
    SodecError,
    match=r"missing \d+: .*\| unexpected \d+: .*Hint: likely cause: its "
    r"keys start with 'module.'",
  ):
    convert.convert_hific(str(tmp_path / "dp.pt"), str(tmp_path / "o"))
  assert_out_clean(str(tmp_path / "o"))


# ----------------------------------------------------------------------------- end to end


def _convert_cli(src: str, out: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "convert", "from_torch.py"),
      "hific",
      "--src",
      src,
      "--out",
      out,
    ],
    env=env,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  return out


def code_against_reference(folder: str, ref: hific_torch.HiFiC, image: np.ndarray) -> dict:
  """Our compress/decompress through a converted folder vs the reference's evaluation path:
  PSNR of ours against its reconstruction, max uint8 difference, coded bits / its estimate."""
  from sodec_jax import api
  from sodec_jax.codec import bitstream

  model = api.load_model(folder)
  data = api.compress(model, image)
  decoded = api.decompress(model, data).astype(np.float64)
  bits = 8 * sum(len(s) for s in bitstream.unpack(data)[1])
  x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float() / 255.0
  out = ref.code(x)
  want = out["reconstruction"][0].permute(1, 2, 0).double().numpy() * 255.0
  mse = float(np.mean((decoded - want) ** 2))
  res = {
    "psnr": 10 * np.log10(255.0**2 / max(mse, 1e-12)),
    "max_diff": float(np.abs(decoded - np.round(want)).max()),
    "bit_ratio": bits / out["bits"],
    "bits": bits,
    "ref_bits": out["bits"],
  }
  print(f"[hific e2e] {image.shape[0]}x{image.shape[1]}: {res}")
  return res


@pytest.mark.parametrize("size", [(96, 160), (101, 133)])
def test_converted_checkpoint_reproduces_upstream_at_any_size(checkpoint, tmp_path_factory, size):
  """`convert/from_torch.py hific` on a save_model-style file, then compress/decompress: the
  reference's reconstruction (image padded to 16, y to 4, as upstream) within 1/255 and its
  rate estimate within 2%, at a size padded differently from ours (96x160) and an odd one."""
  path, ref = checkpoint
  out = str(tmp_path_factory.getbasetemp() / "hific_cli")
  if not os.path.isdir(out):
    _convert_cli(path, out)
  h, w = size
  image = np.ascontiguousarray(load_photo("astronaut.png")[100 : 100 + h, 150 : 150 + w])
  res = code_against_reference(out, ref, image)
  assert res["psnr"] >= 50.0 and res["max_diff"] <= 1.0
  assert abs(res["bit_ratio"] - 1.0) <= 0.02


@pytest.mark.slow
def test_paper_size_checkpoint_reproduces_upstream(tmp_path):
  """The same at paper size (C=220, N=320, 9 residual blocks), random weights, 101x133."""
  torch.manual_seed(1)
  ref = perturbed(hific_torch.HiFiC(discriminator_filters=hific_torch.DISCRIMINATOR_FILTERS))
  # A trained model's regime: y and z of a few units, sigma ~ |y| (random weights give y ~ 0.4,
  # z = 0 and sigma at its 0.11 floor, so the hyperprior would carry nothing).
  with torch.no_grad():
    ref.Encoder.conv_block_out[1].weight.mul_(5.0)
    ref.Hyperprior.analysis_net.conv3.weight.mul_(20.0)
    ref.Hyperprior.synthesis_std.conv3.bias.fill_(2.0)
  path = str(tmp_path / "hific_paper.pt")
  from configs import base

  save_upstream_checkpoint(ref, path, upstream_args(base.get_config().model))
  out = _convert_cli(path, str(tmp_path / "conv"))
  image = np.ascontiguousarray(load_photo("astronaut.png")[100:201, 150:283])
  res = code_against_reference(out, ref, image)
  assert res["psnr"] >= 50.0 and res["max_diff"] <= 1.0
  assert abs(res["bit_ratio"] - 1.0) <= 0.02

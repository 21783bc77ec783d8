"""hific: a HiFiC PyTorch training checkpoint (HiFiC layout, tests/reference/hific_torch.py, plus
its spectral-norm Discriminator) -> our codec; outputs compared with the torch modules."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax import converters as convert
from sodec_jax.weights import converted
from tests.codec.conftest import load_photo, micro_codec_config
from tests.convert.conftest import assert_out_clean, errors
from tests.reference import hific_torch

TOL = 1e-5


class Discriminator(nn.Module):
  """The HiFiC implementation's discriminator (module names and spectral norm as there)."""

  def __init__(self, C, im_channels=3, context_C_out=12, filters=(64, 128, 256, 512)):
    super().__init__()
    self.context_conv = nn.Conv2d(C, context_C_out, 3, padding=1, padding_mode="reflect")
    kw = dict(stride=2, padding=1, padding_mode="reflect")
    sn = nn.utils.spectral_norm
    self.conv1 = sn(nn.Conv2d(im_channels + context_C_out, filters[0], 4, **kw))
    self.conv2 = sn(nn.Conv2d(filters[0], filters[1], 4, **kw))
    self.conv3 = sn(nn.Conv2d(filters[1], filters[2], 4, **kw))
    self.conv4 = sn(nn.Conv2d(filters[2], filters[3], 4, **kw))
    self.conv_out = nn.Conv2d(filters[3], 1, 1)


class HiFiCWithDisc(hific_torch.HiFiCModel):
  def __init__(self, *a, **k):
    super().__init__(*a, **k)
    self.Discriminator = Discriminator(a[0], filters=(8, 8, 16, 16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  m = micro_codec_config().model
  torch.manual_seed(0)
  ref = HiFiCWithDisc(m.latent_channels, m.hyper_channels, tuple(m.encoder_filters),
                      tuple(m.decoder_filters), m.decoder_residual_blocks).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith((".gamma", ".beta")) or ".a_" in name:
        p.add_(0.1 * torch.randn_like(p))
  ref.Discriminator.train()
  with torch.no_grad():   # a power iteration, so u/v are not their init values
    ref.Discriminator.conv1(torch.zeros(1, 3 + 12, 8, 8))
  ref.Discriminator.eval()
  opt = torch.optim.Adam(ref.parameters(), lr=1e-4)
  path = str(tmp_path_factory.mktemp("hific") / "hific_low.pt")
  torch.save({"model_state_dict": ref.state_dict(),
              "compression_optimizer_state_dict": opt.state_dict(),
              "epoch": 3, "steps": 1234,
              "args": {"latent_channels": m.latent_channels, "n_residual_blocks": 1,
                       "regime": "low", "lambda_B": 2 ** -4, "normalize_input_image": False}},
             path)
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
  for k in ("latent_channels", "hyper_channels", "encoder_filters", "decoder_filters",
            "decoder_residual_blocks", "factorized_filters"):
    assert tuple(np.atleast_1d(cfg[k])) == tuple(np.atleast_1d(micro.model[k])), k
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
  np.testing.assert_array_equal(disc["context_conv"]["kernel"],
                                d.context_conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  assert set(disc["conv1"]) == {"kernel", "bias", "sn_u", "sn_v"}
  with torch.no_grad():
    d.conv1(torch.zeros(1, 15, 8, 8))          # eval: the normalised weight from the stored u, v
    w_eval = d.conv1.weight.numpy()
  k = disc["conv1"]["kernel"]                   # [kh, kw, I, O]
  w_mat = k.transpose(3, 2, 0, 1).reshape(k.shape[3], -1)
  sigma = disc["conv1"]["sn_u"] @ w_mat @ disc["conv1"]["sn_v"]
  rel, _ = errors((k / sigma).transpose(3, 2, 0, 1), w_eval)
  assert rel < TOL


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
  with pytest.raises(SodecError, match=r"missing 1: Generator.conv_block_out.1.bias \| "
                                       r"unexpected 1: Encoder.extra"):
    convert.convert_hific(str(tmp_path / "missing.pt"), str(tmp_path / "o"))
  # another model's checkpoint: a hint
  torch.save({"model_state_dict": {"time_embedding.linear_1.weight": torch.zeros(2, 2)}},
             tmp_path / "unet.pt")
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
  """--config.loss.discriminator_init=DIR: train.make_discriminator starts from the converted
  HiFiC discriminator (widths read from it), the same values as a direct torch load."""
  from sodec_jax import train
  from sodec_jax.discriminator import Discriminator, SpectralState
  from sodec_jax.weights.hific import load_hific_discriminator
  from sodec_jax.errors import SodecError
  path, ref = checkpoint
  out = convert.convert_hific(path, str(tmp_path / "hific"))
  config = micro_codec_config()
  config.loss.discriminator_init = out
  _, state, _ = train.make_discriminator(config)
  direct = Discriminator(config.model.latent_channels, filters=(8, 8, 16, 16), rngs=nnx.Rngs(1))
  load_hific_discriminator({k: v.numpy() for k, v in ref.state_dict().items()}, direct)
  want = {"params": nnx.to_pure_dict(nnx.state(direct, nnx.Param)),
          "spectral": nnx.to_pure_dict(nnx.state(direct, SpectralState))}
  for part in ("params", "spectral"):
    got, exp = jax.tree.leaves(state[part]), jax.tree.leaves(want[part])
    assert len(got) == len(exp) > 0
    for a, b in zip(got, exp):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.model.latent_channels = 8
  with pytest.raises(SodecError, match="16 channels, this model has 8"):
    train.make_discriminator(config)
  config.loss.discriminator_init = str(tmp_path / "nowhere")
  with pytest.raises(SodecError, match="does not exist.*convert/from_torch.py hific"):
    train.make_discriminator(config)

"""Our codec equals the HiFiC PyTorch implementation's modules (sodec_jax/benchmarks/hific_torch.py,
written from the upstream source) with the same random weights, through the explicit key map of
sodec_jax.weights.hific."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sodec_jax.benchmarks import hific_torch
from sodec_jax.errors import SodecError
from sodec_jax.pretrained import build_model
from sodec_jax.weights.hific import load_hific_state_dict
from tests.codec.conftest import load_photo, micro_codec_config


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pair():
  config = micro_codec_config()
  m = config.model
  m.factorized_last_gate = True  # upstream's density gates its last layer too
  torch.manual_seed(0)
  ref = hific_torch.HiFiC.from_model_config(m).eval()
  with torch.no_grad():  # non-trivial norms and density gates (defaults are 1/0)
    for name, p in ref.named_parameters():
      if name.endswith((".gamma", ".beta")) or ".a_" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  ours = build_model(config, nnx.Rngs(1))
  load_hific_state_dict(sd, ours, m)
  return config, ref, ours, sd


def test_codec_matches_hific_torch(pair):
  _, ref, ours, _ = pair
  x = (
    load_photo("astronaut.png")[128:256, 192:384].astype(np.float32)[None] / 255.0
  )  # [1,128,192,3]
  with torch.no_grad():
    y_ref = ref.Encoder(_nchw(x))
    z_ref = ref.Hyperprior.analysis_net(y_ref)
    z_hat = torch.round(z_ref)
    mu_ref, sigma_ref = ref.Hyperprior.prior(z_hat)
    y_hat = torch.round(y_ref - mu_ref) + mu_ref
    x_ref = ref.Generator(y_hat)
    lik_z = ref.Hyperprior.hyperlatent_likelihood.likelihood(z_hat + 0.3)
    lik_y = ref.Hyperprior.latent_likelihood(y_hat, mu_ref, sigma_ref)
  y, z = ours.analysis(jnp.asarray(x))
  assert _rel(y, _nhwc(y_ref)) < 1e-5
  assert _rel(z, _nhwc(z_ref)) < 1e-5
  mu, sigma = ours.prior_parameters(jnp.asarray(_nhwc(z_hat)))
  assert _rel(mu, _nhwc(mu_ref)) < 1e-5 and _rel(sigma, _nhwc(sigma_ref)) < 1e-5
  x_f = ours.fidelity_reconstruction(jnp.asarray(_nhwc(y_hat)))
  assert _rel(x_f, _nhwc(x_ref)) < 1e-5
  from sodec_jax.codec.entropy import gaussian_likelihood

  assert (
    _rel(ours.codec.prior.hyperlatent.likelihood(jnp.asarray(_nhwc(z_hat + 0.3))), _nhwc(lik_z))
    < 1e-5
  )
  assert _rel(gaussian_likelihood(jnp.asarray(_nhwc(y_hat)), mu, sigma), _nhwc(lik_y)) < 1e-5


def test_strict_key_map_errors(pair):
  config, _, ours, sd = pair
  bad = dict(sd)
  del bad["Encoder.conv_block_out.1.weight"]
  bad["Encoder.extra.weight"] = np.zeros(3, np.float32)
  bad["Generator.conv_block_out.1.bias"] = np.zeros(7, np.float32)
  with pytest.raises(SodecError) as e:
    load_hific_state_dict(bad, ours, config.model)
  msg = str(e.value)
  assert "missing 1: Encoder.conv_block_out.1.weight" in msg
  assert "unexpected 1: Encoder.extra.weight" in msg
  assert "Generator.conv_block_out.1.bias" in msg
  with pytest.raises(SodecError, match="does not look like a HiFiC"):
    load_hific_state_dict({"unet.conv_in.weight": np.zeros(1)}, ours, config.model)
  ignored = load_hific_state_dict(
    {**sd, "Discriminator.conv1.weight_orig": np.zeros(1)}, ours, config.model
  )
  assert ignored == ["Discriminator.conv1.weight_orig"]


def test_normalize_input_image_is_upstreams_flag(pair):
  """model.normalize_input_image=True is HiFiC's flag of that name (src/model.py of
  Justin-Tan/high-fidelity-generative-compression at b44c6f7: the dataset feeds [-1, 1] images,
  `reconstruction = torch.tanh(reconstruction)`, and decompress maps (r + 1) / 2): written here
  from upstream's modules directly, not through our torch twin's wrapper."""
  config, ref, _, sd = pair
  m = config.model.copy_and_resolve_references()
  m.normalize_input_image = True
  config = config.copy_and_resolve_references()
  config.model = m
  ours = build_model(config, nnx.Rngs(1))
  load_hific_state_dict(sd, ours, m)
  x = load_photo("astronaut.png")[128:256, 192:384].astype(np.float32)[None] / 255.0
  with torch.no_grad():
    y_ref = ref.Encoder(_nchw(2.0 * x - 1.0))
    x_ref = (torch.tanh(ref.Generator(y_ref)) + 1.0) / 2.0
  y, _ = ours.analysis(jnp.asarray(x))
  assert _rel(y, _nhwc(y_ref)) < 1e-5
  x_f = ours.fidelity_reconstruction(jnp.asarray(_nhwc(y_ref)))
  assert _rel(x_f, _nhwc(x_ref)) < 1e-5
  twin = hific_torch.HiFiC.from_model_config(m).eval()
  twin.load_state_dict(ref.state_dict())
  with torch.no_grad():
    assert _rel(_nhwc(twin.synthesis(y_ref)), _nhwc(x_ref)) < 1e-6
    assert _rel(_nhwc(twin.analysis(_nchw(x))[0]), _nhwc(y_ref)) < 1e-6

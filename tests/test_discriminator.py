"""HiFiC conditional discriminator and non-saturating GAN losses vs a plain-torch reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from sodec_jax import gan
from sodec_jax.benchmarks.hific_torch import Discriminator as TorchDiscriminator
from sodec_jax.benchmarks.hific_torch import non_saturating_loss
from sodec_jax.discriminator import Discriminator, SpectralState
from sodec_jax.errors import SodecError
from sodec_jax.weights.hific import hific_discriminator_key_map, load_hific_discriminator
from tests.conftest import load_photo

C = 8  # latent channels (small; the layout does not depend on it)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _inputs(batch=1, size=64, seed=0):
  photo = load_photo("astronaut.png").astype(np.float32) / 255.0
  crops = [photo[40 + 96 * i : 40 + 96 * i + size, 180 : 180 + size] for i in range(batch)]
  x = np.stack(crops)  # [B, H, W, 3] in [0, 1]
  y = np.random.default_rng(seed).normal(size=(batch, size // 16, size // 16, C)).astype(np.float32)
  return x, y


def _pair(seed=0):
  torch.manual_seed(seed)
  ref = TorchDiscriminator(C)
  ours = nnx.eval_shape(lambda: Discriminator(C, rngs=nnx.Rngs(seed + 1)))  # every var is loaded
  sd = {"Discriminator." + k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  load_hific_discriminator(sd, ours)
  return ref, ours


def _torch_call(ref, x, y):
  _, logits = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
  return logits.detach().numpy().reshape(x.shape[0], -1)


def test_state_dict_keys_match_key_map():
  ref = TorchDiscriminator(C)
  assert sorted(ref.state_dict()) == sorted(k for k, _, _ in hific_discriminator_key_map())


def test_eval_mode_matches_torch():
  ref, ours = _pair()
  ref.eval()
  x, y = _inputs()
  want = _torch_call(ref, x, y)
  u_before = np.asarray(ours.conv1.u[...])
  got = ours(jnp.asarray(x), jnp.asarray(y), update_stats=False)
  assert got.shape == (1, 16) and want.shape == (1, 16)
  err = _rel(got, want)
  print(f"eval logits rel err {err:.2e}")
  assert err <= 1e-5
  np.testing.assert_array_equal(np.asarray(ours.conv1.u[...]), u_before)  # no update in eval
  np.testing.assert_allclose(
    np.asarray(jax.nn.sigmoid(got)), torch.sigmoid(torch.from_numpy(want)).numpy(), atol=1e-6
  )


def test_training_mode_power_iteration_matches_torch():
  ref, ours = _pair(seed=3)
  ref.train()
  x, y = _inputs(batch=2, seed=3)
  for step in range(2):  # two training forwards: u, v keep following torch's
    want = _torch_call(ref, x, y)
    got = ours(jnp.asarray(x), jnp.asarray(y), update_stats=True)
    err = _rel(got, want)
    print(f"train step {step} logits rel err {err:.2e}")
    assert err <= 1e-5
    for k in range(1, 5):
      conv_t, conv = getattr(ref, f"conv{k}"), getattr(ours, f"conv{k}")
      eu = _rel(conv.u[...], conv_t.weight_u.numpy())
      ev = _rel(conv.v[...], conv_t.weight_v.numpy())
      assert eu <= 1e-5 and ev <= 1e-5, (k, eu, ev)
  # after the updates, eval mode agrees again with the updated u, v
  ref.eval()
  assert (
    _rel(ours(jnp.asarray(x), jnp.asarray(y), update_stats=False), _torch_call(ref, x, y)) <= 1e-5
  )


def test_d_loss_gradient_matches_torch():
  """Gradient of the D loss w.r.t. weight_orig (sigma differentiated with u, v constant)."""
  ref, ours = _pair(seed=5)
  ref.train()
  x, y = _inputs(seed=5)
  x_hat = np.clip(x + 0.1 * np.random.default_rng(1).normal(size=x.shape), 0, 1).astype(np.float32)
  xt = torch.from_numpy(np.concatenate([x, x_hat])).permute(0, 3, 1, 2)
  yt = torch.from_numpy(np.concatenate([y, y])).permute(0, 3, 1, 2)
  _, logits = ref(xt, yt)
  d_loss_t, _ = non_saturating_loss(logits[:16], logits[16:])
  d_loss_t.backward()

  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss_fn(params):
    disc = nnx.merge(graphdef, params, rest)
    real, fake = gan.real_fake_logits(
      disc,
      jnp.asarray(x),
      jnp.asarray(x_hat),
      jnp.asarray(y),
      update_stats=True,
      train_generator=False,
    )
    return gan.discriminator_loss(real, fake)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  d_loss_t = float(d_loss_t.detach())
  assert abs(float(loss) - d_loss_t) <= 1e-5 * abs(d_loss_t)
  for k in range(1, 5):
    g_t = getattr(ref, f"conv{k}").weight_orig.grad.numpy().transpose(2, 3, 1, 0)
    err = _rel(grads[f"conv{k}"]["kernel"], g_t)
    print(f"conv{k} kernel grad rel err {err:.2e}")
    assert err <= 1e-4
  assert (
    _rel(
      grads["context_conv"]["kernel"], ref.context_conv.weight.grad.numpy().transpose(2, 3, 1, 0)
    )
    <= 1e-4
  )


def test_losses_closed_forms():
  zeros = jnp.zeros((2, 16))
  assert math.isclose(float(gan.discriminator_loss(zeros, zeros)), 2 * math.log(2), rel_tol=1e-6)
  assert math.isclose(float(gan.generator_loss(zeros)), math.log(2), rel_tol=1e-6)
  real, fake = jnp.full((1, 4), 3.0), jnp.full((1, 4), -2.0)
  want = math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-2.0))
  assert math.isclose(float(gan.discriminator_loss(real, fake)), want, rel_tol=1e-6)
  assert math.isclose(float(gan.generator_loss(fake)), math.log1p(math.exp(2.0)), rel_tol=1e-6)
  # large logits stay finite (softplus, not log(sigmoid))
  assert np.isfinite(
    float(gan.discriminator_loss(jnp.full((1, 2), -200.0), jnp.full((1, 2), 200.0)))
  )
  rng = np.random.default_rng(0)
  lr, lf = (
    rng.normal(size=(2, 16)).astype(np.float32) * 3,
    rng.normal(size=(2, 16)).astype(np.float32) * 3,
  )
  d_t, g_t = non_saturating_loss(torch.from_numpy(lr), torch.from_numpy(lf))
  assert math.isclose(
    float(gan.discriminator_loss(jnp.asarray(lr), jnp.asarray(lf))), float(d_t), rel_tol=1e-6
  )
  assert math.isclose(float(gan.generator_loss(jnp.asarray(lf))), float(g_t), rel_tol=1e-6)


class _Pair(nnx.Module):
  """A stand-in generator (x_hat = x * scale + shift) next to the discriminator."""

  def __init__(self, rngs):
    self.gen_scale = nnx.Param(jnp.full((3,), 0.9))
    self.gen_shift = nnx.Param(jnp.full((3,), 0.05))
    self.discriminator = Discriminator(C, filters=(8, 8, 16, 16), rngs=rngs)


def _is_gen(path, _):
  return path[0] in ("gen_scale", "gen_shift")


def _is_disc_param(path, value):
  return path[0] == "discriminator" and isinstance(value, nnx.Param)


def test_gradients_flow_where_they_should():
  model = _Pair(nnx.Rngs(0))
  x, y = (jnp.asarray(a) for a in _inputs(seed=2))

  def g_loss(x_hat, y_hat, disc):
    _, fake = gan.real_fake_logits(disc, x, x_hat, y_hat, update_stats=False, train_generator=True)
    return gan.generator_loss(fake)

  def d_loss(x_hat, y_hat, disc):
    real, fake = gan.real_fake_logits(
      disc, x, x_hat, y_hat, update_stats=False, train_generator=False
    )
    return gan.discriminator_loss(real, fake)

  x_hat = x * 0.9 + 0.05
  gx, gy = nnx.jit(jax.grad(g_loss, argnums=(0, 1)))(x_hat, jnp.asarray(y), model.discriminator)
  assert float(jnp.abs(gx).max()) > 0
  assert float(jnp.abs(gy).max()) == 0  # y_hat is stop-grad
  gx, gy, gd = nnx.jit(nnx.grad(d_loss, argnums=(0, 1, 2)))(
    x_hat, jnp.asarray(y), model.discriminator
  )
  assert float(jnp.abs(gx).max()) == 0 and float(jnp.abs(gy).max()) == 0  # x_hat, y_hat stop-grad
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gd))  # every D param learns

  # generator step: differentiate only the generator's parameters -> D params get nothing
  def gen_objective(model):
    return g_loss(x * model.gen_scale[...] + model.gen_shift[...], y, model.discriminator)

  disc_before = jax.tree.map(np.asarray, nnx.state(model.discriminator, nnx.Param))
  grads = nnx.jit(nnx.grad(gen_objective, argnums=nnx.DiffState(0, _is_gen)))(model)
  paths = [p for p, _ in nnx.to_flat_state(grads)]
  assert paths and all(p[0] in ("gen_scale", "gen_shift") for p in paths)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=_is_gen)
  opt.update(model, grads)
  disc_after = jax.tree.map(np.asarray, nnx.state(model.discriminator, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, disc_before, disc_after)

  # discriminator step: only D params, u/v are not among them
  grads = nnx.jit(
    nnx.grad(
      lambda m: d_loss(x * m.gen_scale[...], y, m.discriminator),
      argnums=nnx.DiffState(0, _is_disc_param),
    )
  )(model)
  paths = [p for p, _ in nnx.to_flat_state(grads)]
  assert paths and all(p[0] == "discriminator" and p[-1] in ("kernel", "bias") for p in paths)


def _d_step_fn(graphdef, tx, x, x_hat, y, copy):
  """The trainer's pattern: split outside, merge inside jax.jit + jax.value_and_grad, updated
  SpectralState taken back out with nnx.state(merged, SpectralState)."""

  @jax.jit
  def d_step(params, rest, opt_state):
    def loss_fn(params):
      merged = nnx.merge(graphdef, params, rest, copy=copy)
      real, fake = gan.real_fake_logits(
        merged, x, x_hat, y, update_stats=True, train_generator=False
      )
      return gan.discriminator_loss(real, fake), nnx.to_pure_dict(nnx.state(merged, SpectralState))

    (loss, spectral), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), spectral, opt_state, loss

  return d_step


@pytest.mark.parametrize("pure_rest", [True, False])
def test_split_merge_under_jit_keeps_spectral_updates(pure_rest):
  disc = Discriminator(C, filters=(8, 8, 16, 16), rngs=nnx.Rngs(0))
  x, y = (jnp.asarray(a) for a in _inputs(seed=4))
  x_hat = jnp.clip(x + 0.05, 0, 1)
  param_paths = [p for p, _ in nnx.to_flat_state(nnx.state(disc, nnx.Param))]
  assert all(p[-1] in ("kernel", "bias") for p in param_paths)  # u, v are not parameters
  spectral_paths = [p for p, _ in nnx.to_flat_state(nnx.state(disc, SpectralState))]
  assert sorted(spectral_paths) == sorted((f"conv{k}", n) for k in range(1, 5) for n in "uv")
  graphdef, params, rest = nnx.split(disc, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  # pure dicts (nnx.to_pure_dict) merge into fresh Variables inside the trace; a State of
  # Variables closed over inside jax.grad must be merged with copy=True instead
  rest = nnx.to_pure_dict(rest) if pure_rest else rest
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  d_step = _d_step_fn(graphdef, tx, x, x_hat, y, copy=not pure_rest)

  # eager reference of the same first power iteration
  eager = nnx.merge(graphdef, params, rest, copy=True)
  gan.real_fake_logits(eager, x, x_hat, y, update_stats=True, train_generator=False)
  want = nnx.to_pure_dict(nnx.state(eager, SpectralState))

  u0 = np.asarray(rest["conv1"]["u"] if pure_rest else rest["conv1"]["u"][...])
  new_params, spectral, opt_state, loss = d_step(params, rest, opt_state)
  assert np.isfinite(float(loss))
  for k in range(1, 5):
    for n in "uv":
      np.testing.assert_allclose(
        np.asarray(spectral[f"conv{k}"][n]), np.asarray(want[f"conv{k}"][n]), rtol=1e-5, atol=1e-7
      )
  assert not np.allclose(np.asarray(spectral["conv1"]["u"]), u0)  # it did move
  # the caller's state is untouched until it writes the new values back
  np.testing.assert_array_equal(
    np.asarray(rest["conv1"]["u"] if pure_rest else rest["conv1"]["u"][...]), u0
  )
  if pure_rest:
    rest = {
      k: dict(v, **spectral.get(k, {})) if isinstance(v, dict) else v for k, v in rest.items()
    }
  else:
    nnx.replace_by_pure_dict(rest, spectral)
  _, spectral2, _, _ = d_step(new_params, rest, opt_state)
  # the second step starts from the stored vectors (and the updated weights)
  eager = nnx.merge(graphdef, new_params, rest, copy=True)
  gan.real_fake_logits(eager, x, x_hat, y, update_stats=True, train_generator=False)
  want2 = nnx.to_pure_dict(nnx.state(eager, SpectralState))
  np.testing.assert_allclose(
    np.asarray(spectral2["conv1"]["v"]), np.asarray(want2["conv1"]["v"]), rtol=1e-4, atol=1e-6
  )
  assert not np.allclose(np.asarray(spectral2["conv1"]["v"]), np.asarray(spectral["conv1"]["v"]))
  # the updated state merges back into a module
  disc2 = nnx.merge(graphdef, new_params, rest, copy=True)
  np.testing.assert_array_equal(np.asarray(disc2.conv1.u[...]), np.asarray(spectral["conv1"]["u"]))


def test_loader_is_strict():
  torch.manual_seed(0)
  sd = {"Discriminator." + k: v.numpy() for k, v in TorchDiscriminator(C).state_dict().items()}
  sd["Encoder.conv_block1.1.weight"] = np.zeros((60, 3, 7, 7), np.float32)
  disc = nnx.eval_shape(lambda: Discriminator(C, rngs=nnx.Rngs(0)))
  assert load_hific_discriminator(dict(sd), disc) == ["Encoder.conv_block1.1.weight"]
  bad = dict(sd)
  del bad["Discriminator.conv2.weight_u"]
  bad["Discriminator.conv2.weight"] = np.zeros((128, 64, 4, 4), np.float32)
  bad["Discriminator.conv_out.weight"] = np.zeros((1, 256, 1, 1), np.float32)
  with pytest.raises(SodecError) as e:
    load_hific_discriminator(bad, disc)
  msg = str(e.value)
  assert "missing 1: Discriminator.conv2.weight_u" in msg
  assert "unexpected 1: Discriminator.conv2.weight" in msg
  assert "mis-shaped 1: Discriminator.conv_out.weight" in msg
  with pytest.raises(SodecError, match="no keys start with"):
    load_hific_discriminator({k[len("Discriminator.") :]: v for k, v in sd.items()}, disc)
  bare = {k[len("Discriminator.") :]: v for k, v in sd.items() if k.startswith("Discriminator.")}
  assert load_hific_discriminator(bare, disc, prefix="") == []


def test_shape_errors():
  disc = Discriminator(C, filters=(8, 8, 16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(SodecError, match="16x"):
    disc(jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 8, 8, C)), update_stats=False)
  with pytest.raises(SodecError, match="expects"):
    disc(jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 4, 4, C + 1)), update_stats=False)


def test_stage_four_builds_the_configured_widths():
  """loss.discriminator_filters sets the random discriminator's widths (HiFiC's by default;
  configs/tiny.py a quarter of them)."""
  from configs import base, tiny
  from sodec_jax.train.build import make_discriminator
  from sodec_jax.train.pipeline import stage_config

  def widths(config):
    params = make_discriminator(config)[1]["params"]
    return tuple(params[f"conv{k}"]["kernel"].shape[-1] for k in range(1, 5))

  assert widths(base.get_config()) == (64, 128, 256, 512)
  assert widths(stage_config(tiny.get_config(), "finetune")) == (16, 32, 64, 128)

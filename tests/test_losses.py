"""Stage-1 loss terms against hand computations (HiFiC rate switching and schedules)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sodec_jax import losses
from tests.conftest import make_micro_config


def _config(**kw):
  c = make_micro_config(
    **{
      "loss.lambda_A": 2.0,
      "loss.lambda_B": 2.0**-4,
      "loss.target_rate": 0.3,
      "loss.k_M": 0.075 * 2**-5,
      "loss.k_P": 0.0,
      "loss.lambda_schedule_values": (2.0, 1.0),
      "loss.lambda_schedule_steps": (100,),
      "loss.target_schedule_values": (0.2 / 0.14, 1.0),
      "loss.target_schedule_steps": (100,),
      **kw,
    }
  )
  return c


def _outputs(bits_y, bits_z, x_hat, b=1, h=64, w=64):
  """Likelihoods whose information content is exactly bits_y + bits_z bits."""
  ny, nz = b * (h // 16) * (w // 16) * 16, b * (h // 64) * (w // 64) * 64
  return {
    "x_hat": x_hat,
    "likelihoods": {
      "y": jnp.full((b, h // 16, w // 16, 16), 2.0 ** (-bits_y / ny)),
      "z": jnp.full((b, h // 64, w // 64, 64), 2.0 ** (-bits_z / nz)),
    },
  }


def test_piecewise_constant_matches_hific_get_scheduled_params():
  # HiFiC: idx = first i with step < steps[i]  -> values[number of boundaries <= step]
  for step, want in [(0, 2.0), (99, 2.0), (100, 1.0), (10**6, 1.0)]:
    assert float(losses.piecewise_constant(step, (100,), (2.0, 1.0))) == want
  assert float(losses.piecewise_constant(25, (10, 20, 30), (1, 2, 3, 4))) == 3
  assert float(losses.piecewise_constant(5, (), (0.5,))) == 0.5
  with pytest.raises(ValueError):
    losses.piecewise_constant(0, (1, 2), (1.0, 2.0))


def test_rate_bits_and_bpp():
  like = {"y": jnp.full((2, 4, 4, 3), 0.5), "z": jnp.full((2, 1, 1, 5), 0.25)}
  assert float(losses.rate_bits(like)) == pytest.approx(2 * 16 * 3 * 1 + 2 * 5 * 2)
  assert float(losses.bpp(like, 2 * 64 * 64)) == pytest.approx((96 + 20) / (2 * 64 * 64))


def test_mse_is_on_0_255_pixels():
  x = jnp.zeros((1, 2, 2, 3))
  y = jnp.full((1, 2, 2, 3), 2.0 / 255.0)
  assert float(losses.mse_255(x, y)) == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize(
  "step,bpp,lam,target",
  [
    (0, 0.5, 2.0 * 2.0, 0.3 * 0.2 / 0.14),  # above the (scheduled) target: lambda_A * 2
    (0, 0.35, 2.0**-4 * 2.0, 0.3 * 0.2 / 0.14),  # 0.35 < 0.4286: lambda_B * 2
    (100, 0.35, 2.0, 0.3),  # after the switch: target 0.3 -> lambda_A * 1
    (100, 0.2, 2.0**-4, 0.3),  # below: lambda_B * 1
    (100, 0.3, 2.0**-4, 0.3),  # at the target counts as below (HiFiC: >)
  ],
)
def test_stage1_loss_rate_switching_and_schedules(step, bpp, lam, target):
  c = _config()
  x = jnp.zeros((1, 64, 64, 3))
  x_hat = jnp.full((1, 64, 64, 3), 10.0 / 255.0)
  bits = bpp * 64 * 64
  out = _outputs(0.75 * bits, 0.25 * bits, x_hat)
  loss, t = losses.stage1_loss(out, x, step, c)
  assert float(t["bpp"]) == pytest.approx(bpp, rel=1e-4)
  assert float(t["bpp_y"]) == pytest.approx(0.75 * bpp, rel=1e-4)
  assert float(t["target_bpp"]) == pytest.approx(target, rel=1e-6)
  assert float(t["lambda"]) == pytest.approx(lam)
  assert float(t["mse"]) == pytest.approx(100.0, rel=1e-4)
  want = lam * bpp + c.loss.k_M * 100.0
  assert float(loss) == pytest.approx(want, rel=1e-4)
  assert float(t["loss"]) == float(loss)
  assert "lpips" not in t


def test_stage1_loss_lpips_term_and_gradients():
  c = _config(**{"loss.k_P": 0.5})
  x = jnp.zeros((2, 64, 64, 3))
  fake_lpips = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))

  def f(x_hat):
    return losses.stage1_loss(_outputs(100.0, 10.0, x_hat, b=2), x, 0, c, fake_lpips)

  x_hat = jnp.full((2, 64, 64, 3), 0.1)
  loss, t = f(x_hat)
  assert float(t["lpips"]) == pytest.approx(0.1, rel=1e-5)
  assert float(t["lpips_loss"]) == pytest.approx(0.05, rel=1e-5)
  assert float(loss) == pytest.approx(float(t["rate_loss"] + t["mse_loss"] + 0.05), rel=1e-5)
  g = jax.grad(lambda v: f(v)[0])(x_hat)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError):
    losses.stage1_loss(_outputs(100.0, 10.0, x_hat, b=2), x, 0, c, None)


def test_rate_weight_is_jittable_with_traced_step():
  c = _config()
  f = jax.jit(lambda b, s: losses.rate_weight(b, s, c.loss))
  lam, target = f(jnp.float32(0.35), jnp.int32(150))
  assert float(lam) == 2.0 and float(target) == pytest.approx(0.3)


def test_gan_weight_warms_up_then_ramps_to_beta():
  c = _config(**{"loss.beta": 0.15, "loss.gan_warmup_steps": 10, "loss.gan_ramp_steps": 4}).loss
  got = [float(losses.gan_weight(s, c)) for s in (0, 9, 10, 11, 12, 13, 14, 100)]
  np.testing.assert_allclose(got, [0, 0, 0.0375, 0.075, 0.1125, 0.15, 0.15, 0.15], rtol=1e-6)
  c.gan_ramp_steps = 0  # no ramp: beta from the first G step
  assert [float(losses.gan_weight(s, c)) for s in (9, 10)] == [0.0, pytest.approx(0.15)]
  assert float(jax.jit(lambda s: losses.gan_weight(s, c))(jnp.int32(12))) == pytest.approx(0.15)
  # sodec_loss adds gan_weight(step) * L_g and reports it
  x = jnp.full((1, 64, 64, 3), 0.5)
  out = dict(_outputs(8.0, 8.0, x), x_f=x)
  cfg = _config(
    **{
      "loss.beta": 0.15,
      "loss.gan_warmup_steps": 10,
      "loss.gan_ramp_steps": 4,
      "loss.rate_mode": "none",
    }
  )
  for step, beta in ((5, 0.0), (11, 0.075)):
    loss, terms = losses.sodec_loss(out, x, step, cfg, gan_generator_loss=jnp.float32(2.0))
    assert float(terms["beta"]) == pytest.approx(beta)
    assert float(loss) == pytest.approx(float(terms["distortion"]) + 2.0 * beta)


@pytest.mark.parametrize(
  "step,bpp,lam",
  [
    (0, 0.5, 2.0),  # above the target: lambda(0) = anneal.start
    (50, 0.5, 3.0),  # halfway through the linear anneal 2 -> 4
    (50, 0.1, 3.0 * 2.0**-4 / 2.0),  # below: lambda(t) * lambda_B / lambda_A
    (200, 0.19, 4.0 * 2.0**-4 / 2.0),  # below at the end of the anneal
    (200, 0.21, 4.0),
  ],
)
def test_anneal_target_rate_switches_lambda(step, bpp, lam):
  c = _config(
    **{
      "loss.rate_mode": "anneal",
      "loss.alignment": "none",
      "loss.anneal.start": 2.0,
      "loss.anneal.end": 4.0,
      "loss.anneal.steps": 100,
      "loss.anneal.shape": "linear",
      "loss.anneal.target_rate": 0.2,
    }
  )
  x = jnp.zeros((1, 64, 64, 3))
  x_hat = jnp.full((1, 64, 64, 3), 10.0 / 255.0)
  bits = bpp * 64 * 64
  out = dict(_outputs(0.75 * bits, 0.25 * bits, x_hat), x_f=x_hat)
  loss, t = losses.sodec_loss(out, x, step, c)
  assert float(t["lambda"]) == pytest.approx(lam, rel=1e-6)
  assert float(t["target_bpp"]) == pytest.approx(0.2)
  assert float(loss) == pytest.approx(lam * bpp + c.loss.k_M * 100.0, rel=1e-4)
  # target_rate 0: the plain anneal whatever the rate
  c.loss.anneal.target_rate = 0.0
  _, t = losses.sodec_loss(out, x, step, c)
  assert float(t["lambda"]) == pytest.approx(2.0 + 2.0 * min(step / 100, 1.0))
  jitted = jax.jit(
    lambda b, s: losses.targeted_lambda(
      b,
      s,
      _config(
        **{
          "loss.anneal.start": 2.0,
          "loss.anneal.end": 4.0,
          "loss.anneal.steps": 100,
          "loss.anneal.target_rate": 0.2,
        }
      ).loss,
    )[0]
  )
  assert float(jitted(jnp.float32(0.1), jnp.int32(100))) == pytest.approx(4.0 / 32.0)


def test_table3_alignment_modes_by_hand():
  """The four alignment modes of Table 3 give four different losses, each computed here by hand
  on one batch: d = k_M * MSE(0..255) + k_P * LPIPS (a stand-in LPIPS: mean |a - b|)."""
  k_m, k_p, alpha = 0.075 * 2**-5, 0.5, 0.7
  c = _config(**{"loss.k_P": k_p, "loss.alpha": alpha, "loss.rate_mode": "none"})
  fake_lpips = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))
  rng = np.random.default_rng(0)
  x, x_hat, x_f = (jnp.asarray(rng.uniform(size=(2, 64, 64, 3)), jnp.float32) for _ in range(3))
  out = dict(_outputs(100.0, 10.0, x_hat, b=2), x_f=x_f)
  xn, hn, fn = (np.asarray(a, np.float64) for a in (x, x_hat, x_f))

  def d(a):
    return k_m * np.mean(((a - xn) * 255) ** 2) + k_p * np.mean(np.abs(a - xn))

  want = {
    "none": d(hn),
    "mse+lpips": d(hn) + alpha * d(fn),
    "merged": 0.5 * (d(hn) + d(fn)),
    "mse": d(hn) + alpha * k_m * np.mean(((fn - xn) * 255) ** 2),
  }
  got = {}
  for mode, value in want.items():
    c.loss.alignment = mode
    loss, terms = losses.sodec_loss(out, x, 0, c, fake_lpips)
    got[mode] = float(loss)
    assert got[mode] == pytest.approx(value, rel=1e-5), mode
    assert float(terms["alignment"]) == (
      0.0 if mode in ("none", "merged") else pytest.approx((value - d(hn)) / alpha, rel=1e-5)
    )
  assert len({round(v, 6) for v in got.values()}) == 4, got

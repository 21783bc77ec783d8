"""SD 2.1 noise schedule and one-step x0 estimate against diffusers' DDPMScheduler."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers_reference import assert_close

from sodec_jax.diffusion.schedule import NoiseSchedule, sd21_schedule
from sodec_jax.errors import SodecError


def _theirs(prediction_type):
  return DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type=prediction_type,
    clip_sample=False,
  )


def test_alphas_cumprod():
  s = sd21_schedule()
  assert_close(s.betas, _theirs("epsilon").betas.numpy(), tol=1e-6, what="betas")
  assert_close(
    s.alphas_cumprod, _theirs("epsilon").alphas_cumprod.numpy(), tol=1e-6, what="alphas_cumprod"
  )
  assert s.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_estimate_matches_ddpm_step(prediction_type):
  ours, theirs = sd21_schedule(prediction_type), _theirs(prediction_type)
  rng = np.random.default_rng(11)
  x0 = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  for t in (999, 500, 1):
    ts = np.array([t, t])
    y = ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), ts)
    y_ref = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts))
    assert_close(y, y_ref.numpy(), tol=1e-6, what=f"add_noise t={t}")
    target = (
      noise
      if prediction_type == "epsilon"
      else np.asarray(ours.velocity(jnp.asarray(x0), jnp.asarray(noise), ts))
    )
    if prediction_type == "v_prediction":
      v_ref = theirs.get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts)
      )
      assert_close(target, v_ref.numpy(), tol=1e-6, what=f"velocity t={t}")
    x0_hat = ours.predict_x0(y, jnp.asarray(target), ts)
    ref = theirs.step(
      torch.from_numpy(target), t, torch.from_numpy(np.array(y))
    ).pred_original_sample
    assert_close(x0_hat, ref.numpy(), tol=1e-5, what=f"x0 t={t}")
    # an exact model output recovers x0
    assert_close(x0_hat, x0, tol=2e-4 if t == 999 else 1e-5, what=f"x0 recovery t={t}")


def test_config_from_scheduler_json_and_errors():
  s = NoiseSchedule.from_dict(
    {
      "_class_name": "DDIMScheduler",
      "beta_start": 0.00085,
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "prediction_type": "v_prediction",
      "steps_offset": 1,
    }
  )
  assert s == sd21_schedule("v_prediction")
  with pytest.raises(SodecError, match="prediction_type"):
    NoiseSchedule(prediction_type="sample")

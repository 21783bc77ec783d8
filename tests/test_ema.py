"""optim.ema_decay: the published weights are the exponential moving average of the trained ones,
computed here in closed form from a run without it, and a resumed run continues it exactly."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from sodec_jax import checkpoints
from sodec_jax.errors import SodecError
from sodec_jax.train import build, train
from tests.conftest import make_micro_config

jax.config.update(
  "jax_compilation_cache_dir", os.environ.get("SODEC_TEST_JAX_CACHE", "/tmp/sodec_jax_test_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

DECAY = 0.2  # below the warm-up's (1 + s) / (10 + s) from step 2 on: both branches of the min


def _flat(tree) -> dict:
  """{'a/b/0/c': float64 array}: saved and built pure dicts name list entries differently."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v, np.float64)
    for path, v in leaves
  }


def _initial_params(config) -> dict:
  model = build.build_training_model(config)
  return _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_ema_weights_in_closed_form_across_a_resume(tmp_path):
  # lr 1e-2: steps large enough that the warm-up's weights show far above float32 rounding
  steps = {
    "train.num_steps": 4,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 0,
    "optim.learning_rate": 1e-2,
  }
  plain = make_micro_config(**steps)
  train(plain, str(tmp_path / "plain"))
  trajectory = [_flat(checkpoints.read_params(str(tmp_path / "plain"), s)[0]) for s in (1, 2, 3, 4)]

  expected = _initial_params(plain)
  for s, p in enumerate(trajectory):
    d = min(DECAY, (1 + s) / (10 + s))
    expected = jax.tree.map(
      lambda e, q, d=d: d * e + (1 - d) * np.asarray(q, np.float64), expected, p
    )

  averaged = str(tmp_path / "averaged")
  train(make_micro_config(**{**steps, "train.num_steps": 2, "optim.ema_decay": DECAY}), averaged)
  train(make_micro_config(**{**steps, "optim.ema_decay": DECAY}), averaged)  # resumes at step 2
  got, step = checkpoints.read_params(averaged)
  got = _flat(got)
  assert step == 4 and got.keys() == expected.keys()
  for k, e in expected.items():
    np.testing.assert_allclose(got[k], e, rtol=1e-6, atol=1e-7, err_msg=k)
  # not the trained weights themselves: the average differs from the last step's
  assert max(float(np.max(np.abs(got[k] - trajectory[-1][k]))) for k in got) > 1e-4


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_ema_decay_out_of_range_is_a_one_line_error(decay):
  with pytest.raises(SodecError, match=r"optim.ema_decay=.* must be in \[0, 1\)"):
    build.validate_config(make_micro_config(**{"optim.ema_decay": decay}))

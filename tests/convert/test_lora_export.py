"""export-lora: our UNet's LoRA -> peft safetensors -> loaded into the diffusers UNet with peft
equals our merged model; the workdir CLI form errors clearly when the model has no UNet."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TUNet
from diffusers_reference import nchw, nhwc, randomize_
from flax import nnx
from safetensors.torch import load_file

from sodec_jax.converters.lora import export_lora, export_lora_from_workdir
from sodec_jax.diffusion.lora import LoRAConfig, apply_lora, merge_lora
from sodec_jax.diffusion.unet import tiny_unet_config
from sodec_jax.errors import SodecError
from sodec_jax.weights import converted
from tests.convert.conftest import errors


def _inputs():
  rng = np.random.default_rng(11)
  return (
    rng.standard_normal((1, 16, 16, 4)).astype(np.float32),
    np.array([999]),
    rng.standard_normal((1, 5, 32)).astype(np.float32),
  )


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out"), ("to_q", "conv")])
def test_export_roundtrip_through_peft(tmp_path, targets):
  from peft import LoraConfig, set_peft_model_state_dict

  theirs = randomize_(TUNet(**tiny_unet_config().to_dict()), seed=12).eval()
  theirs.save_pretrained(tmp_path / "unet")
  ours = converted.load_unet(str(tmp_path / "unet"))
  apply_lora(ours, LoRAConfig(rank=4, alpha=8.0, targets=targets), rngs=nnx.Rngs(3))
  keys = iter(jax.random.split(jax.random.key(4), 1000))
  for _, m in nnx.iter_modules(ours):  # nonzero B everywhere, so the adapters matter
    if hasattr(m, "lora_b"):
      m.lora_b.value = 0.05 * jax.random.normal(next(keys), m.lora_b.value.shape)
  out = export_lora(ours, str(tmp_path / "lora"))
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  sd = load_file(os.path.join(out, "adapter_model.safetensors"))
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
  assert any(k.endswith("attn1.to_out.0.lora_B.weight") for k in sd) == ("to_out" in targets)

  theirs.add_adapter(
    LoraConfig(
      **{
        k: cfg[k]
        for k in (
          "r",
          "lora_alpha",
          "target_modules",
          "lora_dropout",
          "bias",
          "rank_pattern",
          "alpha_pattern",
        )
      }
    )
  )
  result = set_peft_model_state_dict(theirs, sd)
  assert not getattr(result, "unexpected_keys", [])
  lora_keys = [k for k in theirs.state_dict() if "lora_" in k]
  assert len(lora_keys) == len(sd)

  x, t, ctx = _inputs()
  with torch.no_grad():
    ref = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  merge_lora(ours)
  got = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  rel, _ = errors(got, ref)
  assert rel <= 1e-5
  with torch.no_grad():  # and the adapter really changed the output
    theirs.disable_adapters()
    base = nhwc(theirs(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  assert errors(base, ref)[0] > 1e-3


def test_export_without_adapters(tmp_path):
  from sodec_jax.diffusion.unet import UNet2DConditionModel

  unet = UNet2DConditionModel(tiny_unet_config(), rngs=nnx.Rngs(0))
  with pytest.raises(SodecError, match="no LoRA adapters"):
    export_lora(unet, str(tmp_path / "lora"))
  assert not os.path.exists(tmp_path / "lora")


def test_workdir_without_unet(tmp_path, capsys):
  from configs import tiny
  from convert.from_torch import main
  from sodec_jax import checkpoints
  from sodec_jax.pretrained import build_model
  from tests.codec.conftest import micro_codec_config

  config = micro_codec_config()
  workdir = str(tmp_path / "run")
  checkpoints.save_config(workdir, config)
  model = build_model(config, nnx.Rngs(0))
  mngr = checkpoints.manager(workdir)
  checkpoints.save(
    mngr,
    0,
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    {"count": np.zeros((), np.int32)},
    config,
  )
  mngr.close()
  with pytest.raises(SodecError, match="has no UNet, so there is no LoRA to export"):
    export_lora_from_workdir(workdir, str(tmp_path / "lora"))
  assert main(["export-lora", "--src", workdir, "--out", str(tmp_path / "lora")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("from_torch: error: ") and err.count("\n") == 1
  assert main(["export-lora", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "l")]) == 1
  assert not os.path.exists(tmp_path / "lora")
  del tiny

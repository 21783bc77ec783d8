"""load_vit / load_swin: file formats, task-model prefixes, strict key checks, refused pickles."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sodec_jax.errors import SodecError
from sodec_jax.weights.transformers import load_swin, load_vit, swin_table, vit_table
from tests.guidance._tiny_hf import photo_batch, rel_err, tiny_swin, tiny_vit, torch_forward


def _hub_state(model) -> dict[str, np.ndarray]:
  """The checkpoint keys save_pretrained writes (hub layout), as numpy."""
  import tempfile

  from safetensors.numpy import load_file

  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    return dict(load_file(os.path.join(d, "model.safetensors")))


def _write_bin(folder, model, state: dict) -> None:
  import torch

  os.makedirs(folder, exist_ok=True)
  model.config.to_json_file(os.path.join(folder, "config.json"))
  torch.save(
    {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()},
    os.path.join(folder, "pytorch_model.bin"),
  )


def _write_safetensors(folder, model, state: dict) -> None:
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  model.config.to_json_file(os.path.join(folder, "config.json"))
  save_file(
    {k: np.ascontiguousarray(v) for k, v in state.items()},
    os.path.join(folder, "model.safetensors"),
  )


@pytest.fixture(scope="module")
def vit_ref():
  return tiny_vit(num_hidden_layers=1)


def test_safetensors_round_trip_copies_every_tensor(vit_ref, tmp_path):
  vit_ref.save_pretrained(tmp_path)
  ours = load_vit(tmp_path)
  state = _hub_state(vit_ref)
  for key, path, fn in vit_table(ours.spec):
    node = ours
    for part in path.split("."):
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    np.testing.assert_array_equal(np.asarray(node[...]), fn(state[key]), err_msg=key)
  assert ours.ignored_keys == ("pooler.dense.bias", "pooler.dense.weight")


def test_bin_round_trip_hub_and_transformers5_names(vit_ref, tmp_path):
  x = photo_batch(32, 32)
  want = torch_forward(vit_ref, x)
  _write_bin(tmp_path / "hub", vit_ref, _hub_state(vit_ref))
  # torch.save(model.state_dict()) in transformers 5 writes the module names (layers.0.attention.q_proj)
  _write_bin(tmp_path / "v5", vit_ref, {k: v.numpy() for k, v in vit_ref.state_dict().items()})
  for sub in ("hub", "v5"):
    err = rel_err(np.asarray(load_vit(tmp_path / sub)(jnp.asarray(x))), want)
    print(f"vit .bin ({sub} names) rel err {err:.2e}")
    assert err <= 1e-5


def test_vit_for_image_classification_folder(tmp_path):
  ref = tiny_vit("ViTForImageClassification", num_hidden_layers=1)
  ref.save_pretrained(tmp_path)
  ours = load_vit(tmp_path)
  assert ours.ignored_keys == ("classifier.bias", "classifier.weight")
  x = photo_batch(32, 32)
  err = rel_err(np.asarray(ours(jnp.asarray(x))), torch_forward(ref.vit, x))
  assert err <= 1e-5


def test_swin_for_image_classification_and_v5_bin(tmp_path):
  ref = tiny_swin("SwinForImageClassification", depths=[2, 1], num_heads=[2, 2])
  ref.save_pretrained(tmp_path / "cls")
  (tmp_path / "cls" / "preprocessor_config.json").write_text(
    json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})
  )
  ours = load_swin(tmp_path / "cls")
  assert ours.ignored_keys == ("classifier.bias", "classifier.weight")
  assert ours.image_mean == (0.485, 0.456, 0.406)
  x = photo_batch(32, 32, ours.image_mean, ours.image_std)
  want = torch_forward(ref.swin, x)
  assert rel_err(np.asarray(ours(jnp.asarray(x))), want) <= 1e-5
  _write_bin(tmp_path / "v5", ref, {k: v.numpy() for k, v in ref.state_dict().items()})
  assert rel_err(np.asarray(load_swin(tmp_path / "v5")(jnp.asarray(x))), want) <= 1e-5


def test_sharded_safetensors(vit_ref, tmp_path):
  from safetensors.numpy import save_file

  state = _hub_state(vit_ref)
  keys = sorted(state)
  shards = {
    "model-00001-of-00002.safetensors": keys[::2],
    "model-00002-of-00002.safetensors": keys[1::2],
  }
  for name, ks in shards.items():
    save_file({k: state[k] for k in ks}, str(tmp_path / name))
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {k: name for name, ks in shards.items() for k in ks}})
  )
  vit_ref.config.to_json_file(str(tmp_path / "config.json"))
  x = photo_batch(32, 32)
  assert rel_err(np.asarray(load_vit(tmp_path)(jnp.asarray(x))), torch_forward(vit_ref, x)) <= 1e-5


def test_missing_unexpected_and_misshaped_keys_in_one_error(vit_ref, tmp_path):
  state = _hub_state(vit_ref)
  del state["encoder.layer.0.attention.attention.key.weight"]
  state["encoder.layer.0.attention.attention.extra.weight"] = np.zeros((4, 4), np.float32)
  state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 64), np.float32)
  _write_safetensors(tmp_path, vit_ref, state)
  with pytest.raises(SodecError) as e:
    load_vit(tmp_path)
  msg = str(e.value)
  assert "missing 1: encoder.layer.0.attention.attention.key.weight" in msg
  assert "unexpected 1: encoder.layer.0.attention.attention.extra.weight" in msg
  assert "encoder.layer.0.intermediate.dense.weight: (64, 64) (expected (128, 64))" in msg


def test_swin_missing_table_is_reported(tmp_path):
  ref = tiny_swin(depths=[1, 1], num_heads=[2, 2])
  state = _hub_state(ref)
  del state["encoder.layers.1.blocks.0.attention.self.relative_position_bias_table"]
  _write_safetensors(tmp_path, ref, state)
  with pytest.raises(SodecError, match="relative_position_bias_table"):
    load_swin(tmp_path)
  from sodec_jax.guidance.swin import SwinSpec

  # every checkpoint tensor of SwinModel is in the table (and nothing else is)
  assert {k for k, _, _ in swin_table(SwinSpec.from_config(ref.config.to_dict()))} == set(
    _hub_state(ref)
  )


def test_wrong_model_type_names_the_right_loader(vit_ref, tmp_path):
  tiny_swin(depths=[1, 1], num_heads=[2, 2]).save_pretrained(tmp_path / "swin")
  vit_ref.save_pretrained(tmp_path / "vit")
  with pytest.raises(SodecError, match=r"model_type 'swin'.*load_swin"):
    load_vit(tmp_path / "swin")
  with pytest.raises(SodecError, match=r"model_type 'vit'.*load_vit"):
    load_swin(tmp_path / "vit")
  cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
  cfg["model_type"] = "dinov2"
  (tmp_path / "vit" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(SodecError, match="dinov2"):
    load_vit(tmp_path / "vit")


def test_malicious_pickle_is_refused_not_run(vit_ref, tmp_path):
  import pickle

  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  vit_ref.config.to_json_file(str(tmp_path / "config.json"))
  with open(tmp_path / "pytorch_model.bin", "wb") as f:
    pickle.dump({"embeddings.cls_token": Payload()}, f, protocol=2)
  with pytest.raises(SodecError, match="refused.*arbitrary code"):
    load_vit(tmp_path)
  assert not marker.exists()


def test_not_a_model_folder(tmp_path):
  with pytest.raises(SodecError, match="not a folder"):
    load_vit(tmp_path / "nope")
  with pytest.raises(SodecError, match="config.json"):
    load_vit(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
  with pytest.raises(SodecError, match="no weights"):
    load_vit(tmp_path)

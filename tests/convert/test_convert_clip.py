"""clip-iqa converter: a small random transformers CLIPModel (+ an offline CLIP tokenizer) saved for
real, converted through the CLI, loaded, and compared with the PyTorch model on real photos."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from sodec_jax import converters as convert
from sodec_jax.errors import SodecError
from sodec_jax.metrics.clip_iqa import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PROMPTS
from sodec_jax.weights import converted
from sodec_jax.weights.clip import load_clip_iqa
from tests.convert.conftest import assert_out_clean, errors
from tests.guidance._tiny_hf import tiny_vit

TOL = 1e-5
SIZE = 32  # the tiny tower's image_size (= shortest_edge = crop size)


def tiny_tokenizer():
  """A CLIPTokenizer over the 256 byte-level characters (with and without '</w>'), a few merges
  and CLIP's two special tokens: tokenizes any text offline, "good photo." in 7 tokens."""
  from tokenizers import pre_tokenizers
  from transformers import CLIPTokenizer

  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  merges = [
    ("g", "o"),
    ("go", "o"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("b", "a"),
    ("ba", "d</w>"),
  ]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip(tok, seed: int = 0):
  """A small random CLIPModel (vision 32x32 / patch 8 / width 32 / 2 layers / 4 heads), every tensor
  perturbed (LayerNorms off (1, 0)), logit_scale = ln 100 as OpenAI's CLIP."""
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=len(tok),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
    ),
    vision_config=dict(
      image_size=SIZE,
      patch_size=8,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
    ),
    projection_dim=16,
    logit_scale_init_value=float(np.log(100.0)),
  )
  model = transformers.CLIPModel(cfg).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "logit_scale":
        p.add_(0.2 * torch.randn(p.shape, generator=g))
  return model


@pytest.fixture(scope="module")
def clip_src(tmp_path_factory):
  tok = tiny_tokenizer()
  model = tiny_clip(tok)
  src = tmp_path_factory.mktemp("clip") / "src"
  model.save_pretrained(src)
  tok.save_pretrained(src)
  return str(src), model, tok


@pytest.fixture(scope="module")
def clip_out(clip_src, tmp_path_factory):
  from convert.from_torch import main

  out = str(tmp_path_factory.mktemp("conv") / "clip-iqa")
  assert main(["clip-iqa", "--src", clip_src[0], "--out", out]) == 0
  return out


def photos():
  """Three real photos, float32 [H, W, 3] in [0, 1], three aspect ratios (skimage.data)."""
  return [np.asarray(f(), np.float32) / 255.0 for f in (data.astronaut, data.coffee, data.chelsea)]


def reference_pixels(img: np.ndarray, size: int = SIZE) -> np.ndarray:
  """CLIP preprocessing written plainly: PIL bicubic (float 'F' images) to shortest side `size`
  (long side int(size * long / short)), clip to [0, 1], crop at ((H-h)//2, (W-w)//2), normalise."""
  h, w = img.shape[:2]
  if h <= w:
    nh, nw = size, int(size * w / h)
  else:
    nh, nw = int(size * h / w), size
  chans = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize(
        (nw, nh), resample=Image.BICUBIC
      )
    )
    for c in range(3)
  ]
  x = np.clip(np.stack(chans, -1), 0.0, 1.0)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = x[top : top + size, left : left + size]
  return (
    (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
  ).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_manifest(clip_src, clip_out):
  m = converted.read_manifest(clip_out)
  assert m["kind"] == "clip-iqa" and m["components"] == ["clip_iqa"]
  names = {os.path.basename(s["path"]) for s in m["source"]}
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
  assert all(len(s["sha256"]) == 64 for s in m["source"])
  assert m["prompts"] == list(PROMPTS)
  assert m["logit_scale_exp"] == pytest.approx(100.0, rel=1e-5)
  cfg = json.load(open(os.path.join(clip_out, "clip_iqa", "config.json")))
  assert cfg["preprocess"] == {
    "resize": ["shortest_edge", SIZE],
    "crop": [SIZE, SIZE],
    "mean": list(OPENAI_CLIP_MEAN),
    "std": list(OPENAI_CLIP_STD),
    "resample": "cubic",
  }


def test_image_embeddings_match_torch(clip_src, clip_out):
  _, model, _ = clip_src
  iqa = load_clip_iqa(clip_out)
  px = np.stack([reference_pixels(p) for p in photos()])
  with torch.no_grad():
    want = model.get_image_features(pixel_values=_nchw(px)).pooler_output.numpy()
  got = jax.jit(lambda m, x: m.vision(x))(iqa, jnp.asarray(px))
  rel, _ = errors(got, want)
  assert rel <= TOL
  # per-image relative error too (no image hides behind a larger one)
  for g, w in zip(np.asarray(got), want):
    assert np.linalg.norm(g - w) / np.linalg.norm(w) <= TOL
  # another input size: position embeddings interpolated bicubically (4x4 -> 5x5 grid), as torch
  px = np.stack([reference_pixels(p, 40) for p in photos()])
  with torch.no_grad():
    want = model.get_image_features(pixel_values=_nchw(px), interpolate_pos_encoding=True)
  got = iqa.vision(jnp.asarray(px), interpolate_pos_encoding=True)
  assert errors(got, want.pooler_output.numpy())[0] <= TOL


def test_text_embeddings_match_torch(clip_src, clip_out):
  _, model, tok = clip_src
  iqa = load_clip_iqa(clip_out)
  enc = tok(list(PROMPTS), padding=True, return_tensors="pt")  # shortest padding: same features
  with torch.no_grad():
    want = model.get_text_features(**enc).pooler_output.numpy()
  assert errors(iqa.text_embeds[...], want)[0] <= TOL
  assert float(jnp.exp(iqa.logit_scale[...])) == pytest.approx(100.0, rel=1e-5)


def test_scores_match_torch(clip_src, clip_out):
  """Our whole metric (JAX preprocessing inside) vs CLIPModel's own logits_per_image on the
  plainly preprocessed photos: softmax(...)[:, 0]."""
  _, model, tok = clip_src
  iqa = load_clip_iqa(clip_out)
  score = jax.jit(lambda m, x: m(x))
  enc = tok(list(PROMPTS), padding=True, return_tensors="pt")
  got, want = [], []
  for img in photos():
    got.append(float(score(iqa, jnp.asarray(img[None]))[0]))
    with torch.no_grad():
      out = model(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        pixel_values=_nchw(reference_pixels(img)[None]),
      )
    want.append(float(out.logits_per_image.softmax(-1)[0, 0]))
  got, want = np.asarray(got), np.asarray(want)
  print("[clip-iqa] scores ours", got, "torch", want)
  _, mx = errors(got, want)
  assert mx <= TOL
  assert np.all((got >= 0) & (got <= 1))
  assert np.ptp(want) > 1e-3  # the random model does tell the photos apart


def test_jit_batch_and_gradient(clip_out):
  iqa = load_clip_iqa(clip_out)
  x = jnp.asarray(np.stack([p[100:164, 100:196] for p in photos()]))  # [3, 64, 96, 3]
  score = jax.jit(lambda m, x: m(x))
  s = score(iqa, x)
  assert s.shape == (3,)
  np.testing.assert_allclose(np.asarray(s), np.asarray(score(iqa, x[::-1]))[::-1], atol=1e-6)
  g = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x)), argnums=1))(iqa, x[:1])
  assert (
    g.shape == (1, 64, 96, 3) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  )


# ----------------------------------------------------------------------------- errors


def _cli(args, capsys) -> tuple[int, str]:
  from convert.from_torch import main

  capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
  rc = main(args)
  err = capsys.readouterr().err
  return rc, err


def test_cli_rejects_a_vit_folder(tmp_path, capsys):
  tiny_vit().save_pretrained(tmp_path / "vit")
  out = str(tmp_path / "o")
  rc, err = _cli(["clip-iqa", "--src", str(tmp_path / "vit"), "--out", out], capsys)
  assert rc == 1 and err.count("\n") == 1 and err.startswith("from_torch: error: ")
  assert "model_type 'vit'" in err and "`vit` subcommand" in err
  assert_out_clean(out)


def test_vit_subcommand_points_a_clip_folder_to_clip_iqa(clip_src, tmp_path, capsys):
  out = str(tmp_path / "o")
  rc, err = _cli(["vit", "--src", clip_src[0], "--out", out], capsys)
  assert rc == 1 and err.count("\n") == 1 and "clip-iqa --src" in err
  assert_out_clean(out)


def test_cli_rejects_broken_clip_folders(clip_src, tmp_path, capsys):
  src = clip_src[0]
  out = str(tmp_path / "o")
  # no tokenizer files
  bare = tmp_path / "bare"
  bare.mkdir()
  for n in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(src, n), bare / n)
  rc, err = _cli(["clip-iqa", "--src", str(bare), "--out", out], capsys)
  assert rc == 1 and err.count("\n") == 1 and "tokenizer" in err, err
  assert_out_clean(out)
  # a vision weight missing: strict
  from safetensors.numpy import load_file, save_file

  part = tmp_path / "part"
  shutil.copytree(src, part)
  sd = load_file(str(part / "model.safetensors"))
  del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
  save_file(sd, str(part / "model.safetensors"))
  rc, err = _cli(["clip-iqa", "--src", str(part), "--out", out], capsys)
  assert rc == 1 and err.count("\n") == 1
  assert "vision_model.encoder.layers.1.mlp.fc2.bias" in err and "missing" in err, err
  assert_out_clean(out)
  # not a folder
  rc, err = _cli(["clip-iqa", "--src", str(tmp_path / "nope"), "--out", out], capsys)
  assert rc == 1 and "not a folder" in err
  assert_out_clean(out)


def test_load_errors(clip_out, tmp_path):
  with pytest.raises(
    SodecError,
    match=r"does not exist: make it with `python convert/from_torch.py "
    r"clip-iqa --src",
  ):
    load_clip_iqa(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(SodecError, match="not a converted CLIP-IQA folder"):
    load_clip_iqa(str(tmp_path / "empty"))
  tiny_vit().save_pretrained(tmp_path / "vit")
  vit_out = convert.convert_vit(str(tmp_path / "vit"), str(tmp_path / "vit-conv"))
  with pytest.raises(SodecError, match="holds converted 'vit' weights, not CLIP-IQA"):
    load_clip_iqa(vit_out)
  broken = tmp_path / "broken"
  shutil.copytree(clip_out, broken)
  os.remove(broken / "clip_iqa" / "config.json")
  with pytest.raises(SodecError, match="config.json is missing"):
    load_clip_iqa(str(broken))
  shutil.copy(os.path.join(clip_out, "clip_iqa", "config.json"), broken / "clip_iqa")
  shutil.rmtree(broken / "clip_iqa" / "params")
  with pytest.raises(SodecError, match="params is missing") as e:
    load_clip_iqa(str(broken))
  assert "\n" not in str(e.value)


def test_folder_of_converter_1_0_asks_for_a_new_conversion(clip_out, tmp_path):
  """Converter 1.0 named CLIP's encoder blocks differently: such a folder is one clear error."""
  old = tmp_path / "old"
  shutil.copytree(clip_out, old)
  manifest = json.loads((old / "manifest.json").read_text())
  manifest["converter_version"] = "1.0"
  (old / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(SodecError, match="converter 1.0.*convert it again"):
    load_clip_iqa(str(old))

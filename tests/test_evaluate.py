"""python -m sodec_jax.evaluate on a few real photos with a real (micro) training workdir."""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, load_photo

sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import torch_dists  # noqa: E402
import torch_vgg16  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Three real photos (one JPEG in a subfolder, one under 161 px) and one broken file."""
  d = tmp_path_factory.mktemp("photos")
  Image.fromarray(load_photo("astronaut.png")[:170, :180]).save(d / "astronaut.png")
  Image.fromarray(load_photo("chelsea.png")[40:240, 100:290]).save(d / "chelsea.png")
  (d / "sub").mkdir()
  Image.fromarray(load_photo("coffee.png")[:70, :90]).save(d / "sub" / "coffee.jpg", quality=95)
  (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  (d / "notes.txt").write_text("not an image extension: ignored")
  return str(d)


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
  """Random VGG16 (torchvision layout) and random positive DISTS alpha/beta, as user files."""
  d = tmp_path_factory.mktemp("weights")
  feats = torch_vgg16.vgg16_features(seed=0)
  torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, d / "vgg16.pth")
  a, b = torch_dists.random_alpha_beta(0)
  torch.save({"alpha": torch.from_numpy(a), "beta": torch.from_numpy(b)}, d / "weights.pt")
  return str(d / "vgg16.pth"), str(d / "weights.pt")


def _run(*args):
  from sodec_jax import evaluate

  return evaluate.main([*args, "--no-progress"])


def _rows(out):
  with open(os.path.join(out, "results.csv")) as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_all_outputs_with_every_metric(micro_workdir, photos, metric_weights, tmp_path, capsys):
  from sodec_jax import api
  from sodec_jax.images import read_image
  from sodec_jax.metrics import psnr

  out = str(tmp_path / "eval")
  vgg, dists = metric_weights
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      micro_workdir,
      "--images",
      photos,
      "--out",
      out,
      "--vgg-weights",
      vgg,
      "--dists-weights",
      dists,
      "--grids",
      "2",
    )
    == 0
  )
  cols, rows = _rows(out)
  assert cols == [
    "checkpoint",
    "image",
    "height",
    "width",
    "bytes",
    "bpp",
    "psnr",
    "ms_ssim",
    "lpips",
    "dists",
    "encode_s",
    "decode_s",
  ]
  labels = [os.path.basename(micro_workdir), os.path.basename(micro_workdir) + "_2"]
  assert [(r["checkpoint"], r["image"]) for r in rows] == [
    (l, n) for l in labels for n in ("astronaut.png", "chelsea.png", "sub/coffee.jpg")
  ]
  model = api.load_model(micro_workdir)
  for r in rows:
    # bpp comes from the real file on disk, which decodes to the scored image
    f = os.path.join(
      out, "sodec", r["checkpoint"], os.path.splitext(r["image"])[0].replace("/", "__") + ".sodec"
    )
    data = open(f, "rb").read()
    h, w = int(r["height"]), int(r["width"])
    assert int(r["bytes"]) == len(data)
    assert float(r["bpp"]) == pytest.approx(8 * len(data) / (h * w), rel=1e-5)
    original, _ = read_image(os.path.join(photos, r["image"]))
    assert original.shape[:2] == (h, w)
    want = float(psnr(original[None] / 255.0, api.decompress(model, data)[None] / 255.0)[0])
    assert float(r["psnr"]) == pytest.approx(want, rel=1e-4)
    assert (r["ms_ssim"] == "") == (min(h, w) < 161)
    for k in ("lpips", "dists", "encode_s", "decode_s"):
      assert np.isfinite(float(r[k])) and float(r[k]) >= 0
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["metrics"] == ["psnr", "ms_ssim", "lpips", "dists"]
  assert [c["label"] for c in summary["checkpoints"]] == labels
  c = summary["checkpoints"][0]
  assert c["fingerprint"] == model.fingerprint.hex() and c["step"] == 2 and c["images"] == 3
  assert c["config"]["model"]["latent_channels"] == 8
  assert c["mean"]["bpp"] == pytest.approx(np.mean([float(r["bpp"]) for r in rows[:3]]), rel=1e-5)
  assert c["metric_counts"]["ms_ssim"] == 2
  assert [s["image"] for s in summary["skipped"]] == ["broken.png"]
  assert any("NIQE" in n for n in summary["notes"])
  files = set(os.listdir(out))
  assert {
    "rd_psnr.png",
    "rd_ms_ssim.png",
    "rd_lpips.png",
    "rd_dists.png",
    "grid_astronaut.png",
    "grid_chelsea.png",
  } <= files
  assert "grid_sub__coffee.png" not in files  # --grids 2
  for name in ("rd_psnr.png", "grid_astronaut.png"):
    with Image.open(os.path.join(out, name)) as im:
      assert im.size[0] > 300 and im.size[1] > 200
  log = capsys.readouterr()
  assert "1 unreadable image(s) skipped" in log.out


def test_center_crop_limit_and_missing_weights(micro_workdir, photos, tmp_path, capsys):
  out = str(tmp_path / "eval")
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      "--images",
      photos,
      "--out",
      out,
      "--center-crop",
      "64",
      "--limit",
      "2",
      "--no-plots",
    )
    == 0
  )
  cols, rows = _rows(out)
  assert "lpips" not in cols and "dists" not in cols
  assert [(r["image"], r["height"], r["width"]) for r in rows] == [
    ("astronaut.png", "64", "64"),
    ("chelsea.png", "64", "64"),
  ]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["protocol"]["center_crop"] == 64 and summary["protocol"]["limit"] == 2
  assert any("--vgg-weights" in n for n in summary["notes"])
  assert summary["outputs"]["rd_plots"] == [] and not any(
    f.endswith(".png") for f in os.listdir(out)
  )
  assert "note: LPIPS and DISTS skipped" in capsys.readouterr().out


def test_user_errors_are_one_line(micro_workdir, photos, tmp_path, capsys):
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      "--images",
      str(tmp_path / "nope"),
      "--out",
      str(tmp_path / "o"),
    )
    == 1
  )
  assert "is not a directory" in capsys.readouterr().err
  assert (
    _run("--checkpoint", str(tmp_path / "no_run"), "--images", photos, "--out", str(tmp_path / "o"))
    == 1
  )
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "does not exist" in err
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      "--images",
      photos,
      "--out",
      str(tmp_path / "o"),
      "--vgg-weights",
      str(tmp_path / "missing.pth"),
    )
    == 1
  )
  assert "VGG16 weights file not found" in capsys.readouterr().err
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      "--images",
      photos,
      "--out",
      str(tmp_path / "o"),
      "--max-memory",
      "8GB",
    )
    == 1
  )
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "GiB" in err


def test_center_crop_and_detail_window():
  from sodec_jax.evaluate import center_crop
  from sodec_jax.figures import detail_window

  img = load_photo("astronaut.png")
  c = center_crop(img, 100)
  assert c.shape == (100, 100, 3) and np.array_equal(c, img[206:306, 206:306])
  assert center_crop(img[:50, :300], 100).shape == (50, 100, 3)
  flat = np.zeros((64, 64, 3), np.uint8)
  flat[40:56, 8:24] = 255  # the only detail
  top, left = detail_window(flat, 16)
  assert 24 <= top <= 44 and 0 <= left <= 12


@pytest.fixture(scope="module")
def no_reference_weights(tmp_path_factory):
  """A NIQE pristine model (.npz, BasicSR's key names; random SPD covariance) and a converted
  tiny random CLIP-IQA folder (transformers CLIPModel + an offline tokenizer, through the CLI)."""
  from convert.from_torch import main
  from tests.convert.test_convert_clip import tiny_clip, tiny_tokenizer

  d = tmp_path_factory.mktemp("noref")
  rng = np.random.default_rng(0)
  a = rng.normal(size=(36, 36))
  np.savez(
    d / "niqe_pris_params.npz",
    mu_pris_param=rng.normal(size=(1, 36)),
    cov_pris_param=a @ a.T / 36 + np.eye(36),
  )
  tok = tiny_tokenizer()
  tiny_clip(tok).save_pretrained(d / "clip_src")
  tok.save_pretrained(d / "clip_src")
  assert main(["clip-iqa", "--src", str(d / "clip_src"), "--out", str(d / "clip_iqa")]) == 0
  return str(d / "niqe_pris_params.npz"), str(d / "clip_iqa")


def test_no_reference_metrics(micro_workdir, photos, no_reference_weights, tmp_path):
  """NIQE and CLIP-IQA columns score the decoded image alone, equal to the metric modules called
  directly; NIQE is empty where the image is smaller than its blocks."""
  import jax.numpy as jnp

  from sodec_jax import api
  from sodec_jax.metrics.niqe import load_niqe_params, niqe
  from sodec_jax.weights.clip import load_clip_iqa

  niqe_path, clip_dir = no_reference_weights
  out = str(tmp_path / "eval")
  assert (
    _run(
      "--checkpoint",
      micro_workdir,
      "--images",
      photos,
      "--out",
      out,
      "--grids",
      "0",
      "--niqe-params",
      niqe_path,
      "--clip-iqa",
      clip_dir,
    )
    == 0
  )
  cols, rows = _rows(out)
  assert cols == [
    "checkpoint",
    "image",
    "height",
    "width",
    "bytes",
    "bpp",
    "psnr",
    "ms_ssim",
    "niqe",
    "clip_iqa",
    "encode_s",
    "decode_s",
  ]
  model, params, clip = (
    api.load_model(micro_workdir),
    load_niqe_params(niqe_path),
    load_clip_iqa(clip_dir),
  )
  for r in rows:
    f = os.path.join(
      out, "sodec", r["checkpoint"], os.path.splitext(r["image"])[0].replace("/", "__") + ".sodec"
    )
    decoded = api.decompress(model, open(f, "rb").read())
    want = float(clip(jnp.asarray(decoded[None] / np.float32(255.0)))[0])
    assert 0.0 <= float(r["clip_iqa"]) <= 1.0
    assert float(r["clip_iqa"]) == pytest.approx(want, abs=1e-5)
    if min(decoded.shape[:2]) >= 96:
      assert float(r["niqe"]) == pytest.approx(niqe(decoded, params), rel=1e-5)
    else:
      assert r["niqe"] == ""
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["metrics"] == ["psnr", "ms_ssim", "niqe", "clip_iqa"]
  assert summary["checkpoints"][0]["metric_counts"]["niqe"] == 2
  assert not any("NIQE skipped" in n or "CLIP-IQA skipped" in n for n in summary["notes"])
  assert {"rd_niqe.png", "rd_clip_iqa.png"} <= set(os.listdir(out))


def test_bad_no_reference_weights_stop_before_writing(micro_workdir, photos, tmp_path, capsys):
  out = tmp_path / "o"
  bad = tmp_path / "bad.npz"
  np.savez(bad, something_else=np.zeros(3))
  for flag, value, words in [
    ("--niqe-params", str(tmp_path / "missing.mat"), "NIQE"),
    ("--niqe-params", str(bad), "NIQE"),
    ("--clip-iqa", str(tmp_path), "CLIP-IQA"),
  ]:
    assert (
      _run("--checkpoint", micro_workdir, "--images", photos, "--out", str(out), flag, value) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sodec_jax.evaluate: error:"), err
    assert words in err
    assert not out.exists()


@pytest.mark.slow  # ~15 s: codes and scores a 512x512 photo
def test_paper_protocol(micro_workdir, tmp_path, capsys):
  """--protocol paper: every image centre-cropped to 512, bpp over the crop from the whole file, bpp_payload from the coded streams alone, `lpips` =
  LPIPS-AlexNet recomputed here from the kept .sodec file, `lpips_vgg` an (empty) column."""
  import torch_alexnet

  from sodec_jax import api
  from sodec_jax.codec import bitstream
  from sodec_jax.evaluate import center_crop
  from sodec_jax.weights.lpips import load_lpips_alex

  d = tmp_path / "photos"
  d.mkdir()
  big = np.concatenate([load_photo("coffee.png")] * 2, axis=0)[:560, :600]  # 560 x 600
  Image.fromarray(big).save(d / "big.png")
  alex = tmp_path / "alexnet.pth"
  feats = torch_alexnet.alexnet_features(seed=1)
  torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, alex)
  out = str(tmp_path / "eval")
  args = ["--checkpoint", micro_workdir, "--images", str(d), "--out", out, "--no-plots"]
  assert _run(*args, "--protocol", "paper", "--alexnet-weights", str(alex)) == 0
  cols, rows = _rows(out)
  assert cols[:8] == [*"checkpoint image height width bytes bpp bpp_payload psnr".split()]
  assert {"ms_ssim", "lpips", "lpips_vgg"} <= set(cols) and "dists" not in cols
  assert [(r["image"], r["height"], r["width"]) for r in rows] == [("big.png", "512", "512")]
  lpips_alex = load_lpips_alex(alex)
  model = api.load_model(micro_workdir)
  for r, image in zip(rows, (big,)):
    h, w = int(r["height"]), int(r["width"])
    data = open(
      os.path.join(out, "sodec", os.path.basename(micro_workdir), r["image"][:-4] + ".sodec"), "rb"
    ).read()
    assert int(r["bytes"]) == len(data)
    assert float(r["bpp"]) == pytest.approx(8 * len(data) / (h * w), rel=1e-5)
    payload = len(data) - bitstream.HEADER_MIN
    assert float(r["bpp_payload"]) == pytest.approx(8 * payload / (h * w), rel=1e-5)
    crop = center_crop(image, 512)
    decoded = api.decompress(model, data)
    want = float(lpips_alex(crop[None] / np.float32(255), decoded[None] / np.float32(255))[0])
    assert float(r["lpips"]) == pytest.approx(want, rel=1e-4)
    assert r["lpips_vgg"] == ""
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["protocol"]["name"] == "paper" and summary["protocol"]["center_crop"] == 512
  assert _run(*args, "--protocol", "paper", "--center-crop", "256") == 1
  assert "--protocol paper crops to 512" in capsys.readouterr().err


def test_paper_protocol_columns_and_payload(tmp_path):
  """The paper protocol's metric set (lpips = LPIPS-AlexNet, lpips_vgg always a column) and
  bpp_payload's byte count (the coded streams: the file less header and CRC), fast."""
  import torch_alexnet

  from sodec_jax.codec import bitstream
  from sodec_jax.evaluate import Metrics, payload_bytes
  from sodec_jax.metrics.lpips import LPIPSAlex
  from sodec_jax.weights.lpips import load_shipped_heads

  data = open(os.path.join(ROOT, "tests", "data", "v1_micro_astronaut_64x96.sodec"), "rb").read()
  _, streams = bitstream.unpack(data)
  assert payload_bytes(data) == sum(map(len, streams)) == len(data) - bitstream.HEADER_MIN
  feats = torch_alexnet.alexnet_features(seed=1)
  path = tmp_path / "alexnet.pth"
  torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
  m = Metrics(alexnet_weights=str(path), protocol="paper")
  assert m.names == ["psnr", "ms_ssim", "lpips"] and m.empty == ["lpips_vgg"]
  a = load_photo("astronaut.png")[:64, :64]
  b = load_photo("coffee.png")[:64, :64]
  got = m(a, b)
  ours = LPIPSAlex(torch_alexnet.features_state_dict_numpy(feats), load_shipped_heads("alex"))
  want = float(ours(a[None] / np.float32(255), b[None] / np.float32(255))[0])
  assert got["lpips"] == pytest.approx(want, rel=1e-5) and np.isnan(got["lpips_vgg"])
  assert Metrics(alexnet_weights=str(path)).names == ["psnr", "ms_ssim", "lpips_alex"]

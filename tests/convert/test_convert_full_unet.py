"""Slow: converting the full-size SD 2.1 UNet (random weights, a real diffusers folder) takes under
60 s and 8 GiB (measured in a fresh process with /usr/bin/time -v or getrusage)."""

import os
import re
import subprocess
import sys

import pytest

from tests.convert.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_unet_folder(tmp_path_factory):
  import torch
  from diffusers import UNet2DConditionModel as TUNet

  from sodec_jax.diffusion.unet import UNetConfig

  folder = tmp_path_factory.mktemp("sd21_unet")
  with torch.no_grad():
    model = TUNet(**UNetConfig().to_dict())
  model.save_pretrained(folder)
  del model
  return str(folder)


def test_full_unet_conversion_time_and_memory(full_unet_folder, tmp_path):
  out = str(tmp_path / "unet")
  cmd = [
    sys.executable,
    os.path.join(ROOT, "convert", "from_torch.py"),
    "unet",
    "--src",
    full_unet_folder,
    "--out",
    out,
  ]
  if os.path.exists("/usr/bin/time"):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", r.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1])
  else:
    import resource
    import time

    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  assert r.returncode == 0, r.stderr[-2000:]
  gib = rss_kb / 2**20
  print(f"[full SD 2.1 UNet conversion] {seconds:.1f} s, peak RSS {gib:.2f} GiB")
  assert seconds < 60 and gib < 8

  import jax.numpy as jnp
  import numpy as np
  from safetensors import safe_open

  from sodec_jax.weights import converted

  unet = converted.load_unet(out)
  assert unet.conv_in.kernel.value.shape == (3, 3, 4, 320)
  with safe_open(os.path.join(full_unet_folder, "diffusion_pytorch_model.safetensors"), "np") as f:
    w = f.get_tensor("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight")
  got = unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_out.kernel.value
  np.testing.assert_array_equal(np.asarray(got), w.T)
  del jnp

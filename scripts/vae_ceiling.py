"""Where a diffusion-decoder model's error comes from, on the held-out photos of a config: for each
photo (reflect-padded as the coder pads it, measured on the photo's own pixels) the PSNR of

  x_f                 D_a(y_hat), the fidelity decoder's output
  raw                 the diffusion output as D_m gives it
  decode              raw corrected against x_f (the model's sodec.color_fix, wavelet if none)
  vae(x)              D_m(E_m(x)): the stand-in VAE's own reconstruction of the photo
  vae(x) corrected    the same, corrected against the model's x_f: what the decoder would give
                      if the UNet returned the photo's own latent (a ceiling for the diffusion path)

  python scripts/vae_ceiling.py --checkpoint runs/tiny

The photos are the checkpoint's own config's data.holdout; y_hat and z_hat are the model's
rounded latents (what a .sodec file carries); the VAE is the one in that config's
diffusion.weights (its encoder is not part of a SODEC checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sodec_jax import api, color_fix, pretrained, validation  # noqa: E402


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a diffusion-decoder workdir (stage 2-4)")
  args = p.parse_args(argv)
  model = api.load_model(args.checkpoint, color_fix="none")
  config = model.config
  if model.model.decoder_kind != "diffusion":
    raise SystemExit(f"error: {args.checkpoint} holds a codec decoder; give a stage 2-4 workdir")
  kind = config.sodec.get("color_fix", "none")
  kind = "wavelet" if kind == "none" else kind
  levels = int(config.sodec.get("color_fix_levels", color_fix.DEFAULT_LEVELS))
  vae = pretrained.build_vae(config.diffusion, nnx.Rngs(0))
  print(f"correction: {kind} ({levels} levels) against x_f")
  print(f"{'photo':>12}  {'x_f':>6}  {'raw':>6}  {'decode':>6}  {'vae(x)':>6}  {'corrected':>9}")
  for name, image in zip(config.data.holdout, validation.holdout_images(config)):
    h, w = image.shape[:2]
    x = jnp.asarray(api.pad_image(model, image))
    latents = api.encode_latents(model, [image])
    raw, x_f = api.reconstruct(model, latents.y_hat, latents.z_hat)
    mean, _ = vae.encode(x * 2.0 - 1.0)
    own = (vae.decode(mean).astype(jnp.float32) + 1.0) / 2.0
    fix = lambda v: color_fix.color_fix(kind, v, x_f, levels)  # noqa: E731
    db = lambda v: validation.psnr_u8(image, api.to_uint8(np.asarray(v), h, w))  # noqa: E731
    row = [db(x_f), db(raw), db(fix(raw)), db(own), db(fix(own))]
    print(f"{name:>12}  " + "  ".join(f"{v:6.2f}" for v in row[:4]) + f"  {row[4]:9.2f}")


if __name__ == "__main__":
  main()

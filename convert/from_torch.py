#!/usr/bin/env python
"""PyTorch weights -> converted sodec-jax folders, once, offline (nothing is downloaded).

    python convert/from_torch.py sd21  --src stable-diffusion-2-1/ --out /weights/sd21
    python convert/from_torch.py sd21  --src v2-1_768-ema-pruned.safetensors --out /weights/sd21
        --prediction-type v_prediction      (single file: or an original .yaml beside it)
    python convert/from_torch.py unet  --src stable-diffusion-2-1/unet --out /weights/unet
    python convert/from_torch.py vae   --src stable-diffusion-2-1/vae  --out /weights/vae
    python convert/from_torch.py hific --src hific_low.pt --out /weights/hific
    python convert/from_torch.py vit   --src vit-large-patch16-224-in21k/ --out /weights/vit
    python convert/from_torch.py swin  --src swin-base-patch4-window7-224/ --out /weights/swin
    python convert/from_torch.py lpips --src vgg16-397923af.pth --out /weights/lpips
    python convert/from_torch.py dists --src dists/weights.pt --vgg vgg16-397923af.pth --out /weights/dists
    python convert/from_torch.py clip-iqa --src clip-vit-base-patch32/ --out /weights/clip-iqa
    python convert/from_torch.py export-lora --src WORKDIR --out lora/
    python convert/from_torch.py export-torch --src WORKDIR --out sodec_torch/
    python convert/from_torch.py export-standin --src runs/tiny/0_pretrain --out my_tiny_sd/

A thin CLI over `sodec_jax.converters` (`converters.lora` for export-lora,
`converters.torch_export` for export-torch, `converters.standin` for export-standin). Problems are one
line on stderr ("from_torch: error: ...") and exit status 1; nothing is left in --out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="from_torch", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, help_, src_help):
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument("--src", required=True, help=src_help)
    s.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    if not name.startswith("export-"):
      s.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="storage dtype of the converted parameters (default float32)",
      )
    return s

  s = add(
    "sd21",
    "Stable Diffusion 2.1: UNet, VAE and noise schedule",
    "a diffusers folder (unet/, vae/, scheduler/) or an original single-file .safetensors/.ckpt",
  )
  s.add_argument(
    "--config-dir",
    default=None,
    help="single file only: a folder with unet/config.json, vae/config.json "
    "[, scheduler/scheduler_config.json] (default: SD 2.1's)",
  )
  pt_help = (
    "the model's prediction type (SD 2.1-768: v_prediction, 2.1-base: epsilon); "
    "overrides the scheduler's. Required for a single file unless --config-dir has "
    "scheduler/scheduler_config.json or an original config <name>.yaml lies beside it"
  )
  s.add_argument(
    "--prediction-type", default=None, choices=("epsilon", "v_prediction"), help=pt_help
  )
  s = add("unet", "one diffusers UNet2DConditionModel folder", "e.g. stable-diffusion-2-1/unet")
  s.add_argument(
    "--prediction-type",
    default=None,
    choices=("epsilon", "v_prediction"),
    help="recorded in the manifest (default: ../scheduler/scheduler_config.json "
    "beside --src, if any)",
  )
  add("vae", "one diffusers AutoencoderKL folder", "e.g. stable-diffusion-2-1/vae")
  add(
    "hific",
    "a checkpoint of the HiFiC PyTorch implementation (E, H_a, P, D_a, discriminator)",
    "the torch.save file (model_state_dict, args, ...)",
  )
  add("vit", "a transformers ViT folder (guidance extractor)", "save_pretrained folder")
  add("swin", "a transformers Swin folder (guidance extractor)", "save_pretrained folder")
  s = add(
    "lpips",
    "VGG16 + LPIPS heads for the LPIPS metric",
    "VGG16 ImageNet weights in torchvision layout (.pth or .safetensors)",
  )
  s.add_argument(
    "--heads",
    default=None,
    help="LPIPS linear heads (the lpips wheel's weights/v0.1/vgg.pth); default: the "
    "heads shipped with sodec-jax",
  )
  s = add(
    "dists",
    "VGG16 + DISTS alpha/beta for the DISTS metric",
    "DISTS alpha/beta (dists-pytorch's weights.pt, or .safetensors/.npz)",
  )
  s.add_argument("--vgg", required=True, help="VGG16 ImageNet weights, torchvision layout")
  add(
    "clip-iqa",
    "a transformers CLIPModel folder for the CLIP-IQA metric (image tower + the "
    "prompt text embeddings, computed here with torch)",
    "save_pretrained folder: config.json, model.safetensors, tokenizer files",
  )
  s = add(
    "export-lora",
    "the UNet's LoRA of a training workdir -> peft/diffusers safetensors",
    "a sodec-jax training workdir",
  )
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  s = add(
    "export-torch",
    "the whole SODEC decoder of a diffusion workdir -> PyTorch (diffusers UNet with the LoRA "
    "merged and VAE, transformers ViT, torch codec / H_s / T_s / F_p): "
    "sodec_jax.benchmarks.sodec_torch.load_exported(OUT)",
    "a sodec-jax training workdir (stage 2 or later)",
  )
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  s = add(
    "export-standin",
    "the tiny pipeline's stand-in SD (stage 0: small UNet + VAE) -> a diffusers-layout folder "
    "for --config.diffusion.weights (what weights/tiny_sd is)",
    "the stage-0 workdir of a tiny pipeline (e.g. runs/tiny/0_pretrain)",
  )
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  return p


def run(args) -> str:
  from sodec_jax.converters import CONVERTERS

  if args.command == "export-lora":
    from sodec_jax.converters.lora import export_lora_from_workdir

    return export_lora_from_workdir(args.src, args.out, args.step)
  if args.command == "export-standin":
    from sodec_jax.converters.standin import export_standin_from_workdir

    return export_standin_from_workdir(args.src, args.out, args.step)
  if args.command == "export-torch":
    from sodec_jax.converters.torch_export import export_torch_from_workdir

    return export_torch_from_workdir(args.src, args.out, args.step)
  kw = {}
  if args.command == "sd21":
    kw = dict(config_dir=args.config_dir, prediction_type=args.prediction_type)
  elif args.command == "unet":
    kw = dict(prediction_type=args.prediction_type)
  elif args.command == "lpips":
    kw = dict(heads=args.heads)
  elif args.command == "dists":
    kw = dict(vgg=args.vgg)
  return CONVERTERS[args.command](args.src, args.out, args.dtype, **kw)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from sodec_jax.errors import SodecError

  try:
    out = run(args)
  except SodecError as e:
    print(f"from_torch: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("from_torch: error: interrupted (nothing was written to --out)", file=sys.stderr)
    return 1
  except MemoryError:
    print("from_torch: error: out of memory", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

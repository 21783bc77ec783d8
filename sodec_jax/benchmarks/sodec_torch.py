"""The whole SODEC decoder in PyTorch, built from our weights: the reference the codec benchmark
times and the parity tests compare with, and a way for a PyTorch user to decode with a
checkpoint trained here (`python convert/from_torch.py export-torch`, then `load_exported`).

(Over 450 lines: the torch modules, their weights through the inverse key maps and the
exported folder's description are one unit; splitting them would spread one key map.)

    ref = build_sodec_reference(loaded)                  # loaded = api.load_model(workdir)
    x_hat, x_f = ref.reconstruct(y_hat, z_hat)           # NCHW float tensors
    img = decompress(ref, loaded, data)                  # .sodec bytes -> uint8 [H, W, 3]

Pieces (NCHW; the one-step decoder of `sodec_jax.model.SODEC.diffusion_reconstruction`):
  codec        E, H_a, P, D_a: `hific_torch.HiFiC` (torch_reference.build_reference)
  H_s          `HyperSynthesis`: convT5 s2, ReLU, convT5 s2, ReLU, conv3 (zero padding)
  T_s          `Transform`: concat(y_hat, w) -> reflect conv3 -> ChannelNorm -> residual blocks
               -> 2x up (convT3 s2, convT4 s2 [+ binomial blur], or nearest + reflect conv3:
               transform_upsample) ->
               ChannelNorm -> ReLU -> reflect conv3 (our layer order)
  F            transformers `ViTModel` (no pooler): last_hidden_state of the clamped x_f,
               resized (bilinear, antialiased, as `guidance.vit.preprocess`) and normalised
  F_p          `GuidanceProjection`: tokens @ kernel, token map T -> 77, + bias (fidelity
               guidance; or mode none: a learned context; the other modes have no twin)
  eps_theta    diffusers `UNet2DConditionModel`, the LoRA merged into its base weights
  D_m          diffusers `AutoencoderKL` (decoder and post_quant_conv; no encoder)
  x0           (y_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) at t = 999 (v-prediction:
               sqrt(abar_t) y_t - sqrt(1 - abar_t) v), abar from diffusers' `DDPMScheduler`
               (SD 2.1: scaled_linear 0.00085 .. 0.012, 1000 steps); image = (D_m(x0 / s) + 1) / 2

The weights go through the inverse key maps (`sodec_jax.weights.export`, hific_torch's
`state_dict_from_jax`) and are loaded strictly: any missing, unexpected or mis-shaped tensor is
one SodecError. Importing this module imports torch, diffusers and transformers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from sodec_jax.benchmarks.hific_torch import ChannelNorm2D, ResidualBlock
from sodec_jax.errors import SodecError
from sodec_jax.weights import strict
from sodec_jax.weights.export import diffusers_state_dict, hub_name, hub_state_dict


class HyperSynthesis(nn.Module):
  """H_s: z_hat [B, N, h, w] -> w [B, channels, 4h, 4w]."""

  def __init__(self, hyper_channels: int, channels: int):
    super().__init__()
    kw = dict(stride=2, padding=2, output_padding=1)
    self.up1 = nn.ConvTranspose2d(hyper_channels, channels, 5, **kw)
    self.up2 = nn.ConvTranspose2d(channels, channels, 5, **kw)
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, z_hat):
    return self.conv(F.relu(self.up2(F.relu(self.up1(z_hat)))))


class Transform(nn.Module):
  """T_s: y_hat [B, C, h, w], w [B, Cw, h, w] -> y_t [B, out, 2h, 2w]."""

  def __init__(
    self, c_in, w_channels, channels, blocks, out_channels=4, eps=1e-3, upsample="transposed"
  ):
    super().__init__()
    reflect = dict(padding=1, padding_mode="reflect")
    self.conv_in = nn.Conv2d(c_in + w_channels, channels, 3, **reflect)
    self.norm_in = ChannelNorm2D(channels, eps)
    self.blocks = nn.ModuleList([ResidualBlock(channels, eps) for _ in range(blocks)])
    self.upsample = upsample
    if upsample == "resize":  # nearest 2x, then conv3
      self.up_conv = nn.Conv2d(channels, channels, 3, **reflect)
    elif upsample in ("transposed4", "transposed4_blur"):
      self.up = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
    else:
      self.up = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1)
    self.norm_up = ChannelNorm2D(channels, eps)
    self.conv_out = nn.Conv2d(channels, out_channels, 3, **reflect)

  def forward(self, y_hat, w):
    h = self.norm_in(self.conv_in(torch.cat([y_hat, w], dim=1)))
    for block in self.blocks:
      h = block(h)
    if self.upsample == "resize":
      h = self.up_conv(F.interpolate(h, scale_factor=2, mode="nearest"))
    else:
      h = self.up(h)
    if self.upsample == "transposed4_blur":  # [1, 2, 1] x [1, 2, 1] / 16, edges replicated
      k = torch.tensor([1.0, 2.0, 1.0], dtype=h.dtype)
      k = (k[:, None] * k[None, :] / 16.0)[None, None].repeat(h.shape[1], 1, 1, 1)
      h = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="replicate"), k, groups=h.shape[1])
    return self.conv_out(F.relu(self.norm_up(h)))


class GuidanceProjection(nn.Module):
  """F_p, modes fidelity (tokens [B, T, D] -> [B, 77, width]) and none (a learned context)."""

  def __init__(self, mode: str, width: int, tokens: int, in_tokens: int = 0, in_features: int = 0):
    super().__init__()
    if mode not in ("fidelity", "none"):
      raise SodecError(f"guidance.mode={mode!r} has no PyTorch twin here (fidelity and none do)")
    self.mode, self.width, self.tokens = mode, width, tokens
    if mode == "fidelity":
      self.kernel = nn.Parameter(torch.zeros(in_features, width))
      self.token_map = nn.Parameter(torch.zeros(tokens, in_tokens))
      self.bias = nn.Parameter(torch.zeros(width))
    else:
      self.context = nn.Parameter(torch.zeros(tokens, width))

  def forward(self, features):
    if self.mode == "fidelity":
      h = torch.einsum("ot,btd->bod", self.token_map, features @ self.kernel)
      return h + self.bias
    return self.context.expand(features.shape[0], -1, -1)


class SODECDecoder(nn.Module):
  """The decoder after range decoding: `reconstruct(y_hat, z_hat) -> (x_hat, x_f)`, and its
  pieces `guidance(x_f)`, `content_variable(y_hat, z_hat)`, `eps(y_t, c_g)`, `image(y_t, eps)`."""

  def __init__(
    self,
    codec,
    hyper_synthesis,
    transform,
    extractor,
    projection,
    unet,
    vae,
    *,
    timestep: int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    scaling_factor: float,
    image_mean=(0.5,) * 3,
    image_std=(0.5,) * 3,
    image_size=(224, 224),
  ):
    super().__init__()
    self.codec, self.hyper_synthesis, self.transform = codec, hyper_synthesis, transform
    self.extractor, self.guidance_projection = extractor, projection
    self.unet, self.vae_decoder = unet, vae
    self.timestep, self.prediction_type = int(timestep), prediction_type
    self.scaling_factor = float(scaling_factor)
    self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
    self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
    self.image_size = tuple(image_size)

  def preprocess(self, x_f):
    """x_f [B, 3, H, W] -> the extractor's input: clamp to [0, 1], bilinear antialiased resize
    to its image size (as jax.image.resize), (x - mean) / std."""
    x = x_f.clamp(0.0, 1.0)
    if tuple(x.shape[2:]) != self.image_size:
      x = F.interpolate(
        x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
      )
    return (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)

  def guidance(self, x_f):
    """c_g [B, 77, width]."""
    if self.extractor is None:
      return self.guidance_projection(x_f)
    feats = self.extractor(pixel_values=self.preprocess(x_f)).last_hidden_state
    return self.guidance_projection(feats)

  def content_variable(self, y_hat, z_hat):
    """y_t [B, 4, H/8, W/8]."""
    return self.transform(y_hat, self.hyper_synthesis(z_hat))

  def eps(self, y_t, c_g):
    """The UNet's output at t = timestep."""
    t = torch.full((y_t.shape[0],), self.timestep, dtype=torch.long)
    return self.unet(y_t, t, encoder_hidden_states=c_g).sample

  def predict_x0(self, y_t, out):
    abar = self.alphas_cumprod[self.timestep]
    a, s = abar.sqrt(), (1.0 - abar).sqrt()
    y, out = y_t.float(), out.float()
    return (y - s * out) / a if self.prediction_type == "epsilon" else a * y - s * out

  def image(self, y_t, eps):
    """x0 (Eq. 5) -> D_m(x0 / s), mapped to [0, 1] (unclamped) [B, 3, H, W] float32."""
    x0 = self.predict_x0(y_t, eps) / self.scaling_factor
    dtype = next(self.vae_decoder.parameters()).dtype
    return (self.vae_decoder.decode(x0.to(dtype)).sample.float() + 1.0) / 2.0

  def reconstruct(self, y_hat, z_hat):
    """(x_hat, x_f) from the decoded latents [B, C, h, w], [B, N, h/4, w/4]."""
    x_f = self.codec.synthesis(y_hat)
    y_t = self.content_variable(y_hat, z_hat)
    return self.image(y_t, self.eps(y_t, self.guidance(x_f))), x_f


# ----------------------------------------------------------------------------- weights


def _kind(module) -> str:
  from sodec_jax.layers import ChannelNorm, Conv2d, ConvTranspose2d

  if isinstance(module, ConvTranspose2d):
    return "convT"
  if isinstance(module, Conv2d):
    return "conv"
  if isinstance(module, ChannelNorm):
    return "norm"
  return "same"


def conv_state_dict(module) -> dict[str, np.ndarray]:
  """Our conv stack (H_s, T_s) -> its torch twin's state dict above: the torch name is our module
  path with kernel -> weight (conv kernels transposed to torch layout, ChannelNorm gamma/beta
  reshaped [1, C, 1, 1])."""
  from sodec_jax.benchmarks.torch_reference import _to_torch_layout

  kinds = {path: _kind(m) for path, m in nnx.iter_modules(module)}
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    arr = np.asarray(var[...], np.float32)
    leaf = "weight" if path[-1] == "kernel" else str(path[-1])
    kind = kinds[tuple(path[:-1])] if leaf != "bias" else "same"
    out[".".join([*map(str, path[:-1]), leaf])] = np.array(_to_torch_layout(arr, kind), order="C")
  return out


def heads_state_dict(model) -> dict[str, np.ndarray]:
  """H_s, T_s and F_p of our SODEC -> the state dict of `HyperSynthesis` / `Transform` /
  `GuidanceProjection` above (`conv_state_dict` for H_s and T_s, prefixed by their names; F_p's
  arrays as they are)."""
  out = {}
  for name in ("hyper_synthesis", "transform"):
    out.update({f"{name}.{k}": v for k, v in conv_state_dict(getattr(model, name)).items()})
  for path, var in nnx.to_flat_state(nnx.state(model.guidance_projection, nnx.Param)):
    key = ".".join(["guidance_projection", *map(str, path)])
    out[key] = np.ascontiguousarray(np.asarray(var[...], np.float32))
  return out


def load_strict(module: nn.Module, arrays: dict, what: str, skip=lambda k: False) -> None:
  """Copies `arrays` into `module` (every state-dict key not `skip`ped must be given, with its
  shape; nothing else may be): one SodecError lists every missing, unexpected, mis-shaped key."""
  want = {k: tuple(v.shape) for k, v in module.state_dict().items() if not skip(k)}
  missing = sorted(set(want) - set(arrays))
  unexpected = sorted(set(arrays) - set(want))
  bad = [
    f"{k}: {tuple(arrays[k].shape)} (expected {want[k]})"
    for k in sorted(set(want) & set(arrays))
    if tuple(arrays[k].shape) != want[k]
  ]
  strict.check(f"{what} exported to PyTorch", missing, unexpected, bad)
  params = module.state_dict(keep_vars=True)
  with torch.no_grad():  # one tensor at a time: no second copy of a 3.5 GB UNet
    for key in list(arrays):
      params[key].copy_(torch.from_numpy(np.require(arrays.pop(key), np.float32, ["C", "W"])))


def _on_meta(build):
  """build() without initialising its parameters (built on the meta device, then given empty
  CPU storage that load_strict fills entirely); a normal build when the module has buffers,
  whose values the meta device would lose."""
  with torch.device("meta"):
    module = build()
  if any(True for _ in module.buffers()):
    return build()
  return module.to_empty(device="cpu")


def vit_config(spec) -> dict:
  """Our ViTSpec -> transformers ViTConfig kwargs."""
  if spec.head_dim is not None:
    raise SodecError("a ViT with head_dim != hidden_size / heads has no transformers twin")
  return dict(
    hidden_size=spec.hidden_size,
    num_hidden_layers=spec.num_hidden_layers,
    num_attention_heads=spec.num_attention_heads,
    intermediate_size=spec.intermediate_size,
    hidden_act=spec.hidden_act,
    layer_norm_eps=spec.layer_norm_eps,
    image_size=list(spec.image_size),
    patch_size=list(spec.patch_size),
    num_channels=spec.num_channels,
    qkv_bias=spec.qkv_bias,
  )


def _vit(config: dict):
  import transformers

  cfg = transformers.ViTConfig(**config, attn_implementation="eager")
  return _on_meta(lambda: transformers.ViTModel(cfg, add_pooling_layer=False))


def fill_extractor(vit, extractor) -> None:
  """Our ViT's weights -> the transformers ViTModel `vit` (through the hub names)."""
  hub = hub_state_dict(extractor)
  names = {k: hub_name(k, "vit") for k in vit.state_dict()}
  unmapped = sorted(set(hub) - set(names.values()))  # a table row no torch key renames onto
  strict.check("the ViT F exported to PyTorch", unexpected=[f"hub key {k}" for k in unmapped])
  load_strict(vit, {k: hub[n] for k, n in names.items() if n in hub}, "the ViT F")


def torch_extractor(extractor):
  """transformers `ViTModel` (no pooler) holding our ViT's weights."""
  vit = _vit(vit_config(extractor.spec))
  fill_extractor(vit, extractor)
  return vit


def _unet(config: dict):
  from diffusers import UNet2DConditionModel

  return _on_meta(lambda: UNet2DConditionModel(**config))


def _vae_decoder(config: dict):
  from diffusers import AutoencoderKL

  def build():
    vae = AutoencoderKL(**config)
    vae.encoder, vae.quant_conv = None, None  # not part of SODEC (D_m is the decoder)
    return vae

  return _on_meta(build)


def fill_unet(ref, unet) -> None:
  """Our UNet (the LoRA merged) -> the diffusers UNet2DConditionModel `ref`."""
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  arrays = {
    k: v.reshape(want[k]) if k in want and v.size == np.prod(want[k]) else v
    for k, v in diffusers_state_dict(unet).items()
  }
  load_strict(ref, arrays, "the UNet")


def torch_unet(unet):
  """diffusers UNet2DConditionModel holding our UNet's weights, the LoRA merged."""
  ref = _unet(unet.config.to_dict())
  fill_unet(ref, unet)
  return ref


def torch_vae_decoder(vae):
  """diffusers AutoencoderKL holding our D_m (decoder and post_quant_conv; its encoder and
  quant_conv are dropped, as in our SODEC)."""
  ref = _vae_decoder(vae.config.to_dict())
  load_strict(ref, diffusers_state_dict(vae), "the VAE decoder D_m")
  return ref


def schedule_alphas_cumprod(schedule: dict) -> torch.Tensor:
  """abar_t of diffusers' DDPMScheduler with our NoiseSchedule's settings (a dict of them)."""
  from diffusers import DDPMScheduler

  return DDPMScheduler(**schedule).alphas_cumprod.float()


def describe(loaded) -> dict:
  """Everything `build_decoder` needs to rebuild the torch decoder of `loaded` (JSON-able):
  the codec config, H_s / T_s / F_p sizes, the ViT, UNet and VAE configs, the schedule."""
  import dataclasses

  m, cfg = loaded.model, loaded.config
  if m.decoder_kind != "diffusion":
    raise SodecError("the model has the codec decoder; use torch_reference.build_reference")
  s, mc, g, p = cfg.sodec, cfg.model, cfg.guidance, m.guidance_projection
  if g.mode not in ("fidelity", "none"):
    raise SodecError(f"guidance.mode={g.mode!r} has no PyTorch twin here (fidelity and none do)")
  if g.mode == "fidelity" and type(m.guidance_extractor).__name__ != "ViT":
    raise SodecError(
      "the PyTorch decoder has a twin for the ViT extractor only, not "
      f"{type(m.guidance_extractor).__name__}"
    )
  out = {
    "model": {k: list(v) if isinstance(v, tuple) else v for k, v in mc.to_dict().items()},
    "heads": dict(
      hyper_channels=mc.hyper_channels,
      latent_channels=mc.latent_channels,
      hyper_synthesis_channels=s.hyper_synthesis_channels,
      transform_channels=s.transform_channels,
      transform_blocks=s.transform_blocks,
      transform_upsample=m.transform.upsample,
      eps=mc.channel_norm_eps,
      guidance=g.mode,
      width=p.width,
      tokens=p.tokens,
    ),
    "unet": m.unet.config.to_dict(),
    "vae": m.vae_decoder.config.to_dict(),
    "schedule": dataclasses.asdict(m.schedule),
    "timestep": m.timestep,
    "scaling_factor": m.scaling_factor,
    "extractor": None,
  }
  if g.mode == "fidelity":
    f = m.guidance_extractor
    out["heads"].update(in_tokens=p.token_map.shape[1], in_features=p.kernel.shape[0])
    out["extractor"] = dict(
      vit=vit_config(f.spec), image_mean=list(f.image_mean), image_std=list(f.image_std)
    )
  return out


def build_decoder(d: dict) -> SODECDecoder:
  """The torch decoder `describe` describes; the UNet, VAE and ViT are built on the meta device
  (no initialisation): their weights must be loaded next (`build_sodec_reference`,
  `load_exported`)."""
  from types import SimpleNamespace

  from sodec_jax.benchmarks.hific_torch import HiFiC

  h = d["heads"]
  ts = (h["latent_channels"], h["hyper_synthesis_channels"], h["transform_channels"])
  kw, extractor, e = {}, None, d["extractor"]
  if e is not None:
    extractor = _vit(e["vit"])
    kw = dict(image_mean=e["image_mean"], image_std=e["image_std"])
    kw["image_size"] = tuple(e["vit"]["image_size"])
  return SODECDecoder(
    HiFiC.from_model_config(SimpleNamespace(**d["model"])),
    HyperSynthesis(h["hyper_channels"], h["hyper_synthesis_channels"]),
    Transform(
      *ts,
      h["transform_blocks"],
      d["unet"]["in_channels"],
      h["eps"],
      # exported before the option: the transposed conv
      upsample=h.get("transform_upsample", "transposed"),
    ),
    extractor,
    GuidanceProjection(
      h["guidance"], h["width"], h["tokens"], h.get("in_tokens", 0), h.get("in_features", 0)
    ),
    _unet(d["unet"]),
    _vae_decoder(d["vae"]),
    timestep=d["timestep"],
    alphas_cumprod=schedule_alphas_cumprod(d["schedule"]),
    prediction_type=d["schedule"]["prediction_type"],
    scaling_factor=d["scaling_factor"],
    **kw,
  )


def build_sodec_reference(loaded, dtype: torch.dtype = torch.float32) -> SODECDecoder:
  """The PyTorch SODEC decoder holding `loaded.model`'s weights (a diffusion model), every
  tensor set strictly through the inverse key maps."""
  from sodec_jax.benchmarks.torch_reference import state_dict_from_jax

  m = loaded.model
  ref = build_decoder(describe(loaded))
  load_strict(ref.codec, state_dict_from_jax(m, loaded.config.model), "the codec")
  heads = nn.ModuleDict(
    dict(
      hyper_synthesis=ref.hyper_synthesis,
      transform=ref.transform,
      guidance_projection=ref.guidance_projection,
    )
  )
  load_strict(heads, heads_state_dict(m), "H_s, T_s and F_p")
  if ref.extractor is not None:
    fill_extractor(ref.extractor, m.guidance_extractor)
  fill_unet(ref.unet, m.unet)
  load_strict(ref.vae_decoder, diffusers_state_dict(m.vae_decoder), "the VAE decoder D_m")
  return ref.to(dtype).eval()


def load_exported(folder: str, dtype: torch.dtype = torch.float32) -> SODECDecoder:
  """The decoder `python convert/from_torch.py export-torch` wrote (FOLDER/sodec_torch.json +
  FOLDER/model.safetensors), with torch, diffusers and transformers only (no JAX model)."""
  import json
  import os

  from safetensors.torch import load_file

  for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
    if not os.path.isfile(os.path.join(folder, name)):
      raise SodecError(f"{folder} has no {name}: make it with `{EXPORT_HINT}`")
  with open(os.path.join(folder, EXPORT_CONFIG)) as f:
    ref = build_decoder(json.load(f))
  tensors = load_file(os.path.join(folder, EXPORT_WEIGHTS))
  load_strict(ref, {k: v.numpy() for k, v in tensors.items()}, f"the decoder in {folder}")
  return ref.to(dtype).eval()


EXPORT_CONFIG, EXPORT_WEIGHTS = "sodec_torch.json", "model.safetensors"
EXPORT_HINT = "python convert/from_torch.py export-torch --src WORKDIR --out FOLDER"


# ----------------------------------------------------------------------------- decoding


def reconstruct(ref: SODECDecoder, y_hat: np.ndarray, z_hat: np.ndarray) -> np.ndarray:
  """NHWC numpy latents -> x_hat [B, H, W, 3] float32 (unclamped), as api.reconstruct."""
  from sodec_jax.benchmarks.torch_reference import _nchw, _nhwc

  dtype = next(ref.parameters()).dtype
  with torch.inference_mode():
    x_hat, _ = ref.reconstruct(_nchw(y_hat, dtype), _nchw(z_hat, dtype))
  return _nhwc(x_hat)


def decompress(ref: SODECDecoder, loaded, data: bytes) -> np.ndarray:
  """torch twin of `sodec_jax.api.decompress` for the diffusion decoder: `api.decode_latents`
  with the torch prior, then the whole torch decoder, then `api.to_uint8`."""
  from sodec_jax import api
  from sodec_jax.benchmarks.torch_reference import _nchw, _nhwc

  dtype = next(ref.parameters()).dtype

  def torch_prior(z_hat):
    with torch.inference_mode():
      return tuple(_nhwc(t) for t in ref.codec.prior(_nchw(z_hat, dtype)))

  header, y_hat, z_hat = api.decode_latents(loaded, data, torch_prior)
  return api.to_uint8(reconstruct(ref, y_hat, z_hat), header.height, header.width)

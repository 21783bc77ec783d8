"""The codec (E, H_a, P's mean/scale synthesis, D_a) in plain PyTorch, loaded with a JAX model's
weights: the reference `python -m sodec_jax.bench --what codec --reference torch` times.

The modules are `sodec_jax.benchmarks.hific_torch` (the HiFiC PyTorch implementation's layout),
so `state_dict_from_jax` is exactly the inverse of `sodec_jax.weights.hific.hific_key_map`: a
state dict converted from a HiFiC checkpoint round-trips to the same tensors. The factorized
density of z is not run in torch here: both sides range-code with the same host tables
(`LoadedModel.z_coder`), so only the neural pieces are compared.
`compress`/`decompress` below are the torch twins of `sodec_jax.api.compress`/`decompress` (same
padding, rounding, coders and container, and the same exact scale indexes: `api.Latents.from_prior`
and `api.decode_latents` take them from z_hat through the integer network, never from torch's
sigma), used for end-to-end timings.

Importing this module imports torch (only the benchmark does).
"""

from __future__ import annotations

import numpy as np
import torch

from sodec_jax.benchmarks.hific_torch import HiFiC
from sodec_jax.errors import SodecError

# The HiFiC-layout modules (Encoder / Generator / Hyperprior with analysis, prior, synthesis).
TorchCodec = HiFiC


# ----------------------------------------------------------------------------- weights


def _to_torch_layout(arr: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `sodec_jax.weights.hific._to_ours`."""
  if kind == "conv":  # [kh, kw, I, O] -> [O, I, kh, kw]
    return arr.transpose(3, 2, 0, 1)
  if kind == "convT":  # [kh, kw, I, O] -> [I, O, kh, kw]
    return arr.transpose(2, 3, 0, 1)
  if kind == "norm":  # [C] -> [1, C, 1, 1]
    return arr.reshape(1, -1, 1, 1)
  return arr


def state_dict_from_jax(model, model_cfg) -> dict[str, np.ndarray]:
  """Our SODEC model's codec parameters -> a HiFiC `model_state_dict` (float32 numpy): every
  row of `hific_key_map`, plus the density's last gate `a_k` as zeros (tanh(0) = 0: no gate)
  where our model has none, so it fills `hific_torch.HiFiC` strictly."""
  from flax import nnx

  from sodec_jax.weights.hific import hific_key_map

  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for torch_key, path, kind in hific_key_map(model_cfg):
    if path not in flat:
      raise SodecError(f"the model has no parameter {'/'.join(map(str, path))} for {torch_key}")
    out[torch_key] = np.array(
      _to_torch_layout(np.asarray(flat[path].value, np.float32), kind), order="C", copy=True
    )
  last = len(model_cfg.factorized_filters)
  gate = f"Hyperprior.hyperlatent_likelihood.a_{last}"
  if gate not in out:
    out[gate] = np.zeros_like(out[f"Hyperprior.hyperlatent_likelihood.b_{last}"])
  return out


def build_reference(loaded, dtype: torch.dtype = torch.float32) -> HiFiC:
  """A HiFiC torch model holding `loaded.model`'s weights (strict: every tensor is set)."""
  model_cfg = loaded.config.model
  ref = HiFiC.from_model_config(model_cfg)
  sd = state_dict_from_jax(loaded.model, model_cfg)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  return ref.to(dtype).eval()


# ----------------------------------------------------------------------------- the coding path


def _nchw(x: np.ndarray, dtype) -> torch.Tensor:
  return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), order="C", copy=True)).to(
    dtype
  )


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.float().permute(0, 2, 3, 1).contiguous().numpy()


def latents(ref: TorchCodec, loaded, x: np.ndarray):
  """x float32 [B, H, W, 3] (padded) -> sodec_jax.api.Latents computed by the torch networks."""
  from sodec_jax import api

  dtype = next(ref.parameters()).dtype
  with torch.inference_mode():
    y, z = ref.analysis(_nchw(x, dtype))
    z_hat = torch.round(z.float())
    mu, sigma = ref.prior(z_hat.to(dtype))
  return api.Latents.from_prior(loaded, _nhwc(y), _nhwc(z_hat), _nhwc(mu), _nhwc(sigma))


def compress(ref: TorchCodec, loaded, image: np.ndarray) -> bytes:
  """torch twin of `sodec_jax.api.compress`: latents from the torch networks, then `api.pack`
  (the same rounding, scale indexes, coders, container and fingerprint)."""
  from sodec_jax import api

  return api.pack(loaded, latents(ref, loaded, api.pad_image(loaded, image)), *image.shape[:2])


def decompress(ref: TorchCodec, loaded, data: bytes) -> np.ndarray:
  """torch twin of `sodec_jax.api.decompress` for the codec decoder: `api.decode_latents` with
  the torch prior, then the torch D_a."""
  from sodec_jax import api

  dtype = next(ref.parameters()).dtype

  def torch_prior(z_hat):
    with torch.inference_mode():
      return tuple(_nhwc(t) for t in ref.prior(_nchw(z_hat, dtype)))

  header, y_hat, _ = api.decode_latents(loaded, data, torch_prior)
  with torch.inference_mode():
    x = _nhwc(ref.synthesis(_nchw(y_hat, dtype)))
  return api.to_uint8(x, header.height, header.width)

"""The public coding steps of sodec_jax.api (encode_latents, pack, decode_latents, reconstruct,
the batch calls) and which failures are reported as a bad file."""

import numpy as np
import pytest

from sodec_jax import api
from sodec_jax.codec import bitstream
from sodec_jax.errors import SodecError


def test_steps_compose_to_compress_and_decompress(codec_model, astronaut):
  image = np.ascontiguousarray(astronaut[:70, :100])
  lat = api.encode_latents(codec_model, image)
  c, n = codec_model.config.model.latent_channels, codec_model.config.model.hyper_channels
  assert lat.z_hat.shape == (1, 2, 2, n) and lat.y_hat.shape == (1, 8, 8, c)  # padded to 128
  assert lat.indexes.shape == lat.y_symbols.shape and lat.z_indexes.shape == lat.z_hat.shape
  np.testing.assert_array_equal(lat.y_symbols, np.round(lat.y_symbols))
  y, z = (np.asarray(a) for a in api.analysis(codec_model, api.pad_image(codec_model, image)))
  np.testing.assert_array_equal(lat.z_hat, np.round(z))
  np.testing.assert_array_equal(lat.y_symbols, np.round(y - lat.mu))
  data = api.pack(codec_model, lat, 70, 100)
  assert data == api.compress(codec_model, image)
  header, y_hat, z_hat = api.decode_latents(codec_model, data)
  x_hat, x_f = api.reconstruct(codec_model, y_hat, z_hat)
  np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(x_f))  # the codec decoder
  assert (header.height, header.width) == (70, 100)
  np.testing.assert_array_equal(
    api.to_uint8(np.asarray(x_hat), 70, 100), api.decompress(codec_model, data)
  )


def test_pack_refuses_latents_of_another_size(codec_model, astronaut):
  lat = api.encode_latents(codec_model, np.ascontiguousarray(astronaut[:64, :64]))
  with pytest.raises(SodecError, match="64x200"):
    api.pack(codec_model, lat, 64, 200)


def test_batch_calls_agree_with_single_calls(codec_model, astronaut):
  images = [np.ascontiguousarray(astronaut[k * 70 : k * 70 + 60, :90]) for k in range(3)]
  files = api.compress_batch(codec_model, images)
  decoded = api.decompress_batch(codec_model, files)
  for im, f, d in zip(images, files, decoded):
    assert d.shape == im.shape
    single = api.decompress(codec_model, f)
    assert np.abs(d.astype(int) - single.astype(int)).max() <= 1
    want = api.decompress(codec_model, api.compress(codec_model, im))
    assert np.abs(single.astype(int) - want.astype(int)).max() <= 1
  with pytest.raises(SodecError, match="one size"):
    api.compress_batch(codec_model, [images[0], images[0][:32]])


def test_prior_failure_is_a_traceback_not_a_bad_file(codec_model, astronaut, monkeypatch):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:64, :64]))

  def broken_prior(model, z_hat):
    raise RuntimeError("out of memory in the prior")

  monkeypatch.setattr(api, "prior", broken_prior)
  with pytest.raises(RuntimeError, match="out of memory in the prior"):
    api.decode_latents(codec_model, data)
  # decompress runs P inside its one jitted decoder program: a failure there propagates too
  monkeypatch.setattr(
    codec_model, "_decode_image", lambda *a: broken_prior(codec_model, a[1]), raising=True
  )
  with pytest.raises(RuntimeError, match="out of memory in the prior"):
    api.decompress(codec_model, data)


def test_decompress_in_one_program_equals_the_steps(codec_model, astronaut):
  """decompress (symbols -> pixels in one jit: mu, y_hat, decoder, uint8 inside) gives the image
  the public steps give (decode_latents, reconstruct, to_uint8, with mu on the host)."""
  image = np.ascontiguousarray(astronaut[:100, :90])
  data = api.compress(codec_model, image)
  header, y_hat, z_hat = api.decode_latents(codec_model, data)
  steps = api.to_uint8(np.asarray(api.reconstruct(codec_model, y_hat, z_hat)[0]), 100, 90)
  fast = api.decompress(codec_model, data)
  assert fast.shape == (100, 90, 3) and fast.dtype == np.uint8
  assert np.abs(fast.astype(int) - steps.astype(int)).max() <= 1
  assert np.mean(fast != steps) < 1e-3


def test_range_decoding_failure_after_the_crc_names_model_or_build(codec_model, astronaut):
  data = api.compress(codec_model, np.ascontiguousarray(astronaut[:64, :64]))
  header, (z, y, over) = bitstream.unpack(data)
  bad = bitstream.pack(header, [z, y, over + b"\x00"])  # valid container, one stray value
  with pytest.raises(SodecError, match="does not match this model or sodec-jax build"):
    api.decompress(codec_model, bad)

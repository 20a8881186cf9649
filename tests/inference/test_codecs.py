import pytest
import torch

from inference.codecs import Flux2Codec, PixelCodec, load_codec, patchify_2x2, unpatchify_2x2


def test_pixel_codec_round_trip_is_exact():
    codec = load_codec("pixel")
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 48, 8, 12) and codec.channels == 48
    assert torch.equal(codec.decode(z), images)
    assert load_codec("pixel:8").encode(images).shape == (2, 192, 4, 6)
    assert isinstance(codec, PixelCodec) and codec.identity()["codec"] == "pixel"


def test_codec_specs_and_size_errors(tmp_path):
    with pytest.raises(LookupError, match="known: pixel"):
        load_codec("jpeg")
    with pytest.raises(ValueError, match="integer"):
        load_codec("pixel:x")
    with pytest.raises(FileNotFoundError):
        load_codec(f"flux2:{tmp_path / 'none'}")
    with pytest.raises(ValueError, match="multiples of 4"):
        load_codec("pixel").check_size(30, 32)


def test_flux2_codec_shapes_and_normalization_round_trip(tiny_vae):
    codec = load_codec(f"flux2:{tiny_vae}")
    assert isinstance(codec, Flux2Codec) and (codec.channels, codec.factor, codec.multiple) == (32, 8, 16)
    images = torch.rand(2, 3, 64, 32) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 32, 8, 4)
    assert codec.decode(z).shape == images.shape
    raw = torch.randn(2, 32, 8, 4)
    assert torch.allclose(codec.denormalize(codec.normalize(raw)), raw, atol=1e-5)
    # normalization is the VAE's BatchNorm in inference mode over the 2×2-patchified 128 channels
    bn = codec.vae.bn.eval()
    assert torch.allclose(patchify_2x2(codec.normalize(raw)), bn(patchify_2x2(raw)), atol=1e-5)
    # and encode is: VAE posterior mode → that normalization
    posterior = codec.vae.encode(images).latent_dist.mode()
    assert torch.allclose(z, codec.normalize(posterior), atol=1e-5)


def test_patchify_2x2_inverse():
    z = torch.randn(1, 32, 6, 4)
    assert torch.equal(unpatchify_2x2(patchify_2x2(z)), z)
    assert patchify_2x2(z)[0, 5, 0, 0] == z[0, 1, 0, 1]  # channel c·4 + dy·2 + dx

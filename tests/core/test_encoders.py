"""The CLIP backbone: real checkpoint loading, the shared cache, batched encoding, the text cache."""

import pytest
import torch
from PIL import Image

from guardalign_core import encoders
from guardalign_core.encoders import ClipEncoder, clear_clip_cache, get_clip_encoder
from guardalign_core.errors import ModelLoadError
from guardalign_core.testing.tiny_clip import TINY_CLIP, save_tiny_clip_checkpoint


def test_checkpoint_loads_through_pretrained_path(tiny_clip_checkpoint):
    encoder = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint))
    saved = torch.load(tiny_clip_checkpoint, weights_only=True)
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_same_seed_same_checkpoint(tmp_path):
    a = torch.load(save_tiny_clip_checkpoint(tmp_path / "a.pt", seed=3), weights_only=True)
    b = torch.load(save_tiny_clip_checkpoint(tmp_path / "b.pt", seed=3), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_cache_returns_the_same_object(tiny_clip_checkpoint):
    first = get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint))
    assert get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint)) is first
    assert get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint), dtype="bfloat16") is not first


def test_missing_checkpoint_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load open_clip model"):
        ClipEncoder(TINY_CLIP, str(tmp_path / "missing.pt"))


def test_grid_crops_match_cropping_each_box(tiny_clip_checkpoint):
    encoder = get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint))
    image = Image.effect_mandelbrot((192, 192), (-2, -1.5, 1, 1.5), 100).convert("RGB")
    crops = encoder.grid_crops(image, 3)
    assert crops.shape == (9, 3, 64, 64)
    # 192 = 3·64: the tiles are exact crops, no resampling.
    expected = encoder.resize(encoder.to_tensor(image.crop((64, 128, 128, 192))), (64, 64))[0]
    assert torch.allclose(crops[2 * 3 + 1], expected, atol=1e-5)


def test_batched_encoding_equals_one_by_one(tiny_clip_checkpoint):
    encoder = get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint))
    pixels = torch.randn(5, 3, 64, 64)
    batched = encoder.encode_images(pixels, batch_size=2)
    single = torch.cat([encoder.encode_images(pixels[i : i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_token_features_shape_and_value_path(tiny_clip_checkpoint):
    encoder = get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint))
    assert encoder.token_grid == (4, 4)
    tokens, pooled = encoder.encode_tokens(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 16, 64) and pooled.shape == (2, 64)
    # The value path keeps tokens local: changing one token's pixels changes only that token.
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    edited = pixels.clone()
    edited[..., :16, :16] += 3.0
    before, _ = encoder.encode_tokens(pixels)
    after, _ = encoder.encode_tokens(edited)
    changed = (before - after).norm(dim=-1)[0]
    assert changed[0] > 10 * changed[1:].max()


def test_text_embeddings_are_cached_on_disk(tiny_clip_checkpoint, tmp_path, monkeypatch):
    encoder = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint))
    first = encoder.cached_text_embeddings("bank:x", ["a knife", "a gun"], tmp_path)
    assert list((tmp_path / "text_embeddings").glob("*.pt"))
    fresh = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint))
    monkeypatch.setattr(fresh, "encode_text", lambda texts: pytest.fail("should have read the disk cache"))
    assert torch.equal(fresh.cached_text_embeddings("bank:x", ["a knife", "a gun"], tmp_path), first)


def test_clear_cache(tiny_clip_checkpoint):
    first = get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint))
    clear_clip_cache()
    assert not encoders._CACHE
    assert get_clip_encoder(TINY_CLIP, str(tiny_clip_checkpoint)) is not first

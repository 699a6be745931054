"""DinoFeatures on the tiny random-weight DINOv2-with-registers fixture (hidden 32, patch 14, 4 registers)."""

from __future__ import annotations

import shutil

import pytest
import torch

from recdreamer_gs.hub import ModelUnavailable
from recdreamer_gs.pose.features import IMAGENET_MEAN, IMAGENET_STD, DinoFeatures, preprocess


@pytest.fixture(scope="module")
def feats(tiny_models) -> DinoFeatures:
    return DinoFeatures.load(str(tiny_models["dinov2"]))


def test_shapes_dtype_and_frozen(feats):
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    cls, patches = feats(x)
    assert cls.shape == (2, 32) and patches.shape == (2, 16, 16, 32)
    assert cls.dtype == torch.float32 and patches.dtype == torch.float32
    assert torch.isfinite(cls).all() and torch.isfinite(patches).all()
    assert feats.num_register_tokens == 4 and feats.input_size == 560 and feats.patch_size == 14
    assert not any(p.requires_grad for p in feats.parameters())
    feats.train()
    assert not feats.training and not feats.model.training


def test_gradient_reaches_images(feats):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    cls, patches = feats(x, input_size=224)
    (cls.sum() + patches.pow(2).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_registers_and_cls_are_dropped_from_the_grid(feats):
    """With grid = 224 / 14 = 16 no resize happens: the grid is exactly the model's patch tokens."""
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    cls, patches = feats(x, input_size=224, grid_size=16)
    tokens = feats.model(pixel_values=preprocess(x, 224)).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches.reshape(1, 256, 32), tokens[:, 5:])


def test_grid_is_area_average(feats):
    """40x40 -> 20x20 is an exact 2x2 average."""
    x = torch.rand(1, 3, 40, 40) * 2 - 1
    _, full = feats(x, input_size=560, grid_size=40)
    _, half = feats(x, input_size=560, grid_size=20)
    pooled = full.view(1, 20, 2, 20, 2, 32).mean(dim=(2, 4))
    torch.testing.assert_close(half, pooled, rtol=1e-5, atol=1e-5)


def test_preprocess_maps_to_imagenet_normalised():
    white = torch.ones(1, 3, 28, 28)
    out = preprocess(white, 56)
    assert out.shape == (1, 3, 56, 56)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 10, 10], expected)


def test_bad_input_and_size(feats):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        feats(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        feats(torch.zeros(1, 3, 16, 16), input_size=100)


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelUnavailable) as info:
        DinoFeatures.load(str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "--pose-model PATH" in msg


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="config.json"):
        DinoFeatures.load(str(tmp_path))


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable) as info:
        DinoFeatures.load("facebook/dinov2-with-registers-small")
    assert "facebook/dinov2-with-registers-small" in str(info.value) and "--pose-model" in str(info.value)


def test_hub_id_loads_from_the_cache_offline(tiny_models, tmp_path, monkeypatch):
    """Offline, a Hub id resolves to its cached snapshot (no network call, not even for adapters)."""
    repo = tmp_path / "hub" / "models--tiny--dino"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_models["dinov2"], repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    feats = DinoFeatures.load("tiny/dino")
    assert feats.name == "tiny/dino" and feats.dim == 32

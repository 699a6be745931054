"""pEnt / cEnt entropies and the CLIP score (tiny random-weight CLIP fixture)."""

from __future__ import annotations

import math

import pytest
import torch

from recdreamer_gs.hub import ModelUnavailable
from recdreamer_gs.metrics import (
    CLIP_VIEW_SUFFIXES,
    ClipScorer,
    clip_preprocess,
    clip_score,
    clip_view_entropy,
    normalised_entropy,
    pent_views,
    pose_entropy,
)


@pytest.fixture(scope="module")
def scorer(tiny_models) -> ClipScorer:
    return ClipScorer.load(str(tiny_models["clip"]))


def renders(n: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 40, generator=g)


def test_pent_views():
    az = pent_views()
    assert az.shape == (10,)
    torch.testing.assert_close(az, torch.tensor([0.0, 36, 72, 108, 144, -180, -144, -108, -72, -36]))
    assert pent_views(4).tolist() == [0.0, 90.0, -180.0, -90.0]
    with pytest.raises(ValueError):
        pent_views(0)


def test_pose_entropy_extremes():
    assert pose_entropy(torch.full((10, 4), 0.25)) == pytest.approx(1.0)
    one_hot = torch.zeros(10, 4)
    one_hot[:, 0] = 1
    assert pose_entropy(one_hot) == pytest.approx(0.0, abs=1e-12)
    # every view confident, but the views spread evenly over the classes: uniform mean
    assert pose_entropy(torch.eye(4).repeat(2, 1)) == pytest.approx(1.0)
    # front-biased: 7 of 10 views front, one each of the rest
    biased = torch.zeros(10, 4)
    biased[:7, 0] = 1
    biased[7, 1] = biased[8, 2] = biased[9, 3] = 1
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    assert pose_entropy(biased) == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[V, C\]"):
        pose_entropy(torch.ones(4))
    with pytest.raises(ValueError, match="at least 2"):
        normalised_entropy(torch.ones(1))


def test_clip_view_entropy_and_score(scorer):
    images = renders()
    probs = scorer.view_probabilities(images, "a corgi")
    assert probs.shape == (10, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    cent = scorer.view_entropy(images, "a corgi")
    assert math.isfinite(cent) and 0.0 <= cent <= 1.0 + 1e-9
    assert cent == pytest.approx(pose_entropy(probs))
    score = scorer.clip_score(images, "a corgi")
    assert math.isfinite(score) and -100.0 <= score <= 100.0
    # the module functions take the model and tokenizer directly
    assert clip_view_entropy(scorer.model, scorer.tokenizer, images, "a corgi") == pytest.approx(cent)
    assert clip_score(scorer.model, scorer.tokenizer, images, "a corgi") == pytest.approx(score)
    assert CLIP_VIEW_SUFFIXES == (", from front view", ", from side view", ", from back view")


def test_clip_score_of_an_image_with_its_own_direction(scorer):
    """Score = 100 x cosine: check against embeddings computed by hand."""
    from recdreamer_gs.metrics import clip_image_embeddings, clip_text_embeddings

    images = renders(3, seed=1)
    img = clip_image_embeddings(scorer.model, images)
    txt = clip_text_embeddings(scorer.model, scorer.tokenizer, ["a red car"])
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert scorer.clip_score(images, "a red car") == pytest.approx(float(100 * (img @ txt.T).mean()), rel=1e-5)


def test_clip_preprocess():
    x = torch.rand(2, 3, 30, 60)
    out = clip_preprocess(x, 32)
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        clip_preprocess(x * 2 - 1, 32)


def test_missing_clip_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelUnavailable) as info:
        ClipScorer.load(str(tmp_path / "no-clip"))
    assert "no-clip" in str(info.value) and "--clip-model PATH" in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable, match="openai/clip-vit-base-patch32.*offline"):
        ClipScorer.load()


def test_metric_cameras_are_the_preview_orbit_of_the_training_ranges():
    from recdreamer_gs.config import load_config
    from recdreamer_gs.metrics import metric_cameras, pent_views

    camera = load_config("standard").camera  # elevation -10..45, radius 2.5..3, fovy 40..60
    cams = metric_cameras(camera, 48)
    assert len(cams) == 10 and cams.width == cams.height == 48
    assert torch.allclose(cams.azimuth, pent_views(10))
    assert torch.allclose(cams.elevation, torch.full((10,), camera.preview_elevation))
    assert torch.allclose(cams.c2w[:, :3, 3].norm(dim=-1), torch.full((10,), 2.75))
    assert torch.allclose(cams.fovy, torch.full((10,), math.radians(50.0)))

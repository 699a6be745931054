"""PoseClassifier on the tiny random-weight DINOv2 fixture.

Random weights give random but deterministic features, so the tests use templates whose patches are
all distinct (a random texture on a white background): an input equal to a template then matches
its own patches exactly (s_ori close to 1), while a mirrored input finds its nearest patches at the
mirrored columns of the original template. The properties checked hold for any feature extractor.
"""

from __future__ import annotations

import os

import pytest
import torch

from recdreamer_gs.config import PoseClassifierConfig
from recdreamer_gs.pose.classifier import PoseClassifier
from recdreamer_gs.pose.features import DinoFeatures

SIZE = 64


def textured_object(seed: int, box: tuple[int, int, int, int] = (14, 50, 10, 46)) -> torch.Tensor:
    """A [3, 64, 64] image in [-1, 1]: random coarse texture in ``box`` (top, bottom, left, right), white outside."""
    g = torch.Generator().manual_seed(seed)
    img = torch.ones(3, SIZE, SIZE)
    top, bottom, left, right = box
    tex = torch.rand(3, (bottom - top) // 4 + 1, (right - left) // 4 + 1, generator=g)
    tex = tex.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, : bottom - top, : right - left]
    img[:, top:bottom, left:right] = 0.1 + 0.7 * tex
    return img * 2 - 1


@pytest.fixture(scope="module")
def feats(tiny_models) -> DinoFeatures:
    return DinoFeatures.load(str(tiny_models["dinov2"]))


@pytest.fixture(scope="module")
def templates() -> dict[str, list[torch.Tensor]]:
    side = textured_object(3, box=(14, 50, 4, 40))  # off-centre: clearly asymmetric
    return {
        "front": [textured_object(1)],
        "back": [textured_object(2)],
        "left": [side],
        "right": [side.flip(-1)],
    }


CFG = PoseClassifierConfig(classes=("front", "back", "left", "right"), input_size=224, n_augment=3, augment_batch=2)


@pytest.fixture(scope="module")
def classifier(feats, templates) -> PoseClassifier:
    return PoseClassifier.from_templates(feats, templates, CFG, torch.Generator().manual_seed(0))


def stack(templates) -> torch.Tensor:
    return torch.stack([imgs[0] for imgs in templates.values()])


def test_each_template_gets_its_own_class(classifier, templates):
    probs = classifier(stack(templates))
    assert probs.shape == (4, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert probs.argmax(-1).tolist() == [0, 1, 2, 3]
    assert classifier.classes == ("front", "back", "left", "right")


def test_template_and_its_mirror_land_in_different_classes(classifier, templates):
    left = templates["left"][0]
    scores = classifier.scores(torch.stack([left, left.flip(-1)]))
    assert scores.probs[0].argmax() == 2 and scores.probs[1].argmax() == 3
    # The mirror pays in orientation, not texture: [CLS] barely tells left from right.
    assert scores.s_ori[0, 2] > scores.s_ori[0, 3] + 0.1
    assert scores.s_ori[1, 3] > scores.s_ori[1, 2] + 0.1


def test_foreground_of_templates_is_the_object(classifier):
    """PCA sign: the white border is background; the masks cover the textured box."""
    mask = classifier.template_mask
    assert not mask[:, 0, :].any() and not mask[:, -1, :].any()
    assert mask.float().mean() > 0.1
    coords = classifier.template_coords
    assert coords.min() == -0.5 and coords.max() == 0.5


def test_gradient_reaches_input_but_not_masks(classifier, templates):
    x = stack(templates)[:2].clone().requires_grad_(True)
    scores = classifier.scores(x)
    assert not scores.mask.requires_grad and not scores.coords.requires_grad
    assert scores.probs.requires_grad
    torch.log(scores.probs[:, 1]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_save_load_round_trip(classifier, feats, templates, tmp_path):
    path = classifier.save(tmp_path / "sub" / "pose.pt")
    assert sorted(os.listdir(tmp_path / "sub")) == ["pose.pt"]  # one file, no temp file left behind
    loaded = PoseClassifier.load(path, feats)
    assert loaded.classes == classifier.classes and loaded.cfg == classifier.cfg
    x = stack(templates)
    assert torch.equal(loaded(x), classifier(x))
    assert torch.equal(loaded.images, classifier.images) and loaded.images.dtype == torch.uint8


def test_load_errors(feats, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PoseClassifier.load(tmp_path / "missing.pt", feats)
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="expected a pose classifier file"):
        PoseClassifier.load(bad, feats)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read it"):
        PoseClassifier.load(junk, feats)


def test_state_dict_holds_templates_not_dino(classifier):
    keys = set(classifier.state_dict())
    assert "template_cls" in keys and "pca_component" in keys
    assert not any(k.startswith(("features.", "model.")) for k in keys)
    assert list(classifier.parameters()) == []


def test_class_count_errors(feats):
    img = textured_object(0)
    with pytest.raises(ValueError, match="3 to 6 pose classes, got 2"):
        PoseClassifier.from_templates(feats, {"a": [img], "b": [img]}, CFG)
    seven = {f"c{i}": [img] for i in range(7)}
    with pytest.raises(ValueError, match="3 to 6 pose classes, got 7"):
        PoseClassifier.from_templates(feats, seven, CFG)
    with pytest.raises(ValueError, match="config expects"):
        PoseClassifier.from_templates(feats, {"front": [img], "back": [img], "side": [img]}, CFG)
    with pytest.raises(ValueError, match="at least one image"):
        PoseClassifier.from_templates(feats, {"front": [img], "back": [img], "left": [img], "right": []}, CFG)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        PoseClassifier.from_templates(feats, {"front": [img], "back": [img], "left": [img], "right": [img[:1]]}, CFG)
    with pytest.raises(ValueError, match="3 to 6 pose classes, got 2"):
        PoseClassifierConfig(classes=("a", "b")).validate()


def test_three_classes_and_several_templates_per_class(feats):
    cfg = PoseClassifierConfig(classes=("front", "back", "side"), input_size=224, n_augment=1)
    side = textured_object(5, box=(14, 50, 4, 40))
    clf = PoseClassifier.from_templates(
        feats, {"front": [textured_object(1), textured_object(6)], "back": [textured_object(2)], "side": [side]}, cfg
    )
    assert clf.template_class.tolist() == [0, 0, 1, 2]
    probs = clf(torch.stack([textured_object(1), textured_object(2), side]))
    assert probs.shape == (3, 3) and probs.argmax(-1).tolist() == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_build_forward_backward_save_load(tiny_models, templates, tmp_path, dtype):
    feats = DinoFeatures.load(str(tiny_models["dinov2"]), device="cuda", dtype=dtype)
    clf = PoseClassifier.from_templates(feats, templates, CFG, torch.Generator().manual_seed(0))
    assert clf.template_cls.is_cuda and clf.template_cls.dtype == torch.float32
    x = stack(templates).cuda().requires_grad_(True)
    probs = clf(x)
    assert probs.is_cuda and probs.dtype == torch.float32
    assert probs.argmax(-1).tolist() == [0, 1, 2, 3]
    torch.log(probs[:, 0]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    loaded = PoseClassifier.load(clf.save(tmp_path / "pose.pt"), feats)
    torch.testing.assert_close(loaded(x.detach()), probs.detach())
    # CPU images go to the feature model's device; the result matches a CPU build in fp32
    cpu_probs = clf(stack(templates))
    assert cpu_probs.is_cuda
    if dtype == torch.float32:
        cpu_clf = PoseClassifier.load(tmp_path / "pose.pt", DinoFeatures.load(str(tiny_models["dinov2"])))
        torch.testing.assert_close(cpu_clf(stack(templates)), cpu_probs.cpu(), rtol=1e-3, atol=1e-3)

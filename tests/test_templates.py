"""Template folders (read / write / errors) and prompt-based template generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recdreamer_gs.pose.templates import (
    TemplateError,
    generate_templates,
    load_template_folder,
    order_classes,
    resize_templates,
    write_template_folder,
)


def quantised(seed: int, size: int = 16) -> torch.Tensor:
    """A random image in [-1, 1] on the uint8 grid, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g).float() / 127.5 - 1


def test_write_then_load_round_trip(tmp_path):
    templates = {"right": [quantised(0)], "front": [quantised(1), quantised(2)], "back": [quantised(3)],
                 "left": [quantised(4)]}
    paths = write_template_folder(templates, tmp_path / "t")
    assert sorted(p.relative_to(tmp_path / "t").as_posix() for p in paths) == [
        "back/000.png", "front/000.png", "front/001.png", "left/000.png", "right/000.png"]
    assert not list((tmp_path / "t").rglob("*.tmp"))
    loaded = load_template_folder(tmp_path / "t", size=16)
    assert list(loaded) == ["front", "back", "left", "right"]
    for name, images in templates.items():
        assert len(loaded[name]) == len(images)
        for a, b in zip(images, loaded[name]):
            assert b.shape == (3, 16, 16)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_class_order_and_resize(tmp_path):
    for name in ("top", "side", "front", "back"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / name / "a.jpg")
    (tmp_path / ".hidden").mkdir()  # ignored
    loaded = load_template_folder(tmp_path, size=32)
    assert list(loaded) == ["front", "back", "side", "top"]
    assert loaded["top"][0].shape == (3, 32, 32) and loaded["top"][0].max() < -0.9
    assert order_classes(["z", "right", "a", "front"]) == ["front", "right", "a", "z"]


def test_rgba_composited_on_white_and_non_square_padded(tmp_path):
    for name in ("front", "back", "left"):
        (tmp_path / name).mkdir()
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except the centre
    rgba[8:12, 8:12, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "front" / "x.png")
    Image.new("RGB", (20, 10), (0, 0, 0)).save(tmp_path / "back" / "wide.png")  # 2:1, padded to a square
    Image.new("L", (20, 20), 0).save(tmp_path / "left" / "gray.PNG")
    loaded = load_template_folder(tmp_path, size=20)
    front = loaded["front"][0]
    torch.testing.assert_close(front[:, 0, 0], torch.ones(3))  # transparent -> white
    torch.testing.assert_close(front[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))  # opaque red stays red
    back = loaded["back"][0]
    torch.testing.assert_close(back[:, 0, 10], torch.ones(3))  # white bar above
    torch.testing.assert_close(back[:, 10, 10], -torch.ones(3))  # black image in the middle
    assert loaded["left"][0].shape == (3, 20, 20)


def test_folder_errors(tmp_path):
    with pytest.raises(TemplateError, match="template folder not found"):
        load_template_folder(tmp_path / "nope")
    for name in ("front", "back"):
        (tmp_path / name).mkdir()
    with pytest.raises(TemplateError, match="3 to 6 class folders.*got 2"):
        load_template_folder(tmp_path)
    (tmp_path / "left").mkdir()
    with pytest.raises(TemplateError, match="front: expected at least one"):
        load_template_folder(tmp_path)
    for name in ("front", "back", "left"):
        Image.new("RGB", (8, 8)).save(tmp_path / name / "ok.png")
    (tmp_path / "left" / "broken.png").write_text("not an image")
    with pytest.raises(TemplateError, match="broken.png cannot be read"):
        load_template_folder(tmp_path)
    (tmp_path / "left" / "broken.png").unlink()
    assert len(load_template_folder(tmp_path, size=8)) == 3
    for i in range(4):
        (tmp_path / f"extra{i}").mkdir()
    with pytest.raises(TemplateError, match="got 7"):
        load_template_folder(tmp_path)


def test_write_errors(tmp_path):
    with pytest.raises(TemplateError, match="plain folder name"):
        write_template_folder({"../x": [quantised(0)]}, tmp_path)
    with pytest.raises(TemplateError, match=r"\[3, H, W\]"):
        write_template_folder({"front": [torch.zeros(1, 4, 4)]}, tmp_path)


def test_generate_templates_mirrors_the_side_view():
    calls = []

    def sample_fn(prompt: str, n: int) -> torch.Tensor:
        calls.append((prompt, n))
        g = torch.Generator().manual_seed(len(calls))
        return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1

    out = generate_templates(sample_fn, "a corgi", 2)
    assert calls == [("a corgi, front view", 2), ("a corgi, back view", 2), ("a corgi, side view", 2)]
    assert list(out) == ["front", "back", "left", "right"]
    assert all(len(v) == 2 and v[0].shape == (3, 8, 8) for v in out.values())
    for left, right in zip(out["left"], out["right"]):
        torch.testing.assert_close(right, left.flip(-1))
        assert not torch.allclose(left, right)
    assert not torch.allclose(out["front"][0], out["back"][0])


def test_generate_templates_checks_the_sampler():
    with pytest.raises(ValueError, match=r"expected a \[2, 3, H, W\] tensor, got \(1, 3, 8, 8\)"):
        generate_templates(lambda p, n: torch.zeros(1, 3, 8, 8), "x", 2)
    with pytest.raises(ValueError, match="n_per_view"):
        generate_templates(lambda p, n: torch.zeros(n, 3, 8, 8), "x", 0)


def test_resize_templates():
    out = resize_templates({"front": [torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)]}, 16)
    assert [x.shape for x in out["front"]] == [(3, 16, 16), (3, 16, 16)]

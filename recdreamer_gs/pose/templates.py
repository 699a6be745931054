"""Pose template images: read and write template folders, generate templates with a prior (docs/pose-classifier.md).

A template folder holds one sub-folder per pose class, each with one or more images::

    templates/
      front/ 000.png ...
      back/  000.png ...
      left/  000.png ...
      right/ 000.png ...

Images are returned as float tensors ``[3, S, S]`` in [-1, 1] (the prior's range), all resized to a
common square size; transparent images are composited on white (templates are objects on a plain
background, which is what the classifier's foreground PCA assumes).

Side convention (docs/frames.md: the object's front faces +z): class "left" is a view of the
object's LEFT side, seen by a camera at azimuth +90° (on +x). A generated "side view" has no known
handedness; :func:`generate_templates` takes it as "left" and its horizontal mirror as "right". The
choice is arbitrary and harmless for USD, whose target pose distribution f is uniform; it only
names the classes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from recdreamer_gs.config import POSE_CLASSES_MAX, POSE_CLASSES_MIN
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CANONICAL_ORDER = ("front", "back", "left", "right")  # these come first, in this order, when present
VIEW_PROMPTS = {"front": "{prompt}, front view", "back": "{prompt}, back view", "side": "{prompt}, side view"}


class TemplateError(UserError, ValueError):
    """A template folder or image is missing, empty or unreadable; the message says which and why."""


def order_classes(names: list[str]) -> list[str]:
    """front, back, left, right first (those present), then the other names sorted."""
    first = [c for c in CANONICAL_ORDER if c in names]
    return first + sorted(c for c in names if c not in CANONICAL_ORDER)


def read_image(path: Path, size: int) -> Float[Tensor, "3 S S"]:
    """One image as [3, size, size] in [-1, 1]: alpha over white, padded square with white, bicubic resize."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TemplateError(f"image {path} cannot be read: {type(err).__name__}: {err}") from err
    w, h = im.size
    if w != h:  # pad to a square so the object keeps its aspect ratio
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def load_template_folder(folder: str | Path, size: int = 256) -> dict[str, list[Tensor]]:
    """``{class: [images [3, size, size] in [-1, 1]]}`` from ``folder/<class>/*.png|jpg|jpeg``.

    Raises:
        TemplateError: the folder is missing, has fewer than 3 or more than 6 class folders, a class
            folder holds no image, or an image cannot be read.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TemplateError(
            f"template folder not found: {folder} (expected a folder with one sub-folder per pose class)"
        )
    classes = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not POSE_CLASSES_MIN <= len(classes) <= POSE_CLASSES_MAX:
        raise TemplateError(
            f"{folder}: expected {POSE_CLASSES_MIN} to {POSE_CLASSES_MAX} class folders (e.g. front, back, left, right), "
            f"got {len(classes)}: {sorted(classes)}"
        )
    out: dict[str, list[Tensor]] = {}
    for name in order_classes(classes):
        files = sorted(
            p for p in (folder / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise TemplateError(f"{folder / name}: expected at least one {'/'.join(IMAGE_SUFFIXES)} image, found none")
        out[name] = [read_image(p, size) for p in files]
    return out


def write_template_folder(templates: dict[str, list[Tensor]], folder: str | Path) -> list[Path]:
    """Write ``folder/<class>/NNN.png`` for images in [-1, 1] (each file written atomically); returns the paths."""
    folder = Path(folder).expanduser()
    written: list[Path] = []
    for name, images in templates.items():
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise TemplateError(f"class name: expected a plain folder name, got {name!r}")
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3:
                raise TemplateError(
                    f"templates[{name!r}][{i}]: expected a [3, H, W] image in [-1, 1], got {tuple(img.shape)}"
                )
            arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            path = folder / name / f"{i:03d}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written


def generate_templates(
    sample_fn: Callable[[str, int], Tensor], prompt: str, n_per_view: int
) -> dict[str, list[Tensor]]:
    """Templates from a text-to-image sampler: front, back, and a side view mirrored into left/right.

    ``sample_fn(prompt, n)`` returns ``[n, 3, H, W]`` images in [-1, 1] (the lead wires SD's sampler).
    Prompts are "PROMPT, front view", "PROMPT, back view" and "PROMPT, side view"; each side image is
    "left" and its horizontal flip "right" (module docstring). ``n_per_view`` candidates per view let
    the CLI ``templates`` command write them all so that a user can keep the good ones.
    """
    if n_per_view < 1:
        raise ValueError(f"n_per_view: expected >= 1, got {n_per_view}")
    views: dict[str, Tensor] = {}
    for view, template in VIEW_PROMPTS.items():
        text = template.format(prompt=prompt)
        out = sample_fn(text, n_per_view)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != n_per_view or out.shape[1] != 3:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"sample_fn({text!r}, {n_per_view}): expected a [{n_per_view}, 3, H, W] tensor, got {got}")
        views[view] = out.detach().float().clamp(-1, 1)
    return {
        "front": list(views["front"].unbind(0)),
        "back": list(views["back"].unbind(0)),
        "left": list(views["side"].unbind(0)),
        "right": list(views["side"].flip(-1).unbind(0)),
    }


def resize_templates(templates: dict[str, list[Tensor]], size: int) -> dict[str, list[Tensor]]:
    """Every image resized to ``size`` x ``size`` (bilinear, antialiased), e.g. generated 512² -> 256²."""
    def one(x: Tensor) -> Tensor:
        if x.shape[-2:] == (size, size):
            return x
        x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x[0]

    return {name: [one(x) for x in images] for name, images in templates.items()}

"""The training-free pose classifier p(c | x): a template bank of DINOv2 features and the classifier
that compares an image with it (paper appendix B.1; docs/pose-classifier.md).

The similarity maths (eq. 15-17) are pure functions in :mod:`recdreamer_gs.pose.matching`, the
template bank in :mod:`recdreamer_gs.pose.bank`, its augmentations in :mod:`recdreamer_gs.pose.augment`. Class "left" means the camera sees the
object's left side (docs/frames.md). Only the set of classes matters for USD (f is uniform).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.config import POSE_CLASSES_MAX, POSE_CLASSES_MIN, PoseClassifierConfig
from recdreamer_gs.export import atomic_write_bytes
from recdreamer_gs.pose.bank import TemplateBank, build_template_bank, to_uint8
from recdreamer_gs.pose.features import DinoFeatures
from recdreamer_gs.pose.matching import (
    coordinate_map,
    foreground_mask,
    minmax_normalise,
    orientation_similarity,
    pca_scores,
    pose_probabilities,
    texture_similarity,
)
from recdreamer_gs.pose.templates import resize_templates

FILE_FORMAT = "recdreamer-gs-pose-classifier"
FILE_VERSION = 1


# TemplateBank field -> buffer name on the classifier.
_BUFFERS = {"images": "images", "template_class": "template_class", "cls": "template_cls",
            "patches": "template_patches", "mask": "template_mask", "coords": "template_coords",
            "pca_mean": "pca_mean", "pca_component": "pca_component", "pca_std": "pca_std"}


@dataclass
class PoseScores:
    """A forward pass with its intermediate quantities (for inspection and the CLI ``classify``)."""

    probs: Tensor  # [B, C] p(c | x)
    s_tex: Tensor  # [B, T] texture similarity per template
    s_ori: Tensor  # [B, T] orientation similarity per template
    mask: Tensor  # bool [B, G, G] input foreground (no gradient)
    coords: Tensor  # [B, G, G] input coordinate map (no gradient)


class PoseClassifier(nn.Module):
    """p(c | x) for images in [-1, 1]; build with :meth:`from_templates`, persist with :meth:`save`/:meth:`load`.

    The DINOv2 extractor is held by reference, not registered as a submodule: it is frozen and loaded
    by name, so it stays out of ``state_dict()``/``parameters()`` and out of checkpoints, and
    ``.to()`` does not move it (load it on the right device). The template statistics are buffers.
    """

    def __init__(self, features: DinoFeatures, cfg: PoseClassifierConfig, bank: TemplateBank):
        super().__init__()
        cfg.validate()
        object.__setattr__(self, "features", features)  # not a submodule, see the class docstring
        self.cfg = cfg
        self.classes: tuple[str, ...] = tuple(cfg.classes)
        if bank.cls.shape[-1] != features.dim:
            raise ValueError(
                f"templates have {bank.cls.shape[-1]}-dim features but the feature model {features.name!r} "
                f"gives {features.dim}-dim ones"
            )
        present = set(bank.template_class.tolist())
        if present != set(range(len(self.classes))):
            raise ValueError(
                f"every class needs a template: classes {list(self.classes)}, templates cover {sorted(present)}"
            )
        # The template statistics are buffers (moved by .to(), saved by save()); the uint8 images stay on the
        # CPU, kept only for provenance and rebuilding.
        for name, buffer in _BUFFERS.items():
            value = getattr(bank, name)
            self.register_buffer(buffer, value.cpu() if name == "images" else value.to(features.device))
        self._probs = self._probs_eager  # compile_passes() replaces it by its compiled version

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bank(self) -> TemplateBank:
        return TemplateBank(**{name: getattr(self, buffer) for name, buffer in _BUFFERS.items()})

    @classmethod
    def from_templates(
        cls,
        features: DinoFeatures,
        templates: dict[str, list[Tensor]],
        cfg: Optional[PoseClassifierConfig] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "PoseClassifier":
        """Build from template images in [-1, 1] (``{class: [3, H, W] images}``), classes as ``cfg.classes``.

        Raises:
            ValueError: fewer than 3 or more than 6 classes, classes that differ from ``cfg.classes``,
                a class without images, or images that are not [3, H, W].
        """
        cfg = cfg or PoseClassifierConfig()
        if cfg.classes is None:  # the templates' own classes, in their order
            cfg = replace(cfg, classes=tuple(templates))
        if not POSE_CLASSES_MIN <= len(templates) <= POSE_CLASSES_MAX:
            raise ValueError(f"templates: expected {POSE_CLASSES_MIN} to {POSE_CLASSES_MAX} pose classes, "
                             f"got {len(templates)}: {list(templates)}")
        if set(templates) != set(cfg.classes) or len(cfg.classes) != len(templates):
            raise ValueError(
                f"templates have classes {list(templates)} but the config expects {list(cfg.classes)} "
                "(set PoseClassifierConfig.classes to the template classes)"
            )
        cfg.validate()
        for name in cfg.classes:
            if len(templates[name]) == 0:
                raise ValueError(f"templates[{name!r}]: expected at least one image, got none")
            for j, img in enumerate(templates[name]):
                if img.ndim != 3 or img.shape[0] != 3:
                    raise ValueError(
                        f"templates[{name!r}][{j}]: expected a [3, H, W] image in [-1, 1], got {tuple(img.shape)}"
                    )
        resized = resize_templates({k: [x.detach().float().cpu() for x in v] for k, v in templates.items()},
                                   cfg.template_size)
        images = [x.clamp(-1, 1) for name in cfg.classes for x in resized[name]]
        labels = [ci for ci, name in enumerate(cfg.classes) for _ in resized[name]]
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        # Round to the stored uint8 images first, so that a rebuild from a saved file sees the same pixels.
        stacked = torch.stack(images)
        stacked = to_uint8(stacked).float() / 127.5 - 1
        bank = build_template_bank(features, stacked, torch.tensor(labels), cfg, generator)
        return cls(features, cfg, bank)

    def scores(self, images: Float[Tensor, "B 3 H W"]) -> PoseScores:
        """Probabilities with the similarities, mask and coordinate map that produced them."""
        g = self.cfg.grid_size
        cls_tok, pat = self.features(images, self.cfg.input_size, g)
        dev = self.template_cls.device
        cls_tok, pat = cls_tok.to(dev), pat.to(dev)
        b, d = cls_tok.shape
        flat = pat.reshape(b, g * g, d)
        with torch.no_grad():
            z = pca_scores(flat.detach(), self.pca_mean, self.pca_component, self.pca_std)
            mask = foreground_mask(z, self.cfg.mask_threshold).view(b, g, g)
            coords = coordinate_map(mask)
        t = self.template_cls.shape[0]
        s_tex = texture_similarity(cls_tok, self.template_cls)
        s_ori = orientation_similarity(
            minmax_normalise(flat), mask.view(b, -1), coords.view(b, -1),
            minmax_normalise(self.template_patches.view(t, g * g, d)), self.template_mask.view(t, -1),
            self.template_coords.view(t, -1), self.cfg.tau_pat,
        )
        probs = pose_probabilities(s_tex * s_ori, self.template_class, self.num_classes, self.cfg.tau_pose)
        return PoseScores(probs=probs, s_tex=s_tex, s_ori=s_ori, mask=mask, coords=coords)

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C"]:
        """p(c | x) for images in [-1, 1]; differentiable in ``images``."""
        return self._probs(images)

    def _probs_eager(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C"]:
        return self.scores(images).probs

    def compile_passes(self, compiler) -> None:
        """Run :meth:`forward` (DINOv2 and the template matching) through ``compiler`` (a
        :class:`recdreamer_gs.perf.Compiler`); :meth:`scores` stays eager."""
        self._probs = compiler(self._probs_eager, "pose classifier")

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write config, classes, templates and statistics to ONE file (torch.save, atomic rename)."""
        data = {"format": FILE_FORMAT, "version": FILE_VERSION, "config": asdict(self.cfg),
                "feature_model": self.features.name, "feature_dim": self.features.dim,
                "bank": {f.name: getattr(self.bank, f.name).detach().cpu() for f in fields(TemplateBank)}}
        buf = io.BytesIO()
        torch.save(data, buf)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, features: DinoFeatures) -> "PoseClassifier":
        """Read a file written by :meth:`save`; ``features`` must give the same feature width.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a pose classifier file, or feature widths differ.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pose classifier file not found: {path}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: expected a pose classifier file written by PoseClassifier.save, "
                             f"could not read it ({type(err).__name__}: {err})") from err
        if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (FILE_FORMAT, FILE_VERSION):
            raise ValueError(f"{path}: expected a pose classifier file ({FILE_FORMAT!r}, version {FILE_VERSION})")
        if data["feature_dim"] != features.dim:
            raise ValueError(f"{path} was built with {data['feature_model']!r} ({data['feature_dim']}-dim "
                             f"features); the feature model {features.name!r} has {features.dim}-dim features")
        if data["feature_model"] != features.name:
            warnings.warn(f"{path} was built with feature model {data['feature_model']!r}, now using "
                          f"{features.name!r}", stacklevel=2)
        known = {f.name for f in fields(PoseClassifierConfig)}
        cfg = PoseClassifierConfig(**{k: v for k, v in data["config"].items() if k in known})
        cfg = replace(cfg, classes=tuple(cfg.classes), affine_scale=tuple(cfg.affine_scale))
        return cls(features, cfg, TemplateBank(**data["bank"]))

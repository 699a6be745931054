"""The training-free pose classifier p(c | x): a template bank of DINOv2 features and the classifier
that compares an image with it (paper appendix B.1; docs/pose-classifier.md).

The similarity maths (eq. 15-17) are pure functions in :mod:`recdreamer_gs.pose.matching`, the
template augmentations in :mod:`recdreamer_gs.pose.augment`. Class "left" means the camera sees the
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
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recdreamer_gs.config import POSE_CLASSES_MAX, POSE_CLASSES_MIN, PoseClassifierConfig
from recdreamer_gs.pose.augment import photometric_augment, random_affine
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


@dataclass
class TemplateBank:
    """Everything the classifier keeps of its templates (saved in the classifier file)."""

    images: Tensor  # uint8 [T, 3, S, S]: the template images, for provenance and rebuilding
    template_class: Tensor  # long [T]: class index of each template
    cls: Tensor  # float [T, D]: [CLS] features averaged over augmented copies
    patches: Tensor  # float [T, G, G, D]: patch features averaged over photometric copies
    mask: Tensor  # bool [T, G, G]: template foreground
    coords: Tensor  # float [T, G, G]: template coordinate maps
    pca_mean: Tensor  # float [D]: mean patch feature of the PCA fit
    pca_component: Tensor  # float [D]: first principal component, signed so that foreground scores high
    pca_std: Tensor  # float []: std of the projections on it


def _border(grid: int, device: torch.device) -> Bool[Tensor, "G G"]:
    ring = torch.zeros(grid, grid, dtype=torch.bool, device=device)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring


def _to_uint8(images: Float[Tensor, "T 3 S S"]) -> Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def build_template_bank(
    features: DinoFeatures,
    images: Float[Tensor, "T 3 S S"],
    template_class: Int[Tensor, "T"],
    cfg: PoseClassifierConfig,
    generator: torch.Generator,
) -> TemplateBank:
    """Average template features over augmented copies and fit the foreground PCA (appendix B.1.3)."""
    device = features.device
    t = images.shape[0]
    x01 = ((images.float().clamp(-1, 1) + 1) * 0.5).cpu()
    d, g = features.dim, cfg.grid_size
    cls_sum = torch.zeros(t, d, device=device, dtype=torch.float64)
    pat_sum = torch.zeros(t, g, g, d, device=device, dtype=torch.float64)
    # Running moments of every patch token seen (photometric and affine copies): exact PCA without
    # keeping n_augment * T * G² tokens in memory.
    n_tok = 0
    s1 = torch.zeros(d, device=device, dtype=torch.float64)
    s2 = torch.zeros(d, d, device=device, dtype=torch.float64)
    for start in range(0, cfg.n_augment, cfg.augment_batch):
        k = min(cfg.augment_batch, cfg.n_augment - start)
        batch = x01.repeat(k, 1, 1, 1)  # copy-major: [k * T, 3, S, S]
        photo = photometric_augment(batch, cfg, generator)
        warped = random_affine(photo, cfg.affine_translate, cfg.affine_scale, cfg.affine_shear_deg, generator)
        if start == 0:  # copy 0 is the clean template
            photo[:t], warped[:t] = batch[:t], batch[:t]
        _, pat_p = features(photo * 2 - 1, cfg.input_size, g)
        cls_a, pat_a = features(warped * 2 - 1, cfg.input_size, g)
        cls_sum += cls_a.double().view(k, t, d).sum(0)
        pat_sum += pat_p.double().view(k, t, g, g, d).sum(0)
        for p in (pat_p, pat_a):
            flat = p.reshape(-1, d).double()
            n_tok += flat.shape[0]
            s1 += flat.sum(0)
            s2 += flat.T @ flat
    cls_mean = (cls_sum / cfg.n_augment).float()
    patches = (pat_sum / cfg.n_augment).float()
    mu = s1 / n_tok
    cov = s2 / n_tok - torch.outer(mu, mu)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    component = evecs[:, -1].float()
    std = evals[-1].clamp_min(1e-12).sqrt().float()
    mu = mu.float()
    # Sign: templates show an object on a plain background, so the image border is background
    # (the paper decides with SD cross-attention; docs/pose-classifier.md).
    z = pca_scores(patches.view(t, g * g, d), mu, component, std).view(t, g, g)
    ring = _border(g, z.device)
    if z[:, ring].mean() > z[:, ~ring].mean():
        component = -component
        z = -z
    mask = foreground_mask(z.view(t, -1), cfg.mask_threshold).view(t, g, g)
    return TemplateBank(
        images=_to_uint8(images).cpu(),
        template_class=template_class.long().cpu(),
        cls=cls_mean,
        patches=patches,
        mask=mask,
        coords=coordinate_map(mask),
        pca_mean=mu,
        pca_component=component,
        pca_std=std,
    )


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
        stacked = _to_uint8(stacked).float() / 127.5 - 1
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
        from recdreamer_gs.export import atomic_write_bytes

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

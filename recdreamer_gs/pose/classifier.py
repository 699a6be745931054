"""Training-free pose classifier p(c | x) from DINOv2 features and template images (paper appendix B.1).

For an input image x and templates x^i (one or more per pose class):

- texture similarity    s_tex^i = (cos(f_cls, f_cls^i) + 1) / 2                     (Eq. 15, mapped to [0, 1])
- orientation similarity s_ori^i = 1 - mean_u sum_u' w_uu' |m_u - m^i_u'|,
  w_uu' = softmax_u'(-||f_u - f^i_u'|| / tau_pat)  over foreground patches             (Eq. 16)
- p(c | x) = softmax_c( normalise_c(s_tex * s_ori) / tau_pose )                       (Eq. 17)

with patch features min-max normalised per image, binary foreground masks b from the first PCA
component of the template patch features, and horizontal coordinate maps m that run from -0.5 at the
leftmost to +0.5 at the rightmost foreground column. Masks and coordinate maps are constants (no
gradient); the probabilities are differentiable in the input images through DINOv2.

Deviations from the paper / release, on purpose:

- PCA sign: the paper decides which sign of the first component is foreground with Stable Diffusion
  cross-attention maps of the templates. We choose the sign so that the image border is background
  (templates are objects on a plain background), which needs no diffusion model and no patched
  attention hooks (official-facts 10.5).
- Template masks use the same standardised score and threshold as inputs (the release thresholds raw
  scores for templates, official-facts 10.4).
- Augmentations run on [0, 1] images before ImageNet normalisation (the release jitters normalised
  tensors and so clamps them, official-facts 10.3). Patch features are averaged over photometric
  copies only (a geometric augmentation would move patches and blur the coordinate maps); [CLS]
  features are averaged over copies that are also randomly affine-warped. Copy 0 is the clean image.
- Several templates of one class: each is matched on its own and the class score is the mean of its
  templates' s_tex * s_ori (the release uses one template per class).

Class "left" means the camera sees the object's left side: with the object's front facing +z, that
is a camera at azimuth +90° (on +x). Only the set of classes matters for USD (f is uniform).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recdreamer_gs.pose.features import DEFAULT_FEATURE_MODEL, DinoFeatures

FILE_FORMAT = "recdreamer-gs-pose-classifier"
FILE_VERSION = 1
MIN_CLASSES, MAX_CLASSES = 3, 6


@dataclass
class PoseClassifierConfig:
    """Pose classifier settings (paper appendix B.1.4; defaults follow the authors' release)."""

    classes: tuple[str, ...] = ("front", "back", "left", "right")  # pose classes in output order; 3 to 6
    feature_model: str = DEFAULT_FEATURE_MODEL  # DINOv2 repo id or local folder (CLI: --pose-model PATH)
    input_size: int = 560  # images are resized to this square before DINOv2: 40x40 patches of 14 px
    grid_size: int = 16  # patch features are area-resized to grid_size x grid_size (release: infersize 16)
    template_size: int = 256  # templates are resized to this square for storage and feature extraction
    tau_pat: float = 0.01  # softmax temperature of the soft patch matching (Eq. 16)
    tau_pose: float = 0.01  # softmax temperature over classes (Eq. 17): 0.01 in the release, 0.05 in the paper text
    mask_threshold: float = 0.5  # foreground where sigmoid(standardised PC1 score) > threshold
    n_augment: int = 200  # augmented copies per template whose features are averaged (release: 200)
    augment_batch: int = 16  # copies per DINOv2 batch while building (bounds memory, not results)
    brightness: float = 0.2  # colour jitter: brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # colour jitter: contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.2  # colour jitter: saturation factor drawn from [1 - s, 1 + s]
    hue: float = 0.1  # colour jitter: hue shift drawn from [-h, h] turns (rotation in YIQ chroma)
    noise_std: float = 0.05  # Gaussian pixel noise std on [0, 1] images (release: 0.2 on normalised ones)
    noise_p: float = 0.5  # probability that a copy gets pixel noise
    grayscale_p: float = 0.2  # probability that a copy is turned grayscale
    affine_translate: float = 0.1  # [CLS] copies: shift up to this fraction of the image size
    affine_scale: tuple[float, float] = (0.9, 1.1)  # [CLS] copies: zoom factor range
    affine_shear_deg: float = 5.0  # [CLS] copies: shear up to this many degrees

    def validate(self) -> None:
        n = len(self.classes)
        if not MIN_CLASSES <= n <= MAX_CLASSES:
            raise ValueError(
                f"classes: expected {MIN_CLASSES} to {MAX_CLASSES} pose classes, got {n}: {list(self.classes)}"
            )
        if len(set(self.classes)) != n:
            raise ValueError(f"classes: expected unique names, got {list(self.classes)}")
        if self.n_augment < 1:
            raise ValueError(f"n_augment: expected >= 1, got {self.n_augment}")
        if self.augment_batch < 1:
            raise ValueError(f"augment_batch: expected >= 1, got {self.augment_batch}")
        if self.tau_pat <= 0 or self.tau_pose <= 0:
            raise ValueError(f"tau_pat, tau_pose: expected > 0, got {self.tau_pat}, {self.tau_pose}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold: expected in (0, 1), got {self.mask_threshold}")


# --------------------------------------------------------------------------------------------
# Augmentations (plain torch; images in [0, 1], one random draw per image)
# --------------------------------------------------------------------------------------------

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _gray(x: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 1 H W"]:
    return torch.einsum("bchw,c->bhw", x, _LUMA.to(x)).unsqueeze(1)


def color_jitter(
    x: Float[Tensor, "B 3 H W"], brightness: float, contrast: float, saturation: float, hue: float,
    generator: torch.Generator,
) -> Float[Tensor, "B 3 H W"]:
    """Brightness, contrast, saturation and hue jitter (fixed order), clamped to [0, 1] after each."""
    b = x.shape[0]
    col = lambda t: t.to(x).view(b, 1, 1, 1)  # noqa: E731
    x = (x * col(_uniform(b, 1 - brightness, 1 + brightness, generator))).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * col(_uniform(b, 1 - contrast, 1 + contrast, generator))).clamp(0, 1)
    g = _gray(x)
    x = (g + (x - g) * col(_uniform(b, 1 - saturation, 1 + saturation, generator))).clamp(0, 1)
    # Hue: rotate the chroma plane (I, Q) of YIQ; a full turn is 2*pi.
    angle = 2 * math.pi * _uniform(b, -hue, hue, generator)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ  # [b, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m.to(x), x).clamp(0, 1)


def random_noise(
    x: Float[Tensor, "B 3 H W"], std: float, p: float, generator: torch.Generator
) -> Float[Tensor, "B 3 H W"]:
    """Add N(0, std²) pixel noise to each image with probability p."""
    b = x.shape[0]
    on = (torch.rand(b, generator=generator) < p).to(x).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return (x + on * std * noise).clamp(0, 1)


def random_grayscale(x: Float[Tensor, "B 3 H W"], p: float, generator: torch.Generator) -> Float[Tensor, "B 3 H W"]:
    """Replace each image by its luma (3 equal channels) with probability p."""
    b = x.shape[0]
    on = (torch.rand(b, generator=generator) < p).to(x).view(b, 1, 1, 1)
    return on * _gray(x).expand_as(x) + (1 - on) * x


def random_affine(
    x: Float[Tensor, "B 3 H W"], translate: float, scale: tuple[float, float], shear_deg: float,
    generator: torch.Generator,
) -> Float[Tensor, "B 3 H W"]:
    """Random shift, zoom and horizontal shear; the border colour extends into uncovered areas."""
    b = x.shape[0]
    s = _uniform(b, scale[0], scale[1], generator)
    shear = torch.tan(torch.deg2rad(_uniform(b, -shear_deg, shear_deg, generator)))
    t = _uniform(2 * b, -2 * translate, 2 * translate, generator).view(b, 2)  # grid coords span [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 1] = 1 / s, shear / s, 1 / s  # sampling matrix = inverse zoom
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def photometric_augment(
    x: Float[Tensor, "B 3 H W"], cfg: PoseClassifierConfig, generator: torch.Generator
) -> Float[Tensor, "B 3 H W"]:
    """Colour jitter, pixel noise and random grayscale: appearance changes that keep patches in place."""
    x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator)
    x = random_noise(x, cfg.noise_std, cfg.noise_p, generator)
    return random_grayscale(x, cfg.grayscale_p, generator)


# --------------------------------------------------------------------------------------------
# Pure maths of the classifier
# --------------------------------------------------------------------------------------------


def pca_scores(
    patches: Float[Tensor, "B P D"], mean: Float[Tensor, "D"], component: Float[Tensor, "D"], std: Float[Tensor, ""]
) -> Float[Tensor, "B P"]:
    """Standardised projection on the first principal component: ((f - mean) . v) / std."""
    return ((patches - mean) @ component) / std


def foreground_mask(scores: Float[Tensor, "B P"], threshold: float = 0.5) -> Bool[Tensor, "B P"]:
    """sigmoid(score) > threshold; an image with no foreground patch falls back to all patches."""
    mask = torch.sigmoid(scores) > threshold
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def coordinate_map(mask: Bool[Tensor, "B H W"]) -> Float[Tensor, "B H W"]:
    """Column coordinate from -0.5 (leftmost foreground column) to +0.5 (rightmost), 0 off the box.

    Constant along rows; an object one column wide gets 0.
    """
    b, _, w = mask.shape
    cols = torch.arange(w, device=mask.device, dtype=torch.float32).expand(b, w)
    has = mask.any(dim=1)  # [B, W]: columns holding foreground
    left = torch.where(has, cols, torch.full_like(cols, float(w))).amin(dim=1, keepdim=True)
    right = torch.where(has, cols, torch.full_like(cols, -1.0)).amax(dim=1, keepdim=True)
    width = (right - left).clamp_min(1.0)
    m = torch.where(right > left, (cols - left) / width - 0.5, torch.zeros_like(cols))
    inside = (cols >= left) & (cols <= right)
    m = torch.where(inside, m, torch.zeros_like(m))
    return m.unsqueeze(1).expand_as(mask).contiguous()


def minmax_normalise(patches: Float[Tensor, "B P D"], eps: float = 1e-6) -> Float[Tensor, "B P D"]:
    """Per-image min-max normalisation of patch features to [0, 1] (appendix B.1)."""
    lo = patches.amin(dim=(1, 2), keepdim=True)
    hi = patches.amax(dim=(1, 2), keepdim=True)
    return (patches - lo) / (hi - lo + eps)


def texture_similarity(cls: Float[Tensor, "B D"], template_cls: Float[Tensor, "T D"]) -> Float[Tensor, "B T"]:
    """s_tex = (cos(f_cls, f_cls^i) + 1) / 2 (Eq. 15 mapped to [0, 1], as the release does)."""
    return (F.cosine_similarity(cls[:, None, :], template_cls[None, :, :], dim=-1) + 1) * 0.5


def orientation_similarity(
    patches: Float[Tensor, "B P D"], mask: Bool[Tensor, "B P"], coords: Float[Tensor, "B P"],
    template_patches: Float[Tensor, "T P D"], template_mask: Bool[Tensor, "T P"], template_coords: Float[Tensor, "T P"],
    tau_pat: float,
) -> Float[Tensor, "B T"]:
    """s_ori^i = 1 - mean_u sum_u' softmax_u'(-||f_u - f^i_u'|| / tau_pat) |m_u - m^i_u'| (Eq. 16).

    u runs over the input's foreground patches, u' over template i's. Features are expected
    min-max normalised already.
    """
    # Exact pairwise distances (no |a|²+|b|²-2ab expansion: its rounding, divided by tau_pat = 0.01,
    # would swamp near matches); zero distances have a zero gradient.
    dist = torch.cdist(patches[:, None], template_patches[None], compute_mode="donot_use_mm_for_euclid_dist")
    logits = (-dist / tau_pat).masked_fill(~template_mask[None, :, None, :], float("-inf"))
    w = torch.softmax(logits, dim=-1)  # [B, T, P, P']
    gap = (coords[:, None, :, None] - template_coords[None, :, None, :]).abs()
    per_patch = (w * gap).sum(dim=-1)  # [B, T, P]
    fg = mask[:, None, :].to(per_patch)
    d = (per_patch * fg).sum(dim=-1) / fg.sum(dim=-1).clamp_min(1.0)
    return 1.0 - d


def pose_probabilities(
    similarity: Float[Tensor, "B T"], template_class: Int[Tensor, "T"], num_classes: int, tau_pose: float
) -> Float[Tensor, "B C"]:
    """Mean similarity per class, normalised to sum 1 over classes, then softmax(s / tau_pose) (Eq. 17)."""
    onehot = F.one_hot(template_class, num_classes).to(similarity)  # [T, C]
    per_class = similarity @ (onehot / onehot.sum(dim=0, keepdim=True))
    per_class = per_class / per_class.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.softmax(per_class / tau_pose, dim=-1)


# --------------------------------------------------------------------------------------------
# Template statistics
# --------------------------------------------------------------------------------------------


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
    # Sign: templates show an object on a plain background, so the image border is background.
    # (The paper decides with SD cross-attention; this needs no diffusion model.)
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


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


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
        device = features.device
        self.register_buffer("images", bank.images.cpu())  # uint8, only saved, never used on the device
        self.register_buffer("template_class", bank.template_class.long().to(device))
        self.register_buffer("template_cls", bank.cls.float().to(device))
        self.register_buffer("template_patches", bank.patches.float().to(device))
        self.register_buffer("template_mask", bank.mask.bool().to(device))
        self.register_buffer("template_coords", bank.coords.float().to(device))
        self.register_buffer("pca_mean", bank.pca_mean.float().to(device))
        self.register_buffer("pca_component", bank.pca_component.float().to(device))
        self.register_buffer("pca_std", bank.pca_std.float().to(device))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bank(self) -> TemplateBank:
        return TemplateBank(
            images=self.images, template_class=self.template_class, cls=self.template_cls,
            patches=self.template_patches, mask=self.template_mask, coords=self.template_coords,
            pca_mean=self.pca_mean, pca_component=self.pca_component, pca_std=self.pca_std,
        )

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
        n = len(templates)
        if not MIN_CLASSES <= n <= MAX_CLASSES:
            raise ValueError(
                f"templates: expected {MIN_CLASSES} to {MAX_CLASSES} pose classes, got {n}: {list(templates)}"
            )
        if set(templates) != set(cfg.classes) or len(cfg.classes) != n:
            raise ValueError(
                f"templates have classes {list(templates)} but the config expects {list(cfg.classes)} "
                "(set PoseClassifierConfig.classes to the template classes)"
            )
        cfg.validate()
        images, labels = [], []
        for ci, name in enumerate(cfg.classes):
            imgs = templates[name]
            if len(imgs) == 0:
                raise ValueError(f"templates[{name!r}]: expected at least one image, got none")
            for j, img in enumerate(imgs):
                if img.ndim != 3 or img.shape[0] != 3:
                    raise ValueError(
                        f"templates[{name!r}][{j}]: expected a [3, H, W] image in [-1, 1], got {tuple(img.shape)}"
                    )
                x = img.detach().float().cpu()[None]
                if x.shape[-2:] != (cfg.template_size, cfg.template_size):
                    x = F.interpolate(
                        x, size=(cfg.template_size,) * 2, mode="bilinear", align_corners=False, antialias=True
                    )
                images.append(x[0].clamp(-1, 1))
                labels.append(ci)
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
        return self.scores(images).probs

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        bank = self.bank
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "config": asdict(self.cfg),
            "classes": list(self.classes),
            "feature_model": self.features.name,
            "feature_dim": self.features.dim,
            "bank": {f.name: getattr(bank, f.name).detach().cpu() for f in fields(TemplateBank)},
        }

    def save(self, path: str | Path) -> Path:
        """Write config, classes, templates and statistics to ONE file (torch.save, atomic rename)."""
        from recdreamer_gs.export import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
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
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: expected a pose classifier file (format {FILE_FORMAT!r}), got something else")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: expected file version {FILE_VERSION}, got {data.get('version')}")
        if data["feature_dim"] != features.dim:
            raise ValueError(
                f"{path} was built with {data['feature_model']!r} ({data['feature_dim']}-dim features); "
                f"the given feature model {features.name!r} has {features.dim}-dim features"
            )
        if data["feature_model"] != features.name:
            warnings.warn(
                f"{path} was built with feature model {data['feature_model']!r}, now using {features.name!r}",
                stacklevel=2,
            )
        raw = dict(data["config"])
        known = {f.name for f in fields(PoseClassifierConfig)}
        cfg = PoseClassifierConfig(**{k: v for k, v in raw.items() if k in known})
        cfg = replace(cfg, classes=tuple(cfg.classes), affine_scale=tuple(cfg.affine_scale))
        bank = TemplateBank(**data["bank"])
        return cls(features, cfg, bank)

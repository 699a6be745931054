"""The template bank of the pose classifier: DINOv2 features of the templates averaged over augmented
copies, and the foreground PCA fitted on them (paper appendix B.1.3; docs/pose-classifier.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recdreamer_gs.config import PoseClassifierConfig
from recdreamer_gs.pose.augment import photometric_augment, random_affine
from recdreamer_gs.pose.features import DinoFeatures
from recdreamer_gs.pose.matching import coordinate_map, foreground_mask, pca_scores


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


def to_uint8(images: Float[Tensor, "T 3 S S"]) -> Tensor:
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
        images=to_uint8(images).cpu(),
        template_class=template_class.long().cpu(),
        cls=cls_mean,
        patches=patches,
        mask=mask,
        coords=coordinate_map(mask),
        pca_mean=mu,
        pca_component=component,
        pca_std=std,
    )

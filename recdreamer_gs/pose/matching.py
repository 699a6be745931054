"""The pose classifier's similarity maths as pure functions (paper appendix B.1, eq. 15-17).

Inputs are DINOv2 [CLS] and patch features of an image and of the templates; see
docs/pose-classifier.md for the definitions and for where we depart from the authors' release.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


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

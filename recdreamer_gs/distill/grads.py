"""Score-distillation gradients as pure functions (docs/iteration.md; paper eq. numbers in comments).

All gradients are with respect to the diffusion-space sample ``z`` (SD latents or synthetic-prior
pixels) and are turned into a loss on ``z`` by :func:`reparameterised_loss`.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor


def weight(sigma: Tensor) -> Tensor:
    """ω(t) = σ_t² (the weighting of the release and of ProlificDreamer)."""
    return sigma**2


def sds_grad(
    eps_pretrained: Float[Tensor, "B C H W"], eps: Float[Tensor, "B C H W"], sigma: Tensor
) -> Float[Tensor, "B C H W"]:
    """SDS: ω(t) (ε̂ − ε) (DreamFusion; the gradient of paper eq. 4)."""
    return weight(sigma) * (eps_pretrained - eps)


def vsd_grad(
    eps_pretrained: Float[Tensor, "B C H W"], eps_phi: Float[Tensor, "B C H W"], sigma: Tensor
) -> Float[Tensor, "B C H W"]:
    """VSD: ω(t) (ε̂ − ε_φ), ε_φ the particles' own score (ProlificDreamer; paper eq. 9)."""
    return weight(sigma) * (eps_pretrained - eps_phi)


def clamp_to_norm(
    g_rect: Float[Tensor, "N C H W"], g_ref: Float[Tensor, "N C H W"], gain: float, norm_coef: float,
    particles: int = 1,
) -> Float[Tensor, "N C H W"]:
    """Rectifier clamp (docs/iteration.md step 7): scale by ``gain``, then cap each particle's L2 norm
    at ``norm_coef`` times that particle's ‖g_ref‖. The batch is particle-major (``particles`` blocks
    of N / particles views); the norms run over each block, so one particle's large reference gradient
    never loosens another's cap (the 2D check's per-particle clamp)."""
    g = gain * g_rect
    norm = g.reshape(particles, -1).norm(dim=1)
    limit = norm_coef * g_ref.reshape(particles, -1).norm(dim=1)
    scale = torch.where(norm > limit, limit / norm.clamp_min(1e-20), torch.ones_like(norm))
    return (g.reshape(particles, -1) * scale[:, None].to(g.dtype)).reshape(g.shape)


def clamp_elements(grad: Tensor, clip: float) -> Tensor:
    """Optional element-wise clamp of the distillation gradient (0 disables it)."""
    return grad.clamp(-clip, clip) if clip > 0 else grad


def nan_to_zero(grad: Tensor) -> Tensor:
    """NaN/inf entries of a gradient become 0 so that one bad pixel cannot poison θ."""
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def reparameterised_loss(z: Float[Tensor, "B C H W"], grad: Float[Tensor, "B C H W"], views: Optional[int] = None
                         ) -> Tensor:
    """0.5‖z − (z − g).detach()‖² / V, whose gradient w.r.t. z is exactly g / V; V = ``views`` (the views of
    one particle in a particle-major batch of several), else the batch size B."""
    target = (z - grad).detach()
    return 0.5 * ((z - target) ** 2).sum() / (views or z.shape[0])

"""Score-distillation gradients as pure functions (docs/iteration.md; paper eq. numbers in comments).

All gradients are with respect to the diffusion-space sample ``z`` (SD latents or synthetic-prior
pixels) and are turned into a loss on ``z`` by :func:`reparameterised_loss`.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor


def alpha_sigma(
    alphas_cumprod: Float[Tensor, "T"], t: Int[Tensor, "B"]
) -> tuple[Float[Tensor, "B 1 1 1"], Float[Tensor, "B 1 1 1"]]:
    """α_t = sqrt(ᾱ_t) and σ_t = sqrt(1 − ᾱ_t), shaped to broadcast over images."""
    abar = alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1.0 - abar).sqrt()


def add_noise(
    z: Float[Tensor, "B C H W"], eps: Float[Tensor, "B C H W"], alpha: Tensor, sigma: Tensor
) -> Float[Tensor, "B C H W"]:
    """Forward process x_t = α_t z + σ_t ε."""
    return alpha * z + sigma * eps


def cfg_combine(
    eps_uncond: Float[Tensor, "B C H W"], eps_cond: Float[Tensor, "B C H W"], scale: float
) -> Float[Tensor, "B C H W"]:
    """Classifier-free guidance ε̂ = ε_u + s (ε_y − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


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


def v_to_eps(
    v: Float[Tensor, "B C H W"], x_t: Float[Tensor, "B C H W"], alpha: Tensor, sigma: Tensor
) -> Float[Tensor, "B C H W"]:
    """ε from a v-prediction: ε = α v + σ x_t."""
    return alpha * v + sigma * x_t


def tweedie_x0(
    x_t: Float[Tensor, "B C H W"], eps_hat: Float[Tensor, "B C H W"], alpha: Tensor, sigma: Tensor
) -> Float[Tensor, "B C H W"]:
    """Tweedie's estimate x̂0 = (x_t − σ_t ε̂) / α_t."""
    return (x_t - sigma * eps_hat) / alpha


def to_eps(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
    prediction_type: Literal["epsilon", "v_prediction"],
) -> Tensor:
    """Convert a network output to ε according to its prediction type."""
    return pred if prediction_type == "epsilon" else v_to_eps(pred, x_t, alpha, sigma)

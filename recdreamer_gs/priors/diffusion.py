"""The forward process of a prior's noise schedule and the conversions of a network's output to ε, as pure
functions shared by the priors and the distillation step (docs/iteration.md)."""

from __future__ import annotations

from typing import Literal

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

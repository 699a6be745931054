"""The contract every image prior follows (Stable Diffusion, the offline synthetic prior).

A prior is built for one prompt (text embeddings are fixed for the run, which keeps shapes static).
It owns the noise schedule ``alphas_cumprod`` (T = ``num_train_timesteps``) and maps renders to the
space it diffuses in: SD latents, or pixels in [-1, 1] for the synthetic prior.
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol

from jaxtyping import Float, Int
from torch import Tensor


class Prior(Protocol):
    name: str  # "synthetic" or the SD model id, for metrics and notices
    num_train_timesteps: int  # T
    alphas_cumprod: Float[Tensor, "T"]  # ᾱ_t on the prior's device
    prediction_type: Literal["epsilon", "v_prediction"]  # what the pretrained network predicts

    def encode(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Renders in [0, 1] to the diffusion space (differentiable)."""
        ...

    def decode(self, z: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """Diffusion space to images in [-1, 1] (differentiable)."""
        ...

    def eps(
        self,
        x_t: Float[Tensor, "B C h w"],
        t: Int[Tensor, "B"],
        guidance_scale: float,
        background: Optional[Float[Tensor, "B 3"]] = None,
        azimuth: Optional[Float[Tensor, "B"]] = None,
    ) -> Float[Tensor, "B C h w"]:
        """ε̂ = ε_u + s (ε_y − ε_u) for the run's prompt.

        ``background`` is the solid colour each render was composited on; the synthetic prior
        composites its reference views on the same colour, Stable Diffusion ignores it.
        ``azimuth`` (degrees), when given, turns on view-dependent conditioning ("PROMPT, front view"
        style); ``None`` uses the same prompt for every camera, as USD does.
        """
        ...

"""The contracts every image prior and every ε_φ follow (Stable Diffusion, the offline synthetic prior).

A prior is built for one prompt (text embeddings are fixed for the run, which keeps shapes static).
It owns the noise schedule ``alphas_cumprod`` (T = ``num_train_timesteps``) and maps renders to the
space it diffuses in: SD latents, or pixels in [-1, 1] for the synthetic prior. What differs between
priors beyond the score itself (their own settings, their ε_φ, their pose classifier and templates)
is a method of the prior too, so callers never ask which prior they hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

if TYPE_CHECKING:
    from recdreamer_gs.config import RunConfig
    from recdreamer_gs.hub import ModelSpec
    from recdreamer_gs.pose.setup import PoseSetup


class ParticleScore(Protocol):
    """ε_φ, the score of the particles' own distribution (LoRA on SD, exact kernel score on the synthetic
    prior; docs/iteration.md, steps 5 and 10)."""

    def eps_phi(self, x_t: Float[Tensor, "B C h w"], t: Int[Tensor, "B"], c2w: Float[Tensor, "B 4 4"],
                particles: Optional[Float[Tensor, "B K C h w"]] = None) -> Float[Tensor, "B C h w"]:
        """ε_φ(x_t, t, c); ``particles`` holds every particle's detached render at each sample's camera
        (the kernel score needs them, the LoRA ignores them)."""
        ...

    def lora_loss(self, z: Float[Tensor, "B C h w"], c2w: Float[Tensor, "B 4 4"],
                  generator: Optional[torch.Generator] = None) -> Float[Tensor, ""]:
        """The loss that trains ε_φ on the detached renders ``z`` (zero when there is nothing to train)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def make_optimizer(self, lr: float) -> Optional[torch.optim.Optimizer]:
        """The optimizer of ``trainable_parameters`` (None when there are none)."""
        ...


class Prior(Protocol):
    name: str  # "synthetic" or the SD model id, for metrics and notices
    device: torch.device  # where its networks (or mixture) live
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

    @classmethod
    def models(cls, cfg: "RunConfig", cuda: bool) -> list["ModelSpec"]:
        """The model weights a run of ``cfg`` loads with this prior (``cuda``: on a CUDA device), so that all
        are checked, then fetched, before any loads (``prior_choice.run_models``)."""
        ...

    def specialise(self, cfg: "RunConfig") -> "RunConfig":
        """The run config with this prior's own settings in place of the general ones (idempotent)."""
        ...

    def particle_score(self, cfg: "RunConfig") -> Optional[ParticleScore]:
        """ε_φ for the run's stages whose method needs one (None when none does: ``RunConfig.needs``)."""
        ...

    def pose_setup(self, cfg: "RunConfig", need: bool, timings: Optional[dict] = None) -> "PoseSetup":
        """The pose classifier of the run (``need``: the run's method needs one); template seconds go to
        ``timings["templates_s"]``."""
        ...

    def template_candidates(self, prompt: str, per_view: int) -> dict[str, list[Float[Tensor, "3 H W"]]]:
        """Candidate pose templates per class, images in [-1, 1] (the ``templates`` command)."""
        ...

"""What both rasterizers take (gsplat on CUDA, the torch compositor on CPU): splats and views in gsplat's
conventions, so the two backends share one signature."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.gaussians import Gaussians


@dataclass
class Splats:
    """Activated Gaussian parameters."""

    means: Float[Tensor, "N 3"]  # world positions
    quats: Float[Tensor, "N 4"]  # unit quaternions (w, x, y, z)
    scales: Float[Tensor, "N 3"]  # standard deviations along the local axes
    opacities: Float[Tensor, "N"]  # in (0, 1)
    sh: Float[Tensor, "N K 3"]  # SH coefficients, K = (sh_degree + 1)²
    sh_degree: int

    @classmethod
    def of(cls, gaussians: Gaussians) -> "Splats":
        return cls(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh,
                   gaussians.sh_degree)


@dataclass
class Views:
    """Cameras as gsplat wants them (render.camera_matrices)."""

    viewmats: Float[Tensor, "C 4 4"]  # OpenCV world-to-camera
    Ks: Float[Tensor, "C 3 3"]  # pixel intrinsics
    width: int
    height: int

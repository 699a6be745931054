"""The only caller of ``gsplat.rasterization`` (CUDA tensors only)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def rasterize_gsplat(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    opacities: Float[Tensor, "N"],
    sh: Float[Tensor, "N K 3"],
    sh_degree: int,
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    backgrounds: Float[Tensor, "C 3"],
    eps2d: float = 0.3,
    near_plane: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Returns rgb [C,H,W,3], alpha [C,H,W,1], expected depth [C,H,W,1] and gsplat's meta."""
    if means.device.type != "cuda":
        # Checked before touching gsplat: on CPU tensors it would try to JIT-build its CUDA extension.
        raise ValueError(f"gsplat needs CUDA tensors, got {means.device}; use the torch backend on CPU")
    from gsplat import rasterization

    renders, alphas, meta = rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=sh, viewmats=viewmats, Ks=Ks,
        width=width, height=height, near_plane=near_plane, eps2d=eps2d, sh_degree=sh_degree,
        packed=False,  # faster for object-scale scenes; densify must be told the same
        backgrounds=backgrounds, render_mode="RGB+ED", rasterize_mode="classic",
    )
    return renders[..., :3], alphas, renders[..., 3:4], meta

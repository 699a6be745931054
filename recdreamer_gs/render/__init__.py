"""``render()``: Gaussians + cameras -> images, with gsplat on CUDA and a torch compositor on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.cameras import Cameras
from recdreamer_gs.gaussians import Gaussians
from recdreamer_gs.render.gsplat_backend import ensure_cuda_extension, rasterize_gsplat
from recdreamer_gs.render.inputs import Splats, Views

# OpenGL camera axes (x right, y up, looking down -z) to OpenCV (x right, y down, looking down +z).
GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class RenderOut:
    rgb: Float[Tensor, "B 3 H W"]  # in [0, 1], composited on the background
    alpha: Float[Tensor, "B 1 H W"]  # accumulated opacity
    depth: Float[Tensor, "B 1 H W"]  # expected depth along the camera axis (0 where empty)
    meta: dict  # gsplat's info dict (means2d, radii, ...) for densification


def camera_matrices(cameras: Cameras) -> tuple[Float[Tensor, "B 4 4"], Float[Tensor, "B 3 3"]]:
    """OpenCV world-to-camera ``viewmats`` and pixel intrinsics ``Ks`` as gsplat wants them."""
    c2w_cv = cameras.c2w @ GL_TO_CV.to(cameras.c2w)
    viewmats = torch.linalg.inv(c2w_cv)
    focal = cameras.focal()
    Ks = torch.zeros(len(cameras), 3, 3, dtype=cameras.c2w.dtype, device=cameras.device)
    Ks[:, 0, 0] = focal
    Ks[:, 1, 1] = focal
    Ks[:, 0, 2] = cameras.width / 2.0
    Ks[:, 1, 2] = cameras.height / 2.0
    Ks[:, 2, 2] = 1.0
    return viewmats, Ks


def resolve_backend(backend: Literal["auto", "gsplat", "torch"], device: torch.device) -> str:
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "torch"
    if backend == "gsplat" and device.type != "cuda":
        # gsplat would try to JIT-build its CUDA extension on CPU tensors and fail obscurely.
        raise ValueError(f"the gsplat backend needs CUDA tensors, got device {device}; use backend='torch'")
    return backend


def ensure_backend(backend: Literal["auto", "gsplat", "torch"], device: torch.device) -> str:
    """The backend a run on ``device`` uses, after making sure it works there (gsplat: its CUDA extension
    builds and runs, see :func:`recdreamer_gs.render.gsplat_backend.ensure_cuda_extension`)."""
    name = resolve_backend(backend, device)
    if name == "gsplat":
        ensure_cuda_extension()
    return name


def render(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Float[Tensor, "B 3"],
    backend: Literal["auto", "gsplat", "torch"] = "auto",
    eps2d: float = 0.3,
    near_plane: float = 0.01,
) -> RenderOut:
    """Render ``gaussians`` from every camera onto a solid per-view ``background``."""
    device = gaussians.means.device
    viewmats, Ks = camera_matrices(cameras.to(device))
    args = dict(splats=Splats.of(gaussians), views=Views(viewmats, Ks, cameras.width, cameras.height),
                backgrounds=background.to(device), eps2d=eps2d, near_plane=near_plane)
    if resolve_backend(backend, device) == "gsplat":
        rgb, alpha, depth, meta = rasterize_gsplat(**args)
    else:
        # heavy: gsplat (its PyTorch reference) loads only for the CPU compositor
        from recdreamer_gs.render.torch_backend import rasterize_torch

        rgb, alpha, depth, meta = rasterize_torch(**args)
    return RenderOut(
        rgb=rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0),
        alpha=alpha.permute(0, 3, 1, 2),
        depth=depth.permute(0, 3, 1, 2),
        meta=meta,
    )

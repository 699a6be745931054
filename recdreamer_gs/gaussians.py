"""The Gaussian set: per-Gaussian tensors in a ParameterDict with one optimizer each.

Storage follows gsplat's convention (docs/frames.md): ``means [N,3]``, log ``scales [N,3]``,
raw wxyz ``quats [N,4]``, opacity logits ``opacities [N]``, SH DC ``sh0 [N,1,3]`` and higher bands
``shN [N,K,3]``. One single-group Adam per key is the layout gsplat strategies expect; they
replace the Parameter objects when they grow or prune, so always read ``gaussians.params[...]``
afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from recdreamer_gs.config import GaussiansConfig
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import PlyFrame, is_splat_ply, read_splats

SH_C0 = 0.28209479177387814  # rgb = 0.5 + SH_C0 * sh0
COLOUR_PARAMS = ("sh0", "shN")  # what a colour-only (texture) stage trains


class InitError(UserError, ValueError):
    """An --init-from file is missing or holds no usable points."""


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    return sh0 * SH_C0 + 0.5


def num_sh_rest(sh_degree: int) -> int:
    """Number of SH coefficients beyond the DC term for a degree."""
    return (sh_degree + 1) ** 2 - 1


def random_sphere_points(n: int, radius: float, generator: torch.Generator) -> Float[Tensor, "N 3"]:
    """Points uniform in a ball (cube-root radial sampling)."""
    direction = torch.randn(n, 3, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
    return direction * r


def load_points(path: str | Path, n: int, radius: float) -> tuple[Tensor, Optional[Tensor]]:
    """Points (and colours if present) from a point cloud, mesh or 3DGS splat PLY, centred and scaled into
    ``radius``.

    Meshes are sampled uniformly on their surface (open3d); point clouds are subsampled to ``n``. A 3DGS PLY
    (e.g. a ``model.ply``) gives its Gaussians' centres and DC colours, read in the viewer frame as the
    other commands read it (open3d would take it for a point cloud in the file's y-down frame).
    """
    import open3d as o3d  # heavy: open3d loads only for --init-from

    path = Path(path)
    if not path.is_file():
        raise InitError(f"--init-from: file {path} does not exist")
    suffix = path.suffix.lower()
    points = colors = None
    if suffix == ".ply" and is_splat_ply(path):
        params = read_splats(path)
        points, colors = params["means"].numpy(), sh0_to_rgb(params["sh0"].reshape(-1, 3)).clamp(0, 1).numpy()
    # open3d's own console warnings (e.g. "appears to be a PointCloud") stay quiet: what matters is raised below.
    quiet = o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error)
    if points is None and (suffix in {".obj", ".glb", ".gltf", ".off", ".stl", ".fbx"} or suffix == ".ply"):
        with quiet:
            mesh = o3d.io.read_triangle_mesh(str(path))
        if len(mesh.triangles) > 0:
            cloud = mesh.sample_points_uniformly(number_of_points=n)
            points = np.asarray(cloud.points)
            colors = np.asarray(cloud.colors) if cloud.has_colors() else None
    if points is None:
        if suffix not in {".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts"}:
            raise InitError(
                f"--init-from: cannot read {path.name}; expected a mesh (.obj .ply .glb .off .stl) "
                "or a point cloud (.ply .pcd .xyz .pts)"
            )
        with quiet:
            cloud = o3d.io.read_point_cloud(str(path))
        points = np.asarray(cloud.points)
        colors = np.asarray(cloud.colors) if cloud.has_colors() else None
    if len(points) > n:
        keep = np.random.default_rng(0).choice(len(points), n, replace=False)
        points = points[keep]
        colors = colors[keep] if colors is not None else None
    if len(points) == 0 or not np.isfinite(points).all():
        raise InitError(f"--init-from: {path} holds no readable points (empty or corrupt file)")
    pts = torch.as_tensor(points, dtype=torch.float32)
    pts = pts - pts.mean(dim=0)
    extent = pts.norm(dim=-1).max().clamp_min(1e-8)
    pts = pts * (radius / extent)
    rgb = torch.as_tensor(colors, dtype=torch.float32) if colors is not None and len(colors) else None
    return pts, rgb


@dataclass
class StartCloud:
    """The points a run starts from instead of the random ball (``gaussians.init`` file or shap-e), already in
    the world frame and scaled into ``init_radius``; the same cloud seeds every particle."""

    points: Float[Tensor, "N 3"]
    rgb: Optional[Float[Tensor, "N 3"]] = None  # display colours in [0, 1]; None: grey with a little noise
    scales: Optional[Float[Tensor, "N"]] = None  # isotropic scales (world units); None: gaussians.init_scale
    source: str = ""  # where it came from, for messages


class Gaussians(nn.Module):
    """A set of 3D Gaussians with per-parameter Adam optimizers."""

    def __init__(self, params: dict[str, Tensor], cfg: GaussiansConfig):
        super().__init__()
        self.cfg = cfg
        self.params = nn.ParameterDict({k: nn.Parameter(v.contiguous()) for k, v in params.items()})

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_points(
        cls, points: Float[Tensor, "N 3"], cfg: GaussiansConfig, rgb: Optional[Float[Tensor, "N 3"]] = None,
        generator: Optional[torch.Generator] = None, scales: Optional[Float[Tensor, "N"]] = None,
    ) -> "Gaussians":
        """Gaussians at ``points``: colours ``rgb`` (else grey with a little noise), isotropic ``scales``
        (else ``cfg.init_scale``; kept within the log-scale clamp), ``cfg.init_opacity``."""
        n = points.shape[0]
        if rgb is None:
            # Grey with a little noise, as the text-to-3D peers initialise.
            noise = torch.rand(n, 3, generator=generator) if generator is not None else torch.rand(n, 3)
            rgb = 0.5 + 0.1 * (noise - 0.5)
        if scales is None:
            log_scales = torch.full((n, 3), math.log(cfg.init_scale))
        else:
            log_scales = scales.float().clamp_min(1e-12).log().clamp(cfg.min_log_scale, cfg.max_log_scale)
            log_scales = log_scales[:, None].repeat(1, 3)
        params = {
            "means": points.float(),
            "scales": log_scales,
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "opacities": torch.full((n,), math.log(cfg.init_opacity / (1.0 - cfg.init_opacity))),
            "sh0": rgb_to_sh0(rgb.float()).reshape(n, 1, 3),
            "shN": torch.zeros(n, num_sh_rest(cfg.sh_degree), 3),
        }
        return cls(params, cfg)

    @classmethod
    def create(cls, cfg: GaussiansConfig, generator: torch.Generator, start: Optional[StartCloud] = None
               ) -> "Gaussians":
        """The starting cloud ``start`` (a file's or Shap-E's points, ``recdreamer_gs.shape.starting_cloud``),
        else ``cfg.num_init`` points uniform in a ball of ``cfg.init_radius``."""
        if start is not None:
            return cls.from_points(start.points, cfg, start.rgb, generator, start.scales)
        return cls.from_points(random_sphere_points(cfg.num_init, cfg.init_radius, generator), cfg,
                               generator=generator)

    def make_optimizers(self, colour_only: bool = False) -> dict[str, torch.optim.Optimizer]:
        """One single-group Adam per trainable parameter (the layout gsplat strategies check).

        ``colour_only`` freezes positions and shapes (a texture stage): only sh0/shN train.
        """
        lrs = {
            "means": self.cfg.lr_means, "scales": self.cfg.lr_scales, "quats": self.cfg.lr_quats,
            "opacities": self.cfg.lr_opacities, "sh0": self.cfg.lr_sh0, "shN": self.cfg.lr_shN,
        }
        for name, param in self.params.items():
            param.requires_grad_(not colour_only or name in COLOUR_PARAMS)
        return {
            name: torch.optim.Adam([{"params": [param], "lr": lrs[name], "name": name}], eps=1e-15)
            for name, param in self.params.items() if param.requires_grad
        }

    # -- activated views ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    @property
    def sh_degree(self) -> int:
        return self.cfg.sh_degree

    @property
    def means(self) -> Float[Tensor, "N 3"]:
        return self.params["means"]

    @property
    def scales(self) -> Float[Tensor, "N 3"]:
        """Activated (linear) scales."""
        return torch.exp(self.params["scales"])

    @property
    def quats(self) -> Float[Tensor, "N 4"]:
        """Normalised wxyz quaternions."""
        return nn.functional.normalize(self.params["quats"], dim=-1)

    @property
    def opacities(self) -> Float[Tensor, "N"]:
        return torch.sigmoid(self.params["opacities"])

    @property
    def sh(self) -> Float[Tensor, "N K 3"]:
        """All SH coefficients, DC first."""
        return torch.cat([self.params["sh0"], self.params["shN"]], dim=1)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log-scales finite and below the scene size (viewers break on -inf / huge scales)."""
        self.params["scales"].clamp_(self.cfg.min_log_scale, self.cfg.max_log_scale)


def read_gaussians(ply: str | Path, frame: PlyFrame = "viewer", device: str | torch.device = "cpu") -> Gaussians:
    """A ``Gaussians`` from a 3DGS splat PLY (:func:`recdreamer_gs.export.read_splats`), with the SH degree the
    file holds."""
    params = read_splats(ply, frame=frame)
    degree = {0: 0, 3: 1, 8: 2, 15: 3}.get(params["shN"].shape[1], 0)
    return Gaussians(params, GaussiansConfig(sh_degree=degree)).to(device)

"""Triangle mesh with vertex colours from a set of Gaussians: RGB-D renders on an orbit, TSDF fusion.

The way 2DGS-style pipelines extract meshes: render colour, depth and alpha with our own renderer
from rings of cameras around the object, cut the background out by alpha, fuse the views into a
truncated signed distance volume (open3d's sparse voxel-block grid; voxel size from the object's
extent), run marching cubes, keep the largest connected piece and optionally decimate it, then colour
the vertices from the renders that see them. The mesh is written in the same frame as the splat PLY
(viewer frame by default, see ``export.py``); the files are written by ``outputs.py``.

Depth: the renderer returns the alpha-normalised expected z-depth along the camera axis (not the
distance along the ray), which is what open3d's integration expects. It averages the Gaussians'
centre depths, so the surface lies up to about one Gaussian standard deviation inside the splat's
silhouette (negligible for a trained model's small Gaussians). Cameras: ours are OpenGL-style
camera-to-world; open3d takes OpenCV world-to-camera extrinsics, the same ``viewmats`` gsplat gets.
Pixel centres: ours (and gsplat's) sit at +0.5, open3d's at integer coordinates, hence the half-pixel
shift of the principal point.

open3d's legacy ``ScalableTSDFVolume`` is not used: in open3d 0.20 its block allocation reads float
depth images in millimetres (it back-projects them with a fixed depth scale of 1000), so it touches
no block near the surface and returns an empty mesh for depth in metres. ``VoxelBlockGrid`` is the
same sparse hashed-block design on open3d's maintained tensor API.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs.cameras import Cameras, look_at
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import PlyFrame
from recdreamer_gs.gaussians import read_gaussians
from recdreamer_gs.outputs import check_writable, output_for, write_mesh
from recdreamer_gs.render import camera_matrices, render


class MeshError(UserError, ValueError):
    """No mesh can be made from the input (no Gaussians, nothing opaque, nothing rendered)."""


@dataclass
class MeshOptions:
    """How a mesh is extracted; the defaults suit a normal single object and need no tuning."""

    elevations: tuple[float, ...] = (-50.0, -20.0, 10.0, 40.0, 70.0)  # degrees of the camera rings
    views_per_ring: int = 12  # azimuths per ring (5 rings x 12 + 2 poles = 62 views)
    poles: bool = True  # one more view straight from above and one from below
    resolution: int = 0  # render size in pixels; 0: 256 on CUDA, 128 on CPU (the CPU renderer is slow)
    fovy: float = 40.0  # vertical field of view of the cameras, degrees
    voxels: int = 0  # voxels across the object's diameter (voxel size = 2 radius / voxels); 0: the resolution
    # Truncation of the signed distance, in voxels. Thicker bands average more depth noise but inflate
    # the surface (silhouette rays mark voxels beside the object as behind it): 8 voxels put a ball's
    # surface 4 voxels out, 4 voxels about 2.
    trunc_voxels: float = 4.0
    alpha_threshold: float = 0.5  # pixels with less accumulated opacity are background (no depth)
    min_weight: float = 3.0  # keep surface only where at least this many views saw it
    opacity_threshold: float = 0.05  # Gaussians below this opacity do not count for the extent
    faces: int = 0  # decimate to at most this many triangles (quadric error); 0: keep all
    batch: int = 16  # views rendered at once


@dataclass
class MeshResult:
    mesh: "object"  # open3d.geometry.TriangleMesh in the internal y-up frame
    views: int
    voxel_size: float
    seconds: float

    @property
    def vertices(self) -> int:
        return len(self.mesh.vertices)

    @property
    def faces(self) -> int:
        return len(self.mesh.triangles)


# -- cameras ---------------------------------------------------------------------------------


def object_bounds(params: dict[str, Tensor], opacity_threshold: float = 0.05) -> tuple[Tensor, float]:
    """Centre and radius of the visible object: the box between the 1st and 99th percentile of the
    opaque Gaussians' centres per axis, and the 99.5th percentile of their distance from its centre
    plus two standard deviations of their extent (so single stray Gaussians do not inflate it)."""
    means = params["means"].detach().float().cpu()
    if means.shape[0] == 0:
        raise MeshError("the PLY holds no Gaussians")
    opaque = torch.sigmoid(params["opacities"].detach().float().cpu()) >= opacity_threshold
    if not bool(opaque.any()):
        raise MeshError(f"no Gaussian has opacity {opacity_threshold} or more: there is no surface to mesh")
    means = means[opaque]
    sigma = torch.exp(params["scales"].detach().float().cpu()[opaque]).amax(dim=-1)
    lo, hi = torch.quantile(means, 0.01, dim=0), torch.quantile(means, 0.99, dim=0)
    centre = 0.5 * (lo + hi)
    reach = (means - centre).norm(dim=-1) + 2.0 * sigma
    radius = float(torch.quantile(reach, 0.995)) if reach.numel() > 1 else float(reach[0])
    return centre, max(radius, 1e-6)


def mesh_cameras(centre: Tensor, radius: float, opts: MeshOptions, resolution: int) -> Cameras:
    """Rings of cameras around ``centre`` (plus the poles) that each see the whole sphere of ``radius``."""
    rings = [(e, a) for e in opts.elevations
             for a in np.arange(opts.views_per_ring) * (360.0 / opts.views_per_ring)]
    if opts.poles:
        rings += [(89.0, 0.0), (-89.0, 0.0)]  # 89°: look_at needs an up vector off the view axis
    elevation = torch.tensor([e for e, _ in rings], dtype=torch.float32)
    azimuth = torch.tensor([a for _, a in rings], dtype=torch.float32)
    fovy = math.radians(opts.fovy)
    distance = 1.1 * radius / math.sin(0.5 * fovy)
    c2w = look_at(azimuth, elevation, torch.full_like(azimuth, distance))
    c2w[:, :3, 3] += centre.float()
    return Cameras(c2w, torch.full_like(azimuth, fovy), resolution, resolution, azimuth, elevation)


# -- extraction ------------------------------------------------------------------------------


@torch.no_grad()
def render_rgbd(gaussians, cameras: Cameras, batch: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Colour (un-premultiplied), z-depth and alpha of every view, [V,H,W,3], [V,H,W], [V,H,W] on CPU."""
    device = gaussians.means.device
    rgb, depth, alpha = [], [], []
    for i in range(0, len(cameras), batch):
        cams = cameras[i:i + batch]
        out = render(gaussians, cams, torch.zeros(len(cams), 3, device=device))  # black: rgb = Σ w c
        a = out.alpha[:, 0]
        rgb.append((out.rgb.permute(0, 2, 3, 1) / a[..., None].clamp_min(1e-6)).clamp(0, 1).cpu())
        depth.append(out.depth[:, 0].cpu())
        alpha.append(a.cpu())
    return torch.cat(rgb), torch.cat(depth), torch.cat(alpha)


def fuse_tsdf(rgb: Tensor, depth: Tensor, alpha: Tensor, cameras: Cameras, voxel_size: float,
              opts: MeshOptions):
    """Fuse RGB-D views into a TSDF (open3d VoxelBlockGrid) and run marching cubes; an open3d mesh."""
    import open3d as o3d  # heavy: open3d loads only when needed
    import open3d.core as o3c

    viewmats, Ks = camera_matrices(cameras)
    cpu = o3c.Device("CPU:0")
    grid = o3d.t.geometry.VoxelBlockGrid(
        attr_names=("tsdf", "weight", "color"), attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
        attr_channels=((1), (1), (3)), voxel_size=voxel_size, block_resolution=16, block_count=4096, device=cpu)
    far = float((cameras.c2w[:, :3, 3].norm(dim=-1)).max()) * 4.0 + 1.0
    for i in range(len(cameras)):
        d = torch.where(alpha[i] >= opts.alpha_threshold, depth[i], torch.zeros_like(depth[i]))
        if not bool((d > 0).any()):
            continue
        K = Ks[i].double().numpy().copy()
        K[0, 2] -= 0.5  # pixel centres: ours at +0.5, open3d's at integers
        K[1, 2] -= 0.5
        intrinsic = o3c.Tensor(K)
        extrinsic = o3c.Tensor(viewmats[i].double().numpy())
        depth_image = o3d.t.geometry.Image(o3c.Tensor(d.numpy().astype(np.float32)[..., None]))
        colour_image = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(rgb[i].numpy(), dtype=np.float32)))
        blocks = grid.compute_unique_block_coordinates(depth_image, intrinsic, extrinsic, 1.0, far,
                                                        float(opts.trunc_voxels))
        grid.integrate(blocks, depth_image, colour_image, intrinsic, intrinsic, extrinsic, 1.0, far,
                       float(opts.trunc_voxels))
    return grid.extract_triangle_mesh(weight_threshold=float(opts.min_weight)).to_legacy()


def clean_mesh(mesh, faces: int = 0):
    """Largest connected component, no unused or duplicated vertices, optionally decimated; normals."""
    mesh.remove_duplicated_vertices()
    mesh.remove_degenerate_triangles()
    if len(mesh.triangles) == 0:
        return mesh
    clusters, sizes, _ = mesh.cluster_connected_triangles()
    clusters, sizes = np.asarray(clusters), np.asarray(sizes)
    mesh.remove_triangles_by_mask(clusters != int(sizes.argmax()))
    mesh.remove_unreferenced_vertices()
    if 0 < faces < len(mesh.triangles):
        mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=int(faces))
        mesh.remove_unreferenced_vertices()
    mesh.compute_vertex_normals()
    mesh.vertex_colors = type(mesh.vertex_colors)(np.clip(np.asarray(mesh.vertex_colors), 0.0, 1.0))
    return mesh


def extract_mesh(gaussians, opts: Optional[MeshOptions] = None) -> MeshResult:
    """The coloured triangle mesh of ``gaussians`` (a ``Gaussians`` on any device), internal y-up frame."""
    opts = opts or MeshOptions()
    start = time.perf_counter()
    params = {k: v.detach() for k, v in gaussians.params.items()}
    centre, radius = object_bounds(params, opts.opacity_threshold)
    device = gaussians.means.device
    resolution = opts.resolution or (256 if device.type == "cuda" else 128)
    cameras = mesh_cameras(centre, radius, opts, resolution)
    rgb, depth, alpha = render_rgbd(gaussians, cameras.to(device), opts.batch)
    if not bool((alpha >= opts.alpha_threshold).any()):
        raise MeshError(f"the renders are empty (no pixel reaches opacity {opts.alpha_threshold}); "
                        "nothing to mesh")
    voxel_size = 2.0 * radius / (opts.voxels or resolution)  # about one pixel of the renders per voxel
    mesh = clean_mesh(fuse_tsdf(rgb, depth, alpha, cameras, voxel_size, opts), opts.faces)
    if len(mesh.triangles) == 0:
        raise MeshError("no surface was found in the fused views (the Gaussians may be too sparse or faint)")
    colour_vertices(mesh, rgb, alpha, cameras, opts.alpha_threshold, voxel_size)
    return MeshResult(mesh, len(cameras), voxel_size, time.perf_counter() - start)


def _raycasting_scene(mesh):
    import open3d as o3d  # heavy: open3d loads only when needed
    import open3d.core as o3c

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3c.Tensor(np.asarray(mesh.vertices, dtype=np.float32)),
                        o3c.Tensor(np.asarray(mesh.triangles).astype(np.uint32)))
    return scene


def colour_vertices(mesh, rgb: Tensor, alpha: Tensor, cameras: Cameras, alpha_threshold: float,
                    voxel_size: float) -> None:
    """Vertex colours from the renders, in place: each vertex averages the pixels it projects to in the
    views that see it (a ray cast against the mesh itself), weighted by cos² of the viewing angle.

    The TSDF's own colours are averaged over its truncation band and blur small details (eyes, stripes);
    these keep what the splat shows. Vertices no view sees keep the TSDF colour.
    """
    import open3d as o3d  # heavy: open3d loads only when needed
    import open3d.core as o3c

    scene = _raycasting_scene(mesh)
    points, normals = np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals)
    total, weight = np.zeros_like(points), np.zeros(len(points))
    H, W = cameras.height, cameras.width
    focal = cameras.focal().double().numpy()
    for k in range(len(cameras)):
        c2w = cameras.c2w[k].double().numpy()
        offset = points - c2w[:3, 3]
        distance = np.linalg.norm(offset, axis=1)
        direction = offset / distance[:, None].clip(1e-12)
        local = offset @ c2w[:3, :3]  # OpenGL camera coordinates: x right, y up, looking down -z
        z = -local[:, 2]
        # Pixel j covers [j, j + 1): its centre is at j + 0.5, as in the renderer.
        col = np.floor(focal[k] * local[:, 0] / np.maximum(z, 1e-9) + W / 2).astype(np.int64)
        row = np.floor(-focal[k] * local[:, 1] / np.maximum(z, 1e-9) + H / 2).astype(np.int64)
        inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        col, row = col.clip(0, W - 1), row.clip(0, H - 1)
        rays = np.concatenate([np.broadcast_to(c2w[:3, 3], offset.shape), direction], axis=1).astype(np.float32)
        first_hit = scene.cast_rays(o3c.Tensor(rays))["t_hit"].numpy()
        visible = inside & (first_hit >= distance - 0.5 * voxel_size) & (alpha[k].numpy()[row, col] >= alpha_threshold)
        w = np.where(visible, (normals * direction).sum(axis=1) ** 2, 0.0)
        total += w[:, None] * rgb[k].numpy()[row, col]
        weight += w
    seen = weight > 1e-6
    colours = np.asarray(mesh.vertex_colors).copy()
    colours[seen] = total[seen] / weight[seen, None]
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.clip(colours, 0.0, 1.0))


# -- files ------------------------------------------------------------------------------------


def export_mesh(ply: str | Path, target: str | Path, frame_in: PlyFrame = "viewer", frame_out: PlyFrame = "viewer",
                faces: int = 0, resolution: int = 0, device: str | torch.device = "cpu") -> MeshResult:
    """``recdreamer-gs export model.ply mesh.glb``: read the splat PLY, extract, write ``target``."""
    target = Path(target)
    if output_for(target, mesh=True).kind != "mesh":
        raise MeshError(f"{target}: expected a mesh file name ending in .glb, .obj or .ply, got {target.suffix}")
    if faces < 0:
        raise MeshError(f"--faces: expected 0 (keep all) or a positive number of triangles, got {faces}")
    if resolution != 0 and not 16 <= resolution <= 2048:
        raise MeshError(f"--resolution: expected 0 (automatic) or 16..2048 pixels, got {resolution}")
    check_writable(target)
    gaussians = read_gaussians(ply, frame_in, device)
    result = extract_mesh(gaussians, MeshOptions(faces=faces, resolution=resolution))
    write_mesh(target, result.mesh, frame_out)
    return result


# -- looking at a mesh -----------------------------------------------------------------------


def render_mesh(mesh, cameras: Cameras, background: float = 1.0) -> Float[Tensor, "B 3 H W"]:
    """Shaded views of a coloured mesh by ray casting (open3d, headless) from our cameras.

    Vertex colours and normals are interpolated over each triangle (as viewers do with the written
    normals) and lit by a light at the camera, so the picture shows both the colours and the shape.
    Pixels that miss the mesh get ``background``.
    """
    import open3d.core as o3c  # heavy: open3d loads only when needed

    triangles = np.asarray(mesh.triangles)
    scene = _raycasting_scene(mesh)
    colours = np.asarray(mesh.vertex_colors) if mesh.has_vertex_colors() else np.full((len(mesh.vertices), 3), 0.7)
    if not mesh.has_vertex_normals():
        mesh.compute_vertex_normals()
    normals = np.asarray(mesh.vertex_normals)
    H, W = cameras.height, cameras.width
    j, i = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    images = []
    for k in range(len(cameras)):
        c2w = cameras.c2w[k].double().numpy()
        f = float(cameras.focal()[k])
        # OpenGL camera: x right, y up, looking down -z; pixel centres at +0.5.
        dirs = np.stack([(j - W / 2) / f, -(i - H / 2) / f, -np.ones_like(i)], axis=-1) @ c2w[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        rays = np.concatenate([np.broadcast_to(c2w[:3, 3], dirs.shape), dirs], axis=-1).astype(np.float32)
        hit = scene.cast_rays(o3c.Tensor(rays))
        prim = hit["primitive_ids"].numpy().astype(np.int64)
        uv = hit["primitive_uvs"].numpy()
        valid = np.isfinite(hit["t_hit"].numpy())
        tri = triangles[np.where(valid, prim, 0)]
        u, v = uv[..., :1], uv[..., 1:]

        def interpolate(values: np.ndarray) -> np.ndarray:
            return (1 - u - v) * values[tri[..., 0]] + u * values[tri[..., 1]] + v * values[tri[..., 2]]

        colour = interpolate(colours)
        normal = interpolate(normals)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-8)
        shade = 0.35 + 0.65 * np.abs((normal * dirs).sum(-1, keepdims=True))
        image = np.where(valid[..., None], np.clip(colour * shade, 0, 1), background)
        images.append(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1))
    return torch.stack(images)

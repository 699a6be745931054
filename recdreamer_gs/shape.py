"""Starting shapes: the cloud a run starts from when ``gaussians.init`` is ``file`` or ``shap-e``.

``shap-e`` makes a mesh from the prompt with diffusers' ``ShapEPipeline`` (model ``openai/shap-e`` through
``hub.py``) and turns it into points as GaussianDreamer does (docs/starting-shapes.md): mesh vertices with
their colours, plus points grown within ``grow_distance`` of a vertex with that vertex's colour and a little
noise; each point's scale is the root mean squared distance to its three nearest neighbours (3DGS's init).
The mesh is turned from Shap-E's frame (z up, front towards −y) into ours (+y up, front towards +z) and
scaled into the ball the random init fills.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from recdreamer_gs import hub
from recdreamer_gs.config import RunConfig, ShapEConfig
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import is_splat_ply
from recdreamer_gs.gaussians import StartCloud, load_points
from recdreamer_gs.rng import derive_seed

NEIGHBOURS = 3  # scale from the mean squared distance to this many nearest neighbours (3DGS: distCUDA2)
# Shap-E's frame to ours: its x stays, its up (+z) becomes +y, its front (−y) becomes +z: (x, y, z) -> (x, z, −y),
# the -90° turn about x that diffusers' docs apply before writing a y-up GLB.
SHAP_E_TO_WORLD = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# The default 64 steps and grid-128 decode on a CPU: 127 prior passes x 19.5 s + 199 s decode, measured (4 steps)
# by benchmarks/shap_e.py with random weights at Shap-E's size on a shared 2-core machine (docs/measurements.md).
CPU_MINUTES = 45


class ShapeError(UserError, RuntimeError):
    """Shap-E made no usable shape for the prompt."""


@dataclass
class ShapEMesh:
    """The vertices of a mesh from diffusers' ``ShapERenderer.decode_to_mesh`` (its triangles are not needed)."""

    verts: Float[Tensor, "V 3"]  # Shap-E's frame (z up, front towards −y), inside its box [-1, 1]^3
    rgb: Float[Tensor, "V 3"]  # linear colours (diffusers converts the decoded sRGB to linear)


# -- pure maths --------------------------------------------------------------------------------


def linear_to_srgb(c: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """Linear colours to the sRGB values a screen (and our renderer) shows; the inverse of diffusers'
    ``_convert_srgb_to_linear`` on [0, 1]."""
    c = c.clamp(0, 1)
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def shap_e_to_world(points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
    return points @ SHAP_E_TO_WORLD.T.to(points)


def fit_into_ball(points: Float[Tensor, "N 3"], radius: float) -> Float[Tensor, "N 3"]:
    """Centred on the bounding box's centre and scaled so that the farthest point lies at ``radius``: the
    shape fills the ball the random init fills (and so the same part of the view)."""
    centre = (points.min(dim=0).values + points.max(dim=0).values) / 2
    centred = points - centre
    return centred * (radius / centred.norm(dim=-1).max().clamp_min(1e-8))


def _search(points: Tensor):
    import open3d as o3d  # heavy: open3d loads only when needed

    return o3d.core.nns.NearestNeighborSearch(o3d.core.Tensor(np.ascontiguousarray(points.numpy(), np.float32)))


def _query(points: Tensor):
    import open3d as o3d  # heavy: open3d loads only when needed

    return o3d.core.Tensor(np.ascontiguousarray(points.numpy(), np.float32))


def neighbour_scales(points: Float[Tensor, "N 3"], k: int = NEIGHBOURS) -> Optional[Float[Tensor, "N"]]:
    """sqrt(mean squared distance to the ``k`` nearest other points) per point, at least 1e-7 squared (the
    3DGS init); None for a single point."""
    k = min(k, points.shape[0] - 1)
    if k < 1:
        return None
    nns = _search(points)
    nns.knn_index()
    _, d2 = nns.knn_search(_query(points), k + 1)  # the nearest is the point itself (distance 0)
    d2 = torch.from_numpy(d2.numpy()).float()[:, 1:]
    return d2.mean(dim=1).clamp_min(1e-7).sqrt()


def grow_near_surface(verts: Float[Tensor, "V 3"], rgb: Float[Tensor, "V 3"], n: int, distance: float,
                      noise: float, generator: torch.Generator) -> tuple[Float[Tensor, "n 3"], Float[Tensor, "n 3"]]:
    """``n`` points uniform in the union of the balls of radius ``distance`` around the vertices, each with
    its nearest vertex's colour plus uniform noise in [0, ``noise``) per channel, clamped to [0, 1].

    GaussianDreamer draws a million points uniform in the bounding box and keeps those within ``distance``
    of a vertex. Drawing a vertex, then a point uniform in its ball, and keeping it with probability
    1 / (vertices within ``distance`` of it) gives the same distribution without the million draws.
    """
    if n == 0:
        return verts.new_zeros(0, 3), rgb.new_zeros(0, 3)
    nns = _search(verts)
    nns.fixed_radius_index(distance)
    points: list[Tensor] = []
    have = 0
    while have < n:
        m = max(2 * (n - have), 256)
        centre = verts[torch.randint(len(verts), (m,), generator=generator)]
        direction = torch.nn.functional.normalize(torch.randn(m, 3, generator=generator), dim=-1)
        candidate = centre + direction * distance * torch.rand(m, 1, generator=generator) ** (1 / 3)
        _, _, splits = nns.fixed_radius_search(_query(candidate), distance)
        covering = torch.from_numpy(np.diff(splits.numpy())).clamp_min(1).float()
        kept = candidate[torch.rand(m, generator=generator) < 1.0 / covering]
        points.append(kept)
        have += len(kept)
    grown = torch.cat(points)[:n]
    nns.knn_index()
    nearest, _ = nns.knn_search(_query(grown), 1)
    colour = rgb[torch.from_numpy(nearest.numpy()[:, 0].astype(np.int64))]
    colour = (colour + noise * torch.rand(n, 3, generator=generator)).clamp(0, 1)
    return grown, colour


def mesh_to_cloud(mesh: ShapEMesh, n: int, cfg: ShapEConfig, radius: float, generator: torch.Generator,
                  source: str = "Shap-E") -> StartCloud:
    """``n`` starting points from a Shap-E mesh: a random ``1 - grow_fraction`` of them are vertices (all of
    them when the mesh has fewer), the rest grown near the surface; colours in sRGB, the frame turned to
    ours and the shape fitted into ``radius``; scales from the neighbour distances there."""
    verts = mesh.verts.float()
    if len(verts) == 0:
        raise ShapeError(f"{source} made no surface (an empty mesh at grid {cfg.grid_size}); try another --seed, "
                         "a larger gaussians.shap_e.grid_size, or --init sphere")
    rgb = linear_to_srgb(mesh.rgb.float())
    surface = min(n - round(n * cfg.grow_fraction), len(verts))
    keep = torch.randperm(len(verts), generator=generator)[:surface]
    grown, grown_rgb = grow_near_surface(verts, rgb, n - surface, cfg.grow_distance, cfg.colour_noise, generator)
    points = fit_into_ball(shap_e_to_world(torch.cat([verts[keep], grown])), radius)
    return StartCloud(points, torch.cat([rgb[keep], grown_rgb]), neighbour_scales(points), source)


# -- Shap-E ------------------------------------------------------------------------------------


def shap_e_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (as diffusers' example runs it), fp32 on the CPU."""
    if setting == "fp16" or (setting == "auto" and device.type == "cuda"):
        return torch.float16
    return torch.float32


def load_shap_e(cfg: ShapEConfig, device: torch.device):
    """diffusers' ``ShapEPipeline`` from the model's local folder (downloaded first when it is a Hub id and
    the network allows), each part in the weight variant found for it.

    Raises:
        ModelUnavailable: offline, not found, gated, an incomplete folder, or weights that do not load.
    """
    from diffusers import (  # heavy: diffusers loads only when needed
        HeunDiscreteScheduler,
        PriorTransformer,
        ShapEPipeline,
    )
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    dtype = shap_e_dtype(cfg.dtype, device)
    spec = hub.ModelSpec(hub.SHAP_E, cfg.model, half=dtype != torch.float32)
    where = hub.ensure(spec)
    folder, kw = where.folder, dict(local_files_only=True)
    try:
        pipe = ShapEPipeline(
            prior=PriorTransformer.from_pretrained(folder, subfolder="prior", variant=where.variant("prior"),
                                                   torch_dtype=dtype, **kw),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder", variant=where.variant("text_encoder"), torch_dtype=dtype, **kw),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw),
            scheduler=HeunDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **kw),
            shap_e_renderer=ShapERenderer.from_pretrained(
                folder, subfolder="shap_e_renderer", variant=where.variant("shap_e_renderer"), torch_dtype=dtype,
                **kw),
        )
    except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
        raise hub.load_error(spec, err) from err
    return pipe.to(device)


@torch.no_grad()
def generate_mesh(pipe, prompt: str, cfg: ShapEConfig, seed: int, progress: bool = True) -> ShapEMesh:
    """The prompt's latent from Shap-E's prior, decoded to a coloured mesh on a ``cfg.grid_size`` grid
    (the pipeline's own ``output_type="mesh"`` decodes at its default 128 only)."""
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="Shap-E")
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same shape on every device
    latents = pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, generator=generator,
                   output_type="latent").images
    try:
        mesh = pipe.shap_e_renderer.decode_to_mesh(latents[:1], pipe.device, grid_size=cfg.grid_size)
    except ValueError as err:  # diffusers colours the vertices with torch.cat over none when there are none
        if "non-empty list" not in str(err):
            raise
        return ShapEMesh(torch.zeros(0, 3), torch.zeros(0, 3))
    rgb = torch.stack([mesh.vertex_channels[c] for c in "RGB"], dim=-1)
    return ShapEMesh(mesh.verts.float().cpu(), rgb.float().cpu())


def cpu_notice() -> str:
    return (f"Shap-E runs on the CPU: at the default settings expect about {CPU_MINUTES} min on 2 cores before "
            "training starts (docs/measurements.md, Shap-E on a CPU); use a CUDA device, or --init sphere")


def starting_cloud(cfg: RunConfig, device: torch.device, echo: Optional[Callable[[str], None]] = None
                   ) -> Optional[StartCloud]:
    """The cloud of a fresh run: None for the random ball, the ``init_from`` file's points, or the prompt's
    Shap-E shape (made on ``device``; the prompt without USD's or the view prompts' phrases).

    Raises:
        InitError: the file is missing or holds no points.
        ModelUnavailable: the Shap-E model cannot be had or loaded.
        ShapeError: Shap-E made an empty mesh.
    """
    g = cfg.gaussians
    if g.init == "sphere":
        return None
    if g.init == "file":
        points, rgb = load_points(g.init_from, g.num_init, g.init_radius)
        if echo is not None and is_splat_ply(g.init_from):
            echo(f"--init-from {g.init_from}: a 3DGS splat file; starting from the centres and colours of "
                 f"{len(points):,} of its Gaussians (viewer frame, as model.ply is written)")
        return StartCloud(points, rgb, None, str(g.init_from))
    pipe = load_shap_e(g.shap_e, device)
    if echo is not None:
        if device.type == "cpu":
            echo(cpu_notice())
        echo(f"making the starting shape with Shap-E ({g.shap_e.steps} steps, grid {g.shap_e.grid_size}) "
             f"on {device}")
    start = time.perf_counter()
    mesh = generate_mesh(pipe, cfg.prompt, g.shap_e, derive_seed(cfg.train.seed, "shap-e"), cfg.train.progress_bar)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()  # Stable Diffusion gets the memory back
    generator = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "init"))
    cloud = mesh_to_cloud(mesh, g.num_init, g.shap_e, g.init_radius, generator, f"Shap-E for {cfg.prompt!r}")
    if echo is not None:
        echo(f"starting shape: {len(mesh.verts)} vertices -> {len(cloud.points)} points "
             f"({time.perf_counter() - start:.1f} s)")
    return cloud

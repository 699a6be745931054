"""shape.py: a Shap-E mesh becomes the starting Gaussians (colours, frame, size, growth, scales), on the
tiny random-weight Shap-E folder of make_fixtures and on meshes built here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.shap_e.camera import create_pan_cameras
from diffusers.pipelines.shap_e.renderer import _convert_srgb_to_linear
from plyfile import PlyData
from typer.testing import CliRunner

from recdreamer_gs.cameras import orbit
from recdreamer_gs.cli import app
from recdreamer_gs.config import GaussiansConfig, ShapEConfig
from recdreamer_gs.gaussians import Gaussians, sh0_to_rgb
from recdreamer_gs.render import render
from recdreamer_gs.shape import (
    ShapeError,
    ShapEMesh,
    generate_mesh,
    grow_near_surface,
    linear_to_srgb,
    load_shap_e,
    mesh_to_cloud,
    neighbour_scales,
    shap_e_to_world,
)

VERTICES_ONLY = ShapEConfig(grow_fraction=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(n: int, spacing: float, *origin: float) -> torch.Tensor:
    """n³ points on a regular grid."""
    axis = torch.arange(n, dtype=torch.float32) * spacing
    return torch.cartesian_prod(axis, axis, axis) + torch.tensor(origin)


def test_linear_to_srgb_undoes_diffusers_conversion():
    srgb = torch.linspace(0, 1, 101)
    assert torch.allclose(linear_to_srgb(_convert_srgb_to_linear(srgb)), srgb, atol=1e-5)


def test_mesh_colours_are_the_colours_the_renderer_shows():
    """A flat patch facing Shap-E's front, sRGB orange: Shap-E hands it over linear (0.60, 0.03, 0.01); the
    front view of the starting Gaussians shows orange again."""
    orange = torch.tensor([0.8, 0.2, 0.1])
    axis = torch.linspace(-0.8, 0.8, 40)
    x, z = torch.meshgrid(axis, axis, indexing="ij")
    verts = torch.stack([x.flatten(), torch.full_like(x.flatten(), -0.1), z.flatten()], dim=-1)  # the plane y = -0.1
    mesh = ShapEMesh(verts, _convert_srgb_to_linear(orange).expand(len(verts), 3))
    cloud = mesh_to_cloud(mesh, len(verts), VERTICES_ONLY, 0.6, gen())
    assert torch.allclose(cloud.rgb, orange.expand_as(cloud.rgb), atol=1e-5)
    cfg = GaussiansConfig(init_opacity=0.9)
    g = Gaussians.create(cfg, gen(), cloud)
    assert torch.allclose(sh0_to_rgb(g.params["sh0"][:, 0]), orange.expand(len(g), 3), atol=1e-5)
    front = orbit(1, elevation=0.0, radius=2.5, fovy_deg=40.0, resolution=32)  # azimuth 0: on +z
    rgb = render(g, front, torch.zeros(1, 3), backend="torch").rgb[0]
    assert torch.allclose(rgb[:, 14:18, 14:18].mean(dim=(1, 2)), orange, atol=0.03)


def shap_e_figure() -> tuple[ShapEMesh, dict[str, torch.Tensor]]:
    """An asymmetric figure in Shap-E's frame (z up, front towards −y): a grey body, a red head on top,
    a green nose at the front, a blue hand on the +x side; each part's vertices as a mask."""
    body = grid(6, 0.1, -0.25, -0.25, -0.6)
    parts = {"body": body, "head": grid(3, 0.05, -0.05, -0.05, 0.2), "nose": grid(3, 0.05, -0.05, -0.45, -0.2),
             "hand": grid(3, 0.05, 0.4, -0.05, -0.2)}
    colours = {"body": (0.5, 0.5, 0.5), "head": (1.0, 0.0, 0.0), "nose": (0.0, 1.0, 0.0), "hand": (0.0, 0.0, 1.0)}
    verts = torch.cat(list(parts.values()))
    rgb = torch.cat([torch.tensor(colours[k]).expand(len(v), 3) for k, v in parts.items()])
    return ShapEMesh(verts, _convert_srgb_to_linear(rgb)), colours


def test_the_shape_stands_upright_facing_front_and_fills_the_ball():
    mesh, colours = shap_e_figure()
    cloud = mesh_to_cloud(mesh, len(mesh.verts), VERTICES_ONLY, 0.6, gen())
    part = {k: (cloud.rgb - torch.tensor(c)).abs().max(dim=-1).values < 1e-4 for k, c in colours.items()}
    assert sum(int(m.sum()) for m in part.values()) == len(cloud.points)
    x, y, z = cloud.points.unbind(-1)
    assert y[part["head"]].min() > y[~part["head"]].max()  # the head is on top: +y up
    assert z[part["nose"]].min() > z[~part["nose"]].max()  # the nose points at the front: +z
    assert x[part["hand"]].min() > x[~part["hand"]].max()  # the hand stays on +x
    # Fitted into the random init's ball: the farthest point at init_radius, the bounding box centred.
    assert cloud.points.norm(dim=-1).max() == pytest.approx(0.6, rel=1e-5)
    centre = (cloud.points.min(0).values + cloud.points.max(0).values) / 2
    assert centre.abs().max() < 1e-6


def test_shap_e_front_camera_lands_on_our_front_camera():
    """Shap-E's first pan view (its front) looks from −y with +z up; mapped, it is our azimuth-0 camera: on +z,
    image right +x, image up +y."""
    cam = create_pan_cameras(8)
    origin, right, down = (shap_e_to_world(v[:1].float())[0] for v in (cam.origin, cam.x, cam.y))
    assert origin[2] > 0 and abs(origin[0]) < 1e-6 and origin[1] > 0  # in front, above the horizon
    assert torch.allclose(right, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert -down[1] > 0.8  # image up is mostly +y (the camera looks slightly down)


def test_growth_is_uniform_near_the_vertices_with_noisy_colours():
    verts = grid(5, 0.05, 0.0, 0.0, 0.0)  # balls of radius 0.01 around vertices 0.05 apart do not overlap
    rgb = torch.rand(len(verts), 3, generator=gen(1)) * 0.7
    points, colours = grow_near_surface(verts, rgb, 3000, 0.01, 0.2, gen())
    assert points.shape == colours.shape == (3000, 3)
    dist = torch.cdist(points, verts)
    nearest = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() < 0.01
    noise = colours - rgb[nearest]
    assert noise.min() >= 0 and noise.max() <= 0.2 and noise.mean() == pytest.approx(0.1, abs=0.01)
    inner = (dist.min(dim=1).values < 0.005).float().mean()  # uniform in a ball: 1/8 within half the radius
    assert inner == pytest.approx(1 / 8, abs=0.03)


def test_growth_is_uniform_over_overlapping_balls():
    """Two vertices one radius apart: the share of points within reach of both is the lens' share of the
    union's volume, 5/27 (drawing around a random vertex without the correction would give 5/16)."""
    verts = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    points, _ = grow_near_surface(verts, torch.zeros(2, 3), 6000, 0.01, 0.0, gen())
    both = (torch.cdist(points, verts) < 0.01).all(dim=1).float().mean()
    assert both == pytest.approx(5 / 27, abs=0.025)


def test_neighbour_scales_on_a_grid():
    points = grid(4, 0.03, 0.0, 0.0, 0.0)
    assert torch.allclose(neighbour_scales(points), torch.full((64,), 0.03), atol=1e-6)
    assert neighbour_scales(points[:1]) is None
    two = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    assert torch.allclose(neighbour_scales(two), torch.tensor([0.5, 0.5]))


def test_count_from_the_config_and_few_vertices():
    mesh, _ = shap_e_figure()  # 297 vertices
    cfg = ShapEConfig(grow_fraction=0.25)
    cloud = mesh_to_cloud(mesh, 200, cfg, 0.6, gen())
    assert len(cloud.points) == len(cloud.rgb) == len(cloud.scales) == 200
    assert ((cloud.rgb >= 0) & (cloud.rgb <= 1)).all() and (cloud.scales > 0).all()
    many = mesh_to_cloud(mesh, 1000, cfg, 0.6, gen())  # wants 750 vertices, has 297: the rest is grown
    assert len(many.points) == 1000
    with pytest.raises(ShapeError, match="made no surface.*--init sphere"):
        mesh_to_cloud(ShapEMesh(torch.zeros(0, 3), torch.zeros(0, 3)), 10, cfg, 0.6, gen())


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models):
    return load_shap_e(ShapEConfig(model=str(tiny_models["shap_e"])), torch.device("cpu"))


def test_tiny_shap_e_makes_a_coloured_mesh_and_an_empty_one_is_caught(tiny_pipe):
    cfg = ShapEConfig(grid_size=16, steps=2)
    mesh = generate_mesh(tiny_pipe, "a cat", cfg, seed=0, progress=False)
    assert len(mesh.verts) > 100 and mesh.verts.abs().max() <= 1.0
    assert mesh.rgb.shape == mesh.verts.shape and ((mesh.rgb >= 0) & (mesh.rgb <= 1)).all()
    again = generate_mesh(tiny_pipe, "a cat", cfg, seed=0, progress=False)
    assert torch.equal(again.verts, mesh.verts)  # the run's seed fixes the shape
    decoder = tiny_pipe.shap_e_renderer.mesh_decoder
    masks = decoder.masks.clone()
    decoder.masks.zero_()  # no triangle in any cell: diffusers decodes no vertex at all
    try:
        empty = generate_mesh(tiny_pipe, "a cat", cfg, seed=0, progress=False)
    finally:
        decoder.masks.copy_(masks)
    assert len(empty.verts) == 0
    assert math.isfinite(float(mesh.verts.sum()))


# ---- the command line ------------------------------------------------------------------------

SHAPE_RUN = ["--init", "shap-e", "--set", "gaussians.shap_e.grid_size=16", "--set", "gaussians.shap_e.steps=2",
             "--set", "gaussians.num_init=300", "--set", "output.turntable_frames=0", "--set",
             "train.progress_bar=false", "--set", "train.preview_every=2", "--resolution", "32", "--device", "cpu",
             "--prior", "synthetic"]


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_run_init_shap_e_end_to_end_and_resume_without_the_model(tiny_models, tmp_path, monkeypatch):
    from recdreamer_gs import shape

    model = tmp_path / "shap-e"
    shutil.copytree(tiny_models["shap_e"], model)
    prompts: list[str] = []

    def spy(pipe, prompt, cfg, seed, progress=True):  # the real generate_mesh, recording the prompt it gets
        prompts.append(prompt)
        return generate(pipe, prompt, cfg, seed, progress)
    generate = shape.generate_mesh
    monkeypatch.setattr(shape, "generate_mesh", spy)
    result = invoke(["run", "a red teapot", "--steps", "2", "--set", f"gaussians.shap_e.model={model}", *SHAPE_RUN,
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert prompts == ["a red teapot"]  # the prompt alone: no USD or view phrases
    assert "Shap-E runs on the CPU" in " ".join(result.output.split())
    (run_dir,) = list((tmp_path / "out").iterdir())
    vertex = PlyData.read(str(run_dir / "init.ply"))["vertex"]
    assert vertex.count == 300 and {p.name for p in vertex.properties} == {"x", "y", "z", "red", "green", "blue"}
    xyz = np.stack([vertex[a] for a in "xyz"], axis=1)
    assert np.linalg.norm(xyz, axis=1).max() == pytest.approx(0.6, rel=1e-5)
    assert vertex["red"].dtype == np.uint8 and len(np.unique(vertex["red"])) > 10  # Shap-E's colours, not grey
    assert (run_dir / "preview" / "iter_000000.png").is_file() and (run_dir / "preview" / "iter_000002.png").is_file()
    assert "init: shap-e" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["gaussians"] == 300

    # Resume offline with the model gone: the Gaussians come from the checkpoint, Shap-E never runs again.
    before = (run_dir / "init.ply").read_bytes()
    shutil.rmtree(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(["run", "--resume", str(run_dir), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert prompts == ["a red teapot"] and (run_dir / "init.ply").read_bytes() == before
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 3


@pytest.mark.parametrize("case, fragment", [
    ("offline", "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache"),
    ("incomplete", "missing weights in prior/"),
])
def test_shap_e_that_cannot_be_had_is_one_line_before_any_run_folder(case, fragment, tiny_models, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    args = []
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        model = tmp_path / "shap-e"
        shutil.copytree(tiny_models["shap_e"], model)
        (model / "prior" / "diffusion_pytorch_model.safetensors").unlink()
        args = ["--set", f"gaussians.shap_e.model={model}"]
    out = tmp_path / "out"
    result = invoke(["run", "a cat", *SHAPE_RUN, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Shap-E model" in text and fragment in text and "--init sphere" in text and "Traceback" not in text
    assert not out.exists()


def test_a_fresh_run_downloads_shap_e_when_missing(tiny_models, tmp_path, monkeypatch):
    """``training.prepare`` (what ``run`` calls before the run folder): the model is not in the cache, the Hub
    (a stand-in serving the tiny folder) has it: it is fetched, then the starting shape is made from it."""
    import huggingface_hub
    from make_fixtures import write_hub_snapshot

    from recdreamer_gs import hub, training
    from recdreamer_gs.config import load_config, parse_override

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tiny_models["shap_e"]
    files = [p for p in source.rglob("*") if p.is_file()]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: SimpleNamespace(siblings=[
        SimpleNamespace(rfilename=p.relative_to(source).as_posix(), size=p.stat().st_size) for p in files]))
    fetched: list[str] = []

    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        fetched.append(repo_id)
        return str(write_hub_snapshot(Path(cache_dir), repo_id, source, only=set(allow_patterns)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    overrides = ("prompt=a cat", "gaussians.init=shap-e", "gaussians.shap_e.grid_size=16", "gaussians.shap_e.steps=2",
                 "gaussians.num_init=100", "prior.kind=synthetic", "train.device=cpu", "train.progress_bar=false")
    ready = training.prepare(load_config("preview", overrides=[parse_override(s) for s in overrides]))
    assert fetched == ["openai/shap-e"] and hub.status(hub.ModelSpec(hub.SHAP_E, "openai/shap-e")).complete
    assert len(ready.start.points) == 100

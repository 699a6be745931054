"""Mesh extraction (recdreamer_gs.mesh): TSDF fusion of our renders, frames, files, the export command."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import torch
from typer.testing import CliRunner

from recdreamer_gs.cameras import orbit
from recdreamer_gs.cli import app
from recdreamer_gs.config import GaussiansConfig
from recdreamer_gs.export import write_ply
from recdreamer_gs.gaussians import Gaussians, rgb_to_sh0
from recdreamer_gs.mesh import MeshError, MeshOptions, extract_mesh, render_mesh
from recdreamer_gs.outputs import to_frame, write_mesh
from recdreamer_gs.render import render

RADIUS = 0.5
RED, BLUE = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
# Small and quick: 32 px renders, 3 rings of 12 views + 2 poles = 38 views, voxels = 32 across.
FAST = MeshOptions(resolution=32, elevations=(-45.0, 0.0, 45.0))


def ball_params(n: int = 300, sigma: float = 0.06, opacity_logit: float = 4.0) -> dict[str, torch.Tensor]:
    """Gaussians evenly on a sphere of RADIUS (Fibonacci lattice): red where y > 0, blue below."""
    i = torch.arange(n) + 0.5
    polar = torch.acos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    d = torch.stack([torch.cos(azimuth) * torch.sin(polar), torch.cos(polar), torch.sin(azimuth) * torch.sin(polar)], -1)
    return {
        "means": RADIUS * d,
        "scales": torch.full((n, 3), math.log(sigma)),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacities": torch.full((n,), opacity_logit),
        "sh0": rgb_to_sh0(torch.where(d[:, 1:2] > 0, RED, BLUE)).reshape(n, 1, 3),
        "shN": torch.zeros(n, 0, 3),
    }


@pytest.fixture(scope="module")
def ball():
    gaussians = Gaussians(ball_params(), GaussiansConfig())
    return gaussians, extract_mesh(gaussians, FAST)


def test_ball_gives_a_closed_mesh_on_its_radius(ball):
    _, result = ball
    mesh = result.mesh
    assert result.views >= 36 and result.faces > 1000
    assert mesh.is_watertight() and mesh.is_orientable()
    r = np.linalg.norm(np.asarray(mesh.vertices), axis=1)
    # The visible surface of a shell of Gaussians lies a little outside their centres (about σ).
    assert np.abs(r - RADIUS).max() < 3 * result.voxel_size, (r.min(), r.max(), result.voxel_size)
    # Outward normals (consistent winding): normals point away from the centre.
    normals = np.asarray(mesh.vertex_normals)
    assert ((normals * np.asarray(mesh.vertices)).sum(1) > 0).mean() > 0.99


def test_colours_keep_their_sides_in_the_written_files(ball, tmp_path):
    _, result = ball
    for frame, red_sign in (("viewer", -1.0), ("y-up", 1.0)):
        for suffix in (".ply", ".obj"):
            path = tmp_path / f"ball_{frame}{suffix}"
            write_mesh(path, result.mesh, frame=frame)
            mesh = o3d.io.read_triangle_mesh(str(path))
            v, c = np.asarray(mesh.vertices), np.asarray(mesh.vertex_colors)
            assert len(v) == result.vertices
            red_side = red_sign * v[:, 1] > 0.2  # viewer frame: y points down, the red top is at y < 0
            blue_side = red_sign * v[:, 1] < -0.2
            assert red_side.sum() > 100 and blue_side.sum() > 100
            assert (c[red_side, 0] > 0.8).mean() > 0.98 and (c[red_side, 2] < 0.2).mean() > 0.98, (frame, suffix)
            assert (c[blue_side, 2] > 0.8).mean() > 0.98 and (c[blue_side, 0] < 0.2).mean() > 0.98, (frame, suffix)
    assert not list(tmp_path.glob(".*"))  # no temp files left


def glb_json(path: Path) -> dict:
    data = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_len, chunk_type = struct.unpack("<I4s", data[12:20])
    assert chunk_type == b"JSON" and chunk_len % 4 == 0
    return json.loads(data[20:20 + chunk_len])


def test_glb_is_valid_gltf_read_by_an_independent_reader(ball, tmp_path):
    pygltflib = pytest.importorskip("pygltflib")
    _, result = ball
    path = tmp_path / "ball.glb"
    write_mesh(path, result.mesh, frame="viewer")
    gltf = pygltflib.GLTF2().load(str(path))
    assert gltf.asset.version == "2.0"
    assert all(buffer.uri is None for buffer in gltf.buffers)  # the GLB's own binary chunk, no data URI
    blob = gltf.binary_blob()
    (primitive,) = gltf.meshes[0].primitives
    assert primitive.mode == 4 and gltf.materials[primitive.material].pbrMetallicRoughness.metallicFactor == 0

    def read(index: int) -> np.ndarray:
        acc = gltf.accessors[index]
        view = gltf.bufferViews[acc.bufferView]
        dtype = {5126: np.float32, 5125: np.uint32, 5121: np.uint8}[acc.componentType]
        width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[acc.type]
        start = view.byteOffset + (acc.byteOffset or 0)
        values = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=start).reshape(acc.count, width)
        if acc.min is not None:  # declared bounds must match the data (strict importers check them)
            assert np.allclose(values.min(0), acc.min) and np.allclose(values.max(0), acc.max)
        return values

    attrs = primitive.attributes
    positions, colours, normals = read(attrs.POSITION), read(attrs.COLOR_0), read(attrs.NORMAL)
    indices = read(primitive.indices).reshape(-1, 3)
    assert gltf.accessors[attrs.POSITION].min is not None  # POSITION bounds are required by glTF 2.0
    assert len(positions) == result.vertices and len(indices) == result.faces
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    expected = np.asarray(to_frame(result.mesh, "viewer").vertices)
    assert np.allclose(positions, expected, atol=1e-6)
    assert gltf.accessors[attrs.COLOR_0].normalized
    red_side = positions[:, 1] < -0.2
    assert (colours[red_side, 0] > 200).mean() > 0.98
    assert glb_json(path)["asset"]["version"] == "2.0"


def test_mesh_view_matches_the_splat_render(ball):
    gaussians, result = ball
    cams = orbit(4, 20.0, 2.0, 40.0, 48)
    with torch.no_grad():
        alpha = render(gaussians, cams, torch.ones(4, 3)).alpha[:, 0] > 0.5
    image = render_mesh(result.mesh, cams)
    hit = (image < 0.99).any(dim=1)
    # Same silhouette up to the rim: the renderer's depth is the alpha-weighted mean of the Gaussians'
    # centre depths, so the fused surface lies up to about one σ (here 1-2 px) inside the splat's.
    assert (hit & ~alpha).sum() < 0.01 * hit.sum()
    iou = (hit & alpha).sum() / (hit | alpha).sum()
    assert iou > 0.75, iou
    # The top of the picture is red, the bottom blue (the camera is 20° above the horizon).
    assert image[:, 0, 14, 24].min() > 0.3 and image[:, 2, 14, 24].max() < 0.2
    assert image[:, 2, 38, 24].min() > 0.3 and image[:, 0, 38, 24].max() < 0.2


def test_vertex_colours_come_from_the_views_that_see_them(ball):
    import copy

    from recdreamer_gs.mesh import colour_vertices, mesh_cameras, object_bounds, render_rgbd

    gaussians, result = ball
    centre, radius = object_bounds({k: v.detach() for k, v in gaussians.params.items()})
    cams = mesh_cameras(centre, radius, FAST, 32)
    rgb, _, alpha = render_rgbd(gaussians, cams)
    mesh = copy.deepcopy(result.mesh)
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.full((result.vertices, 3), 0.5))
    colour_vertices(mesh, rgb, alpha, cams, 0.5, result.voxel_size)
    v, c = np.asarray(mesh.vertices), np.asarray(mesh.vertex_colors)
    assert np.allclose(c, np.asarray(result.mesh.vertex_colors))  # what extract_mesh does
    top, bottom = v[:, 1] > 0.1, v[:, 1] < -0.1
    assert (c[top, 0] > 0.9).mean() > 0.98 and (c[bottom, 2] > 0.9).mean() > 0.98
    # Nothing sees a vertex from views where alpha is below the threshold: it keeps its colour.
    colour_vertices(mesh, rgb, torch.zeros_like(alpha), cams, 0.5, result.voxel_size)
    assert np.allclose(np.asarray(mesh.vertex_colors), c)


def test_decimation_to_a_face_budget():
    params = ball_params()
    result = extract_mesh(Gaussians(params, GaussiansConfig()), dataclasses.replace(FAST, faces=500))
    assert 0 < result.faces <= 500
    assert result.mesh.has_vertex_colors() and len(result.mesh.vertex_colors) == result.vertices


def test_nothing_to_mesh():
    with pytest.raises(MeshError, match="no Gaussians"):
        extract_mesh(Gaussians({k: v[:0] for k, v in ball_params().items()}, GaussiansConfig()), FAST)
    with pytest.raises(MeshError, match="opacity"):
        extract_mesh(Gaussians(ball_params(opacity_logit=-8.0), GaussiansConfig()), FAST)


# -- the export command ------------------------------------------------------------------------

runner = CliRunner()


def invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert fragment in text, text
    assert text.startswith("error:") and text.count("error:") == 1


@pytest.fixture(scope="module")
def ball_ply(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ball") / "model.ply"
    write_ply(path, ball_params(), frame="viewer")
    return path


def write_raw_ply(path: Path, params, bad_scales) -> None:
    """A 3DGS PLY whose rows ``bad_scales`` have an infinite scale (our writer would leave them out)."""
    from plyfile import PlyData, PlyElement

    from recdreamer_gs.export import ply_rows, prepare_for_export

    rows = ply_rows(prepare_for_export(params, "viewer"))
    rows["scale_0"][bad_scales] = np.inf
    PlyData([PlyElement.describe(rows, "vertex")]).write(str(path))


def test_export_command_writes_a_glb(tmp_path):
    params = ball_params()
    source = tmp_path / "some_infinite.ply"
    write_raw_ply(source, params, bad_scales=[0, 5, 9])  # said in a warning; the rest makes the mesh
    target = tmp_path / "mesh.glb"
    result = invoke(["export", str(source), str(target), "--resolution", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    n = len(params["means"])
    assert (f"warning: {source}: 3 of {n:,} Gaussians have NaN or infinite values (scales: 3 Gaussians); "
            "they are left out") in " ".join(result.output.split())
    assert "vertices" in result.output and "views" in result.output
    doc = glb_json(target)
    count = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]["count"]
    assert count > 500
    # Written in the viewer frame, like the PLY it came from: y points down.
    y_min, y_max = (doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]][k][1]
                    for k in ("min", "max"))
    assert y_min < -0.45 and y_max > 0.45
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "some_infinite.ply"]


def test_export_bad_input(ball_ply, tmp_path):
    not_splat = tmp_path / "cloud.ply"
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).random((50, 3))))
    o3d.io.write_point_cloud(str(not_splat), cloud)
    one_line_error(invoke(["export", str(not_splat), str(tmp_path / "m.glb")]), "not a 3DGS PLY")

    empty = tmp_path / "empty.ply"
    write_ply(empty, {k: v[:0] for k, v in ball_params().items()})
    one_line_error(invoke(["export", str(empty), str(tmp_path / "m.glb")]), "holds no Gaussians")

    infinite = tmp_path / "infinite.ply"  # every Gaussian has an infinite scale: nothing to render
    write_raw_ply(infinite, ball_params(), bad_scales=slice(None))
    one_line_error(invoke(["export", str(infinite), str(tmp_path / "m.glb")]),
                   f"all {len(ball_params()['means']):,} Gaussians have NaN or infinite values (scales:")

    suffixes = "ending in .glb, .obj, .ply, .sog, .splat, .spz, got .stl"
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "m.stl")]), suffixes)
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "m.stl"), "--mesh"]), suffixes)
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "m.spz"), "--mesh"]), "a mesh (--mesh) needs a .glb")
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "m.ply"), "--faces", "100"]), "or .ply with --mesh")
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "no" / "such" / "m.glb")]), "does not exist")
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path), "--mesh"]), "got no suffix")
    (tmp_path / "dir.glb").mkdir()
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "dir.glb")]), "it is a folder")
    one_line_error(invoke(["export", str(ball_ply), str(tmp_path / "m.glb"), "--faces", "-1"]), "--faces")
    one_line_error(invoke(["export", str(tmp_path / "missing.ply"), str(tmp_path / "m.glb")]), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud.ply", "dir.glb", "empty.ply", "infinite.ply"]


def test_run_writes_a_mesh(tmp_path):
    args = ["run", "a ball", "--steps", "2", "--out", str(tmp_path), "--device", "cpu", "--resolution", "16",
            "--set", "output.mesh=ply", "--set", "output.turntable_frames=0", "--set", "train.preview_every=0",
            "--set", "train.progress_bar=false", "--set", "gaussians.num_init=300", "--set", "gaussians.init_scale=0.08",
            # opaque enough to have a surface after 2 steps (no opacity reset at a block boundary)
            "--set", "gaussians.init_opacity=0.9", "--set", "densify.reset_at_block_boundaries=false"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    info = json.loads((run_dir / "metrics.json").read_text())["mesh"]
    assert info["file"] == "mesh.ply" and info["views"] >= 36 and info["faces"] > 100
    mesh = o3d.io.read_triangle_mesh(str(run_dir / "mesh.ply"))
    assert len(mesh.triangles) == info["faces"] and mesh.has_vertex_colors()
    assert (run_dir / "report.png").is_file()

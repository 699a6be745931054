"""Gaussian parameter set: layout, optimizers, init from sphere, files and starting clouds, clamps."""

import math

import numpy as np
import pytest
import torch

from recdreamer_gs.config import GaussiansConfig, load_config
from recdreamer_gs.gaussians import Gaussians, InitError, StartCloud, load_points, rgb_to_sh0, sh0_to_rgb
from recdreamer_gs.shape import starting_cloud


def test_sphere_init_layout_and_optimizers():
    cfg = GaussiansConfig(num_init=500, init_radius=0.5, sh_degree=1)
    g = Gaussians.create(cfg, torch.Generator().manual_seed(0))
    p = g.params
    assert p["means"].shape == (500, 3) and p["scales"].shape == (500, 3) and p["quats"].shape == (500, 4)
    assert p["opacities"].shape == (500,) and p["sh0"].shape == (500, 1, 3) and p["shN"].shape == (500, 3, 3)
    assert p["means"].norm(dim=-1).max() <= 0.5 + 1e-6
    assert torch.allclose(g.opacities, torch.full((500,), cfg.init_opacity))
    assert torch.allclose(g.scales, torch.full((500, 3), cfg.init_scale))
    assert ((sh0_to_rgb(p["sh0"]) - 0.5).abs() <= 0.05 + 1e-6).all()
    opts = g.make_optimizers()
    assert set(opts) == set(p.keys())
    for name, opt in opts.items():
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is p[name]


def test_gsplat_strategy_accepts_layout():
    from gsplat import DefaultStrategy

    g = Gaussians.create(GaussiansConfig(num_init=50), torch.Generator().manual_seed(0))
    DefaultStrategy().check_sanity(g.params, g.make_optimizers())


def test_clamp_keeps_scales_finite_and_bounded():
    cfg = GaussiansConfig(num_init=10)
    g = Gaussians.create(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.params["scales"][0] = -math.inf
        g.params["scales"][1] = 5.0
    g.clamp_()
    assert torch.isfinite(g.params["scales"]).all()
    assert g.params["scales"].max() <= cfg.max_log_scale and g.params["scales"].min() >= cfg.min_log_scale


def test_init_from_point_cloud_and_mesh(tmp_path, capfd):
    import open3d as o3d

    pts = np.random.default_rng(0).normal(size=(300, 3)) * 3 + 10
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    cloud.colors = o3d.utility.Vector3dVector(np.tile([[1.0, 0.0, 0.0]], (300, 1)))
    o3d.io.write_point_cloud(str(tmp_path / "cloud.ply"), cloud)
    points, rgb = load_points(tmp_path / "cloud.ply", 200, 0.6)
    assert points.shape == (200, 3)
    assert points.mean(0).abs().max() < 0.1  # centred
    assert points.norm(dim=-1).max() == pytest.approx(0.6, rel=1e-4)  # scaled into the radius
    assert torch.allclose(rgb, torch.tensor([1.0, 0.0, 0.0]).expand(200, 3))
    assert "Open3D" not in "".join(capfd.readouterr())  # "appears to be a PointCloud" stays out of the terminal

    mesh = o3d.geometry.TriangleMesh.create_box(2.0, 2.0, 2.0)
    o3d.io.write_triangle_mesh(str(tmp_path / "box.obj"), mesh)
    cfg = load_config("preview", overrides=[{"gaussians": {"init": "file", "init_from": str(tmp_path / "box.obj"),
                                                           "num_init": 400, "init_radius": 0.5}}])
    start = starting_cloud(cfg, torch.device("cpu"))
    assert start.source == str(tmp_path / "box.obj") and start.rgb is None and start.scales is None
    g = Gaussians.create(cfg.gaussians, torch.Generator().manual_seed(0), start)
    assert len(g) == 400 and torch.equal(g.means, start.points)
    assert torch.allclose(g.scales, torch.full((400, 3), cfg.gaussians.init_scale))
    # Surface samples of a cube: every point has at least one coordinate on a face.
    m = g.means
    gap = torch.minimum(m - m.min(0).values, m.max(0).values - m).min(dim=-1).values
    on_face = gap < 1e-4
    assert on_face.float().mean() > 0.99


def test_init_from_a_splat_ply_takes_its_centres_and_colours(tmp_path, capfd):
    from plyfile import PlyData, PlyElement

    from recdreamer_gs.export import ply_rows, prepare_for_export

    n = 50
    means, colours = torch.randn(n, 3), torch.rand(n, 3)
    params = {"means": means, "scales": torch.full((n, 3), -3.0), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "opacities": torch.zeros(n), "sh0": rgb_to_sh0(colours).reshape(n, 1, 3), "shN": torch.zeros(n, 0, 3)}
    rows = ply_rows(prepare_for_export(params, "viewer"))  # as model.ply holds them: y down
    rows["scale_0"][7] = np.inf  # left out with a warning, as by every command that reads a PLY
    PlyData([PlyElement.describe(rows, "vertex")]).write(str(tmp_path / "model.ply"))
    points, rgb = load_points(tmp_path / "model.ply", 1000, 0.6)
    keep = torch.arange(n) != 7
    expected = means[keep] - means[keep].mean(0)
    expected = expected * (0.6 / expected.norm(dim=-1).max())
    torch.testing.assert_close(points, expected, atol=1e-5, rtol=0)  # upright: back in the y-up frame
    torch.testing.assert_close(rgb, colours[keep], atol=1e-5, rtol=0)
    out, err = capfd.readouterr()
    assert "Open3D" not in out + err and "1 of 50 Gaussians have NaN or infinite values" in err


def test_start_cloud_scales_and_colours():
    cfg = GaussiansConfig(min_log_scale=-6.0, max_log_scale=-1.0)
    points = torch.zeros(3, 3)
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.4, 0.6]])
    g = Gaussians.create(cfg, torch.Generator().manual_seed(0), StartCloud(points, rgb, torch.tensor([0.1, 0.0, 5.0])))
    assert torch.allclose(sh0_to_rgb(g.params["sh0"][:, 0]), rgb, atol=1e-6)
    # isotropic, and kept within the log-scale clamp (a zero distance, a huge one)
    assert torch.allclose(g.params["scales"], torch.tensor([math.log(0.1), -6.0, -1.0])[:, None].expand(3, 3))


def test_init_from_missing_or_corrupt_file(tmp_path):
    with pytest.raises(InitError, match="does not exist"):
        load_points(tmp_path / "nope.ply", 10, 0.5)
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"this is not a ply file")
    with pytest.raises(InitError, match="no readable points"):
        load_points(bad, 10, 0.5)
    with pytest.raises(InitError, match="cannot read"):
        other = tmp_path / "x.txt"
        other.write_text("1 2 3")
        load_points(other, 10, 0.5)

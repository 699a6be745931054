"""Renderer tests: hand-built scenes with known pixels, gsplat's compositing rules, gradients, conventions.

CPU tests use the torch compositor. The GPU parity test (gsplat vs torch on CUDA tensors) is marked
``gpu``; it also runs as a script on a GPU machine:

    python tests/test_render.py --parity-json parity.json
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

if __package__ in (None, "") and __name__ == "__main__":  # script mode from a checkout
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recdreamer_gs.cameras import Cameras, look_at, sample_cameras
from recdreamer_gs.config import CameraConfig, GaussiansConfig
from recdreamer_gs.gaussians import SH_C0, Gaussians, rgb_to_sh0
from recdreamer_gs.render import camera_matrices, render
from recdreamer_gs.render.inputs import Splats, Views
from recdreamer_gs.render.torch_backend import ALPHA_MAX, ALPHA_MIN, T_MIN, project, rasterize_torch

FOVY_DEG = 40.0


def make_gaussians(
    means: list[list[float]], scales: list[float], opacities: list[float], rgbs: list[list[float]],
    dtype: torch.dtype = torch.float32,
) -> Gaussians:
    """Isotropic Gaussians from activated values (linear scale, opacity, rgb)."""
    n = len(means)
    opac = torch.tensor(opacities, dtype=torch.float64)
    params = {
        "means": torch.tensor(means, dtype=dtype),
        "scales": torch.tensor(scales, dtype=dtype).log()[:, None].repeat(1, 3),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype).repeat(n, 1),
        "opacities": torch.logit(opac).to(dtype),
        "sh0": rgb_to_sh0(torch.tensor(rgbs, dtype=dtype)).reshape(n, 1, 3),
        "shN": torch.zeros(n, 0, 3, dtype=dtype),
    }
    return Gaussians(params, GaussiansConfig(sh_degree=0))


def make_cameras(azimuths: list[float], elevations: list[float], radius: float, size: int,
                 height: int | None = None, dtype: torch.dtype = torch.float32) -> Cameras:
    az = torch.tensor(azimuths, dtype=dtype)
    el = torch.tensor(elevations, dtype=dtype)
    c2w = look_at(az, el, torch.full_like(az, radius))
    fovy = torch.full_like(az, math.radians(FOVY_DEG))
    return Cameras(c2w, fovy, size, height or size, az, el)


def focal(height: int) -> float:
    return 0.5 * height / math.tan(math.radians(FOVY_DEG) / 2)


def head_on_alpha(o: float, scale: float, dist: float, size: int, eps2d: float = 0.3) -> torch.Tensor:
    """Analytic alpha image of one isotropic Gaussian at the origin seen head-on from ``dist``."""
    var = (focal(size) * scale / dist) ** 2 + eps2d  # J Σ Jᵀ + eps2d with J = f/d·I at the axis
    centres = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    r2 = centres[:, None] ** 2 + centres[None, :] ** 2
    alpha = (o * torch.exp(-0.5 * r2 / var)).clamp_max(ALPHA_MAX)
    return torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))


# -- one Gaussian ------------------------------------------------------------------------------


def test_opaque_gaussian_head_on():
    size, dist = 33, 3.0  # odd size: the centre pixel's centre lies exactly on the Gaussian's mean
    g = make_gaussians([[0.0, 0.0, 0.0]], [0.3], [0.99995], [[0.9, 0.2, 0.1]])
    bg = torch.tensor([[0.1, 0.3, 0.8]])
    out = render(g, make_cameras([0.0], [0.0], dist, size), bg, backend="torch")
    assert out.rgb.shape == (1, 3, size, size) and out.alpha.shape == out.depth.shape == (1, 1, size, size)
    c = size // 2
    colour = torch.tensor([0.9, 0.2, 0.1])
    assert out.alpha[0, 0, c, c].item() == pytest.approx(ALPHA_MAX, abs=1e-6)  # clamped at 0.999
    torch.testing.assert_close(out.rgb[0, :, c, c], ALPHA_MAX * colour + (1 - ALPHA_MAX) * bg[0], atol=1e-5, rtol=0)
    assert out.depth[0, 0, c, c].item() == pytest.approx(dist, abs=1e-5)  # camera-axis distance
    for i, j in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
        torch.testing.assert_close(out.rgb[0, :, i, j], bg[0], atol=0, rtol=0)
        assert out.alpha[0, 0, i, j].item() == 0.0 and out.depth[0, 0, i, j].item() == 0.0


def test_alpha_image_matches_analytic_footprint():
    """Every pixel: alpha = min(0.999, o·exp(-σ)) with the eps2d-dilated covariance, 0 below 1/255."""
    size, dist, o, scale = 32, 3.0, 0.6, 0.15
    g = make_gaussians([[0.0, 0.0, 0.0]], [scale], [o], [[0.5, 0.5, 0.5]])
    out = render(g, make_cameras([0.0], [0.0], dist, size), torch.zeros(1, 3), backend="torch")
    expected = head_on_alpha(o, scale, dist, size)
    assert (expected == 0).any() and (expected > 0).any()  # the skip rule acts inside the image
    torch.testing.assert_close(out.alpha[0, 0].double(), expected, atol=2e-6, rtol=1e-5)
    # Fragments below 1/255 are dropped, not faded: no alpha in (0, 1/255).
    a = out.alpha[0, 0]
    assert not ((a > 0) & (a < ALPHA_MIN)).any()


def test_gaussian_below_opacity_threshold_is_culled():
    g = make_gaussians([[0.0, 0.0, 0.0]], [0.3], [0.003], [[1.0, 0.0, 0.0]])  # 0.003 < 1/255
    bg = torch.tensor([[0.2, 0.4, 0.6]])
    out = render(g, make_cameras([0.0], [0.0], 3.0, 17), bg, backend="torch")
    assert out.alpha.abs().max().item() == 0.0
    torch.testing.assert_close(out.rgb[0], bg[0, :, None, None].expand(3, 17, 17), atol=0, rtol=0)
    assert out.meta["radii"].abs().max().item() == 0


# -- several Gaussians: order, stop rule, background -------------------------------------------


def _pair_scene(z_red: float, z_blue: float) -> Gaussians:
    return make_gaussians([[0.0, 0.0, z_red], [0.0, 0.0, z_blue]], [0.3, 0.3], [0.9, 0.9],
                          [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_depth_order_nearer_gaussian_dominates():
    size, dist = 33, 3.0
    cams = make_cameras([0.0], [0.0], dist, size)
    bg = torch.tensor([[0.0, 1.0, 0.0]])
    c = size // 2
    o = 0.9
    w_near, w_far, t_final = o, (1 - o) * o, (1 - o) ** 2
    red_front = render(_pair_scene(0.5, -0.5), cams, bg, backend="torch")  # camera on +z: red is nearer
    torch.testing.assert_close(red_front.rgb[0, :, c, c], torch.tensor([w_near, t_final, w_far]), atol=1e-5, rtol=0)
    expected_depth = (w_near * (dist - 0.5) + w_far * (dist + 0.5)) / (w_near + w_far)
    assert red_front.depth[0, 0, c, c].item() == pytest.approx(expected_depth, abs=1e-5)
    assert red_front.alpha[0, 0, c, c].item() == pytest.approx(1 - t_final, abs=1e-6)
    blue_front = render(_pair_scene(-0.5, 0.5), cams, bg, backend="torch")
    torch.testing.assert_close(blue_front.rgb[0, :, c, c], torch.tensor([w_far, t_final, w_near]), atol=1e-5, rtol=0)


def test_transmittance_stop_rule():
    """A pixel stops before the Gaussian that would take T to 1e-4 or below; it and all behind it drop."""
    size = 17
    c = size // 2
    cams = make_cameras([0.0], [0.0], 4.0, size)
    bg = torch.tensor([[0.5, 0.5, 0.5]])
    zs = [1.0, 0.5, 0.0, -0.5]
    rgbs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    o = 0.98  # T after each: 0.02, 4e-4, 8e-6 -> the third and fourth are dropped
    g = make_gaussians([[0.0, 0.0, z] for z in zs], [0.2] * 4, [o] * 4, rgbs)
    out = render(g, cams, bg, backend="torch")
    w = [o, (1 - o) * o]
    assert (1 - o) ** 3 <= T_MIN < (1 - o) ** 2
    expected = w[0] * torch.tensor(rgbs[0]) + w[1] * torch.tensor(rgbs[1]) + (1 - sum(w)) * bg[0]
    torch.testing.assert_close(out.rgb[0, :, c, c], expected, atol=1e-5, rtol=0)
    assert out.alpha[0, 0, c, c].item() == pytest.approx(sum(w), abs=1e-6)
    # Without the stop rule the blue one would add ≈ 0.0004·0.98 and alpha would reach ≈ 1 - 8e-6.
    assert out.rgb[0, 2, c, c].item() == pytest.approx(expected[2].item(), abs=1e-6)


def _random_scene(n: int, seed: int, dtype: torch.dtype = torch.float32, sh_degree: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    g = Gaussians.create(GaussiansConfig(num_init=n, sh_degree=sh_degree, init_radius=0.6), gen)
    with torch.no_grad():
        g.params["scales"].add_(0.4 * torch.randn(n, 3, generator=gen))
        g.params["quats"].add_(0.5 * torch.randn(n, 4, generator=gen))
        g.params["opacities"].add_(1.5 * torch.randn(n, generator=gen))
        g.params["sh0"].add_(0.5 * torch.randn(n, 1, 3, generator=gen))
        g.params["shN"].add_(0.2 * torch.randn(g.params["shN"].shape, generator=gen))
    return g.to(dtype)


def test_background_compositing():
    """rgb = Σ w c + (1 - Σ w)·bg for every pixel and view."""
    g = _random_scene(200, seed=3)
    cams = sample_cameras(CameraConfig(resolution=24), 2, torch.Generator().manual_seed(0))
    black = render(g, cams, torch.zeros(2, 3), backend="torch")
    bg = torch.tensor([[0.9, 0.1, 0.4], [0.2, 0.7, 1.0]])
    coloured = render(g, cams, bg, backend="torch")
    assert 0.05 < black.alpha.mean().item() < 0.95
    unclipped = (black.rgb < 1.0).all(dim=1, keepdim=True).expand_as(black.rgb)  # render() clamps to [0, 1]
    expected = (black.rgb + (1 - black.alpha) * bg[:, :, None, None]).clamp(0, 1)
    torch.testing.assert_close(coloured.rgb[unclipped], expected[unclipped], atol=1e-5, rtol=0)
    torch.testing.assert_close(coloured.alpha, black.alpha)


def _dense_reference(splats, views, backgrounds):
    """Naive compositor: every pixel against every visible Gaussian, cumprod transmittance."""
    from gsplat.cuda._torch_impl import _spherical_harmonics

    means, opacities, sh, sh_degree = splats.means, splats.opacities, splats.sh, splats.sh_degree
    viewmats, width, height = views.viewmats, views.width, views.height
    radii, means2d, depths, conics = project(splats, views)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means.dtype) + 0.5,
                            torch.arange(width, dtype=means.dtype) + 0.5, indexing="ij")
    rgbs, alphas, ds = [], [], []
    for c in range(viewmats.shape[0]):
        ids = torch.nonzero((radii[c] > 0).all(-1)).squeeze(-1)
        ids = ids[torch.argsort(depths[c, ids])]
        col = torch.clamp_min(_spherical_harmonics(sh_degree, means[ids] - campos[c], sh[ids]) + 0.5, 0.0)
        dx = xs.reshape(-1, 1) - means2d[c, ids, 0]
        dy = ys.reshape(-1, 1) - means2d[c, ids, 1]
        a, b, cc = conics[c, ids].unbind(-1)
        sigma = 0.5 * (a * dx**2 + cc * dy**2) + b * dx * dy
        alpha = torch.clamp_max(opacities[ids] * torch.exp(-sigma), ALPHA_MAX)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
        t_next = torch.cumprod(1 - alpha, dim=1)
        t = torch.cat([torch.ones_like(t_next[:, :1]), t_next[:, :-1]], dim=1)
        w = alpha * t * torch.cumprod((t_next > T_MIN).to(alpha.dtype), dim=1)
        acc = w.sum(1, keepdim=True)
        rgbs.append((w @ col + (1 - acc) * backgrounds[c]).reshape(height, width, 3))
        alphas.append(acc.reshape(height, width, 1))
        ds.append(((w @ depths[c, ids][:, None]) / acc.clamp_min(1e-10)).reshape(height, width, 1))
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(ds)


def _raster_args(g: Gaussians, cams: Cameras, bg: torch.Tensor) -> dict:
    viewmats, Ks = camera_matrices(cams)
    dtype = g.means.dtype
    return dict(splats=Splats.of(g), views=Views(viewmats.to(dtype), Ks.to(dtype), cams.width, cams.height),
                backgrounds=bg.to(dtype))


def test_tiled_compositor_matches_dense_reference():
    """Tiling and the segmented log-transmittance change nothing: values and gradients equal a dense loop."""
    g = _random_scene(250, seed=1, dtype=torch.float64, sh_degree=1)
    cams = make_cameras([0.0, 130.0, -70.0], [10.0, 25.0, -5.0], 2.2, 30, height=27, dtype=torch.float64)
    bg = torch.rand(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = [torch.rand(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, s in enumerate([(3, 27, 30, 3), (3, 27, 30, 1), (3, 27, 30, 1)])]
    results = []
    for fn in (rasterize_torch, _dense_reference):
        g.zero_grad()
        outs = fn(**_raster_args(g, cams, bg))[:3]
        sum((w * o).sum() for w, o in zip(weights, outs)).backward()
        results.append(([o.detach() for o in outs], {k: p.grad.clone() for k, p in g.params.items()}))
    (fast, fast_grads), (dense, dense_grads) = results
    assert dense[1].max() > 1 - 2 * T_MIN  # some pixels saturate: the stop rule is exercised
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for k in ("means", "quats", "scales", "opacities", "sh0", "shN"):
        assert dense_grads[k].abs().max() > 0, k
        torch.testing.assert_close(fast_grads[k], dense_grads[k], atol=1e-9, rtol=1e-8)


def test_gradcheck_tiny_scene():
    """Analytic compositing backward against finite differences (float64)."""
    dtype = torch.float64
    means = torch.tensor([[0.0, 0.05, 0.1], [0.12, -0.08, -0.2], [-0.1, 0.0, 0.3]], dtype=dtype)
    log_scales = torch.log(torch.tensor([[0.12, 0.08, 0.1], [0.15, 0.1, 0.12], [0.06, 0.09, 0.08]], dtype=dtype))
    quats = torch.tensor([[1.0, 0.1, 0.2, 0.0], [0.9, -0.2, 0.1, 0.3], [1.0, 0.0, -0.1, 0.2]], dtype=dtype)
    logits = torch.tensor([1.5, 0.5, -0.5], dtype=dtype)
    sh0 = torch.tensor([[[0.5, -0.3, 0.2]], [[-0.4, 0.6, 0.1]], [[0.2, 0.2, -0.5]]], dtype=dtype)
    cams = make_cameras([0.0, 60.0], [0.0, 20.0], 2.0, 12, dtype=dtype)
    viewmats, Ks = camera_matrices(cams)
    bg = torch.tensor([[0.2, 0.3, 0.4], [0.9, 0.1, 0.5]], dtype=dtype)

    def fn(m, s, q, o, c):
        splats = Splats(m, torch.nn.functional.normalize(q, dim=-1), s.exp(), torch.sigmoid(o), c, 0)
        rgb, alpha, depth, _ = rasterize_torch(splats, Views(viewmats, Ks, 12, 12), bg)
        return rgb, alpha, depth

    inputs = [t.clone().requires_grad_(True) for t in (means, log_scales, quats, logits, sh0)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    # And each input on its own, with explicit central differences for one scalar loss.
    probe = [torch.rand(s, generator=torch.Generator().manual_seed(9), dtype=dtype)
             for s in [(2, 12, 12, 3), (2, 12, 12, 1), (2, 12, 12, 1)]]

    def loss(*args):
        return sum((p * o).sum() for p, o in zip(probe, fn(*args)))

    loss(*inputs).backward()
    h = 1e-6
    gen = torch.Generator().manual_seed(4)
    for idx, t in enumerate(inputs):
        for _ in range(3):
            flat = int(torch.randint(t.numel(), (1,), generator=gen))
            plus = [x.detach().clone() for x in inputs]
            minus = [x.detach().clone() for x in inputs]
            plus[idx].view(-1)[flat] += h
            minus[idx].view(-1)[flat] -= h
            numeric = (loss(*plus) - loss(*minus)).item() / (2 * h)
            assert t.grad.view(-1)[flat].item() == pytest.approx(numeric, rel=1e-4, abs=1e-6), (idx, flat)


# -- conventions and meta ---------------------------------------------------------------------


def _centroid(alpha: torch.Tensor) -> tuple[float, float]:
    h, w = alpha.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=alpha.dtype), torch.arange(w, dtype=alpha.dtype), indexing="ij")
    total = alpha.sum()
    return (alpha * ys).sum().item() / total.item(), (alpha * xs).sum().item() / total.item()


def test_y_up_and_x_right_from_front_camera():
    size = 32
    cams = make_cameras([0.0], [0.0], 3.0, size)  # camera on +z looking at the origin
    up = render(make_gaussians([[0.0, 0.6, 0.0]], [0.1], [0.9], [[1, 1, 1]]), cams, torch.zeros(1, 3), backend="torch")
    row, col = _centroid(up.alpha[0, 0])
    assert row < size / 2 - 5 and abs(col - (size - 1) / 2) < 0.5  # world +y -> upper half (row 0 is the top)
    right = render(make_gaussians([[0.6, 0.0, 0.0]], [0.1], [0.9], [[1, 1, 1]]), cams, torch.zeros(1, 3),
                   backend="torch")
    row, col = _centroid(right.alpha[0, 0])
    assert col > size / 2 + 5 and abs(row - (size - 1) / 2) < 0.5  # world +x -> right half
    # From azimuth 90 (camera on +x) world -z is screen right.
    side = make_cameras([90.0], [0.0], 3.0, size)
    back = render(make_gaussians([[0.0, 0.0, -0.6]], [0.1], [0.9], [[1, 1, 1]]), side, torch.zeros(1, 3),
                  backend="torch")
    assert _centroid(back.alpha[0, 0])[1] > size / 2 + 5


def test_gaussian_behind_camera_is_culled():
    g = make_gaussians([[0.0, 0.0, 4.0]], [0.3], [0.9], [[1, 0, 0]])  # camera at z = 3 looks towards -z
    out = render(g, make_cameras([0.0], [0.0], 3.0, 16), torch.zeros(1, 3), backend="torch")
    assert out.alpha.max().item() == 0.0


def test_meta_for_densification():
    g = _random_scene(300, seed=5)
    cams = sample_cameras(CameraConfig(resolution=32), 3, torch.Generator().manual_seed(1))
    out = render(g, cams, torch.rand(3, 3), backend="torch")
    meta = out.meta
    assert meta["radii"].shape == (3, 300, 2) and meta["radii"].dtype == torch.int32
    assert meta["means2d"].shape == (3, 300, 2)
    assert (meta["width"], meta["height"], meta["n_cameras"], meta["gaussian_ids"]) == (32, 32, 3, None)
    visible = (meta["radii"] > 0).all(-1)
    assert 0 < visible.sum() < 900
    meta["means2d"].retain_grad()  # what gsplat's DefaultStrategy does
    out.rgb.square().mean().backward()
    grad2d = meta["means2d"].grad
    assert grad2d is not None and grad2d.shape == (3, 300, 2)
    assert grad2d[visible].abs().sum() > 0
    assert grad2d[~visible].abs().max() == 0  # culled Gaussians get no gradient, as in gsplat
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1


def test_empty_view_renders_background_and_backprops_zero():
    g = make_gaussians([[0.0, 0.0, 0.0]], [0.1], [0.9], [[1, 0, 0]])
    cams = make_cameras([0.0], [0.0], 3.0, 8)
    cams.c2w[:, :3, 3] += torch.tensor([50.0, 0.0, 0.0])  # look far to the side of the Gaussian
    bg = torch.tensor([[0.3, 0.6, 0.9]])
    out = render(g, cams, bg, backend="torch")
    torch.testing.assert_close(out.rgb[0], bg[0, :, None, None].expand(3, 8, 8))
    out.rgb.sum().backward()
    assert g.params["means"].grad.abs().max().item() == 0.0


def test_gsplat_backend_refuses_cpu_tensors():
    g = make_gaussians([[0.0, 0.0, 0.0]], [0.1], [0.9], [[1, 0, 0]])
    with pytest.raises(ValueError, match="CUDA"):
        render(g, make_cameras([0.0], [0.0], 3.0, 8), torch.zeros(1, 3), backend="gsplat")


def test_rasterize_gsplat_refuses_cpu_tensors():
    from recdreamer_gs.render.gsplat_backend import rasterize_gsplat

    g = make_gaussians([[0.0, 0.0, 0.0]], [0.1], [0.9], [[1, 0, 0]])
    args = _raster_args(g, make_cameras([0.0], [0.0], 3.0, 8), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="CUDA"):
        rasterize_gsplat(**args)


def test_sh0_colour_is_linear_in_dc():
    """Degree-0 colour: rgb = 0.5 + C0·sh0 (then clamped at 0), as gsplat evaluates it."""
    g = make_gaussians([[0.0, 0.0, 0.0]], [0.3], [0.99995], [[0.25, 0.5, 0.75]])
    out = render(g, make_cameras([0.0], [0.0], 3.0, 33), torch.zeros(1, 3), backend="torch")
    sh0 = g.params["sh0"][0, 0].detach()
    torch.testing.assert_close(out.rgb[0, :, 16, 16], ALPHA_MAX * (0.5 + SH_C0 * sh0), atol=1e-5, rtol=0)


# -- GPU parity: gsplat vs the torch compositor ------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def parity_report(seeds: tuple[int, ...] = (0, 1), n: int = 400, device: str = "cuda",
                  backends: tuple[str, str] = ("gsplat", "torch")) -> list[dict]:
    """Render random scenes with both backends on CUDA; max errors and gradient cosines per setting."""
    report = []
    for res, n_cams in [(64, 2), (64, 4), (128, 2), (128, 4)]:
        for seed in seeds:
            g = _random_scene(n, seed).to(device)
            cams = sample_cameras(CameraConfig(resolution=res), n_cams, torch.Generator().manual_seed(seed)).to(device)
            bg = torch.rand(n_cams, 3, generator=torch.Generator().manual_seed(seed + 100)).to(device)
            outs, grads = {}, {}
            for backend in backends:
                g.zero_grad()
                out = render(g, cams, bg, backend=backend)
                probe = torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(7)).to(device)
                ((out.rgb * probe).sum() + out.alpha.sum() + 0.1 * (out.depth * out.alpha).sum()).backward()
                outs[backend] = out
                grads[backend] = {k: g.params[k].grad.detach().clone() for k in ("means", "opacities", "sh0")}
            a, b = outs[backends[0]], outs[backends[-1]]
            solid = (a.alpha > 0.5) & (b.alpha > 0.5)
            report.append({
                "resolution": res, "cameras": n_cams, "gaussians": n, "seed": seed,
                "rgb_max_abs": (a.rgb - b.rgb).abs().max().item(),
                "alpha_max_abs": (a.alpha - b.alpha).abs().max().item(),
                "depth_max_abs_where_alpha_gt_0.5": (a.depth - b.depth)[solid].abs().max().item(),
                "mean_alpha": a.alpha.mean().item(),
                **{f"grad_cos_{k}": _cosine(grads[backends[0]][k], grads[backends[-1]][k])
                   for k in ("means", "opacities", "sh0")},
            })
    return report


def _torch_backend_outputs(device: torch.device, default_device: str | None = None) -> list[torch.Tensor]:
    """rgb, alpha, depth, meta tensors and gradients of a small torch-backend render on ``device``, rendered
    (forward and backward) with PyTorch's default device set to ``default_device``."""
    g = make_gaussians([[0.0, 0.0, 0.0], [0.2, 0.1, -0.3]], [0.3, 0.2], [0.9, 0.6], [[0.9, 0.2, 0.1], [0.1, 0.8, 0.2]])
    g = g.to(device)
    cams = make_cameras([0.0, 90.0], [10.0, 0.0], 3.0, 16).to(device)
    background = torch.rand(2, 3).to(device)
    with torch.device(default_device or device):
        out = render(g, cams, background, backend="torch")
        out.rgb.sum().backward()
    meta = [v for v in out.meta.values() if isinstance(v, torch.Tensor)]
    return [out.rgb, out.alpha, out.depth, *meta, *[p.grad for p in g.parameters()]]


def test_torch_backend_follows_the_input_device():
    """The compositor makes its tensors on its inputs' device (it is the fallback renderer on GPUs too): with
    PyTorch's default device set to 'meta', a tensor the forward made without ``device=`` would break the
    render. (Autograd runs backward outside that setting; the CUDA test below covers the backward.)"""
    tensors = _torch_backend_outputs(torch.device("cpu"), default_device="meta")
    assert all(t is not None and t.device.type == "cpu" for t in tensors)
    assert torch.isfinite(tensors[0]).all() and tensors[1].max() > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda():
    """``render.backend=torch`` on a GPU: outputs and gradients stay on CUDA and match the CPU render."""
    on_gpu = _torch_backend_outputs(torch.device("cuda"))
    on_cpu = _torch_backend_outputs(torch.device("cpu"))
    assert all(t is not None and t.device.type == "cuda" for t in on_gpu)
    for a, b in zip(on_gpu[:3], on_cpu[:3]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_torch_parity():
    report = parity_report(seeds=(0,))
    for row in report:
        print(row)
        assert row["rgb_max_abs"] < 1e-2, row
        assert row["alpha_max_abs"] < 1e-2, row
        assert row["depth_max_abs_where_alpha_gt_0.5"] < 1e-2, row
        for k in ("means", "opacities", "sh0"):
            assert row[f"grad_cos_{k}"] > 0.95, row


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="gsplat vs torch compositor parity on CUDA")
    parser.add_argument("--parity-json", required=True, help="where to write the max errors (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("parity needs a CUDA device; none is available")
    rows = parity_report()
    for row in rows:
        print(json.dumps(row))
    with open(args.parity_json, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": rows}, f, indent=2)

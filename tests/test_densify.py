"""Densification: BNF windows, and real grow / prune / reset / cap runs through gsplat's strategy ops."""

from __future__ import annotations

import io
import math

import pytest
import torch

from recdreamer_gs.cameras import orbit
from recdreamer_gs.config import GaussiansConfig
from recdreamer_gs.densify import (
    Densifier,
    DensifyConfig,
    densify_window,
    is_block_boundary,
    is_reset_step,
    is_refine_step,
    over_cap,
    prune_mask,
)
from recdreamer_gs.gaussians import Gaussians
from recdreamer_gs.render import render

RES = 32
N_CAMS = 3
TOTAL, N_INTERVALS = 40, 2  # blocks of 10: grow in [0, 20), prune-only in [20, 40), reset at 10

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- pure schedule functions --------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 10])
def test_windows_at_every_block_boundary(n):
    length = 30
    total = 2 * n * length
    for block in range(2 * n):
        expected = "grow" if block < n else "prune"
        for it in (block * length, block * length + 1, block * length + length - 1):
            assert densify_window(it, total, n, texture_only=False) == expected, (block, it)
            assert densify_window(it, total, n, texture_only=True) == "frozen"
    # Past the end: still the last (shrinking) block.
    assert densify_window(total + 5, total, n, False) == "prune"


@pytest.mark.parametrize("n", [2, 10])
def test_block_boundaries_only_inside_expanding_phase(n):
    length = 30
    total = 2 * n * length
    boundaries = [it for it in range(total + 10) if is_block_boundary(it, total, n)]
    assert boundaries == [k * length for k in range(1, n)]
    assert not is_block_boundary(0, total, n)
    assert not is_block_boundary(n * length, total, n)  # shrinking starts: no reset
    # Uneven totals: blocks of total // (2n) iterations.
    assert [it for it in range(45) if is_block_boundary(it, 45, 2)] == [11]


def test_resets_at_most_once_per_refine_period():
    # 10 blocks of 25 iterations in a 500-iteration run: boundaries every 25, resets once per refine period.
    assert [it for it in range(500) if is_reset_step(it, 500, 10, 100)] == [25, 100, 200]
    # Blocks as long as a refine period or longer: every boundary resets (the single-particle schedule).
    assert [it for it in range(500) if is_reset_step(it, 500, 2, 100)] == [125]
    assert [it for it in range(1200) if is_reset_step(it, 1200, 3, 100)] == [200, 400]


def test_refine_steps():
    assert [it for it in range(0, 50) if is_refine_step(it, 20, 10)] == [20, 30, 40]
    assert not is_refine_step(0, 0, 10)  # no statistics at iteration 0
    assert is_refine_step(10, 0, 10)


def test_validation_messages():
    with pytest.raises(ValueError, match="opacity_reset_value"):
        DensifyConfig(prune_opa=0.05, opacity_reset_value=0.05).validate()
    DensifyConfig(prune_opa=0.05, opacity_reset_value=0.01, reset_at_block_boundaries=False).validate()
    with pytest.raises(ValueError, match="refine_every: expected 1 or more, got 0"):
        DensifyConfig(refine_every=0).validate()
    with pytest.raises(ValueError, match="scene_scale"):
        Densifier(DensifyConfig(), 0.0, TOTAL, N_INTERVALS)


def test_over_cap_keeps_the_highest_scores():
    scores = torch.tensor([5.0, 0.1, 3.0, 4.0, 0.2, 6.0])
    assert over_cap(scores, 1.0, 10).tolist() == [False] * 6
    assert over_cap(scores, 1.0, 2).tolist() == [False, False, True, True, False, False]
    assert over_cap(scores, 1.0, 0).tolist() == [True, False, True, True, False, True]


def test_prune_mask_rules_and_never_everything():
    params = {
        "means": torch.zeros(4, 3), "scales": torch.log(torch.tensor([[0.1] * 3, [0.1] * 3, [2.0] * 3, [0.1] * 3])),
        "opacities": torch.logit(torch.tensor([0.5, 0.001, 0.5, 0.5])), "sh0": torch.zeros(4, 1, 3),
    }
    params["sh0"][3, 0, 1] = float("nan")
    assert prune_mask(params, 0.01, 1.0).tolist() == [False, True, True, True]
    params["opacities"] = torch.logit(torch.tensor([0.002, 0.001, 0.003, 0.004]))
    params["sh0"].zero_()
    assert prune_mask(params, 0.01, 10.0).tolist() == [True, True, True, False]  # keeps the most opaque


# -- a real run on the torch renderer ------------------------------------------------------------


def _scene(device: str = "cpu", n: int = 240):
    gaussians = Gaussians.create(
        GaussiansConfig(num_init=n, init_radius=0.6, init_scale=0.05, init_opacity=0.3),
        torch.Generator().manual_seed(0),
    ).to(device)
    optimizers = gaussians.make_optimizers()
    cameras = orbit(N_CAMS, 15.0, 2.5, 40.0, RES)
    # A high-contrast target (stripes and ramps) against grey Gaussians: large screen-space gradients.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, RES), torch.linspace(0, 1, RES), indexing="ij")
    target = torch.stack([xx, yy, torch.remainder(torch.floor(xx * 8), 2)], dim=0)
    return gaussians, optimizers, cameras, target[None].expand(N_CAMS, 3, RES, RES).to(device)


def _densifier(**overrides) -> Densifier:
    cfg = dict(grow_grad2d=10.0, grow_scale3d=0.05, prune_opa=0.005, prune_scale3d=0.5, refine_every=2,
               refine_start=2, opacity_reset_value=0.05, max_gaussians=100_000)
    cfg.update(overrides)
    return Densifier(DensifyConfig(**cfg), scene_scale=1.0, total_iterations=TOTAL, n_intervals=N_INTERVALS)


def _iteration(densifier, gaussians, optimizers, cameras, target, iteration, backend="torch", grad_log=None,
               before_post=None):
    """One training iteration with the hooks where system.training_step puts them."""
    background = torch.ones(N_CAMS, 3, device=target.device)
    out = render(gaussians, cameras, background, backend=backend)
    densifier.pre_backward(gaussians.params, optimizers, iteration, out.meta)
    loss = ((out.rgb - target) ** 2).sum()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    if grad_log is not None:  # gsplat's statistic, recomputed independently: |∂L/∂means2d · (W/2, H/2)·C|
        m = out.meta
        scale = [m["width"] / 2.0 * m["n_cameras"], m["height"] / 2.0 * m["n_cameras"]]
        g = m["means2d"].grad * torch.tensor(scale, device=target.device)
        visible = (m["radii"] > 0).all(dim=-1)
        grad_log.append((torch.where(visible, g.norm(dim=-1), 0.0).sum(0), visible.float().sum(0)))
    if before_post is not None:  # sees the first 10 opacities after the optimizer step
        before_post(gaussians.opacities[:10].detach())
    counts = densifier.post_backward(gaussians.params, optimizers, iteration, out.meta,
                                     lr_means=optimizers["means"].param_groups[0]["lr"])
    gaussians.clamp_()
    return out, counts


def _assert_optimizers_consistent(gaussians, optimizers):
    n = len(gaussians)
    for name, opt in optimizers.items():
        param = gaussians.params[name]
        assert opt.param_groups[0]["params"][0] is param, name
        assert param.shape[0] == n
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[param][key].shape == param.shape, (name, key)


def _expected_candidates(grad_log, threshold):
    total = sum(g for g, _ in grad_log)
    count = sum(c for _, c in grad_log)
    return int(((total / count.clamp_min(1)) > threshold).sum())


def _grow_then_prune(device: str, backend: str):
    gaussians, optimizers, cameras, target = _scene(device)
    densifier = _densifier()
    densifier.check(gaussians.params, optimizers)
    n0 = len(gaussians)

    # Grow window: iteration 1 accumulates, iteration 2 refines (refine_every = 2).
    grads = []
    out, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 1, backend, grads)
    assert out.meta["means2d"].retains_grad  # pre_backward kept the screen-space gradient
    assert counts == {"grown": 0, "pruned": 0, "count": n0}
    _, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 2, backend, grads)
    expected = _expected_candidates(grads, densifier.cfg.grow_grad2d)
    assert 0 < expected <= n0
    assert counts == {"grown": expected, "pruned": 0, "count": n0 + expected}
    seen = sum(c for _, c in grads)
    mean_grad = (sum(g for g, _ in grads) / seen.clamp_min(1))[seen > 0]
    assert densifier.grad2d_quantiles["p50"] == pytest.approx(float(torch.quantile(mean_grad, 0.5)), rel=1e-4)
    assert len(gaussians) == n0 + expected
    _assert_optimizers_consistent(gaussians, optimizers)
    # New Gaussians start with zero Adam moments; the statistics restart after a refine.
    assert torch.all(optimizers["means"].state[gaussians.params["means"]]["exp_avg"][-expected:] == 0)
    assert float(densifier.state["count"].sum()) == 0.0
    _iteration(densifier, gaussians, optimizers, cameras, target, 3, backend)  # the grown set trains

    # Prune window (iteration 22 is a refine step): low-opacity, huge and NaN Gaussians go, nothing grows.
    n1 = len(gaussians)
    with torch.no_grad():
        gaussians.params["opacities"][:15] = math.log(0.001 / 0.999)
        gaussians.params["scales"][20] = 0.0  # exp(0) = 1 > prune_scale3d · scene_scale = 0.5
    out, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 21, backend)
    assert not out.meta["means2d"].retains_grad  # no statistics outside grow windows
    assert counts == {"grown": 0, "pruned": 0, "count": n1}  # not a refine step
    out = render(gaussians, cameras, torch.ones(N_CAMS, 3, device=device), backend=backend)
    with torch.no_grad():
        gaussians.params["opacities"][:15] = math.log(0.001 / 0.999)
        gaussians.params["scales"][20] = 0.0
        gaussians.params["sh0"][25, 0, 0] = float("nan")
    keep = torch.ones(n1, dtype=torch.bool, device=device)
    keep[:15] = keep[20] = keep[25] = False
    kept_means = gaussians.params["means"][keep].detach().clone()
    counts = densifier.post_backward(gaussians.params, optimizers, 22, out.meta, lr_means=1e-3)
    assert counts == {"grown": 0, "pruned": 17, "count": n1 - 17}
    assert torch.equal(gaussians.params["means"].detach(), kept_means)
    assert float(gaussians.opacities.detach().min()) >= densifier.cfg.prune_opa
    _assert_optimizers_consistent(gaussians, optimizers)
    assert (densifier.n_grown, densifier.n_pruned) == (expected, 17)


def test_grow_window_grows_and_prune_window_only_prunes():
    _grow_then_prune("cpu", "torch")


def test_grow_window_refine_also_prunes():
    gaussians, optimizers, cameras, target = _scene(n=120)
    densifier = _densifier(grow_grad2d=1e9)  # nothing qualifies for growth
    n0 = len(gaussians)
    _iteration(densifier, gaussians, optimizers, cameras, target, 1)
    with torch.no_grad():
        gaussians.params["opacities"][:4] = math.log(0.001 / 0.999)
    _, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 2)
    assert counts == {"grown": 0, "pruned": 4, "count": n0 - 4}
    _assert_optimizers_consistent(gaussians, optimizers)


def test_full_run_follows_the_windows():
    gaussians, optimizers, cameras, target = _scene(n=80)
    n0, total = len(gaussians), 20  # blocks of 5: grow in [0, 10), prune-only in [10, 20), reset at 5
    cap = n0 + 120
    densifier = Densifier(
        DensifyConfig(grow_grad2d=10.0, prune_opa=0.045, refine_every=2, refine_start=2, max_gaussians=cap),
        scene_scale=1.0, total_iterations=total, n_intervals=2,
    )
    history = []
    for it in range(total):
        # From the reset on, the target is the white background: every Gaussian fades and gets pruned.
        goal = target if it < 5 else torch.ones_like(target)
        _, counts = _iteration(densifier, gaussians, optimizers, cameras, goal, it)
        history.append(counts)
        assert counts["count"] == len(gaussians) <= cap
        if counts["grown"] or counts["pruned"]:
            assert is_refine_step(it, 2, 2), it
    assert sum(c["grown"] for c in history[:10]) > 0
    assert all(c["grown"] == 0 for c in history[10:])  # prune-only once shrinking starts
    assert all(c["pruned"] == 0 for c in history[:10])  # opacities 0.31 -> 0.05 (reset) -> 0.044
    assert sum(c["pruned"] for c in history[10:]) > 0 and len(gaussians) >= 1
    assert densifier.n_resets == 1  # iteration 5, the one boundary inside the expanding phase
    assert densifier.n_grown == sum(c["grown"] for c in history)
    assert densifier.n_pruned == sum(c["pruned"] for c in history)
    assert len(gaussians) == n0 + densifier.n_grown - densifier.n_pruned


def test_reset_at_block_boundary_only():
    gaussians, optimizers, cameras, target = _scene()
    densifier = _densifier(refine_start=1000)  # no refine: only statistics and resets
    with torch.no_grad():
        gaussians.params["opacities"][:10] = math.log(0.02 / 0.98)  # already below the reset value
    below = torch.empty(10)
    _iteration(densifier, gaussians, optimizers, cameras, target, 9)
    assert float(gaussians.opacities.detach().max()) > 0.2  # iteration 9 is no boundary
    assert densifier.resets_at(10) and not densifier.resets_at(20) and not densifier.resets_at(0)
    _iteration(densifier, gaussians, optimizers, cameras, target, 10, before_post=below.copy_)
    opacity = gaussians.opacities.detach()
    assert torch.allclose(opacity[10:], torch.full_like(opacity[10:], 0.05), atol=1e-6)
    assert torch.all(below < 0.05) and torch.allclose(opacity[:10], below)  # a clamp: lower values stay
    state = optimizers["opacities"].state[gaussians.params["opacities"]]
    assert torch.all(state["exp_avg"] == 0) and torch.all(state["exp_avg_sq"] == 0)
    assert densifier.n_resets == 1
    _assert_optimizers_consistent(gaussians, optimizers)
    # Where shrinking starts (iteration 20) there is no reset.
    with torch.no_grad():
        gaussians.params["opacities"].fill_(math.log(0.5 / 0.5))
    out = render(gaussians, cameras, torch.ones(N_CAMS, 3))
    densifier.post_backward(gaussians.params, optimizers, 20, out.meta, lr_means=1e-3)
    assert torch.allclose(gaussians.opacities, torch.full_like(gaussians.opacities, 0.5))


def test_cap_limits_growth_to_highest_gradients():
    gaussians, optimizers, cameras, target = _scene()
    # Tiny threshold: every visible Gaussian is a candidate; large grow_scale3d: all duplicate (exact copies).
    densifier = _densifier(grow_grad2d=1e-6, grow_scale3d=100.0, prune_scale3d=1000.0, max_gaussians=len(gaussians) + 5)
    n0 = len(gaussians)
    grads = []
    _iteration(densifier, gaussians, optimizers, cameras, target, 1, grad_log=grads)
    before = gaussians.params["means"].detach().clone()
    _, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 2, grad_log=grads)
    assert counts["grown"] == 5 and counts["count"] == n0 + 5
    mean_grad = sum(g for g, _ in grads) / sum(c for _, c in grads).clamp_min(1)
    top5 = torch.topk(mean_grad, 5).indices
    # The copies are the top-5 Gaussians after this iteration's optimizer step.
    copies = gaussians.params["means"].detach()[-5:]
    originals = gaussians.params["means"].detach()[top5]
    assert torch.allclose(copies.sort(dim=0).values, originals.sort(dim=0).values)
    assert not torch.equal(before[top5], originals)  # sanity: they did train this step
    _iteration(densifier, gaussians, optimizers, cameras, target, 3)
    _, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 4)
    assert counts["grown"] == 0 and counts["count"] == n0 + 5  # at the cap
    _assert_optimizers_consistent(gaussians, optimizers)


def test_texture_only_and_none_are_frozen():
    gaussians, optimizers, cameras, target = _scene()
    with torch.no_grad():
        gaussians.params["opacities"][:5] = math.log(0.001 / 0.999)
    n0 = len(gaussians)
    frozen = Densifier(DensifyConfig(refine_every=2, refine_start=2), 1.0, TOTAL, N_INTERVALS, texture_only=True)
    none = Densifier(DensifyConfig(strategy="none"), 1.0, TOTAL, N_INTERVALS)
    for densifier in (frozen, none):
        assert densifier.window(2) == "frozen"
        densifier.check(gaussians.params, optimizers)
        out = render(gaussians, cameras, torch.ones(N_CAMS, 3))
        densifier.pre_backward(gaussians.params, optimizers, 10, out.meta)
        assert not out.meta["means2d"].retains_grad
        for it in (2, 10, 22):
            assert densifier.post_backward(gaussians.params, optimizers, it, out.meta, 1e-3) == \
                {"grown": 0, "pruned": 0, "count": n0}


def test_missing_pre_backward_is_a_clear_error():
    gaussians, optimizers, cameras, target = _scene(n=60)
    densifier = _densifier()
    out = render(gaussians, cameras, torch.ones(N_CAMS, 3))
    ((out.rgb - target) ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="call pre_backward"):
        densifier.post_backward(gaussians.params, optimizers, 1, out.meta, 1e-3)


def test_mcmc_on_cpu_is_a_clear_error():
    gaussians, optimizers, _, _ = _scene(n=60)
    densifier = Densifier(DensifyConfig(strategy="mcmc"), 1.0, TOTAL, N_INTERVALS)
    with pytest.raises(ValueError, match="mcmc.*needs CUDA"):
        densifier.check(gaussians.params, optimizers)


def test_check_rejects_a_wrong_optimizer_layout():
    gaussians, optimizers, _, _ = _scene(n=60)
    del optimizers["sh0"]
    with pytest.raises(ValueError, match="layout gsplat strategies need"):
        _densifier().check(gaussians.params, optimizers)


def test_state_dict_round_trip():
    gaussians, optimizers, cameras, target = _scene(n=120)
    densifier = _densifier(refine_every=4, refine_start=4)
    _iteration(densifier, gaussians, optimizers, cameras, target, 1)
    densifier.n_grown, densifier.n_pruned, densifier.n_resets = 7, 3, 1
    buffer = io.BytesIO()
    torch.save(densifier.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["grad2d"].shape == (len(gaussians),) and float(state["count"].sum()) > 0
    restored = _densifier(refine_every=4, refine_start=4)
    restored.load_state_dict(state)
    assert torch.equal(restored.state["grad2d"], densifier.state["grad2d"])
    assert torch.equal(restored.state["count"], densifier.state["count"])
    assert (restored.n_grown, restored.n_pruned, restored.n_resets) == (7, 3, 1)
    # Both continue identically.
    twin = Gaussians({k: v.detach().clone() for k, v in gaussians.params.items()}, gaussians.cfg)
    twin_opt = twin.make_optimizers()
    for name, opt in optimizers.items():
        twin_opt[name].load_state_dict(opt.state_dict())
    densifier.post_backward(gaussians.params, optimizers, 2, _accumulated_meta(gaussians, cameras, target), 1e-3)
    restored.post_backward(twin.params, twin_opt, 2, _accumulated_meta(twin, cameras, target), 1e-3)
    assert torch.allclose(restored.state["grad2d"], densifier.state["grad2d"])
    with pytest.raises(ValueError, match="strategy 'default'"):
        Densifier(DensifyConfig(strategy="none"), 1.0, TOTAL, N_INTERVALS).load_state_dict(state)


def _accumulated_meta(gaussians, cameras, target):
    out = render(gaussians, cameras, torch.ones(N_CAMS, 3))
    out.meta["means2d"].retain_grad()
    ((out.rgb - target) ** 2).sum().backward()
    return out.meta


# -- the same on CUDA with gsplat's rasterizer --------------------------------------------------


@pytest.mark.gpu
@gpu
def test_gsplat_default_strategy_grows_and_prunes_on_cuda():
    _grow_then_prune("cuda", "gsplat")


@pytest.mark.gpu
@gpu
def test_gsplat_mcmc_relocates_adds_and_prunes_on_cuda():
    gaussians, optimizers, cameras, target = _scene("cuda")
    densifier = Densifier(
        DensifyConfig(strategy="mcmc", refine_every=2, refine_start=2, prune_opa=0.005, max_gaussians=10_000),
        1.0, TOTAL, N_INTERVALS,
    )
    densifier.check(gaussians.params, optimizers)
    n0 = len(gaussians)
    with torch.no_grad():
        gaussians.params["opacities"][:10] = math.log(0.001 / 0.999)  # dead: relocated at the refine
    _iteration(densifier, gaussians, optimizers, cameras, target, 1, "gsplat")
    with torch.no_grad():
        gaussians.params["opacities"][:10] = math.log(0.001 / 0.999)
    _, counts = _iteration(densifier, gaussians, optimizers, cameras, target, 2, "gsplat")
    assert counts["grown"] == int(1.05 * n0) - n0 and counts["count"] == int(1.05 * n0)
    assert float(gaussians.opacities.detach().min()) >= 0.005 - 1e-6  # the dead ones moved onto live ones
    _assert_optimizers_consistent(gaussians, optimizers)
    # Prune window: MCMC neither relocates nor adds; low-opacity Gaussians are removed.
    n1 = len(gaussians)
    with torch.no_grad():
        gaussians.params["opacities"][:7] = math.log(0.001 / 0.999)
    out = render(gaussians, cameras, torch.ones(N_CAMS, 3, device="cuda"), backend="gsplat")
    counts = densifier.post_backward(gaussians.params, optimizers, 22, out.meta, lr_means=1e-3)
    assert counts == {"grown": 0, "pruned": 7, "count": n1 - 7}
    _assert_optimizers_consistent(gaussians, optimizers)

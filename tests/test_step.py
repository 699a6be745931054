"""One distillation step (recdreamer_gs.distill.step) on the synthetic prior: shapes, closed forms, clamps, NaN."""

import pytest
import torch

from recdreamer_gs.config import DistillConfig, RectifierConfig, SyntheticPriorConfig
from recdreamer_gs.priors.synthetic import KernelParticleScore, SyntheticPrior
from recdreamer_gs.distill import grads
from recdreamer_gs.distill.rectifier import Rectifier
from recdreamer_gs.distill.step import distill_step, same_camera_renders

P, B, RES = 2, 2, 16


@pytest.fixture(scope="module")
def prior():
    return SyntheticPrior(SyntheticPriorConfig(resolution=RES))


def make_z(prior, seed=0, requires_grad=True):
    """P·B samples near the mixture's centre (particle-major), as encoded renders would be."""
    g = torch.Generator().manual_seed(seed)
    centre = prior.means(torch.ones(1, 3), 1)[0].mean(0)
    z = centre + 0.3 * torch.randn(P * B, 3, RES, RES, generator=g)
    return z.requires_grad_(requires_grad)


def usd_parts(prior, **rect):
    d = DistillConfig(method="usd", guidance_scale=1.0, rectifier=RectifierConfig(**rect))
    rectifier = Rectifier(d.rectifier, prior.classify, prior.class_names, prior.num_train_timesteps, particles=P)
    return d, KernelParticleScore(prior.alphas_cumprod, 0.3), rectifier


def run(prior, d, score, rectifier, z, t=500, seed=1, iteration=0):
    tt = torch.full((z.shape[0],), t, dtype=torch.long)
    return distill_step(prior, score, rectifier, d, z, P, tt, torch.Generator().manual_seed(seed),
                        torch.ones(z.shape[0], 3), torch.eye(4).repeat(z.shape[0], 1, 1), iteration=iteration)


def test_usd_step_shapes_and_statistics(prior):
    d, score, rectifier = usd_parts(prior)
    z = make_z(prior)
    out = run(prior, d, score, rectifier, z)
    assert out.method == "usd"
    for g in (out.grad, out.grad_distill, out.grad_rect):
        assert g.shape == z.shape and torch.isfinite(g).all()
    assert out.probs.shape == (P * B, 4) and out.log_r.shape == (P * B,)
    assert not out.probs.requires_grad and not out.log_r.requires_grad
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(P * B))
    assert out.grad_rect.norm() > 0 and not bool(out.bad)
    torch.testing.assert_close(out.grad, out.grad_distill + out.grad_rect)
    # Step 9: the interval of t = 500 moved, once, towards the batch mean; the others did not.
    assert rectifier.stats.counts.tolist() == [0] * 5 + [1] + [0] * 4
    assert not torch.allclose(rectifier.stats.marginal[5], torch.full((4,), 0.25))
    assert set(out.log_terms(prior.class_names)) == {
        "grad/vsd_norm", "grad/rect_norm", "rect/log_r", "pose/front", "pose/left", "pose/back", "pose/right"}


def test_sds_gradient_equals_the_closed_form(prior):
    d = DistillConfig(method="sds", guidance_scale=1.0)
    z = make_z(prior)
    out = distill_step(prior, None, None, d, z, P, torch.full((P * B,), 300), torch.Generator().manual_seed(7),
                       torch.ones(P * B, 3))
    # ω(t)(ε̂ − ε) with ε̂ the mixture's exact ε (docs/synthetic-prior.md) and ε the step's draw.
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    abar = prior.alphas_cumprod[300]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * z.detach() + sigma * eps
    means = prior.means(torch.ones(P * B, 3), P * B)  # [N, K, 3, H, W]
    var = alpha**2 * prior.cfg.std**2 + sigma**2
    sq = ((x_t[:, None] - alpha * means) ** 2).flatten(2).sum(-1)
    w = torch.softmax(prior.log_weights - sq / (2 * var), dim=-1)  # posterior over the components
    eps_hat = sigma * (x_t - alpha * torch.einsum("nk,nkchw->nchw", w, means)) / var  # −σ ∇log p_t(x_t)
    torch.testing.assert_close(out.grad, sigma**2 * (eps_hat - eps), rtol=1e-4, atol=1e-6)
    assert out.probs is None and torch.equal(out.grad_rect, torch.zeros_like(z))
    assert set(out.log_terms(())) == {"grad/sds_norm", "grad/rect_norm"}


def test_vsd_uses_every_particles_render_at_the_same_camera(prior):
    z = torch.arange(P * B, dtype=torch.float32).view(P * B, 1, 1, 1).expand(P * B, 3, 2, 2)
    same = same_camera_renders(z, P)  # sample p·B + b sees particle q's view b at [q]
    assert same.shape == (P * B, P, 3, 2, 2)
    assert same[:, :, 0, 0, 0].tolist() == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_rectify_every_skips_the_rectifier_gradient_but_not_the_statistics(prior):
    d, score, rectifier = usd_parts(prior, rectify_every=2)
    skipped = run(prior, d, score, rectifier, make_z(prior), iteration=1)
    assert torch.equal(skipped.grad_rect, torch.zeros_like(skipped.grad_rect))
    assert skipped.probs is not None and int(rectifier.stats.counts.sum()) == 1
    rectified = run(prior, d, score, rectifier, make_z(prior), iteration=2)
    assert rectified.grad_rect.norm() > 0 and int(rectifier.stats.counts.sum()) == 2


def test_fresh_noise_draws_its_own_x_t(prior):
    d, score, rectifier = usd_parts(prior, noise="fresh")
    shared_d, _, shared_rect = usd_parts(prior)
    fresh = run(prior, d, score, rectifier, make_z(prior))
    shared = run(prior, shared_d, score, shared_rect, make_z(prior))
    torch.testing.assert_close(fresh.grad_distill, shared.grad_distill)  # same ε for step 5
    assert not torch.allclose(fresh.grad_rect, shared.grad_rect)  # ε' for step 6


def test_rectifier_cap_is_per_particle():
    """Two particles whose VSD gradients differ 100x: each rectifier gradient is capped by its own norm."""
    rect = Rectifier(RectifierConfig(gain=16384.0, norm_coef=1.0), lambda x, bg: x, ("a", "b", "c"))
    g_vsd = torch.cat([torch.full((B, 3, 4, 4), 0.01), torch.full((B, 3, 4, 4), 1.0)])  # particle-major
    g_rect = torch.randn(P * B, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = rect.clamp(g_rect, g_vsd, particles=P)
    for p in range(P):
        block = slice(p * B, (p + 1) * B)
        torch.testing.assert_close(out[block].norm(), g_vsd[block].norm())  # its own ‖g_vsd‖, not the batch's
        cos = torch.nn.functional.cosine_similarity(out[block].flatten(), g_rect[block].flatten(), dim=0)
        torch.testing.assert_close(cos, torch.tensor(1.0))  # direction kept
    # A whole-batch cap would let particle 0 take ~70x its own VSD norm.
    whole = grads.clamp_to_norm(g_rect, g_vsd, 16384.0, 1.0, particles=1)
    assert whole[:B].norm() > 50 * g_vsd[:B].norm()


def test_step_caps_each_particle_by_its_own_vsd_norm(prior):
    d, score, rectifier = usd_parts(prior, norm_coef=1.0)
    out = run(prior, d, score, rectifier, make_z(prior))
    for p in range(P):
        block = slice(p * B, (p + 1) * B)
        assert out.grad_rect[block].norm() <= out.grad_distill[block].norm() * (1 + 1e-5)


def test_no_nan_passes(prior):
    d, score, rectifier = usd_parts(prior)
    z = make_z(prior, requires_grad=False)
    z[0, 0, 0, 0] = float("nan")
    out = run(prior, d, score, rectifier, z.requires_grad_(True))
    assert torch.isfinite(out.grad).all() and not bool(out.bad)  # one bad pixel: zeroed, not divergence
    assert torch.isfinite(rectifier.stats.marginal).all()  # the statistics skip a non-finite batch
    nan = torch.full_like(z, float("nan")).requires_grad_(True)
    out = run(prior, d, score, rectifier, nan)
    assert torch.equal(out.grad, torch.zeros_like(nan)) and bool(out.bad)


def test_missing_components_are_clear_errors(prior):
    d, _, rectifier = usd_parts(prior)
    with pytest.raises(ValueError, match="needs ε_φ"):
        run(prior, d, None, rectifier, make_z(prior))
    with pytest.raises(ValueError, match="needs a Rectifier"):
        run(prior, d, KernelParticleScore(prior.alphas_cumprod, 0.3), None, make_z(prior))

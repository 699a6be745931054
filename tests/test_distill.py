"""Pure score-distillation maths (recdreamer_gs.distill.distill) against hand-computed values."""

from __future__ import annotations

import math

import torch

from recdreamer_gs.priors.diffusion import add_noise, alpha_sigma, cfg_combine, to_eps, tweedie_x0, v_to_eps
from recdreamer_gs.distill.grads import clamp_elements, clamp_to_norm, nan_to_zero, reparameterised_loss, sds_grad, vsd_grad, weight


def full(value: float, shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.full(shape, value)


def test_alpha_sigma_shapes_and_values():
    abar = torch.tensor([0.99, 0.64, 0.36, 0.01])
    alpha, sigma = alpha_sigma(abar, torch.tensor([1, 2, 3]))
    assert alpha.shape == sigma.shape == (3, 1, 1, 1)
    torch.testing.assert_close(alpha.flatten(), torch.tensor([0.8, 0.6, 0.1]))
    torch.testing.assert_close(sigma.flatten(), torch.tensor([0.6, 0.8, math.sqrt(0.99)]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, 1, 1, 1))


def test_add_noise_and_tweedie_invert_each_other():
    z, eps = full(0.5), full(-2.0)
    alpha, sigma = torch.tensor(0.8), torch.tensor(0.6)
    x_t = add_noise(z, eps, alpha, sigma)
    torch.testing.assert_close(x_t, full(0.8 * 0.5 + 0.6 * -2.0))  # -0.8
    torch.testing.assert_close(tweedie_x0(x_t, eps, alpha, sigma), z)
    torch.testing.assert_close(tweedie_x0(full(1.0), full(0.5), alpha, sigma), full((1.0 - 0.3) / 0.8))


def test_cfg_combine():
    out = cfg_combine(full(1.0), full(3.0), 7.5)
    torch.testing.assert_close(out, full(1.0 + 7.5 * 2.0))  # 16
    torch.testing.assert_close(cfg_combine(full(1.0), full(3.0), 1.0), full(3.0))  # s = 1: conditional
    torch.testing.assert_close(cfg_combine(full(1.0), full(3.0), 0.0), full(1.0))  # s = 0: unconditional


def test_sds_and_vsd_gradients():
    sigma = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    eps_hat = torch.stack([full(3.0)[0], full(1.0)[0]])
    eps = full(1.0, (2, 1, 2, 2))
    eps_phi = full(-1.0, (2, 1, 2, 2))
    torch.testing.assert_close(weight(sigma), sigma**2)
    sds = sds_grad(eps_hat, eps, sigma)  # σ²(ε̂ − ε): 0.25·2 and 4·0
    torch.testing.assert_close(sds[:, 0, 0, 0], torch.tensor([0.5, 0.0]))
    vsd = vsd_grad(eps_hat, eps_phi, sigma)  # σ²(ε̂ − ε_φ): 0.25·4 and 4·2
    torch.testing.assert_close(vsd[:, 0, 0, 0], torch.tensor([1.0, 8.0]))
    assert vsd.shape == (2, 1, 2, 2)


def test_clamp_to_norm():
    g_ref = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # ‖g_ref‖ = 5
    small = torch.tensor([0.01, 0.0]).view(1, 2, 1, 1)
    # gain 100 -> norm 1 < 5: kept as gain·g
    torch.testing.assert_close(clamp_to_norm(small, g_ref, gain=100.0, norm_coef=1.0), small * 100)
    big = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    # gain 16384 -> norm 16384 > 5: rescaled to norm 5 with direction kept
    out = clamp_to_norm(big, g_ref, gain=16384.0, norm_coef=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 5.0]).view(1, 2, 1, 1))
    out = clamp_to_norm(big, g_ref, gain=16384.0, norm_coef=0.5)
    torch.testing.assert_close(out.norm(), torch.tensor(2.5))
    # a zero reference caps the rectifier at zero, without NaN
    assert torch.equal(clamp_to_norm(big, torch.zeros_like(g_ref), 4.0, 1.0), torch.zeros_like(big))


def test_clamp_to_norm_per_particle():
    """Particle-major blocks: each capped at its own reference norm (the 2D check's clamp)."""
    g_ref = torch.ones(2, 3, 4, 4)
    g = torch.stack([torch.full((3, 4, 4), 10.0), torch.full((3, 4, 4), 0.1)])
    out = clamp_to_norm(g, g_ref, gain=1.0, norm_coef=1.0, particles=2)
    assert torch.allclose(out[0].norm(), g_ref[0].norm())  # capped
    assert torch.allclose(out[1], g[1])  # under the cap: unchanged


def test_clamp_elements():
    g = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    torch.testing.assert_close(clamp_elements(g, 1.0), torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    assert clamp_elements(g, 0.0) is g


def test_nan_to_zero():
    g = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -2.0])
    torch.testing.assert_close(nan_to_zero(g), torch.tensor([1.0, 0.0, 0.0, 0.0, -2.0]))


def test_reparameterised_loss_gradient_is_g_over_batch():
    g_gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 2, generator=g_gen, requires_grad=True)
    grad = torch.randn(3, 4, 2, 2, generator=g_gen)
    loss = reparameterised_loss(z, grad)
    # value: 0.5‖g‖² / B
    torch.testing.assert_close(loss, 0.5 * grad.square().sum() / 3)
    loss.backward()
    torch.testing.assert_close(z.grad, grad / 3)


def test_reparameterised_loss_divides_by_the_views_of_one_particle():
    # 2 particles x 3 views: each particle's gradient is g / 3, as in a single-particle run.
    g_gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, 2, 2, generator=g_gen, requires_grad=True)
    grad = torch.randn(6, 4, 2, 2, generator=g_gen)
    reparameterised_loss(z, grad, views=3).backward()
    torch.testing.assert_close(z.grad, grad / 3)


def test_v_to_eps_and_to_eps():
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    z, eps = full(0.5), full(-1.0)
    x_t = alpha * z + sigma * eps
    v = alpha * eps - sigma * z  # diffusers' get_velocity
    torch.testing.assert_close(v_to_eps(v, x_t, alpha, sigma), eps)
    torch.testing.assert_close(to_eps(v, x_t, alpha, sigma, "v_prediction"), eps)
    assert to_eps(eps, x_t, alpha, sigma, "epsilon") is eps
    # by hand: ε = α v + σ x_t = 0.6·2 + 0.8·1
    torch.testing.assert_close(v_to_eps(full(2.0), full(1.0), alpha, sigma), full(2.0))

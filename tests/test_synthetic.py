"""The synthetic prior: closed-form ε against autograd, Tweedie, class posterior, classifier."""

import pytest
import torch

from recdreamer_gs.config import SyntheticPriorConfig
from recdreamer_gs.priors.synthetic import (
    POSE_CLASSES,
    SyntheticPrior,
    component_views,
    _reference_views,
    mixture_eps,
    render_reference,
    mixture_log_prob,
)


@pytest.fixture(scope="module")
def prior() -> SyntheticPrior:
    return SyntheticPrior(SyntheticPriorConfig(resolution=32))


def test_front_class_owns_55_percent_of_components(prior):
    share = prior.class_prior()
    assert share[POSE_CLASSES.index("front")].item() == pytest.approx(11 / 20)
    assert torch.allclose(share[1:], torch.full((3,), 3 / 20))
    az, el, labels = component_views(SyntheticPriorConfig())
    assert len(labels) == 20 and az.shape == el.shape == (20,)


def test_reference_views_are_distinct_objects(prior):
    means = prior.means(torch.ones(1, 3), 1)[0]  # [K, 3, H, W]
    assert means.min() >= -1 - 1e-5 and means.max() <= 1 + 1e-5
    assert (prior.alpha.flatten(1).mean(1) > 0.1).all()  # the object covers the frame, not empty
    templates = means[prior.template_index]
    dist = torch.cdist(templates.flatten(1), templates.flatten(1))
    assert (dist + torch.eye(4) * 1e9).min() > 1.0  # front/left/back/right look different


def test_reference_renders_are_made_once_and_each_prior_owns_its_copy(prior):
    cfg = SyntheticPriorConfig(resolution=32)
    az, el, _ = component_views(cfg)
    hits = _reference_views.cache_info().hits
    colour, alpha = render_reference(cfg, az, el)
    assert _reference_views.cache_info().hits == hits + 1  # rendered when the prior was made, not again
    assert torch.equal(colour, prior.colour) and torch.equal(alpha, prior.alpha)  # the same renders ...
    colour.zero_()  # ... in a copy: a caller that writes into its own leaves the others' alone
    assert torch.equal(render_reference(cfg, az, el)[0], prior.colour) and prior.colour.abs().sum() > 0
    other = SyntheticPriorConfig(resolution=32, fovy=30.0)
    assert not torch.equal(render_reference(other, *component_views(other)[:2])[1], prior.alpha)


@pytest.mark.parametrize("t", [30, 300, 700, 950])
def test_closed_form_eps_equals_minus_sigma_score(prior, t):
    torch.manual_seed(t)
    bg = torch.rand(2, 3, dtype=torch.float64)
    means = prior.means(bg.float(), 2).double()
    abar = prior.alphas_cumprod.double()[t]
    alpha, sigma = abar.sqrt().repeat(2), (1 - abar).sqrt().repeat(2)
    x0 = means[:, 3] + 0.1 * torch.randn_like(means[:, 3])
    x_t = (alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)).requires_grad_(True)
    log_w = prior.log_weights.double()
    logp = mixture_log_prob(x_t, means, log_w, alpha, sigma, prior.cfg.std).sum()
    (score,) = torch.autograd.grad(logp, x_t)
    eps = mixture_eps(x_t.detach(), means, log_w, alpha, sigma, prior.cfg.std)
    expected = -sigma.view(-1, 1, 1, 1) * score
    assert torch.allclose(eps, expected, atol=1e-8, rtol=1e-6)


def test_prior_eps_matches_pure_function(prior):
    t = torch.tensor([400, 400])
    x_t = torch.randn(2, 3, 32, 32)
    bg = torch.rand(2, 3)
    out = prior.eps(x_t, t, guidance_scale=7.5, background=bg)  # CFG is a no-op without text
    abar = prior.alphas_cumprod[t]
    ref = mixture_eps(x_t, prior.means(bg, 2), prior.log_weights, abar.sqrt(), (1 - abar).sqrt(), prior.cfg.std)
    assert torch.allclose(out, ref)


def test_tweedie_at_small_t_recovers_nearest_component(prior):
    torch.manual_seed(0)
    bg = torch.ones(1, 3)
    means = prior.means(bg, 1)[0]
    t = torch.tensor([10])
    abar = prior.alphas_cumprod[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    for k in (0, 12, 15, 18):
        x_t = alpha * means[k : k + 1] + sigma * torch.randn(1, *means.shape[1:])
        eps = prior.eps(x_t, t, background=bg)
        x0_hat = (x_t - sigma * eps) / alpha
        dist = ((x0_hat - means) ** 2).flatten(1).mean(1)
        assert dist.argmin().item() == k
        # What is left is the noise σ/α·ε that the prior's own spread s cannot explain (≈ 0.003).
        assert dist[k] < 0.01 and dist.sort().values[1] > 2 * dist[k]


def test_class_posterior_and_template_classifier(prior):
    bg = torch.rand(4, 3)
    templates = prior.templates(bg, 4)  # [4, C, 3, H, W]
    images = templates[torch.arange(4), torch.arange(4)]
    probs = prior.classify(images, bg)
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert (probs.argmax(-1) == torch.arange(4)).all()
    assert probs.max() < 0.999  # τ keeps it from saturating
    t = torch.full((4,), 20)
    post = prior.class_posterior(images * prior.alphas_cumprod[20].sqrt(), t, bg)
    assert (post.argmax(-1) == torch.arange(4)).all()
    # Differentiable in the input (the rectifier needs this).
    x = images.clone().requires_grad_(True)
    prior.classify(x, bg)[:, 0].log().sum().backward()
    assert x.grad.abs().sum() > 0


def test_size_mismatch_is_a_clear_error(prior):
    with pytest.raises(ValueError, match="32x32"):
        prior.encode(torch.rand(1, 3, 64, 64))


def test_view_prompts_pull_towards_the_camera_class(prior):
    """With an azimuth (scale 1: the conditional branch alone),  ε̂ towards the components of that view's class."""
    from recdreamer_gs.priors.synthetic import azimuth_to_class

    assert azimuth_to_class(torch.tensor([0.0, 44.0, 90.0, 180.0, -170.0, -90.0, 300.0])).tolist() == [0, 0, 1, 2, 2, 3, 3]
    bg = torch.ones(1, 3)
    means = prior.means(bg, 1)[0]
    t = torch.tensor([600])
    abar = prior.alphas_cumprod[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * means[0:1] + sigma * torch.randn(1, *means.shape[1:])  # looks like a front view
    x0_back = (x_t - sigma * prior.eps(x_t, t, 1.0, bg, azimuth=torch.tensor([180.0]))) / alpha
    x0_none = (x_t - sigma * prior.eps(x_t, t, 1.0, bg)) / alpha
    back = means[prior.template_index[2]]
    assert ((x0_back - back) ** 2).mean() < ((x0_none - back) ** 2).mean()

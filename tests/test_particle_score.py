"""LoRA ε_φ on the tiny SD UNet: adapter/camera switching, training step, checkpoints, separate base."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from recdreamer_gs.cameras import look_at
from recdreamer_gs.priors.particle_score import (
    LoRAParticleScore, ParticleScoreConfig, lora_branch, lora_target,
)
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior
from recdreamer_gs.priors.diffusion import alpha_sigma



def load_prior(model) -> StableDiffusionPrior:
    return StableDiffusionPrior.load(str(model), "a kangaroo", ", from back view", "cpu", "fp32", 64)


@pytest.fixture
def prior(tiny_models) -> StableDiffusionPrior:
    """A fresh prior per test: LoRA adapters are added to its UNet in place."""
    return load_prior(tiny_models["sd"])




def cameras(azimuths) -> torch.Tensor:
    az = torch.tensor(azimuths, dtype=torch.float32)
    return look_at(az, torch.full_like(az, 15.0), torch.full_like(az, 2.5))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])


def pure_unet_eps(prior, x_t, t):
    with torch.no_grad():
        return prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding.expand(len(t), -1, -1)).sample


def train_steps(ps: LoRAParticleScore, n: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    opt = ps.make_optimizer(lr=lr)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for _ in range(n):
        loss = ps.lora_loss(z, cameras([0.0, 90.0]), g)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adapters_cover_every_attention_projection(prior):
    ps = LoRAParticleScore.from_prior(prior)
    names = [n for n, _ in prior.unet.named_parameters() if "lora_" in n]
    # tiny UNet: 3 transformer blocks (1 down, 2 up) x 2 attentions x (q, k, v, out) x (A, B)
    assert len(names) == 48
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert sum(f".{proj}.lora_A." in n for n in names) == 6
    params = ps.trainable_parameters()
    assert len(params) == 48 + 4  # + camera MLP (two Linear layers)
    assert all(p.dtype == torch.float32 for p in params)
    assert ps.camera.net[0].in_features == 16
    assert ps.camera.net[2].out_features == prior.unet.time_embedding.linear_2.out_features == 128
    opt = ps.make_optimizer()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-4
    assert opt.defaults["fused"] is True  # one kernel for every LoRA and camera weight
    # the UNet is not a submodule: nothing of it is counted, moved or saved with the particle score
    assert {n.split(".")[0] for n, _ in ps.named_parameters()} == {"camera"}


def test_fresh_eps_phi_is_pretrained_conditional_eps(prior):
    """Zero-initialised LoRA B and camera output layer: ε_φ starts as the frozen conditional ε."""
    ps = LoRAParticleScore.from_prior(prior)
    x_t, t = inputs()
    with torch.no_grad():
        eps_phi = ps.eps_phi(x_t, t, cameras([0.0, 180.0]))
    torch.testing.assert_close(eps_phi, pure_unet_eps(prior, x_t, t), atol=1e-6, rtol=1e-6)


def test_lora_branch_toggles_and_restores(prior):
    x_t, t = inputs()
    eps_hat_before = prior.eps(x_t, t, 7.5).detach()
    reference = pure_unet_eps(prior, x_t, t)
    ps = LoRAParticleScore.from_prior(prior)
    train_steps(ps)
    with torch.no_grad():
        with lora_branch(prior.unet, ps.camera):
            assert prior.unet.class_embedding is ps.camera
            inside = prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding.expand(2, -1, -1),
                                class_labels=cameras([0.0, 90.0]).reshape(2, 16)).sample
        assert prior.unet.class_embedding is None
        after = pure_unet_eps(prior, x_t, t)
        eps_hat_after = prior.eps(x_t, t, 7.5)
    assert (inside - reference).abs().max() > 1e-4  # adapters and camera act inside
    assert torch.equal(after, reference)  # exactly the frozen UNet after exit
    assert torch.equal(eps_hat_after, eps_hat_before)
    # restored even when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with lora_branch(prior.unet, ps.camera):
            raise RuntimeError("boom")
    assert prior.unet.class_embedding is None and torch.equal(pure_unet_eps(prior, x_t, t), reference)


def test_branch_switches_only_the_adapter_flag(prior):
    """The adapter weights stay trainable in and out of the branch (no per-weight requires_grad loops);
    outside it peft's layers run the base projection alone."""
    ps = LoRAParticleScore.from_prior(prior)
    layers = ps._handles.layers
    assert all(layer.disable_adapters for layer in layers)
    assert all(p.requires_grad for p in ps.trainable_parameters())
    with lora_branch(prior.unet, ps.camera, ps._handles):
        assert not any(layer.disable_adapters for layer in layers)
        assert all(p.requires_grad for p in ps.trainable_parameters())
    assert all(layer.disable_adapters for layer in layers)
    assert all(p.requires_grad for p in ps.trainable_parameters())


def test_fused_adamw_steps_like_the_loop(prior):
    """The fused AdamW of make_optimizer gives the per-weight loop's update."""
    ps = LoRAParticleScore.from_prior(prior)
    params = ps.trainable_parameters()
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    results = []
    for opt in (ps.make_optimizer(1e-2), torch.optim.AdamW(params, lr=1e-2, foreach=False)):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nested_branch_is_refused(prior):
    ps = LoRAParticleScore.from_prior(prior)
    with lora_branch(prior.unet, ps.camera):
        with pytest.raises(RuntimeError, match="expected a UNet without class embedding"):
            with lora_branch(prior.unet, ps.camera):
                pass


def test_camera_changes_eps_phi_only_inside_branch(prior):
    ps = LoRAParticleScore.from_prior(prior)
    train_steps(ps)
    x_t, t = inputs(1)
    with torch.no_grad():
        front = ps.eps_phi(x_t, t, cameras([0.0, 0.0]))
        back = ps.eps_phi(x_t, t, cameras([180.0, 180.0]))
        again = ps.eps_phi(x_t, t, cameras([0.0, 0.0]))
    assert (front - back).abs().max() > 1e-5
    assert torch.equal(front, again)
    # the camera MLP is not installed outside the branch: the frozen pass takes no labels
    assert prior.unet.class_embedding is None
    with pytest.raises(ValueError, match="class_labels should be provided"):
        prior.unet.class_embedding = ps.camera
        try:
            prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding.expand(2, -1, -1))
        finally:
            prior.unet.class_embedding = None


def test_lora_step_changes_lora_not_frozen_unet(prior):
    ps = LoRAParticleScore.from_prior(prior)
    frozen = {n: p.detach().clone() for n, p in prior.unet.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in prior.unet.named_parameters() if "lora_B" in n}
    camera = [p.detach().clone() for p in ps.camera.parameters()]
    opt = ps.make_optimizer()
    loss = ps.lora_loss(torch.randn(2, 4, 8, 8), cameras([30.0, -60.0]), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    opt.step()
    assert all(p.grad is None for n, p in prior.unet.named_parameters() if "lora_" not in n)
    for n, p in prior.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in prior.unet.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])]
    assert len(changed) == len(lora_b)  # every B moves on its first step (A gets no gradient while B = 0)
    assert not torch.equal(ps.camera.net[2].weight, camera[2])


def test_lora_loss_regresses_eps_or_v_and_drops_camera():
    z, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    alpha, sigma = torch.tensor(0.8).view(1, 1, 1, 1), torch.tensor(0.6).view(1, 1, 1, 1)
    assert torch.equal(lora_target(z, noise, alpha, sigma, "epsilon"), noise)
    torch.testing.assert_close(lora_target(z, noise, alpha, sigma, "v_prediction"), 0.8 * noise - 0.6 * z)


def test_camera_dropout_zeroes_the_pose(prior):
    ps = LoRAParticleScore.from_prior(prior, ParticleScoreConfig(camera_dropout=1.0))
    train_steps(ps)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = ps.lora_loss(z, cameras([0.0, 0.0]), torch.Generator().manual_seed(5))
        b = ps.lora_loss(z, cameras([120.0, 240.0]), torch.Generator().manual_seed(5))
        ps.cfg.camera_dropout = 0.0
        c = ps.lora_loss(z, cameras([120.0, 240.0]), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # every pose zeroed: the camera cannot matter
    assert not torch.equal(b, c)


def test_state_dict_round_trip_reproduces_eps_phi(prior, tiny_models):
    ps = LoRAParticleScore.from_prior(prior)
    train_steps(ps)
    x_t, t = inputs(2)
    c2w = cameras([45.0, 200.0])
    with torch.no_grad():
        expected = ps.eps_phi(x_t, t, c2w)
    state = ps.state_dict()
    assert set(k.split(".")[0] for k in state) == {"lora", "camera"}
    assert len([k for k in state if k.startswith("lora.")]) == 48
    assert not any("eps_phi" in k for k in state)  # peft's adapter-name-free keys

    fresh = LoRAParticleScore.from_prior(load_prior(tiny_models["sd"]))
    with torch.no_grad():
        assert not torch.equal(fresh.eps_phi(x_t, t, c2w), expected)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh.eps_phi(x_t, t, c2w), expected)

    # nested in a parent module (as in a LightningModule), strict loading reports missing LoRA keys
    parent, other = nn.Module(), nn.Module()
    parent.eps_phi, other.eps_phi = ps, LoRAParticleScore.from_prior(load_prior(tiny_models["sd"]))
    assert all(k.startswith("eps_phi.") for k in parent.state_dict())
    other.load_state_dict(parent.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eps_phi.eps_phi(x_t, t, c2w), expected)
    partial = {k: v for k, v in parent.state_dict().items() if ".to_q." not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(partial)


def test_separate_base_v_prediction(prior, vpred_folder):
    cfg = ParticleScoreConfig(base="separate", separate_model=str(vpred_folder))
    ps = LoRAParticleScore.from_prior(prior, cfg)
    assert ps.unet is not prior.unet and ps.prediction_type == "v_prediction"
    assert not getattr(prior.unet, "_hf_peft_config_loaded", False)  # the prior's UNet has no adapters
    train_steps(ps)
    x_t, t = inputs(3)
    c2w = cameras([10.0, 100.0])
    with torch.no_grad():
        v = ps.predict(x_t, t, c2w)
        eps = ps.eps_phi(x_t, t, c2w)
    alpha, sigma = alpha_sigma(ps.alphas_cumprod, t)
    torch.testing.assert_close(eps, alpha * v + sigma * x_t, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs separate_model"):
        LoRAParticleScore.from_prior(prior, ParticleScoreConfig(base="separate"))

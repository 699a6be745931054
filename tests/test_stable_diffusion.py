"""StableDiffusionPrior on the tiny random-weight SD folder (real from_pretrained code paths, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recdreamer_gs import hub
from recdreamer_gs.hub import ModelUnavailable
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior, resolve_dtype
from recdreamer_gs.usd.distill import alpha_sigma

PROMPT, AUX = "a kangaroo wearing boxing gloves", ", from side view, from back view"



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and OpenMP threads stall for seconds on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def load(model) -> StableDiffusionPrior:
    return StableDiffusionPrior.load(str(model), PROMPT, AUX, device="cpu", dtype="auto", latent_resolution=64)


@pytest.fixture(scope="module")
def prior(tiny_models) -> StableDiffusionPrior:
    return load(tiny_models["sd"])




def fake_hub_cache(hf_home: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source`` out as a cached Hub snapshot under ``hf_home`` (what a finished download leaves)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def sd_status(model) -> hub.Status:
    return hub.status(hub.ModelSpec(hub.SD_PIPELINE, str(model)))


# ---- loading ---------------------------------------------------------------------------------


def test_load_local_folder(prior):
    assert prior.name.endswith("sd")
    assert prior.prompt == PROMPT + AUX
    assert prior.num_train_timesteps == 1000
    assert prior.prediction_type == "epsilon"
    # SD's scaled-linear schedule: ᾱ_0 = 1 − 0.00085, decreasing, ᾱ_999 ≈ 0.0047
    assert prior.alphas_cumprod.shape == (1000,)
    assert prior.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert prior.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=2e-4)
    assert bool((prior.alphas_cumprod[1:] < prior.alphas_cumprod[:-1]).all())
    assert prior.dtype == torch.float32 and prior.device.type == "cpu"
    for module in (prior.unet, prior.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert prior.cond_embedding.shape == prior.uncond_embedding.shape == (1, 77, 32)
    assert not torch.allclose(prior.cond_embedding, prior.uncond_embedding)
    assert sd_status(prior.name).complete


def test_missing_folder(tmp_path):
    model = str(tmp_path / "no-such-sd")
    with pytest.raises(ModelUnavailable) as info:
        load(model)
    message = str(info.value)
    assert model in message and "not found" in message and "\n" not in message
    assert "--model PATH" in message and "--prior synthetic" in message
    assert not sd_status(model).complete and "no folder" in sd_status(model).where()


def test_incomplete_folder(tiny_models, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    shutil.rmtree(folder / "unet")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert sd_status(folder).missing == ["unet/", "weights in vae/ (*.safetensors or *.bin)"]
    with pytest.raises(ModelUnavailable) as info:
        load(folder)
    message = str(info.value)
    assert str(folder) in message and "incomplete" in message and "unet/" in message
    assert "--model PATH" in message and "--prior synthetic" in message


def test_unknown_repo_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model = "nobody-here/no-such-diffusion-model"
    with pytest.raises(ModelUnavailable) as info:
        load(model)
    message = str(info.value)
    assert model in message and "offline" in message and "not in the Hugging Face cache" in message
    assert "--model PATH" in message and "--prior synthetic" in message and "models --download" in message


def test_repo_from_hub_cache_offline(tiny_models, monkeypatch, tmp_path):
    """A repo id resolves to a complete snapshot in HF_HOME's cache without any network access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    fake_hub_cache(tmp_path / "hf", "tiny/sd", tiny_models["sd"])
    assert sd_status("tiny/sd").complete and "Hugging Face cache" in sd_status("tiny/sd").where()
    prior = load("tiny/sd")
    assert prior.name == "tiny/sd" and prior.cond_embedding.shape == (1, 77, 32)

    snapshot = fake_hub_cache(tmp_path / "hf", "tiny/partial", tiny_models["sd"])
    shutil.rmtree(snapshot / "unet")
    with pytest.raises(ModelUnavailable, match=r"'tiny/partial'.*offline.*incomplete download.*unet/"):
        load("tiny/partial")


def test_fp16_variant_files_load_with_their_variant(tiny_models, tmp_path):
    """A folder holding only the fp16 variant weights (what a half-precision download fetches) loads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path / "sd16"
    shutil.copytree(tiny_models["sd"], folder)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(folder / sub, torch_dtype=torch.float16)
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(folder / sub, variant="fp16")
    st = hub.status(hub.ModelSpec(hub.SD_PIPELINE, str(folder), half=True))
    assert st.complete and st.variants == {"text_encoder": "fp16", "unet": "fp16", "vae": "fp16"}
    prior = load(folder)  # on CPU: fp32 from the fp16 files
    assert prior.dtype == torch.float32
    reference = load(tiny_models["sd"])
    for a, b in zip(prior.unet.parameters(), reference.unet.parameters()):
        torch.testing.assert_close(a, b.half().float())


def test_template_sampler_uses_the_pipeline_scheduler_config(tiny_models, tmp_path):
    """DDIM for templates comes from the pipeline's scheduler config: its betas and its final ᾱ."""
    import json

    prior = load(tiny_models["sd"])
    ddim = prior.ddim_scheduler(10)
    torch.testing.assert_close(ddim.alphas_cumprod.float(), prior.alphas_cumprod.cpu())
    assert float(ddim.final_alpha_cumprod) == pytest.approx(float(prior.alphas_cumprod[0]))  # set_alpha_to_one false
    assert int(ddim.timesteps[-1]) == 1  # steps_offset 1, as in SD's config
    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, set_alpha_to_one=True, steps_offset=0)
    path.write_text(json.dumps(config))
    other = load(folder)
    ddim = other.ddim_scheduler(10)
    assert not torch.allclose(other.alphas_cumprod, prior.alphas_cumprod)
    torch.testing.assert_close(ddim.alphas_cumprod.float(), other.alphas_cumprod.cpu())
    assert float(ddim.final_alpha_cumprod) == 1.0 and int(ddim.timesteps[-1]) == 0
    images = other.sample("front", 1, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 64) and images.abs().max() <= 1


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="expected one of"):
        resolve_dtype("fp8", torch.device("cpu"))  # type: ignore[arg-type]


# ---- encode / decode -------------------------------------------------------------------------


def test_encode_decode_shapes_and_gradient(prior):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)  # resized to latent_resolution 64 first
    z = prior.encode(images, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    z.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in prior.vae.parameters())
    x = prior.decode(z.detach())
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()


def test_encode_is_scaled_posterior_sample(prior):
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        z = prior.encode(images, generator=torch.Generator().manual_seed(3))
        posterior = prior.vae.encode(images * 2 - 1).latent_dist
        expected = posterior.sample(generator=torch.Generator().manual_seed(3)) * prior.vae.config.scaling_factor
    torch.testing.assert_close(z, expected)


# ---- ε̂ ---------------------------------------------------------------------------------------


def test_eps_cfg_matches_two_separate_unet_calls(prior):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 700])
    s = 7.5
    with torch.no_grad():
        eps_hat = prior.eps(x_t, t, s)
        eps_u = prior.unet(x_t, t, encoder_hidden_states=prior.uncond_embedding.expand(2, -1, -1)).sample
        eps_y = prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding.expand(2, -1, -1)).sample
    assert eps_hat.shape == (2, 4, 8, 8)
    assert not torch.allclose(eps_u, eps_y)
    torch.testing.assert_close(eps_hat, eps_u + s * (eps_y - eps_u), atol=1e-5, rtol=1e-5)


def test_eps_converts_v_prediction(vpred_folder):
    prior = load(vpred_folder)
    assert prior.prediction_type == "v_prediction"
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([400])
    with torch.no_grad():
        v_u = prior.unet(x_t, t, encoder_hidden_states=prior.uncond_embedding).sample
        v_y = prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding).sample
        eps_hat = prior.eps(x_t, t, 3.0)
    alpha, sigma = alpha_sigma(prior.alphas_cumprod, t)
    v = v_u + 3.0 * (v_y - v_u)
    torch.testing.assert_close(eps_hat, alpha * v + sigma * x_t, atol=1e-5, rtol=1e-5)


def test_eps_gradient_reaches_x_t_not_weights(prior):
    x_t = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps_hat = prior.eps(x_t, torch.tensor([100, 900]), 7.5)
    assert eps_hat.requires_grad
    eps_hat.square().sum().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.unet.parameters())
    with torch.no_grad():
        assert not prior.eps(x_t, torch.tensor([100, 900]), 7.5).requires_grad

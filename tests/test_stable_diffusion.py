"""StableDiffusionPrior on the tiny random-weight SD folder (real from_pretrained code paths, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recdreamer_gs import hub
from recdreamer_gs.hub import ModelUnavailable
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior, resolve_dtype
from recdreamer_gs.priors.diffusion import alpha_sigma

PROMPT, AUX = "a kangaroo wearing boxing gloves", ", from side view, from back view"



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


def test_template_sampler_never_clips_latents(tiny_models, tmp_path):
    """A PNDM config as newer diffusers write it has no clip_sample (the stand-in's is one; SD's own says false):
    DDIM built from it defaulted to clip_sample=True and clipped x̂0 to [-1, 1], which ruins latents (SD's span
    about ±4) and drew templates that looked like nothing."""
    import json

    from diffusers import PNDMScheduler

    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    shutil.rmtree(folder / "scheduler")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    assert "clip_sample" not in json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ddim = load(folder).ddim_scheduler(4)
    assert ddim.config.clip_sample is False
    # One step from far outside [-1, 1]: x̂0 is kept as it is, so the step lands where the unclipped maths says.
    x = torch.full((1, 4, 8, 8), -3.0)
    eps = torch.zeros_like(x)
    t = ddim.timesteps[-1]
    prev = ddim.step(eps, t, x).prev_sample
    abar = ddim.alphas_cumprod[int(t)]
    torch.testing.assert_close(prev, x / abar.sqrt() * ddim.final_alpha_cumprod.sqrt())


def test_render_size_is_read_from_the_model(tiny_models):
    """No SD 2.1 number is assumed: without latent_resolution the prior takes the model's own size (UNet
    sample_size x VAE downsampling, both read from the configs), and a size the VAE cannot divide is refused."""
    from recdreamer_gs.errors import ModelMismatch, UserError

    native = StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, device="cpu")
    assert native.vae_downscale == 8 and native.latent_resolution == 8 * 8 and native.latent_shape == (4, 8, 8)
    assert native.encode(torch.rand(1, 3, 40, 40)).shape == (1, 4, 8, 8)
    with pytest.raises(ModelMismatch, match=r"expected a multiple of 8 .*got 60") as err:
        StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, device="cpu", latent_resolution=60)
    assert isinstance(err.value, UserError)


def test_a_unet_that_cannot_take_the_vae_latents_is_refused():
    from types import SimpleNamespace

    from recdreamer_gs.errors import ModelMismatch
    from recdreamer_gs.priors.stable_diffusion import check_model_sizes

    vae = SimpleNamespace(latent_channels=4)
    good = SimpleNamespace(in_channels=4, out_channels=4, sample_size=8)
    assert check_model_sizes(good, vae, 4, None, "m") == 32 and check_model_sizes(good, vae, 4, 48, "m") == 48
    with pytest.raises(ModelMismatch, match="takes 16 and predicts 4 channels but the VAE's latents have 4"):
        check_model_sizes(SimpleNamespace(in_channels=16, out_channels=4, sample_size=8), vae, 4, None, "m")


def test_sampler_draws_the_run_prompt_or_a_view_prompt(prior):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same start noise for both
    run_prompt = prior.sample(None, 2, steps=2, generator=g())
    front = prior.sample("front", 2, steps=2, generator=g())
    assert run_prompt.shape == front.shape == (2, 3, 64, 64)
    assert not torch.allclose(run_prompt, front)  # different text, different images


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # Ampere and newer
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # Turing, Volta
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16
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


# ---- precision, memory layout, tiny decoder ---------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_vae_and_unet_stay_close_to_fp32(tiny_models, prior):
    """bf16 keeps fp32's exponent range (no overflow in the VAE, unlike fp16): encode, decode, ε̂ and the
    encoder's gradient stay within bf16 rounding of fp32."""
    low = StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, "cpu", "bf16", 64)
    assert low.dtype == torch.bfloat16 and next(low.vae.parameters()).dtype == torch.bfloat16
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    grads = []
    for p in (prior, low):
        x = images.clone().requires_grad_(True)
        z = p.encode(x, generator=torch.Generator().manual_seed(5))
        z.square().sum().backward()
        grads.append((z.detach(), x.grad))
    (z32, g32), (z16, g16) = grads
    assert z16.dtype == torch.float32  # latents leave the prior in fp32 whatever it runs in
    # bf16 keeps 8 mantissa bits (0.4% per rounding); through the VAE's ~20 layers that adds up to about 3% on
    # the decode and the encoder's gradient (0.026-0.033 over six inputs, diffusers 0.42). A wrong cast or an
    # overflow gives inf/NaN or an O(1) gap, far above these bounds.
    assert torch.isfinite(g16).all() and relative(z16, z32) < 0.03 and relative(g16, g32) < 0.05
    with torch.no_grad():
        assert relative(low.decode(z32), prior.decode(z32)) < 0.06
        x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)), torch.tensor([100, 800])
        assert relative(low.eps(x_t, t, 1.0), prior.eps(x_t, t, 1.0)) < 0.03  # CFG 7.5 scales the gap 7.5x


def test_channels_last_changes_layout_not_values(tiny_models, prior):
    cl = StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, "cpu", "fp32", 64, channels_last=True)
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x_t, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500])
    with torch.no_grad():
        for p_cl, p in ((cl, prior),):
            torch.testing.assert_close(p_cl.eps(x_t, t, 7.5), p.eps(x_t, t, 7.5), rtol=1e-4, atol=1e-5)
            z = p.encode(images, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(p_cl.encode(images, generator=torch.Generator().manual_seed(3)), z,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p_cl.decode(z), p.decode(z), rtol=1e-4, atol=1e-5)


def test_tiny_decoder_decodes_x0_and_templates_keep_the_full_vae(tiny_models, prior):
    tiny = StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, "cpu", "fp32", 64,
                                     tiny_decoder=str(tiny_models["taesd"]))
    assert type(tiny.tiny_decoder).__name__ == "AutoencoderTiny"
    assert not any(p.requires_grad for p in tiny.tiny_decoder.parameters())
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = tiny.decode(z)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    x.square().sum().backward()  # the rectifier differentiates through it
    assert z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        # TAESD reads the diffusion-space latents directly (scaling factor 1): nothing rescales them
        expected = tiny.tiny_decoder.decode(z / tiny.tiny_decoder.config.scaling_factor).sample
        torch.testing.assert_close(tiny.decode(z), expected)
        assert not torch.allclose(tiny.decode(z), prior.decode(z), atol=1e-2)
        torch.testing.assert_close(tiny.decode_full(z), prior.decode(z))  # the full VAE is still there
    images = tiny.sample("front", 1, steps=2, generator=torch.Generator().manual_seed(0))
    reference = prior.sample("front", 1, steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, reference)  # templates come from the full VAE


def test_missing_tiny_decoder_is_one_clear_error(tiny_models, tmp_path):
    with pytest.raises(ModelUnavailable) as info:
        StableDiffusionPrior.load(str(tiny_models["sd"]), PROMPT, AUX, "cpu", "fp32", 64,
                                  tiny_decoder=str(tmp_path / "no-taesd"))
    message = str(info.value)
    assert "Tiny decoder (AutoencoderTiny)" in message and "prior.sd.tiny_decoder=null" in message
    assert "\n" not in message


def test_view_index_without_boolean_masks():
    from recdreamer_gs.priors.stable_diffusion import view_index

    az = torch.tensor([0.0, 44.0, -45.0, 46.0, 90.0, -134.0, 135.0, 180.0, -180.0, 225.0, 315.0, 360.0])
    assert view_index(az).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 0]

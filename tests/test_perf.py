"""Compiled network passes (recdreamer_gs.perf): compiled and eager runs give the same values and gradients,
nothing recompiles from one iteration to the next, ``auto`` compiles only long CUDA runs, and the synthetic
prior is unaffected. Compiling on a CPU is slow, so the plumbing runs through ``aot_eager`` (the same
captured graphs, no code generation), the CLI run through ``eager``, and one test compiles with Inductor."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from recdreamer_gs import perf
from recdreamer_gs.cameras import look_at
from recdreamer_gs.cli import app
from recdreamer_gs.config import PerfConfig, PoseClassifierConfig
from recdreamer_gs.distill.grads import reparameterised_loss
from recdreamer_gs.export import read_ply
from recdreamer_gs.pose.classifier import PoseClassifier
from recdreamer_gs.pose.features import DinoFeatures
from recdreamer_gs.priors.diffusion import add_noise, alpha_sigma, tweedie_x0
from recdreamer_gs.priors.particle_score import LoRAParticleScore
from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_auto_compiles_long_cuda_runs_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = PerfConfig()
    assert auto.compile == "auto" and auto.compile_min_steps == 300
    assert perf.should_compile(auto, cuda, 300) and perf.should_compile(auto, cuda, 5000)
    assert not perf.should_compile(auto, cuda, 299)
    assert not perf.should_compile(auto, cpu, 5000)
    assert perf.should_compile(PerfConfig(compile="on"), cpu, 1)
    assert not perf.should_compile(PerfConfig(compile="off"), cuda, 5000)
    timings: dict = {}
    assert perf.make_compiler(auto, cpu, 5000, timings=timings) is None and timings == {"compile_s": 0.0}


# ---- the networks of an iteration ---------------------------------------------------------------


def lora_with_random_weights(prior) -> LoRAParticleScore:
    """LoRA ε_φ whose adapters and camera MLP are non-zero, so that every weight gets a gradient."""
    ps = LoRAParticleScore.from_prior(prior)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ps.trainable_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return ps


def networks(tiny_models, device: str = "cpu"):
    """Tiny SD prior (fp32), LoRA ε_φ with random adapters, and a DINOv2 pose classifier."""
    prior = StableDiffusionPrior.load(str(tiny_models["sd"]), "a kangaroo", ", from back view", device, "fp32", 64)
    ps = lora_with_random_weights(prior)
    feats = DinoFeatures.load(str(tiny_models["dinov2"]), device=device)
    g = torch.Generator().manual_seed(0)
    images = {name: [torch.rand(3, 64, 64, generator=g) * 2 - 1] for name in ("front", "back", "left", "right")}
    pcfg = PoseClassifierConfig(input_size=112, grid_size=8, template_size=64, n_augment=2, augment_batch=2)
    classifier = PoseClassifier.from_templates(feats, images, pcfg, torch.Generator().manual_seed(1)).to(device)
    return prior, ps, classifier


def iteration(prior, ps, classifier, rectify: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every compiled pass once, as an iteration calls them (encode, ε̂, ε_φ, decode, classify, LoRA
    loss), with the gradients that flow back through them."""
    device = prior.device
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    az = torch.tensor([30.0, 200.0])
    c2w = look_at(az, torch.full_like(az, 15.0), torch.full_like(az, 2.5)).to(device)
    t = torch.tensor([400, 400], device=device)
    z = prior.encode(images, generator=g)
    alpha, sigma = alpha_sigma(prior.alphas_cumprod, t)
    x_t = add_noise(z if rectify else z.detach(), torch.randn(z.shape, generator=g, device=device), alpha, sigma)
    with torch.set_grad_enabled(rectify):
        eps_hat = prior.eps(x_t, t, 7.5)
    with torch.no_grad():
        eps_phi = ps.eps_phi(x_t.detach(), t, c2w)
    grad = eps_hat.detach() - eps_phi
    with torch.set_grad_enabled(rectify):
        probs = classifier(prior.decode(tweedie_x0(x_t, eps_hat, alpha, sigma)))
    out = {"z": z.detach(), "eps_hat": eps_hat.detach(), "eps_phi": eps_phi, "probs": probs.detach()}
    if rectify:
        (g_rect,) = torch.autograd.grad(torch.log(probs[:, 0]).sum(), z)
        out["g_rect"] = g_rect
        grad = grad + g_rect
    reparameterised_loss(z, grad).backward()
    out["image_grad"] = images.grad
    loss = ps.lora_loss(z, c2w, generator=g)
    loss.backward()
    out["lora_loss"] = loss.detach()
    for i, p in enumerate(ps.trainable_parameters()):
        out[f"lora_grad_{i}"] = p.grad.clone()
        p.grad = None
    return out


def assert_same(compiled: dict, eager: dict, rtol: float) -> None:
    assert compiled.keys() == eager.keys()
    for key, ref in eager.items():
        err = (compiled[key] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= rtol, f"{key}: relative error {float(err):.2e} > {rtol}"


def test_compiled_passes_match_eager_and_never_recompile(tiny_models):
    prior, ps, classifier = networks(tiny_models)
    eager = {rectify: iteration(prior, ps, classifier, rectify) for rectify in (True, False)}
    lines: list[str] = []
    timings: dict = {}
    compiler = perf.Compiler(torch.device("cpu"), backend="aot_eager", echo=lines.append, timings=timings)
    try:
        names = perf.compile_networks(compiler, prior, ps, classifier, None)
        assert names == ["UNet CFG pass", "VAE encoder", "VAE decoder", "ε_φ pass", "LoRA step", "pose classifier"]
        for rectify in (True, False):
            assert_same(iteration(prior, ps, classifier, rectify), eager[rectify], rtol=1e-4)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert compiler.seconds > 0 and timings["compile_s"] == pytest.approx(compiler.seconds)
        assert any(line.startswith("compiling UNet CFG pass") for line in lines), lines
        assert any(line.startswith("compiled LoRA step in") for line in lines), lines
        # The adapters switch on and off between the frozen pass and the LoRA passes, grad modes alternate
        # with rectify_every: once each variant is compiled, later iterations reuse it.
        torch._dynamo.config.error_on_recompile = True
        seconds = compiler.seconds
        for rectify in (True, False, True):
            iteration(prior, ps, classifier, rectify, seed=5)
        assert compiler.seconds == seconds
    finally:
        compiler.close()
    # The frozen pass is still the pure pretrained UNet after all that switching.
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        pure = prior.unet(x_t, t, encoder_hidden_states=prior.cond_embedding).sample
        torch.testing.assert_close(perf.eager(prior._eps_pair)(x_t, t, prior.cond_embedding)[1], pure)


@pytest.mark.slow
def test_inductor_lora_step_gradients_match_eager(tiny_models):
    """One real Inductor compile (generated C++ kernels): the LoRA step's loss and every LoRA and camera
    gradient within 1e-4 relative of eager (its forward is a whole UNet pass with adapters and camera)."""
    prior = StableDiffusionPrior.load(str(tiny_models["sd"]), "a kangaroo", ", from back view", "cpu", "fp32", 64)
    ps = lora_with_random_weights(prior)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    az = torch.tensor([30.0, 200.0])
    c2w = look_at(az, torch.full_like(az, 15.0), torch.full_like(az, 2.5))

    def step() -> list[torch.Tensor]:
        loss = ps.lora_loss(z, c2w, generator=torch.Generator().manual_seed(3))
        loss.backward()
        out = [loss.detach()] + [p.grad.clone() for p in ps.trainable_parameters()]
        for p in ps.trainable_parameters():
            p.grad = None
        return out

    eager = step()
    compiler = perf.Compiler(torch.device("cpu"), backend="inductor")
    # What the C++ compiler gets is made cheap; what Inductor generates stays its own (on a GPU it writes Triton):
    # - scalar kernels: without the CPU's SIMD intrinsics they compile in half the time, and the six compiles that
    #   probe the CPU's instruction sets are skipped;
    # - cpp_wrapper: each graph (forward, backward) is one C++ file, its kernels and the code that calls them, so
    #   g++ runs twice instead of about 40 times, and -O0 (Inductor's debug_compile, which also checks each input's
    #   dtype, shape and stride): g++ took 11 s instead of 28 s on the 2-core machine, the gradients are the same;
    # - one compile thread: no pool of compile processes to start (each imports torch) beside the other test worker.
    cheap_cpp = {"cpp.vec_isa_ok": False, "cpp_wrapper": True, "aot_inductor.debug_compile": True,
                 "compile_threads": 1}
    with torch._inductor.config.patch(cheap_cpp):
        try:
            ps.compile_passes(compiler)
            compiled = step()
        finally:
            compiler.close()
    assert compiler.seconds > 0
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert (c - e).norm() <= 1e-4 * e.norm(), f"tensor {i}"


# ---- whole runs ---------------------------------------------------------------------------------

FAST = ["--set", "gaussians.num_init=200", "--set", "output.turntable_frames=0", "--set", "train.progress_bar=false",
        "--set", "train.preview_every=0", "--resolution", "32", "--device", "cpu", "--steps", "3"]


def run_folder(tmp_path, *args) -> tuple:
    result = runner.invoke(app, ["run", "a red teapot", "--out", str(tmp_path), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    return run_dir, result.output


def test_compile_on_leaves_a_synthetic_run_unchanged(tmp_path):
    """The synthetic prior has no networks: compile on writes the same model as compile off."""
    off, _ = run_folder(tmp_path / "off", *FAST, "--set", "perf.compile=off")
    on, _ = run_folder(tmp_path / "on", *FAST, "--set", "perf.compile=on")
    a, b = read_ply(off / "model.ply"), read_ply(on / "model.ply")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    metrics = json.loads((on / "metrics.json").read_text())
    assert metrics["timings"]["compile_s"] == 0.0


def test_usd_run_with_compiled_networks_and_tiny_decoder(tiny_models, tmp_path, monkeypatch):
    """USD on the tiny SD with every pass compiled and the tiny decoder for x̂0: the run finishes, says what it
    compiles and reports the time in metrics.json. Dynamo's ``eager`` backend here (the graphs are captured, then
    run as they are): the values and gradients of AOT-compiled passes are the test above's."""
    monkeypatch.setattr(perf, "BACKEND", "eager")
    run_dir, output = run_folder(
        tmp_path, "--prior", "sd", "--model", str(tiny_models["sd"]), "--method", "usd",
        "--pose-model", str(tiny_models["dinov2"]), "--set", "distill.rectifier.classifier.n_augment=2",
        "--set", "prior.sd.latent_resolution=64", "--set", f"prior.sd.tiny_decoder={tiny_models['taesd']}",
        "--set", "perf.compile=on", "--set", "distill.rectifier.rectify_every=2", *FAST, "--steps", "2")
    text = " ".join(output.split())
    assert "compiling 6 network passes with torch.compile (eager)" in text
    for name in ("UNet CFG pass", "ε_φ pass", "LoRA step", "VAE encoder", "tiny decoder", "pose classifier"):
        assert f"compiled {name} in" in text, name
    # The classifier's two variants (iterations with and without the rectifier's gradient); pEnt at the end, on
    # 10 views, runs the eager pass instead of compiling a third.
    assert text.count("compiling pose classifier") == 2, text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["timings"]["compile_s"] > 0
    assert 0.0 <= metrics["pEnt"] <= 1.0


# ---- a GPU session: compiled gradients on CUDA, no host-device synchronisation in an iteration -------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_passes_match_eager(tiny_models):
    """The run's setting (Inductor, CUDA graphs) on CUDA: the same values and gradients as eager in fp32
    (TF32 off on both sides), and nothing recompiles once the variants exist."""
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        prior, ps, classifier = networks(tiny_models, "cuda")
        eager = {rectify: iteration(prior, ps, classifier, rectify) for rectify in (True, False)}
        compiler = perf.Compiler(torch.device("cuda"), PerfConfig().compile_mode, echo=print)
        try:
            perf.compile_networks(compiler, prior, ps, classifier)
            for _ in range(3):  # compile, CUDA-graph warm-up and recording, replay
                for rectify in (True, False):
                    assert_same(iteration(prior, ps, classifier, rectify), eager[rectify], rtol=1e-4)
            torch._dynamo.config.error_on_recompile = True
            iteration(prior, ps, classifier, True, seed=7)
            assert not counters["graph_break"], dict(counters["graph_break"])
        finally:
            compiler.close()
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["sds", "vsd", "usd"])
def test_no_host_sync_inside_an_iteration_on_cuda(tiny_models, tmp_path, method):
    """After two warm-up iterations, ``training_step`` runs under ``torch.cuda.set_sync_debug_mode("error")``:
    any ``.item()``, ``int(tensor)``, boolean-mask index or blocking copy in the loop raises."""
    import lightning as L

    from recdreamer_gs import prior_choice, training
    from recdreamer_gs.config import load_config, parse_override

    overrides = [f"prior.sd.model={tiny_models['sd']}", "prior.kind=sd", f"distill.method={method}",
                 "train.steps=4", "camera.resolution=64", "prior.sd.latent_resolution=64", "gaussians.num_init=500",
                 "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
                 "train.device=cuda", "perf.compile=off", f"distill.rectifier.classifier.feature_model={tiny_models['dinov2']}",
                 "distill.rectifier.classifier.n_augment=2", "distill.rectifier.rectify_every=2", "prompt='a red teapot'"]
    cfg = load_config("preview", overrides=[parse_override(s) for s in overrides])
    device = torch.device("cuda")
    choice = prior_choice.build_prior(cfg, device)

    class SyncCheck(L.Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2:
                original = pl_module.training_step

                def guarded(*args, **kwargs):
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        return original(*args, **kwargs)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                        SyncCheck.checked += 1

                pl_module.training_step = guarded

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.__dict__.pop("training_step", None)

    training.fit(cfg, tmp_path, choice, device, extra_callbacks=[SyncCheck()])
    assert SyncCheck.checked == 2

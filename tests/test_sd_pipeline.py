"""The Stable Diffusion path end to end on the tiny random-weight pipeline (real from_pretrained code)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from recdreamer_gs import prior_choice, training
from recdreamer_gs.cli import app
from recdreamer_gs.config import load_config, parse_override

runner = CliRunner()


def fast(tiny_models, *extra):
    return ["--prior", "sd", "--model", str(tiny_models["sd"]), "--device", "cpu", "--resolution", "32",
            "--set", "prior.sd.latent_resolution=64", "--set", "gaussians.num_init=200",
            "--set", "train.progress_bar=false", "--set", "output.turntable_frames=0",
            "--set", "train.preview_every=0", "--set", "train.log_every=1", *extra]


@pytest.mark.parametrize("method", ["sds", "vsd"])
def test_cli_run_with_tiny_sd(tiny_models, tmp_path, method):
    result = runner.invoke(app, ["run", "a red teapot", "--steps", "2", "--method", method, "--out", str(tmp_path),
                                 *fast(tiny_models)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["prior"] == str(tiny_models["sd"]) and metrics["method"] == method
    assert (run_dir / "model.ply").stat().st_size > 200 * 248
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_vsd_trains_lora_and_keeps_unet_frozen(tiny_models, tmp_path):
    overrides = [f"prior.sd.model={tiny_models['sd']}", "prior.kind=sd", "distill.method=vsd", "train.steps=3",
                 "camera.resolution=32", "prior.sd.latent_resolution=64", "gaussians.num_init=200",
                 "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
                 "train.device=cpu", "prompt='a red teapot'"]
    cfg = load_config("preview", overrides=[parse_override(s) for s in overrides])
    device = torch.device("cpu")
    choice = prior_choice.build_prior(cfg, device)
    unet = choice.prior.unet
    frozen_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    torch.manual_seed(cfg.train.seed)
    system = training.fit(cfg, tmp_path, choice, device)
    lora = {k: v for k, v in system.particle_score.state_dict().items() if k.startswith("lora.")}
    assert lora, "no LoRA weights in the checkpointed state"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {k[len("particle_score."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("particle_score.")}
    assert saved.keys() == system.particle_score.state_dict().keys()
    # peft initialises every LoRA B matrix at zero: non-zero B means the AdamW steps changed the weights.
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    frozen_after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora" not in k}
    assert frozen_after.keys() == frozen_before.keys()
    for k, v in frozen_before.items():
        assert torch.equal(frozen_after[k], v), k


def test_sd_without_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["run", "a cat", "--prior", "sd", "--model", str(tmp_path / "no-such-model"),
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no-such-model" in text and "--prior synthetic" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_usd_with_tiny_sd_and_dinov2(tiny_models, tmp_path, monkeypatch):
    """USD on SD: templates generated with the prior's view prompts, DINOv2 classifier, rectifier, pEnt;
    --resume reuses the classifier the run saved instead of generating templates again."""
    result = runner.invoke(app, ["run", "a red teapot", "--steps", "2", "--method", "usd", "--out", str(tmp_path),
                                 "--pose-model", str(tiny_models["dinov2"]),
                                 "--set", "distill.rectifier.classifier.n_augment=2", *fast(tiny_models)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["pEnt"] <= 1.0
    assert sorted(p.name for p in (run_dir / "templates").iterdir()) == ["back", "front", "left", "right"]
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "grad/rect_norm" in header and "pose/front" in header
    assert (run_dir / "pose_classifier.pt").is_file()

    from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior

    def no_templates(*args, **kwargs):
        raise AssertionError("templates generated again on --resume")

    monkeypatch.setattr(StableDiffusionPrior, "template_candidates", no_templates)
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--steps", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 3


def test_run_writes_clip_metrics(tiny_models, tmp_path):
    """cEnt and the CLIP score in metrics.json when a CLIP model is configured (tiny fixture)."""
    result = runner.invoke(app, ["run", "a red teapot", "--steps", "1", "--prior", "synthetic", "--device", "cpu",
                                 "--out", str(tmp_path), "--set", f"output.clip_model={tiny_models['clip']}",
                                 "--set", "prior.synthetic.resolution=32", "--set", "gaussians.num_init=100",
                                 "--set", "train.progress_bar=false", "--set", "output.turntable_frames=0"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["cEnt"] <= 1.0 and isinstance(metrics["clip_score"], float)
    assert 0.0 <= metrics["pEnt"] <= 1.0


def test_missing_clip_model_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["run", "a cat", "--prior", "synthetic", "--device", "cpu", "--out", str(tmp_path),
                                 "--set", f"output.clip_model={tmp_path / 'no-clip'}"])
    assert result.exit_code == 2 and "no-clip" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())  # no run folder left behind

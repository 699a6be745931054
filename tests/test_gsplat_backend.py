"""gsplat's CUDA extension check (render/gsplat_backend.py), driven on a CPU by replacing the build step.

Nothing here compiles or calls CUDA: the build command is swapped for a child process that prints what a
failing compiler prints, and the device is only pretended to be CUDA until the check stops the run.
"""

from __future__ import annotations

import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from recdreamer_gs.cli import app
from recdreamer_gs.render import gsplat_backend as gs

COMPILER_OUTPUT = (
    "[1/12] /usr/local/cuda/bin/nvcc -c rasterize_to_pixels_fwd.cu -o rasterize_to_pixels_fwd.cuda.o\n"
    "FAILED: rasterize_to_pixels_fwd.cuda.o\n"
    "rasterize_to_pixels_fwd.cu(41): error: identifier \"__hfma2\" is undefined\n"
    "1 error detected in the compilation of \"rasterize_to_pixels_fwd.cu\".\n"
    "ninja: build stopped: subcommand failed.\n"
)


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    """An empty torch extensions folder: nothing is built there."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


@pytest.fixture
def failing_build(ext_dir, monkeypatch):
    """Build tools present, and a build step that fails as a compiler error does."""
    monkeypatch.setattr(gs, "prebuilt", lambda: False)
    monkeypatch.setattr(gs, "missing_build_tools", lambda: None)
    script = f"import sys; sys.stdout.write({COMPILER_OUTPUT!r}); sys.exit(1)"
    monkeypatch.setattr(gs, "BUILD_COMMAND", [sys.executable, "-c", script])
    return ext_dir


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def test_extension_folder_is_torchs(tmp_path, monkeypatch):
    """Our path of the JIT build is the one torch.utils.cpp_extension uses (checked without creating ours)."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    assert not gs.extension_dir().exists()
    assert str(gs.extension_dir()) == cpp_extension._get_build_directory(gs.EXTENSION, verbose=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "x"))
    assert gs.extension_dir() == tmp_path / "x" / gs.EXTENSION and not gs.extension_built()


def test_failed_build_is_one_line_with_the_log(failing_build):
    with pytest.raises(gs.GsplatUnavailable) as info:
        gs.ensure_cuda_extension(quiet())
    message = str(info.value)
    log = failing_build / "gsplat_cuda-build.log"
    assert "\n" not in message and log.read_text() == COMPILER_OUTPUT
    assert 'the compiler failed (rasterize_to_pixels_fwd.cu(41): error: identifier "__hfma2" is undefined)' in message
    assert f"full output in {log}" in message
    assert "https://docs.gsplat.studio/whl/" in message and "ninja" in message
    assert "--set render.backend=torch" in message


def test_missing_tools_stop_before_building(ext_dir, monkeypatch):
    monkeypatch.setattr(gs, "prebuilt", lambda: False)
    monkeypatch.setattr(gs, "find_nvcc", lambda: None)
    monkeypatch.setattr(gs, "BUILD_COMMAND", [sys.executable, "-c", "raise SystemExit('must not run')"])
    with pytest.raises(gs.GsplatUnavailable, match=r"no CUDA toolkit \(nvcc\) was found.*compiles its CUDA code"):
        gs.ensure_cuda_extension(quiet())
    assert not (ext_dir / "gsplat_cuda-build.log").exists()


def test_successful_build_says_so_and_then_loads(ext_dir, monkeypatch):
    monkeypatch.setattr(gs, "prebuilt", lambda: False)
    monkeypatch.setattr(gs, "missing_build_tools", lambda: None)
    monkeypatch.setattr(gs, "BUILD_COMMAND", [sys.executable, "-c", "print('compiled')"])
    loaded = []
    monkeypatch.setattr(gs, "_smoke_test", lambda: loaded.append(True))
    console = Console(record=True, width=300)
    gs.ensure_cuda_extension(console)
    assert loaded == [True] and "built gsplat's CUDA rasterizer in" in console.export_text()
    assert (ext_dir / "gsplat_cuda-build.log").read_text() == "compiled\n"


def test_a_build_for_another_gpu_is_named(ext_dir, monkeypatch):
    """A cached build that does not run on this GPU (e.g. a shared home on a cluster of mixed GPUs)."""
    monkeypatch.setattr(gs, "extension_built", lambda: True)

    def smoke():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    monkeypatch.setattr(gs, "_smoke_test", smoke)
    with pytest.raises(gs.GsplatUnavailable, match="architecture mismatch") as info:
        gs.ensure_cuda_extension(quiet())
    assert "no kernel image" in (ext_dir / "gsplat_cuda-build.log").read_text()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("output, cause", [
    ("gsplat: No CUDA toolkit found. gsplat will be disabled.", "gsplat found no CUDA toolkit"),
    ("RuntimeError: Ninja is required to load C++ extensions", "ninja is not installed"),
    ("nvcc fatal : Unsupported gpu architecture 'compute_90'", "architecture mismatch"),
    ("RuntimeError: The detected CUDA version (11.8) mismatches the version that was used to compile PyTorch (12.8)",
     "does not match the CUDA version torch was built for"),
    ("[3/12] nvcc ...\nKilled", "the compiler was killed (out of memory? run again with MAX_JOBS=2)"),
    ("something odd happened\nthe end", "it failed (the end)"),
])
def test_cause_of(output, cause):
    assert cause in gs.cause_of(output)


def test_cli_run_stops_before_any_model_and_leaves_no_run_folder(failing_build, tmp_path, monkeypatch):
    from recdreamer_gs import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the check goes
    monkeypatch.setattr(training, "build_prior", lambda *a, **k: pytest.fail("no model may load first"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "a kangaroo wearing boxing gloves", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(result.output.split())
    assert lines[0].startswith("error: gsplat's CUDA rasterizer cannot run: the compiler failed")
    assert "gsplat_cuda-build.log" in text and "--set render.backend=torch" in text and "Traceback" not in text
    assert (failing_build / "gsplat_cuda-build.log").is_file() and not out.exists()


def test_torch_backend_on_cuda_skips_the_check(monkeypatch):
    from recdreamer_gs.render import ensure_backend

    monkeypatch.setattr(gs, "ensure_cuda_extension", lambda *a: pytest.fail("not needed for the torch backend"))
    assert ensure_backend("torch", torch.device("cuda")) == "torch"
    assert ensure_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extension_builds_and_runs_on_this_gpu():
    """On a GPU machine: the real check builds gsplat's extension if needed, loads it and renders."""
    gs.ensure_cuda_extension(quiet())
    assert gs.extension_built()

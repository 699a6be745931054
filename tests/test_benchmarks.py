"""CPU smoke runs of benchmarks/iteration.py (USD parts), benchmarks/memory.py (real training loop),
benchmarks/lora_step.py (the LoRA step's operators) and benchmarks/cli_timing.py (the real CLI as a child process).

The scripts' ``main`` runs in the test process with tiny random-weight networks (their command lines, their
printed output): a child Python per script would spend most of its time importing torch and Lightning again.
The tests check that they finish and that the JSON they write has the expected keys and values, never the times.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
USD_PARTS = ("usd_unet_cfg", "usd_decode", "pose_classifier", "rectifier_backward")


def load_script(name: str) -> ModuleType:
    """benchmarks/<name> as a module (its ``main(argv)`` is the script's command line)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> dict:
    """``python benchmarks/<name> ARGS --threads 1``, in this process; returns the JSON result it writes."""
    return load_script(name).main([*args, "--threads", "1"])


def test_iteration_tiny_usd_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "iteration.json"
    run_script("iteration.py", "--device", "cpu", "--tiny", "--resolution", "64", "--iters", "1", "--warmup", "1",
               "--parts", ",".join(("vae_encode", *USD_PARTS, "lora_step")), "--iterations", "usd,usd_k4",
               "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"vae_encode", *USD_PARTS, "lora_step"}
    assert set(result["iterations"]) == {"usd", "usd_k4"}
    for timing in [*result["parts"].values(), *result["iterations"].values()]:
        assert timing["median_ms"] > 0 and timing["min_ms"] <= timing["median_ms"]
        assert "peak_mem_mib" not in timing  # GPU memory only on CUDA
    assert result["parts"]["rectifier_backward"]["timed_region_only"] is True
    assert result["iterations"]["usd_k4"]["iterations_per_call"] == 4
    assert "iterations_per_call" not in result["iterations"]["usd"]
    assert result["pose_dtype"] == "fp32" and result["pose_input_size"] == 112
    assert result["render_resolution"] == 64 and result["latent_resolution"] == 8
    sanity = result["sanity"]
    assert sanity["pose_probs_finite"] and sanity["rect_grad_finite"]
    assert sanity["pose_probs_sum"] == pytest.approx(1.0, abs=1e-4)


def test_iteration_sds_only_skips_pose_classifier(tmp_path: Path) -> None:
    out = tmp_path / "sds.json"
    run_script("iteration.py", "--device", "cpu", "--tiny", "--resolution", "64", "--iters", "1", "--warmup", "0",
               "--parts", "unet_cfg", "--iterations", "sds", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["pose_model"] is None and "pose_probs_finite" not in result["sanity"]
    assert set(result["iterations"]) == {"sds"}


def test_time_ms_counts_timed_region_and_divides_per_call() -> None:
    it = load_script("iteration.py")
    state: dict = {}

    def fn() -> None:
        state["region"] = 8.0  # what timed_region leaves on CPU: milliseconds of the region only

    timing = it.time_ms(fn, torch.device("cpu"), iters=3, warmup=0, state=state, per_call=4)
    assert timing["median_ms"] == pytest.approx(2.0) and timing["iterations_per_call"] == 4
    assert timing["timed_region_only"] is True


def test_memory_tiny_runs_training_loop(tmp_path: Path, capsys) -> None:
    out = tmp_path / "memory.json"
    run_script("memory.py", "--device", "cpu", "--tiny", "--iters", "2", "--warmup", "0", "--out", str(out))
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == result  # printed and written alike
    assert result["preset"] == "standard" and result["method"] == "usd" and result["rectify_every"] == 1
    assert result["iterations"] == 2 and len(result["ms_all_iterations"]) == 2
    assert result["ms_per_iteration"] > 0
    assert result["resolution"] == 64 and result["latent_resolution"] == 8
    assert result["batch_size"] == 2  # the standard preset's batch
    assert result["gaussians"] == 512 and result["render"] == "torch"
    for key in ("peak_allocated_gib", "peak_reserved_gib", "steady_peak_allocated_gib", "static_allocated_gib"):
        assert key in result and result[key] is None  # CUDA only
    assert result["cpu_max_rss_gib"] > 0
    metrics = result["metrics"]
    assert {"loss/usd", "grad/vsd_norm", "grad/rect_norm", "loss/lora", "pose/front"} <= set(metrics)
    assert metrics["grad/vsd_norm"] > 0


def test_memory_overrides_and_torch_render_fallback(tmp_path: Path, capsys) -> None:
    # gsplat refuses CPU tensors, so the probe fails and the torch compositor takes over.
    out = tmp_path / "memory.json"
    run_script("memory.py", "--device", "cpu", "--tiny", "--iters", "1", "--warmup", "1", "--method", "vsd",
               "--set", "camera.batch_size=2", "--set", "render.backend=gsplat", "--out", str(out))
    result = json.loads(out.read_text())
    assert "NOTICE" in capsys.readouterr().out
    assert result["render"].startswith("torch (gsplat failed")
    assert result["method"] == "vsd" and result["rectify_every"] is None and result["pose_dtype"] is None
    assert result["batch_size"] == 2 and result["overrides"] == ["camera.batch_size=2", "render.backend=gsplat"]
    assert result["warmup"] == 1 and len(result["ms_all_iterations"]) == 2
    assert "grad/rect_norm" in result["metrics"] and result["metrics"]["grad/rect_norm"] == 0.0


def test_memory_render_fallback_error_stops(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="render probe failed with backend 'gsplat'"):
        run_script("memory.py", "--device", "cpu", "--tiny", "--iters", "1", "--method", "sds",
                   "--set", "render.backend=gsplat", "--render-fallback", "error")


def test_cli_timing_small_writes_json(tmp_path: Path) -> None:
    """benchmarks/cli_timing.py: writes SD and DINOv2 folders, runs the real CLI (the standard preset's run; the
    preview run is the same code with another preset), reads its phases."""
    out = tmp_path / "cli_timing.json"
    run_script("cli_timing.py", "--small", "--device", "cpu", "--presets", "standard", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"standard_2"}
    assert set(result["models"]["params"]) == {"text_encoder", "unet", "vae", "dinov2"}
    assert all(n > 0 for n in result["models"]["params"].values())
    for run in result["runs"].values():
        assert run["iterations"] == 2 and run["ms_per_iteration"] > 0
        assert run["load_s"] > 0 and run["templates_s"] > 0 and run["train_s"] > 0 and run["export_s"] > 0
        parts = run["load_s"] + run["templates_s"] + run["train_s"] + run["export_s"] + run["other_s"]
        assert parts == pytest.approx(run["wall_s"], abs=0.05)
        assert run["peak_gpu_memory_gib"] is None  # CPU
    assert "--preset standard --steps 2" in result["runs"]["standard_2"]["command"]


def test_lora_step_benchmark_counts_operators(tmp_path: Path) -> None:
    """benchmarks/lora_step.py on the tiny UNet: the JSON has every phase with operator and Python-call
    counts; the fused AdamW is a handful of operators, the LoRA adds operators to the plain pass."""
    out = tmp_path / "lora.json"
    run_script("lora_step.py", "--size", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert set(phases) == {"unet_fwd_bwd", "lora_step", "lora_forward", "lora_backward", "adamw_step", "eps_phi",
                           "unet_cond"}
    assert result["lora_layers"] == 32 and all(p["ops"] > 0 and p["median_ms"] > 0 for p in phases.values())
    assert phases["adamw_step"]["ops"] <= 4
    assert phases["eps_phi"]["ops"] > phases["unet_cond"]["ops"]

"""What a user pastes into a bug report (``recdreamer-gs doctor``), and the ``models`` listing.

Nothing here downloads a model, builds gsplat's CUDA extension or needs a GPU: versions come from package
metadata, the GPU from torch or the NVIDIA driver, cache sizes from the file system.

    python -m recdreamer_gs.doctor --short    # one line: which torch this is (used by `make install`)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from recdreamer_gs import __version__

# hub (rich, huggingface_hub) and torch load inside the functions that need them: `python -m recdreamer_gs.doctor
# --short` runs in `make install` when torch is the only dependency installed yet (tests/test_doctor.py checks it).
if TYPE_CHECKING:
    from rich.console import Console

    from recdreamer_gs.hub import ModelSpec

PACKAGES = ("torch", "gsplat", "diffusers", "transformers", "peft", "lightning", "open3d", "huggingface_hub", "ray",
            "gsply", "sogpy")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def nvidia_gpus() -> list[str]:
    """NVIDIA GPUs the driver knows, whatever torch sees (names; empty without a driver)."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            model = next(line for line in info.read_text().splitlines() if line.startswith("Model:"))
            names.append(model.split(":", 1)[1].strip())
        except (OSError, StopIteration):
            names.append("NVIDIA GPU")
    if names or shutil.which("nvidia-smi") is None:
        return names
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def torch_summary() -> str:
    """One line: torch's version, CUDA or CPU build, and the GPU it sees."""
    import torch  # torch loads only here: `doctor --short` runs before the other dependencies are installed

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        seen = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        if torch.cuda.device_count() > 1:
            seen += f" (+{torch.cuda.device_count() - 1} more)"
    else:
        seen = "none"
    return f"torch {torch.__version__} ({build}); GPU seen by torch: {seen}"


def cuda_mismatch() -> Optional[str]:
    """One line when torch cannot use a GPU for a fixable reason (a CPU torch on a GPU machine, or a CUDA
    torch that sees no GPU), with the fix; None when torch uses a GPU or there is nothing to fix."""
    import torch  # torch loads only here: `doctor --short` runs before the other dependencies are installed

    if torch.cuda.is_available():
        return None
    gpus = nvidia_gpus()
    if torch.version.cuda is None:
        if not gpus:
            return None
        return (f"an NVIDIA GPU ({gpus[0]}) is present but torch {torch.__version__} is a CPU build; install a "
                "CUDA build: `rm -rf .venv && make install` without CPU=1, or TORCH=... (README, GPU set-up)")
    if gpus:
        return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and an NVIDIA GPU ({gpus[0]}) is "
                "present, but torch cannot use it: the driver may be older than CUDA "
                f"{torch.version.cuda} needs (see nvidia-smi), or CUDA_VISIBLE_DEVICES hides it")
    return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no GPU is visible; on a machine "
            "without an NVIDIA GPU the much smaller CPU build does the same: `rm -rf .venv && make install CPU=1`")


def folder_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed: a HF cache counts its blobs once)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _folder_line(path: Path) -> str:
    from recdreamer_gs.hub import human_size  # see the note at the imports

    return f"{path} ({human_size(folder_size(path))})" if path.is_dir() else f"{path} (not created yet)"


def _toolchain() -> str:
    # torch loads only here: `doctor --short` runs before the other dependencies are installed
    from torch.utils.cpp_extension import is_ninja_available

    from recdreamer_gs.render.gsplat_backend import find_nvcc

    nvcc = find_nvcc()
    return f"nvcc: {nvcc or 'not found'}; ninja: {'yes' if is_ninja_available() else 'no'}"


def report(specs: list["ModelSpec"], console: "Console") -> None:
    """Print the bug-report block: versions, GPU, toolchain, caches, and which of the models ``specs`` (a run's:
    ``prior_choice.run_models``) are local."""
    import torch  # see the note at the imports

    from recdreamer_gs import hub
    from recdreamer_gs.render import gsplat_backend as gs

    rows: list[tuple[str, str]] = []
    rows.append(("recdreamer-gs", f"{__version__} (python {sys.version.split()[0]}, {sys.platform})"))
    rows.append(("torch", torch_summary().removeprefix("torch ")))
    if torch.version.cuda:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        rows.append(("CUDA runtime", f"{torch.version.cuda}" + (f", cuDNN {cudnn}" if cudnn else "")))
    if gs.prebuilt():
        built = "prebuilt wheel (gsplat.csrc)"
    elif gs.extension_built():
        built = f"built, cached in {gs.extension_dir()}"
    else:
        built = f"not built yet (the first CUDA run builds it into {gs.extension_dir()})"
    rows.append(("gsplat", f"{version('gsplat')}; CUDA extension: {built}"))
    for package in PACKAGES[2:]:
        rows.append((package, version(package)))
    gpus = nvidia_gpus()
    rows.append(("NVIDIA GPUs", ", ".join(gpus) if gpus else "none found (no driver, or no NVIDIA GPU)"))
    rows.append(("build tools", _toolchain()))
    offline = " (HF_HUB_OFFLINE is set)" if hub.hub_offline() else ""
    rows.append(("HF cache", _folder_line(hub.cache_dir()) + offline))
    rows.append(("torch extensions", _folder_line(gs.extensions_root())))
    for spec in specs:
        st = hub.status(spec)
        state = f"local ({hub.human_size(st.size)})" if st.complete else st.where()
        rows.append((spec.kind.title, f"{spec.source}: {state}"))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:  # plain lines, so that a bug report pastes them unwrapped
        console.print(f"{key:<{width}}{value}", highlight=False, soft_wrap=True)
    hint = cuda_mismatch()
    if hint:
        console.print(f"note: {hint}", highlight=False, soft_wrap=True)


def models_report(specs: list["ModelSpec"], download: bool, console: "Console") -> None:
    """The ``models`` command: every model of ``specs`` (what a run loads: ``prior_choice.run_models``), where
    it comes from, whether it is complete here and its size; with ``download`` the missing ones are fetched
    (after checking all)."""
    from recdreamer_gs import hub  # see the note at the imports

    if not specs:
        console.print("This configuration loads no model weights (the synthetic prior needs none).")
        return
    missing = 0
    for spec in specs:
        st = hub.status(spec)
        if st.complete:
            here, size = f"complete: {st.where()}", hub.human_size(st.size)
        else:
            missing += 1
            here = st.where()
            try:
                todo = hub.plan(spec)
                size = f"{todo.describe()} to download" if todo else "?"
            except hub.ModelUnavailable as err:
                size = f"cannot be had: {err.cause}"
        for line in (f"{spec.kind.title}: {spec.source}", f"  here: {here}", f"  size: {size}"):
            console.print(line, highlight=False, soft_wrap=True)
    if download and missing:
        hub.prepare(specs, console)
        console.print(f"All {len(specs)} models are complete in {hub.cache_dir()}. Machines without network can "
                      "use this cache with HF_HUB_OFFLINE=1 (and HF_HOME pointing at the same folder).",
                      highlight=False)
    elif missing:
        console.print(f"{missing} model(s) missing: the run downloads them on first use, or fetch them now with "
                      "`recdreamer-gs models --download` and the same options.", highlight=False)
    else:
        console.print("All models are complete here.", highlight=False)


if __name__ == "__main__":
    if sys.argv[1:] != ["--short"]:
        sys.exit("usage: python -m recdreamer_gs.doctor --short   (the full report: recdreamer-gs doctor)")
    print(torch_summary())
    hint = cuda_mismatch()
    if hint:
        print(f"note: {hint}")

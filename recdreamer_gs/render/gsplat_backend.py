"""The only caller of ``gsplat.rasterization`` (CUDA tensors only), and the check that gsplat's CUDA code works.

gsplat 1.5.3 from the package index ships CUDA sources that its ``gsplat.cuda._backend`` compiles on first
import with ``torch.utils.cpp_extension`` (nvcc, ninja and a C++ compiler, cached under the torch
extensions folder); gsplat's prebuilt wheels ship the compiled module as ``gsplat.csrc`` instead.
:func:`ensure_cuda_extension` runs before a CUDA run loads any model: it builds the extension once in a
child process (its compiler output goes to a log file, a spinner to the terminal), then loads it and
renders one Gaussian. Any failure is one :class:`GsplatUnavailable` line: the cause, the log, the ways on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor

from recdreamer_gs.errors import UserError
from recdreamer_gs.render.inputs import Splats, Views

EXTENSION = "gsplat_cuda"  # the name gsplat gives its JIT extension (gsplat/cuda/_backend.py)
# What builds the extension: importing gsplat's backend (it compiles when no build is cached). Run as a
# child process so that the compiler output lands in the log; tests replace it with a failing command.
BUILD_COMMAND = [
    sys.executable, "-c",
    "from gsplat.cuda._backend import _C\n"
    "if _C is None: raise SystemExit('gsplat: No CUDA toolkit found')",
]
BUILD_TIME = "about 1-2 minutes on a fast machine, longer with few CPU cores"


class GsplatUnavailable(UserError, RuntimeError):
    """gsplat's CUDA rasterizer cannot run here; the message is one line: cause, log file, ways on."""


def rasterize_gsplat(
    splats: Splats, views: Views, backgrounds: Float[Tensor, "C 3"], eps2d: float = 0.3, near_plane: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Returns rgb [C,H,W,3], alpha [C,H,W,1], expected depth [C,H,W,1] and gsplat's meta."""
    if splats.means.device.type != "cuda":
        # Checked before touching gsplat: on CPU tensors it would try to JIT-build its CUDA extension.
        raise ValueError(f"gsplat needs CUDA tensors, got {splats.means.device}; use the torch backend on CPU")
    from gsplat import rasterization  # heavy: gsplat loads only when needed

    renders, alphas, meta = rasterization(
        means=splats.means, quats=splats.quats, scales=splats.scales, opacities=splats.opacities, colors=splats.sh,
        viewmats=views.viewmats, Ks=views.Ks, width=views.width, height=views.height, near_plane=near_plane,
        eps2d=eps2d, sh_degree=splats.sh_degree,
        packed=False,  # faster for object-scale scenes; densify must be told the same
        backgrounds=backgrounds, render_mode="RGB+ED", rasterize_mode="classic",
    )
    return renders[..., :3], alphas, renders[..., 3:4], meta


# --------------------------------------------------------------------------------------------
# Is the CUDA extension there? (nothing here builds or imports it)
# --------------------------------------------------------------------------------------------


def extensions_root() -> Path:
    """Where torch builds JIT extensions for this Python and torch: TORCH_EXTENSIONS_DIR, or
    ``<cache>/torch_extensions/py<XY>_cu<ZZ>`` (the folder ``torch.utils.cpp_extension`` uses; it is not
    created here)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    # heavy: torch.utils.cpp_extension loads only when needed
    from torch.utils.cpp_extension import get_default_build_root

    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accel}"


def extension_dir() -> Path:
    return extensions_root() / EXTENSION


def build_log() -> Path:
    """Where the compiler output of the last build goes (beside the build folder, which gsplat wipes)."""
    return extensions_root() / f"{EXTENSION}-build.log"


def prebuilt() -> bool:
    """gsplat came as a prebuilt wheel (its compiled module ``gsplat.csrc`` is installed)."""
    try:
        return importlib.util.find_spec("gsplat.csrc") is not None
    except (ImportError, ValueError):
        return False


def extension_built() -> bool:
    """A compiled extension is there: prebuilt, or a JIT build cached by an earlier run."""
    return prebuilt() or (extension_dir() / f"{EXTENSION}.so").is_file()


def find_nvcc() -> Optional[Path]:
    """The CUDA compiler torch's extension builder would use (CUDA_HOME, PATH or /usr/local/cuda)."""
    from torch.utils.cpp_extension import _find_cuda_home  # gsplat's backend uses the same lookup

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns when no CUDA runtime is installed, which is the case we report
    try:
        home = _find_cuda_home()
    finally:
        log.setLevel(level)
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    if nvcc is not None and nvcc.is_file():
        return nvcc
    found = shutil.which("nvcc")
    return Path(found) if found else None


def missing_build_tools() -> Optional[str]:
    """Why a JIT build cannot start here (no nvcc, no ninja, no C++ compiler, nvcc's CUDA major version
    differing from torch's), or None when the tools are there."""
    from torch.utils.cpp_extension import is_ninja_available  # heavy: torch.utils.cpp_extension loads only when needed

    nvcc = find_nvcc()
    if nvcc is None:
        return "no CUDA toolkit (nvcc) was found (set CUDA_HOME or put nvcc on PATH)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if torch.version.cuda:
        try:
            out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        found = re.search(r"release (\d+)\.(\d+)", out)
        release = f"{found.group(1)}.{found.group(2)}" if found else None
        if release and release.split(".")[0] != torch.version.cuda.split(".")[0]:
            return (f"nvcc {nvcc} is CUDA {release} but torch {torch.__version__} was built for CUDA "
                    f"{torch.version.cuda}; the major versions must match")
    return None


# --------------------------------------------------------------------------------------------
# Making sure it works
# --------------------------------------------------------------------------------------------


def cause_of(log_text: str) -> str:
    """One line naming why a build or load failed, from its output."""
    text = log_text.lower()
    if "no cuda toolkit found" in text:
        return "gsplat found no CUDA toolkit (nvcc)"
    if "ninja is required" in text:
        return "ninja is not installed (pip install ninja)"
    if "mismatches the version that was used to compile" in text:
        return "the CUDA toolkit's version does not match the CUDA version torch was built for"
    if "unsupported gpu architecture" in text or "no kernel image is available" in text:
        return "architecture mismatch: this CUDA toolkit or build does not support this GPU"
    if "is less than the minimum required version" in text or "is greater than the maximum required" in text:
        return "the C++ compiler's version is not supported by this CUDA toolkit"
    if "killed" in text.split():
        return "the compiler was killed (out of memory? run again with MAX_JOBS=2)"
    for line in log_text.splitlines():
        if " error" in line.lower() or line.lower().startswith("error"):
            return f"the compiler failed ({line.strip()[:200]})"
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return f"it failed ({lines[-1][:200]})" if lines else "it failed without output"


def ways_on() -> str:
    cuda = torch.version.cuda or "?"
    pair = f"pt{''.join(torch.__version__.split('+')[0].split('.')[:2])}cu{cuda.replace('.', '')}"
    return (f"install gsplat's prebuilt wheel for torch {torch.__version__.split('+')[0]} + CUDA {cuda} "
            f"(pip install gsplat==1.5.3 --index-url https://docs.gsplat.studio/whl/{pair}, where one exists; "
            "see README, GPU set-up); or install the CUDA toolkit matching torch's CUDA and ninja, then run "
            "again; or run with --set render.backend=torch (the slower PyTorch renderer)")


def _fail(cause: str, log: Optional[Path]) -> GsplatUnavailable:
    where = f"; full output in {log}" if log is not None else ""
    return GsplatUnavailable(f"gsplat's CUDA rasterizer cannot run: {cause}{where}. Ways on: {ways_on()}.")


def _build(console: "Console") -> None:
    """Compile gsplat's extension in a child process under a spinner; raises with the log on failure."""
    log = build_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    message = (f"Building gsplat's CUDA rasterizer (once; {BUILD_TIME}; cached in {extension_dir()}; "
               f"compiler output in {log})")
    start = time.perf_counter()
    with open(log, "w") as out, console.status(message):
        code = subprocess.run(BUILD_COMMAND, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise _fail(cause_of(log.read_text(errors="replace")), log)
    console.print(f"built gsplat's CUDA rasterizer in {time.perf_counter() - start:.0f} s", highlight=False)


def _smoke_test() -> None:
    """Load the extension in this process and render one Gaussian (catches a build for another GPU)."""
    from gsplat.cuda._backend import _C  # heavy: gsplat loads only when needed

    if _C is None:
        raise RuntimeError("gsplat: No CUDA toolkit found")
    dev = torch.device("cuda")
    eye = torch.eye(4, device=dev)
    eye[2, 3] = 3.0
    K = torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]], device=dev)
    one = Splats(torch.zeros(1, 3, device=dev), torch.tensor([[1.0, 0, 0, 0]], device=dev),
                 torch.full((1, 3), 0.1, device=dev), torch.ones(1, device=dev), torch.ones(1, 1, 3, device=dev), 0)
    rasterize_gsplat(one, Views(eye[None], K[None], 8, 8), torch.zeros(1, 3, device=dev))
    torch.cuda.synchronize(dev)


def ensure_cuda_extension(console: Optional["Console"] = None) -> None:
    """Make sure gsplat's CUDA rasterizer runs here, building it once if needed (call before loading models).

    Raises:
        GsplatUnavailable: the build tools are missing, the build failed, or the built code does not run on
            this GPU; the message names the cause, the log with the full output and the ways on.
    """
    console = console or Console(stderr=True)
    if not extension_built():
        cause = missing_build_tools()
        if cause is not None:
            raise _fail(f"{cause}, and gsplat compiles its CUDA code on first use", None)
        _build(console)
    try:
        _smoke_test()
    except Exception as err:  # noqa: BLE001 - a load or kernel failure becomes the one message
        log = build_log()
        log.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        log.write_text(text)
        raise _fail(cause_of(text), log) from None

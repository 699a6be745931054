"""Compiled networks: ``torch.compile`` around the passes of an iteration, and what compiling costs.

An eager iteration at Stable Diffusion size is bound by kernel launches and Python, not by arithmetic
(docs/performance.md), so the networks' passes run compiled when ``perf.compile`` says so: the frozen
UNet's CFG pass, the ε_φ pass, the LoRA loss (its backward is compiled with it), the VAE encoder and
decoder (or the tiny decoder) and the pose classifier. Each network object takes a :class:`Compiler`
through its ``compile_passes`` method and routes those passes through it; the eager code is the same
function, uncompiled.

Shapes stay static per run (fixed batch, render and latent resolution, text embeddings), so every pass
compiles once per grad mode and never again (``dynamic=False``: a new shape compiles a new static graph
instead of a slower dynamic one). Compilation happens lazily in the first iterations; every compilation is
announced and timed here (``Compiler.seconds``, ``metrics.json`` ``timings.compile_s``). Inductor keeps its
compiled graphs on disk (FX graph cache and AOTAutograd cache, both on by default, under
``TORCHINDUCTOR_CACHE_DIR``), so a second run of the same preset loads instead of compiling.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
from torch.utils._pytree import tree_map_only

from recdreamer_gs.config import PerfConfig

Echo = Callable[[str], None]


def should_compile(perf: PerfConfig, device: torch.device, iterations: int) -> bool:
    """``on``/``off`` as asked; ``auto``: on for CUDA runs of at least ``perf.compile_min_steps`` iterations.

    A cold compile of every pass takes minutes and saves a few hundred ms per iteration; on a CPU the
    networks' arithmetic dominates and compiling gains little for its cost.
    """
    if perf.compile == "auto":
        return device.type == "cuda" and iterations >= perf.compile_min_steps
    return perf.compile == "on"


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled graphs (``TORCHINDUCTOR_CACHE_DIR``, else /tmp/torchinductor_<user>)."""
    # heavy: torch._inductor.runtime.cache_dir_utils loads only when needed
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


class _Tally:
    """Seconds spent in compilation (Dynamo tracing, AOTAutograd, Inductor, CUDA-graph recording), from
    Dynamo's compile callbacks; one per process, registered on first use."""

    def __init__(self):
        self.seconds = 0.0
        self.events = 0
        self.label = threading.local()  # the pass being called (set by CompiledPass)
        self.labels: dict[str, str] = {}  # Dynamo compile id -> pass, to name a backward compiled later
        self.listeners: list["Compiler"] = []
        self._start = 0.0

    def register(self) -> None:
        handler = torch._dynamo.callback_handler  # torch._dynamo.reset() clears it: check every time
        if self._on_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_start)
        if self._on_end not in handler.end_callbacks:
            handler.register_end_callback(self._on_end)

    def name(self, args: Any) -> str:
        """The pass a compile event belongs to: the one being called, or (for a backward compiled while
        autograd runs it) the pass whose forward had the same compile id."""
        compile_id = str(getattr(args, "compile_id", ""))
        current = getattr(self.label, "name", None)
        if current is not None and _trigger(args) == "DYNAMO":
            self.labels[compile_id] = current
        return self.labels.get(compile_id, current or "a compiled pass")

    def _on_start(self, args: Any) -> None:
        self._start = time.perf_counter()
        label = self.name(args)
        for compiler in self.listeners:
            compiler._started(args, label)

    def _on_end(self, args: Any) -> None:
        seconds = time.perf_counter() - self._start
        self.seconds += seconds
        self.events += 1
        label = self.name(args)
        for compiler in self.listeners:
            compiler._ended(args, label, seconds)


def _trigger(args: Any) -> str:
    """DYNAMO (a frame is traced), LAZY_BACKWARD (a backward compiled when first run) or CUDAGRAPH_RECORDING."""
    return getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")


_TALLY = _Tally()


class Compiler:
    """Compiles the passes handed to it with one torch.compile setting and accounts for the time.

    ``mode`` applies on CUDA only (``reduce-overhead`` = CUDA graphs); CPU runs use Inductor's default.
    ``backend="aot_eager"`` traces and runs the same graphs without generating kernels (fast; for
    checking the plumbing). ``echo`` receives the progress lines; ``timings`` (a run's phase timings)
    gets ``compile_s`` kept current.
    """

    def __init__(self, device: torch.device, mode: str = "reduce-overhead", backend: str = "inductor",
                 echo: Optional[Echo] = None, timings: Optional[dict] = None):
        self.device = torch.device(device)
        self.backend = backend
        self.mode = mode if (self.device.type == "cuda" and backend == "inductor") else None
        # CUDA graphs replay into memory they own: outputs are copied out so that nothing the caller
        # keeps (logged losses, probabilities) is overwritten by the next replay.
        self.cuda_graphs = self.mode in ("reduce-overhead", "max-autotune")
        self.echo = echo
        self.timings = timings
        self.passes: list[str] = []
        self._offset = _TALLY.seconds
        self._announced = False
        _TALLY.register()
        _TALLY.listeners.append(self)
        if timings is not None:
            timings["compile_s"] = 0.0

    @property
    def seconds(self) -> float:
        """Compilation seconds since this compiler was made (all passes, forward and backward)."""
        return _TALLY.seconds - self._offset

    def __call__(self, fn: Callable, label: str) -> "CompiledPass":
        self.passes.append(label)
        return CompiledPass(self, fn, label)

    def close(self) -> None:
        """Stop reporting (the compiled passes keep working)."""
        if self in _TALLY.listeners:
            _TALLY.listeners.remove(self)

    def describe(self) -> str:
        how = self.backend if self.mode is None else f"{self.backend}, mode {self.mode}"
        return f"torch.compile ({how})"

    # -- progress lines ---------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)

    def _started(self, args: Any, label: str) -> None:
        trigger = _trigger(args)
        if trigger == "CUDAGRAPH_RECORDING":
            return  # sub-second, once per pass; counted, not announced
        if not self._announced:
            self._announced = True
            cache = inductor_cache_dir() if self.backend == "inductor" else "none"
            self._say(f"compiling {len(self.passes)} network passes with {self.describe()} during the first "
                      f"iterations; Inductor cache: {cache}")
        what = f"{label} (backward)" if trigger == "LAZY_BACKWARD" else label
        self._say(f"compiling {what} ...")

    def _ended(self, args: Any, label: str, seconds: float) -> None:
        if self.timings is not None:
            self.timings["compile_s"] = self.seconds
        trigger = _trigger(args)
        if trigger == "CUDAGRAPH_RECORDING":
            return
        what = f"{label} (backward)" if trigger == "LAZY_BACKWARD" else label
        self._say(f"compiled {what} in {seconds:.1f} s (compiling so far: {self.seconds:.1f} s)")


def inductor_options(mode: Optional[str]) -> dict[str, Any]:
    """Inductor settings of ``mode`` (as ``torch.compile(mode=...)`` would set them) without its layout
    optimisation: with it, torch 2.13's Inductor returned zero input gradients through a UNet up block on
    the CPU (the convolution-backward lowering added for channels-last). Channels-last weights
    (``perf.channels_last``) give the NHWC convolution kernels instead."""
    from torch._inductor import list_mode_options  # heavy: torch._inductor loads only when needed

    return {**(list_mode_options(mode) if mode else {}), "layout_optimization": False}


class CompiledPass:
    """One network pass run through ``torch.compile``; ``eager`` is the same function uncompiled."""

    def __init__(self, compiler: Compiler, fn: Callable, label: str):
        self.compiler, self.eager, self.label = compiler, fn, label
        options: dict[str, Any] = dict(backend=compiler.backend, dynamic=False)
        if compiler.backend == "inductor":
            options["options"] = inductor_options(compiler.mode)
        self.compiled = torch.compile(fn, **options)

    def __call__(self, *args: Any) -> Any:
        _TALLY.register()
        previous = getattr(_TALLY.label, "name", None)
        _TALLY.label.name = self.label
        try:
            out = self.compiled(*args)
        finally:
            _TALLY.label.name = previous
        if self.compiler.cuda_graphs:
            out = tree_map_only(torch.Tensor, torch.Tensor.clone, out)
        return out


def eager(fn: Callable) -> Callable:
    """The uncompiled function behind a pass (itself when it is not compiled)."""
    return fn.eager if isinstance(fn, CompiledPass) else fn


@runtime_checkable
class Compilable(Protocol):
    """A network object with passes to compile: it hands them to the compiler itself (the Stable Diffusion prior,
    the LoRA ε_φ, the DINOv2 pose classifier)."""

    def compile_passes(self, compiler: "Compiler") -> None: ...


def compile_networks(compiler: Compiler, *networks: Any) -> list[str]:
    """Hand ``compiler`` to each network object that has passes to compile (the Stable Diffusion prior,
    the LoRA ε_φ, the DINOv2 pose classifier); others (the synthetic prior and its kernel ε_φ, None) are
    left as they are. Returns the names of the compiled passes."""
    for network in networks:
        if isinstance(network, Compilable):
            network.compile_passes(compiler)
    return list(compiler.passes)


def make_compiler(perf: PerfConfig, device: torch.device, iterations: int, echo: Optional[Echo] = None,
                  timings: Optional[dict] = None) -> Optional[Compiler]:
    """The run's compiler, or None when ``perf.compile`` leaves this run eager."""
    if timings is not None:
        timings.setdefault("compile_s", 0.0)
    if not should_compile(perf, device, iterations):
        return None
    return Compiler(device, perf.compile_mode, BACKEND, echo=echo, timings=timings)


BACKEND = "inductor"  # torch.compile backend of runs; the tests swap in aot_eager or eager (same graphs, no codegen)

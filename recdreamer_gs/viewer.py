"""Live web viewer (viser): a run's Gaussians while they train (``run --viewer``), or 3DGS PLY files
(``recdreamer-gs view``).

viser serves a page that renders Gaussian splats in the browser itself (WebGL), so the training
process only hands over centres, covariances, colours and opacities (32 bytes per Gaussian) now
and then; the sending happens on viser's own thread, and nothing waits for a browser. Import this
module only when a viewer is asked for: viser is imported by ``Viewer`` and nowhere else.

Frame: the page shows the internal frame (+y up, the object's front facing +z, where the initial
camera stands). PLY files are read back into it with ``read_ply``, so a file in the viewer frame
(y down, COLMAP-style, the default of ``model.ply``) shows upright too. Colours are the SH DC term
(viser's splat renderer has no view-dependent colour).
"""

from __future__ import annotations

import contextlib
import html
import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from recdreamer_gs.config import RunConfig, needs
from recdreamer_gs.errors import os_cause
from recdreamer_gs.export import PlyError, finite_rows, read_splats
from recdreamer_gs.gaussians import sh0_to_rgb
from recdreamer_gs.model_files import write_particles
from recdreamer_gs.ranks import is_secondary_rank

if TYPE_CHECKING:  # pragma: no cover
    import viser

DEFAULT_PORT = 8080
MAX_STD = 250.0  # viser stores covariances as float16 (max 65504): variances are capped at 250²
VIEW_FOVY = 40.0  # degrees: the initial camera's field of view (the training cameras' default)
VIEW_ELEVATION = 15.0  # degrees above the horizon for the initial camera, as the preview orbit


@dataclass
class Splats:
    """One Gaussian set in viser's formats (numpy, float32)."""

    centers: np.ndarray  # [N, 3]
    covariances: np.ndarray  # [N, 3, 3] = R diag(s²) Rᵀ
    rgbs: np.ndarray  # [N, 3] in [0, 1]
    opacities: np.ndarray  # [N, 1] in [0, 1]

    def __len__(self) -> int:
        return self.centers.shape[0]

    def extent(self) -> float:
        """Radius around the median centre holding 95% of the centres (robust to floaters)."""
        if len(self) == 0:
            return 1.0
        r = np.linalg.norm(self.centers - np.median(self.centers, axis=0), axis=1)
        return max(float(np.quantile(r, 0.95)), 1e-3)


@torch.no_grad()
def splats_from_params(params: Mapping[str, Tensor]) -> Splats:
    """viser's arrays from ``Gaussians.params`` (log scales, wxyz quats, opacity logits, SH DC):
    covariance R diag(exp(2s)) Rᵀ, colour 0.5 + C0·sh0, opacity sigmoid; non-finite rows dropped."""
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci  # pure PyTorch, no CUDA build

    p = {k: params[k].detach().to("cpu", torch.float32) for k in ("means", "scales", "quats", "opacities", "sh0")}
    keep = finite_rows(p)
    p = {k: v[keep] for k, v in p.items()}
    scales = p["scales"].clamp(max=math.log(MAX_STD)).exp()
    covars, _ = _quat_scale_to_covar_preci(p["quats"], scales, compute_covar=True, compute_preci=False)
    n = p["means"].shape[0]
    return Splats(
        centers=p["means"].numpy(),
        covariances=covars.numpy(),
        rgbs=sh0_to_rgb(p["sh0"].reshape(n, 3)).clamp(0.0, 1.0).numpy(),
        opacities=torch.sigmoid(p["opacities"]).reshape(n, 1).numpy(),
    )


def push_delay(cost_s: float, min_interval_s: float, budget: float) -> float:
    """Seconds to wait after a push that took ``cost_s`` so that pushing takes at most ``budget`` of
    the wall time (and pushes come no closer than ``min_interval_s``)."""
    return max(min_interval_s, cost_s / budget)


def histogram_html(probs: Mapping[str, float], caption: str) -> str:
    """The pose histogram as HTML bars (one row per class)."""
    rows = "".join(
        f'<div style="display:flex;align-items:center;gap:6px;margin:2px 0">'
        f'<span style="width:3.5em">{html.escape(name)}</span>'
        f'<span style="flex:1;background:#e4e4e7;height:10px;border-radius:2px">'
        f'<span style="display:block;width:{100 * min(max(p, 0.0), 1.0):.1f}%;height:10px;'
        f'background:#2563eb;border-radius:2px"></span></span>'
        f'<span style="width:3em;text-align:right">{p:.2f}</span></div>'
        for name, p in probs.items()
    )
    return (f'<div style="font-size:0.85em;padding:0 0.75em"><div style="opacity:0.7;margin-bottom:2px">'
            f'{html.escape(caption)}</div>{rows}</div>')


class Viewer:
    """A viser server on localhost showing one or more Gaussian sets side by side (or one at a time)."""

    def __init__(self, port: int = DEFAULT_PORT, title: str = "recdreamer-gs", host: str = "127.0.0.1"):
        import viser  # heavy: viser loads only when needed

        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        # A browser's speculative connections that close before a request make websockets log a traceback.
        logging.getLogger("websockets.server").setLevel(logging.CRITICAL)
        # viser prints a banner of its own on start and stop; the caller says the URL once.
        with contextlib.redirect_stdout(io.StringIO()):
            self.server: viser.ViserServer = viser.ViserServer(host=host, port=port, label=title, verbose=False)
        self.host, self.requested_port = host, port
        self.port = self.server.get_port()  # viser moves on to the next free port when one is taken
        self.server.scene.set_up_direction("+y")
        self.handles: list = []
        self.labels: list[str] = []
        self.offsets: list[np.ndarray] = []  # per set: where it sits in the side-by-side row
        self.spacing: Optional[float] = None
        self.show_menu = None  # dropdown "all side by side" / one set, when there are several
        self.lock = threading.Lock()  # show() (training thread) vs the dropdown callback (viser's thread)

    def training_callback(self, cfg: RunConfig, out_dir: Path) -> "TrainingViewer":
        """The Lightning callback that shows the run's particles here."""
        return TrainingViewer(self, cfg, out_dir)

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "localhost") else self.host
        return f"http://{host}:{self.port}"

    def banner(self) -> str:
        """The one line that tells the user where to look."""
        if self.requested_port not in (0, self.port):
            return f"viewer: port {self.requested_port} is in use; serving on {self.url} instead"
        return f"viewer: {self.url}"

    def frame_camera(self, extent: float, distance: Optional[float] = None, fovy: float = VIEW_FOVY,
                     elevation: float = VIEW_ELEVATION) -> None:
        """Initial camera for new pages: in front of the row (+z), a little above, seeing all of it."""
        half = math.radians(fovy) / 2
        if distance is None:
            distance = 1.4 * extent / math.tan(half)
        if len(self.offsets) > 1:  # the whole row in a 16:9 page
            row = max(abs(float(o[0])) for o in self.offsets) + extent
            distance = max(distance, 1.1 * row / (math.tan(half) * 16 / 9))
        e = math.radians(elevation)
        cam = self.server.initial_camera
        cam.look_at = (0.0, 0.0, 0.0)
        cam.position = (0.0, distance * math.sin(e), distance * math.cos(e))
        cam.up = (0.0, 1.0, 0.0)
        cam.fov = math.radians(fovy)

    def show(self, sets: Sequence[Splats], labels: Sequence[str], centre: bool = False) -> None:
        """Send the sets to every page (and to pages that open later). The first call fixes the layout:
        a row along x, ``spacing`` apart; ``centre`` moves each set's median centre to its slot."""
        with self.lock:
            if len(sets) != len(self.handles):
                self._layout(sets, labels, centre)
            for handle, s in zip(self.handles, sets):
                handle.set_gaussians(s.centers, s.covariances, s.rgbs, s.opacities)

    def _layout(self, sets: Sequence[Splats], labels: Sequence[str], centre: bool) -> None:
        for handle in self.handles:
            handle.remove()
        if self.show_menu is not None:
            self.show_menu.remove()
            self.show_menu = None
        self.spacing = 3.0 * max(s.extent() for s in sets)
        n = len(sets)
        self.labels = list(labels)
        self.offsets = [np.array([(i - (n - 1) / 2) * self.spacing, 0.0, 0.0]) for i in range(n)]
        self.handles = []
        for i, s in enumerate(sets):
            shift = -np.median(s.centers, axis=0) if centre and len(s) else np.zeros(3)
            handle = self.server.scene.add_gaussian_splats(
                f"/splats/{i}", centers=s.centers, covariances=s.covariances, rgbs=s.rgbs, opacities=s.opacities)
            handle.position = tuple(float(v) for v in self.offsets[i] + shift)
            self.handles.append(handle)
            self.offsets[i] = self.offsets[i] + shift
        if n > 1:
            self.show_menu = self.server.gui.add_dropdown("Show", ("all side by side", *self.labels), order=0)
            self.show_menu.on_update(lambda _: self._select(self.show_menu.value))

    def _select(self, choice: str) -> None:
        """Show every set in its slot, or only the chosen one, at the centre."""
        with self.lock:
            for handle, label, offset in zip(self.handles, self.labels, self.offsets):
                alone = choice == label
                handle.visible = choice not in self.labels or alone
                slot = offset - np.array([offset[0], 0.0, 0.0]) if alone else offset
                handle.position = tuple(float(v) for v in slot)

    def stop(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()

    def wait(self) -> None:
        """Serve until Ctrl-C."""
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


# -- recdreamer-gs view ---------------------------------------------------------------------------


def ply_paths(paths: Sequence[Path]) -> list[Path]:
    """The PLY files named, a run folder standing for its model.ply / model_<i>.ply."""
    out: list[Path] = []
    for path in paths:
        if Path(path).is_dir():
            found = sorted(Path(path).glob("model.ply")) or sorted(
                Path(path).glob("model_*.ply"), key=lambda p: (len(p.name), p.name))
            if not found:
                raise PlyError(f"{path}: a folder without model.ply or model_<i>.ply; give the PLY file(s)")
            out += found
        else:
            out.append(Path(path))
    return out


def open_plys(paths: Sequence[Path], port: int = DEFAULT_PORT, frame: str = "viewer") -> Viewer:
    """A viewer showing these 3DGS PLY files side by side (read first: a bad file starts no server)."""
    files = ply_paths(paths)
    sets = [splats_from_params(read_splats(path, frame=frame)) for path in files]
    labels = [p.name for p in files]
    if len(set(labels)) < len(labels):  # e.g. two runs' model.ply: name them by folder too
        labels = [f"{p.parent.name}/{p.name}" for p in files]
    viewer = Viewer(port, title=files[0].name if len(files) == 1 else f"{len(files)} PLY files")
    viewer.show(sets, labels, centre=True)
    count = sum(len(s) for s in sets)
    viewer.server.gui.add_markdown(f"**{html.escape(', '.join(labels))}**  \n{count:,} Gaussians", order=-1)
    viewer.frame_camera(max(s.extent() for s in sets))
    return viewer


# -- run --viewer ---------------------------------------------------------------------------------


def fit_watched(port: Optional[int], cfg: RunConfig, out_dir: Path, fit: Callable[[list], Any],
                echo: Callable[[str], None] = print) -> None:
    """``fit(extra_callbacks)`` of ``run``; with a ``port`` (``run --viewer``) a live viewer watches it from
    rank 0 (data-parallel ranks above 0 serve nothing)."""
    if port is None or is_secondary_rank():
        return fit([])
    live = Viewer(port)
    try:
        echo(live.banner())
        fit([live.training_callback(cfg, out_dir)])
    finally:
        live.stop()


class TrainingViewer(L.Callback):
    """Shows the particles of a run while they train, with pause/resume and "write model.ply now".

    Pushes happen at the end of an iteration, at most every ``min_interval_s`` and never more than
    ``budget`` of the wall time (a push's cost sets the wait before the next). Only rank 0 of a
    data-parallel run serves (its own particles). Several stages reuse one viewer.
    """

    POSE_EMA = 0.2  # weight of the newest reading in the shown pose histogram (one per info update)

    def __init__(self, viewer: Viewer, cfg: RunConfig, out_dir: Path, min_interval_s: float = 0.5,
                 budget: float = 0.02, info_interval_s: float = 0.5, clock: Callable[[], float] = time.perf_counter):
        self.viewer, self.cfg, self.out_dir = viewer, cfg, Path(out_dir)
        self.min_interval_s, self.budget, self.info_interval_s = min_interval_s, budget, info_interval_s
        self.clock = clock
        self.pushes = 0  # pushes so far, and the seconds they took on the training thread
        self.push_seconds = 0.0
        self.paused = threading.Event()
        self.write_requested = threading.Event()
        self._next_push = self._next_info = 0.0
        self._pose: Optional[np.ndarray] = None  # EMA of the logged pose/<class> batch means
        self._pose_names: tuple[str, ...] = ()
        gui = viewer.server.gui
        gui.add_markdown(f"**{html.escape(cfg.prompt)}**", order=-2)
        self.info = gui.add_markdown("starting…", order=1)
        self.pose_html = gui.add_html("", order=2)
        self.pause_button = gui.add_button("Pause training", order=3)
        self.write_button = gui.add_button("Write model files now", order=4)
        self.status = gui.add_markdown("", order=5)
        self.pause_button.on_click(lambda _: self._toggle_pause())
        self.write_button.on_click(lambda _: self._request_write())

    # GUI thread: only flags; the training thread acts on them between iterations.
    def _toggle_pause(self) -> None:
        if self.paused.is_set():
            self.paused.clear()
        else:
            self.paused.set()

    def _request_write(self) -> None:
        self.write_requested.set()
        self.status.content = "writing at the end of this iteration…"

    # Training thread.
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._pose = None
            self.push(pl_module)
            self.update_info(trainer, pl_module, "training")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        if self.write_requested.is_set():
            self.write_now(pl_module)
        if self.paused.is_set():
            self.wait_while_paused(trainer, pl_module)
        now = self.clock()
        if now >= self._next_info:
            self.update_info(trainer, pl_module, "training")
            self._next_info = now + self.info_interval_s
        if now >= self._next_push:
            cost = self.push(pl_module)
            self._next_push = now + push_delay(cost, self.min_interval_s, self.budget)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self.push(pl_module)
            self.update_info(trainer, pl_module, "finished")

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if trainer.is_global_zero:
            why = "interrupted" if isinstance(exception, KeyboardInterrupt) else f"stopped ({type(exception).__name__})"
            self.update_info(trainer, pl_module, why)

    def push(self, pl_module: Any) -> float:
        """Send the current particles; returns the seconds it took on this thread."""
        start = self.clock()
        sets = [splats_from_params(g.params) for g in pl_module.particles]
        labels = ["model"] if self.cfg.train.particles == 1 else [f"particle {i}" for i in pl_module.particle_ids]
        if self.viewer.spacing is None:
            self.viewer.show(sets, labels)
            c = self.cfg.camera
            self.viewer.frame_camera(max(s.extent() for s in sets), distance=0.5 * sum(c.radius_range),
                                     fovy=0.5 * sum(c.fovy_range), elevation=c.preview_elevation)
        else:
            self.viewer.show(sets, labels)
        cost = self.clock() - start
        self.pushes += 1
        self.push_seconds += cost
        return cost

    def wait_while_paused(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Hold the training loop (Ctrl-C and SIGTERM still stop the run), serving "write now" meanwhile."""
        start = time.perf_counter()
        self.push(pl_module)
        self.update_info(trainer, pl_module, "paused")
        self.pause_button.label = "Resume training"
        while self.paused.is_set() and not getattr(trainer, "received_sigterm", False):  # SIGTERM ends it too
            if self.write_requested.is_set():
                self.write_now(pl_module)
            time.sleep(0.05)
        self.pause_button.label = "Pause training"
        # Not training time: the run's ms/iteration leaves it out.
        pl_module.paused_seconds = getattr(pl_module, "paused_seconds", 0.0) + time.perf_counter() - start
        self.update_info(trainer, pl_module, "training")

    def write_now(self, pl_module: Any) -> None:
        """This process's particles in the run's output formats with the end-of-run writer (atomic)."""
        self.write_requested.clear()
        try:
            written = write_particles(pl_module, self.out_dir, self.cfg)
        except OSError as err:
            self.status.content = html.escape(f"could not write {err.filename or self.out_dir}: {os_cause(err)}; "
                                              "the files written before are unchanged")
            return
        files = ", ".join(w.describe() for w in written)
        self.status.content = html.escape(f"wrote {files} at iteration {pl_module.iteration} into {self.out_dir}")

    def _track_pose(self, trainer: L.Trainer, pl_module: Any) -> None:
        """EMA of the logged pose/<class> batch means (read with the info, so no host sync per iteration)."""
        names = tuple(getattr(pl_module, "class_names", ()) or ())
        metrics = pl_module.logged
        if not names or any(f"pose/{n}" not in metrics for n in names):
            return
        batch = np.array([float(metrics[f"pose/{n}"]) for n in names])
        if self._pose is None or self._pose_names != names:
            self._pose, self._pose_names = batch, names
        else:
            self._pose = (1 - self.POSE_EMA) * self._pose + self.POSE_EMA * batch

    def update_info(self, trainer: L.Trainer, pl_module: Any, state: str) -> None:
        run, stage_cfg = self.cfg, pl_module.cfg
        stage = ""
        if run.stages:
            k = getattr(pl_module, "stage", 0)
            stage = f" · stage {k + 1}/{len(run.stages)} ({html.escape(run.stages[k].name)})"
        count = sum(len(g) for g in pl_module.particles)
        self.info.content = (
            f"**iteration** {pl_module.iteration} / {stage_cfg.train.steps}{stage} · {state}  \n"
            f"**method** {stage_cfg.distill.method} · **prior** {getattr(pl_module.prior, 'name', '?')}  \n"
            f"**Gaussians** {count:,}"
            + (f" in {len(pl_module.particles)} particles" if len(pl_module.particles) > 1 else ""))
        self._track_pose(trainer, pl_module)
        if self._pose is not None:
            self.pose_html.content = histogram_html(dict(zip(self._pose_names, self._pose.tolist())),
                                                    "pose histogram of the rendered views (recent mean)")
        elif not needs(stage_cfg.distill.method).pose_classifier:
            self.pose_html.content = histogram_html({}, f"no pose histogram: {stage_cfg.distill.method} runs "
                                                        "no pose classifier")


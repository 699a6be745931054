"""``run --viewer``: the Lightning callback that shows a run's particles in the web viewer (viewer.py) while
they train, with pause/resume and "write the model files now", and ``fit_watched``, which ``run`` trains under.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import lightning as L
import numpy as np

from recdreamer_gs.config import RunConfig, needs
from recdreamer_gs.errors import os_cause
from recdreamer_gs.model_files import write_particles
from recdreamer_gs.ranks import is_secondary_rank
from recdreamer_gs.viewer import Viewer, splats_from_params


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


def fit_watched(port: Optional[int], cfg: RunConfig, out_dir: Path, fit: Callable[[list], Any],
                echo: Callable[[str], None] = print) -> None:
    """``fit(extra_callbacks)`` of ``run``; with a ``port`` (``run --viewer``) a live viewer watches it from
    rank 0 (data-parallel ranks above 0 serve nothing)."""
    if port is None or is_secondary_rank():
        return fit([])
    live = Viewer(port)
    try:
        echo(live.banner())
        fit([TrainingViewer(live, cfg, out_dir)])
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

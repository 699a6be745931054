"""Web viewer (viser) of Gaussian sets: 3DGS PLY files (``recdreamer-gs view``), and the server that
``run --viewer`` shows a run's Gaussians in while they train (its training callback: live_viewer.py).

viser serves a page that renders Gaussian splats in the browser itself (WebGL), so a process only
hands over centres, covariances, colours and opacities (32 bytes per Gaussian) now and then; the
sending happens on viser's own thread, and nothing waits for a browser. Import this module only
when a viewer is asked for: viser is imported by ``Viewer`` and nowhere else. Nothing here loads
Lightning, so ``view`` starts in about a second.

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
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from recdreamer_gs.export import PlyError, finite_rows, read_splats
from recdreamer_gs.gaussians import sh0_to_rgb

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

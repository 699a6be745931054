"""The live viewer: viser's page and websocket serve the splats (checked with viser's own wire protocol), the
training controls act on the run, and nothing of viser is imported or waited for when it is not asked for."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import msgspec  # viser's wire format: msgpack, zstd-compressed
import numpy as np
import pytest
import torch
import viser
import zstandard
from typer.testing import CliRunner

from recdreamer_gs import prior_choice, training
from recdreamer_gs.cli import app
from recdreamer_gs.config import load_config, parse_override
from recdreamer_gs.export import PlyError, write_ply
from recdreamer_gs.gaussians import rgb_to_sh0
from recdreamer_gs.live_viewer import TrainingViewer, push_delay
from recdreamer_gs.viewer import Viewer, open_plys, splats_from_params

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [
    "train.steps=6", "train.progress_bar=false", "output.turntable_frames=0", "train.preview_every=0",
    "gaussians.num_init=120", "prior.synthetic.resolution=32", "prior.kind=synthetic", "train.device=cpu",
    "distill.method=usd",
]


class Page:
    """Stands in for the browser: viser's websocket protocol. Each server frame is
    [u64 msgpack size][u64 zstd size][zstd(msgpack {messages, binaryBufferLengths})][8-aligned raw buffers]."""

    def __init__(self, port: int):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"], max_size=None)
        self.messages: list[tuple[dict, list[bytes]]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # The page reports its camera first; viser counts it as a client from then on (GUI events need that).
        self.send({"type": "ViewerCameraMessage", "wxyz": [1.0, 0.0, 0.0, 0.0], "position": [0.0, 0.0, 3.0],
                   "fov": 0.7, "near": 0.01, "far": 100.0, "image_height": 600, "image_width": 800,
                   "look_at": [0.0, 0.0, 0.0], "up_direction": [0.0, 1.0, 0.0]})

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                raw = self.ws.recv()
                decoded = decode_frame(raw)
                with self.lock:
                    self.messages += decoded
        except (ConnectionClosed, OSError):
            pass

    def send(self, message: dict) -> None:
        self.ws.send(msgspec.msgpack.encode(message))

    def find(self, predicate: Callable[[dict], bool]) -> list[tuple[dict, list[bytes]]]:
        with self.lock:
            return [(m, b) for m, b in self.messages if predicate(m)]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> tuple[dict, list[bytes]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.find(predicate)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no such message within {timeout} s; got types "
                             f"{sorted({m['type'] for m, _ in self.find(lambda m: True)})}")

    def splat_counts(self) -> dict[str, int]:
        """Latest Gaussian count per splat node, from the create and buffer-update messages."""
        counts: dict[str, int] = {}
        for m, buffers in self.find(lambda m: True):
            if m["type"] == "GaussianSplatsMessage":
                counts[m["name"]] = len(buffers[m["props"]["buffer"]["__binary_index"]]) // 32
            elif m["type"] == "SceneNodeUpdateMessage" and "buffer" in m["updates"]:
                counts[m["name"]] = len(buffers[m["updates"]["buffer"]["__binary_index"]]) // 32
        return counts

    def gui(self, type_: str, **props: Any) -> dict:
        """The latest state of a GUI element: its create message with later updates applied."""
        (created, _), *_ = self.find(lambda m: m["type"] == type_ and all(m["props"].get(k) == v
                                                                            for k, v in props.items()))
        state = dict(created["props"], uuid=created["uuid"])
        for m, _ in self.find(lambda m: m["type"] == "GuiUpdateMessage" and m["uuid"] == created["uuid"]):
            state.update(m["updates"])
        return state

    def click(self, uuid: str) -> None:
        self.send({"type": "GuiUpdateMessage", "uuid": uuid, "updates": {"value": True}})

    def close(self) -> None:
        self.ws.close()
        self.thread.join(timeout=10)


def decode_frame(raw: bytes) -> list[tuple[dict, list[bytes]]]:
    size, packed = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little")
    inner = msgspec.msgpack.decode(zstandard.ZstdDecompressor().decompress(raw[16:16 + packed], max_output_size=size))
    buffers, offset = [], 16 + packed
    for length in inner["binaryBufferLengths"]:
        offset += (8 - offset % 8) % 8
        buffers.append(raw[offset:offset + length])
        offset += length
    return [(m, buffers) for m in inner["messages"]]


def splat_centers(buffer: bytes) -> np.ndarray:
    """Centres from viser's 32-byte splat records (3 float32, then reserved, covariance and colour)."""
    return np.frombuffer(buffer, dtype=np.float32).reshape(-1, 8)[:, :3]


def gaussian_params(means: torch.Tensor, rgb=(0.8, 0.2, 0.2)) -> dict[str, torch.Tensor]:
    n = means.shape[0]
    return {"means": means.float(), "scales": torch.full((n, 3), -3.0),
            "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
            "opacities": torch.full((n,), 2.0), "sh0": rgb_to_sh0(torch.tensor(rgb)).repeat(n, 1, 1),
            "shN": torch.zeros(n, 0, 3)}


@pytest.fixture
def no_leaked_threads():
    """Every test here stops what it starts: no server, client or viser pool thread survives it."""
    before = set(threading.enumerate())
    yield
    deadline = time.time() + 10
    while time.time() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"threads left running: {[t.name for t in left]}")


def test_splats_from_params_uses_viser_formats():
    angle = math.pi / 2  # 90° about z: the x and y axes swap
    params = gaussian_params(torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0]]))
    params["quats"][0] = torch.tensor([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]) * 3.0  # unnormalised
    params["scales"][0] = torch.log(torch.tensor([0.1, 0.2, 0.3]))
    params["opacities"][0] = 0.0
    params["sh0"][0] = rgb_to_sh0(torch.tensor([[0.25, 0.5, 1.0]]))
    s = splats_from_params(params)
    assert len(s) == 2  # the NaN row is dropped
    np.testing.assert_allclose(s.centers[0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(s.covariances[0], np.diag([0.2**2, 0.1**2, 0.3**2]), atol=1e-7)
    np.testing.assert_allclose(s.rgbs[0], [0.25, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(s.opacities[:, 0], [0.5, 1 / (1 + math.exp(-2.0))], atol=1e-6)
    assert s.centers.dtype == s.covariances.dtype == np.float32
    assert s.opacities.shape == (2, 1) and s.rgbs.shape == (2, 3)


def test_push_delay_keeps_pushing_within_the_budget():
    assert push_delay(0.001, 0.5, 0.02) == 0.5  # cheap pushes: at most every min interval
    assert push_delay(0.1, 0.5, 0.02) == pytest.approx(5.0)  # costly pushes: spaced so they take 2%
    cost, delay = 0.3, push_delay(0.3, 0.5, 0.02)
    assert cost / delay <= 0.02 + 1e-12


def test_view_serves_page_and_splats(tmp_path, no_leaked_threads):
    gen = torch.Generator().manual_seed(0)
    means_a = torch.randn(50, 3, generator=gen) * 0.3 + torch.tensor([0.0, 0.5, 0.0])
    means_b = torch.randn(70, 3, generator=gen) * 0.3
    write_ply(tmp_path / "a.ply", gaussian_params(means_a))  # viewer frame (y down) on disk
    write_ply(tmp_path / "b.ply", gaussian_params(means_b), frame="y-up")
    with pytest.raises(PlyError, match="no such file"):
        open_plys([tmp_path / "missing.ply"], port=0)

    viewer = open_plys([tmp_path / "a.ply"], port=0)
    page = None
    try:
        html = urllib.request.urlopen(f"http://127.0.0.1:{viewer.port}/", timeout=30).read().decode()
        assert "<title>Viser</title>" in html and len(html) > 100_000  # viser's client, from the wheel
        page = Page(viewer.port)
        message, buffers = page.wait_for(lambda m: m["type"] == "GaussianSplatsMessage")
        assert page.splat_counts() == {"/splats/0": 50}
        # The file's y-down frame is undone: the page gets the internal frame (+y up), each set centred.
        sent = splat_centers(buffers[message["props"]["buffer"]["__binary_index"]])
        position = page.wait_for(lambda m: m["type"] == "SetPositionMessage" and m["name"] == "/splats/0")[0]
        np.testing.assert_allclose(sent + np.array(position["position"]),
                                   means_a.numpy() - np.median(means_a.numpy(), axis=0), atol=1e-5)
        up = page.wait_for(lambda m: m["type"] == "SetCameraUpDirectionMessage")[0]
        camera = page.wait_for(lambda m: m["type"] == "SetCameraPositionMessage")[0]
        assert up["position"] == [0.0, 1.0, 0.0] and camera["position"][2] > 0  # in front (+z), looking at it
        assert page.gui("GuiMarkdownMessage")  # the file name and count
    finally:
        if page:
            page.close()
        viewer.stop()


def test_view_several_files_side_by_side_and_switchable(tmp_path, no_leaked_threads):
    for name, n in (("a.ply", 30), ("b.ply", 40)):
        write_ply(tmp_path / name, gaussian_params(torch.randn(n, 3) * 0.2))
    viewer = open_plys([tmp_path / "a.ply", tmp_path / "b.ply"], port=0)
    page = Page(viewer.port)
    try:
        page.wait_for(lambda m: m["type"] == "GaussianSplatsMessage" and m["name"] == "/splats/1")
        assert page.splat_counts() == {"/splats/0": 30, "/splats/1": 40}
        xs = [page.wait_for(lambda m, i=i: m["type"] == "SetPositionMessage" and m["name"] == f"/splats/{i}")[0]
              for i in (0, 1)]
        assert xs[0]["position"][0] < xs[1]["position"][0]  # side by side along x
        menu = page.gui("GuiDropdownMessage")
        assert list(menu["options"]) == ["all side by side", "a.ply", "b.ply"]
        page.send({"type": "GuiUpdateMessage", "uuid": menu["uuid"], "updates": {"value": "b.ply"}})
        hidden = page.wait_for(lambda m: m["type"] == "SetSceneNodeVisibilityMessage" and m["name"] == "/splats/0"
                               and not m["visible"])
        assert hidden
    finally:
        page.close()
        viewer.stop()


def test_view_cli_errors_are_one_line(tmp_path):
    from plyfile import PlyData, PlyElement

    cloud = np.zeros(5, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(cloud, "vertex")]).write(str(tmp_path / "cloud.ply"))
    runner = CliRunner()
    for args, fragment in ((["view", str(tmp_path / "cloud.ply")], "not a 3DGS PLY"),
                           (["view", str(tmp_path / "none.ply")], "no such file"),
                           (["view", str(tmp_path)], "without model.ply"),
                           (["view", str(tmp_path / "cloud.ply"), "--port", "70000"], "--port: expected 0..65535"),
                           (["run", "a cat", "--viewer", "--port", "-1"], "--port: expected 0..65535")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and fragment in " ".join(result.output.split())
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_training_viewer_shows_the_run_and_its_controls_act(tmp_path, no_leaked_threads):
    """A page connected before training: it pauses the run, asks for model.ply while paused, resumes; it
    gets the Gaussians (with the final count), the iteration, method, prior and pose histogram."""
    cfg = load_config("preview", overrides=[parse_override(s) for s in SETTINGS])
    device = torch.device("cpu")
    out = tmp_path / "run"
    out.mkdir()
    viewer = Viewer(0)
    callback = TrainingViewer(viewer, cfg, out)
    page = Page(viewer.port)
    held = {}

    def operator() -> None:  # what a user does in the browser, from another thread
        resumed = False
        try:
            pause = page.gui("GuiButtonMessage", label="Pause training")
            page.click(pause["uuid"])
            page.wait_for(lambda m: m["type"] == "GuiUpdateMessage" and "· paused" in str(m["updates"]), timeout=240)
            assert not (out / "model.ply").exists()
            page.click(page.gui("GuiButtonMessage", label="Write model files now")["uuid"])
            deadline = time.time() + 120
            while not (out / "model.ply").exists() and time.time() < deadline:
                time.sleep(0.05)
            held["written_while_paused"] = (out / "model.ply").exists()
            time.sleep(0.5)
            held["paused_label"] = page.gui("GuiButtonMessage", label="Pause training")["label"]
            page.click(pause["uuid"])  # the same button, now labelled "Resume training"
            resumed = True
        finally:
            if not resumed:
                callback.paused.clear()  # never leave the run held if this thread failed

    try:
        page.wait_for(lambda m: m["type"] == "GuiButtonMessage")
        thread = threading.Thread(target=operator, daemon=True)
        thread.start()
        start = time.perf_counter()
        system = training.fit(cfg, out, prior_choice.build_prior(cfg, device), device, extra_callbacks=[callback])
        wall = time.perf_counter() - start
        thread.join(timeout=240)
        assert held["written_while_paused"] and held["paused_label"] == "Resume training"
        assert system.paused_seconds >= 0.5 and callback.pushes >= 3
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["train_seconds"] <= wall - system.paused_seconds + 0.01  # a pause is not training time
        info = str(page.wait_for(lambda m: m["type"] == "GuiUpdateMessage" and "finished" in str(m["updates"]))[0])
        assert "6 / 6" in info and "usd" in info and "synthetic" in info
        assert page.splat_counts() == {"/splats/0": len(system.gaussians)}
        pose = str(page.wait_for(lambda m: m["type"] == "GuiUpdateMessage" and "pose histogram" in str(m))[0])
        assert all(name in pose for name in system.class_names)
    finally:
        page.close()
        viewer.stop()


def test_training_viewer_serves_from_rank_zero_only(tmp_path, monkeypatch, no_leaked_threads):
    from recdreamer_gs import cli

    cfg = load_config("preview", overrides=[parse_override(s) for s in SETTINGS])
    got = {}
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started for rank 1
    cli._fit(0, cfg, tmp_path, lambda callbacks: got.setdefault("callbacks", callbacks))
    assert got["callbacks"] == []  # no server in ranks above 0
    viewer = Viewer(0)
    try:
        callback = TrainingViewer(viewer, cfg, tmp_path)
        rank1 = SimpleNamespace(is_global_zero=False)
        callback.on_train_start(rank1, None)  # would fail on a None module if it did anything
        callback.on_train_batch_end(rank1, None, None, None, 0)
        callback.on_train_end(rank1, None)
        assert callback.pushes == 0
    finally:
        viewer.stop()


def test_pushing_never_waits_on_pages(no_leaked_threads):
    """With no page, or with a page that connected and stopped reading, a push returns at once (viser
    queues and coalesces the updates on its own thread)."""
    viewer = Viewer(0)
    stalled = socket.create_connection(("127.0.0.1", viewer.port))
    try:
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        stalled.sendall((f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"Sec-WebSocket-Protocol: viser-v{viser.__version__}\r\n\r\n").encode())
        assert b"101" in stalled.recv(1024).split(b"\r\n")[0]  # upgraded; it never reads from here on
        big = splats_from_params(gaussian_params(torch.randn(100_000, 3)))
        done = threading.Event()

        def pushes() -> None:
            for _ in range(10):  # 32 MB in all, far more than the socket buffers hold
                viewer.show([big], ["model"])
            done.set()

        thread = threading.Thread(target=pushes, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert done.is_set(), "a push waited on a page that does not read"
    finally:
        stalled.close()
        viewer.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_with_viewer_ctrl_c_keeps_checkpoint_behaviour(tmp_path):
    """A real SIGINT to ``run --viewer``: checkpoint + PLY first, exit 130; the URL was said once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = free_port()
    cmd = [sys.executable, "-m", "recdreamer_gs.cli", "run", "a cat", "--steps", "100000", "--device", "cpu",
           "--out", str(tmp_path), "--viewer", "--port", str(port), "--set", "train.progress_bar=false",
           "--set", "train.preview_every=2", "--set", "gaussians.num_init=150", "--set",
           "prior.synthetic.resolution=32", "--set", "output.turntable_frames=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(tmp_path.glob("*/preview/iter_000002.png")):
        time.sleep(0.2)
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
    assert b"<title>Viser</title>" in page
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "model.ply").is_file()
    assert "--resume" in output
    assert output.count("viewer: http://localhost:") == 1 and f"viewer: http://localhost:{port}" in output
    assert "viser" not in output.lower().replace("viewer", "")  # viser's own banners stay quiet


def test_view_cli_port_in_use_then_ctrl_c_exits_0(tmp_path):
    write_ply(tmp_path / "model.ply", gaussian_params(torch.randn(20, 3) * 0.2))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "recdreamer_gs.cli", "view", str(tmp_path), "--port",
                                 str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        line = proc.stdout.readline()
    assert f"port {port} is in use; serving on http://localhost:" in line, line
    moved = int(line.split("http://localhost:")[1].split()[0])
    assert moved != port
    assert b"<title>Viser</title>" in urllib.request.urlopen(f"http://127.0.0.1:{moved}/", timeout=30).read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Traceback" not in output


def test_view_ctrl_c_while_its_banner_prints_exits_0(tmp_path, monkeypatch):
    """Ctrl-C that lands while `view` prints where it serves (before it waits) still ends the view with 0 and
    stops its server: the race the test above can hit on a loaded machine, made certain."""
    from recdreamer_gs import cli

    write_ply(tmp_path / "model.ply", gaussian_params(torch.randn(20, 3) * 0.2))
    stopped = []
    monkeypatch.setattr(Viewer, "stop", lambda self: (stopped.append(self.port), self.server.stop()))

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.err_console, "print", ctrl_c)
    result = CliRunner().invoke(app, ["view", str(tmp_path), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert len(stopped) == 1

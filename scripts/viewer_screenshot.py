"""Screenshot of the live viewer for the README, taken by a real browser (headless Chromium).

    python scripts/viewer_screenshot.py --out assets/readme/viewer.png [--steps 500 --pause-at 400]

Trains the default run ("a kangaroo wearing boxing gloves"; the synthetic prior on a CPU) with the live
viewer, pauses it from the viewer's own pause control at ``--pause-at``, lets Chromium (software WebGL)
open the page and capture it over the DevTools protocol, then resumes and finishes the run. Needs a
``chromium`` on the PATH (Debian: ``apt-get install chromium``). ``--ply FILE`` shows a PLY instead, as
``recdreamer-gs view FILE`` does (no training).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--hide-scrollbars",
]
# viser warns in a notification that WebGL runs in software; true here, noise in a README picture.
HIDE_NOTICES = "document.querySelectorAll('.mantine-Notification-root').forEach(e => e.remove()); true"


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, url: str, width: int, height: int):
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            raise SystemExit("no chromium on the PATH (Debian: apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp()
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline:
                raise SystemExit("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.time() < deadline:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
            pages = [t for t in targets if t["type"] == "page"]
            time.sleep(0.1)
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == i:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path, settle_s: float) -> None:
        deadline = time.time() + 120
        while not self.evaluate("document.querySelectorAll('canvas').length > 0"):
            if time.time() > deadline:
                raise SystemExit("the page never drew a canvas")
            time.sleep(0.5)
        time.sleep(settle_s)  # software WebGL: let the splats sort and draw
        self.evaluate(HIDE_NOTICES)
        time.sleep(1.0)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def shoot(url: str, out: Path, width: int, height: int, settle_s: float) -> None:
    browser = Browser(url, width, height)
    try:
        browser.screenshot(out, settle_s)
    finally:
        browser.close()
    print(f"wrote {out}")


class PauseAndShoot(L.Callback):
    """Pauses the run through the viewer's pause control at one iteration and takes the screenshot meanwhile."""

    def __init__(self, viewer_callback, iteration: int, shot):
        self.viewer_callback, self.iteration, self.shot = viewer_callback, iteration, shot

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.iteration != self.iteration:
            return

        def take() -> None:
            try:
                self.shot()
            finally:
                self.viewer_callback.paused.clear()  # resume

        self.viewer_callback.paused.set()  # the same event the "Pause training" button sets
        threading.Thread(target=take, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "readme" / "viewer.png")
    parser.add_argument("--prompt", default="a kangaroo wearing boxing gloves")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--pause-at", type=int, default=400)
    parser.add_argument("--ply", type=Path, nargs="*", help="show these PLY files instead of training")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds for the page to draw")
    args = parser.parse_args()

    if args.ply:
        from recdreamer_gs.viewer import open_plys

        viewer = open_plys(args.ply, port=0)
        try:
            shoot(viewer.url, args.out, args.width, args.height, args.settle)
        finally:
            viewer.stop()
        return

    import torch

    from recdreamer_gs import prior_choice, run_folder, training
    from recdreamer_gs.config import load_config
    from recdreamer_gs.viewer import Viewer

    cfg = load_config("preview", None, [{"prompt": args.prompt, "train": {"steps": args.steps, "device": "cpu",
                                                                          "progress_bar": False}}])
    device = torch.device("cpu")
    choice = prior_choice.build_prior(cfg, device)
    out_dir = run_folder.make_run_dir(Path(tempfile.mkdtemp()), cfg.prompt)
    viewer = Viewer(0)
    try:
        live = viewer.training_callback(cfg, out_dir)
        shot = PauseAndShoot(live, args.pause_at, lambda: shoot(viewer.url, args.out, args.width, args.height,
                                                                  args.settle))
        # The shot first, so that the pause holds the iteration it was asked at.
        training.fit(cfg, out_dir, choice, device, extra_callbacks=[shot, live])
    finally:
        viewer.stop()


if __name__ == "__main__":
    main()

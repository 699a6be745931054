"""Regenerate the README pictures in this folder from the default CPU run.

    python assets/readme/make_assets.py                 # runs the default CPU run first (minutes)
    python assets/readme/make_assets.py --run OUTDIR    # or uses a finished run folder made with
                                                        #   recdreamer-gs run "a kangaroo wearing boxing gloves" --set output.mesh=glb

Writes preview.png (the final preview grid), turntable.gif, mesh.png (splat renders above, the extracted
mesh.glb below, from the same cameras) and report.png (the run's training report), each small.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "a kangaroo wearing boxing gloves"


def default_run(parent: Path) -> Path:
    """The README's command: the default preset on the CPU, plus the mesh."""
    subprocess.run([sys.executable, "-m", "recdreamer_gs.cli", "run", PROMPT, "--device", "cpu", "--out", str(parent),
                    "--set", "output.mesh=glb"], check=True)
    (run_dir,) = [p for p in parent.iterdir() if p.is_dir()]
    return run_dir


def small_png(image, path: Path, colours: int = 0) -> None:
    """PNG with optional palette quantisation (the previews are flat-shaded: 256 colours lose nothing visible)."""
    if colours:
        image = image.convert("RGB").quantize(colours, dither=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())


def mesh_comparison(run_dir: Path, resolution: int = 160):
    """Four views at 15° elevation: the splat renders (top) and the mesh.glb of the run (bottom)."""
    import open3d as o3d
    import torch

    from recdreamer_gs.images import image_grid
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.gaussians import read_gaussians
    from recdreamer_gs.mesh import render_mesh, to_frame
    from recdreamer_gs.render import render

    gaussians = read_gaussians(run_dir / "model.ply")  # viewer frame -> internal y-up
    mesh = to_frame(o3d.io.read_triangle_mesh(str(run_dir / "mesh.glb")), "viewer")  # the rotation is its own inverse
    cams = orbit(4, 15.0, 2.5, 40.0, resolution)
    with torch.no_grad():
        splat = render(gaussians, cams, torch.ones(4, 3)).rgb
    return image_grid(torch.cat([splat, render_mesh(mesh, cams)]), columns=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder with mesh.glb (default: make one)")
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or default_run(Path(tmp))
        with Image.open(run_dir / "preview" / "final.png") as preview:
            small_png(preview.resize((preview.width // 2, preview.height // 2), Image.NEAREST), HERE / "preview.png", 256)
        with Image.open(run_dir / "turntable.gif") as gif:
            frames, size = [], (gif.width * 3 // 4, gif.height * 3 // 4)
            for i in range(gif.n_frames):
                gif.seek(i)
                frames.append(gif.convert("RGB").resize(size, Image.NEAREST))
            duration = gif.info.get("duration", 83)
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                       optimize=True)
        (HERE / "turntable.gif").write_bytes(buffer.getvalue())
        small_png(mesh_comparison(run_dir), HERE / "mesh.png")
        shutil.copyfile(run_dir / "report.png", HERE / "report.png")
    for name in ("preview.png", "turntable.gif", "mesh.png", "report.png"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size // 1024} kB")


if __name__ == "__main__":
    main()

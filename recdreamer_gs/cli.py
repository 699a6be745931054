"""Command line: ``recdreamer-gs run | templates | classify | eval | render | export | report | models | doctor``.

Every known failure (bad input, missing files, no GPU, no weights) ends with one line on stderr
saying what was wrong and what to do, and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Text to 3D Gaussians by uniform score distillation (RecDreamer) with gsplat.",
)
err_console = Console(stderr=True)


class UserError(Exception):
    """Raised by commands for input the user can fix."""


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _quiet_libraries() -> None:
    """Keep Lightning's and the model libraries' chatter out of the run's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _known_errors() -> tuple[type[BaseException], ...]:
    from recdreamer_gs.config import ConfigError
    from recdreamer_gs.export import PlyError
    from recdreamer_gs.gaussians import InitError
    from recdreamer_gs.hub import ModelUnavailable
    from recdreamer_gs.mesh import MeshError
    from recdreamer_gs.pipeline import RunError
    from recdreamer_gs.render.gsplat_backend import GsplatUnavailable
    from recdreamer_gs.report import ReportError

    return (ConfigError, GsplatUnavailable, InitError, MeshError, ModelUnavailable, PlyError, ReportError, RunError,
            UserError)


@app.command()
def run(
    prompt: Optional[str] = typer.Argument(None, help="What to make, e.g. 'a kangaroo wearing boxing gloves'."),
    preset: str = typer.Option(
        "preview", help="Preset in configs/: preview (fast look), standard, paper (three stages), synthetic."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the preset."),
    out: Path = typer.Option(Path("outputs"), "--out", help="Parent folder; the run goes to OUT/<slug>-<time>/."),
    steps: Optional[int] = typer.Option(None, help="Iterations (overrides the preset)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    resolution: Optional[int] = typer.Option(None, help="Render size in pixels (square)."),
    prior: Optional[str] = typer.Option(None, help="auto | synthetic | sd. auto: SD on a CUDA GPU (weights "
                                        "downloaded on first use), else the offline synthetic prior."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Point cloud or mesh to start from (open3d)."),
    method: Optional[str] = typer.Option(None, help="usd | vsd | sds (score distillation flavour)."),
    particles: Optional[int] = typer.Option(None, help="Gaussian sets optimised together (model_0.ply, ...)."),
    devices: Optional[int] = typer.Option(None, help="Processes/GPUs for data-parallel training (particles split)."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion repo id or local diffusers folder."),
    pose_model: Optional[str] = typer.Option(None, "--pose-model", help="DINOv2 repo id or local folder (USD)."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Pose template folder DIR/<class>/*.png (USD)."),
    pose_control: Optional[str] = typer.Option(None, "--pose-control", help="Pull every view to one pose class."),
    set_: List[str] = typer.Option([], "--set", help="Any config value, e.g. --set distill.guidance_scale=50."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its "
                                          "checkpoints/last.ckpt (--steps may extend it)."),
    viewer: bool = typer.Option(False, "--viewer", help="Watch the Gaussians form in a browser (viser, localhost)."),
    port: int = typer.Option(8080, "--port", help="Port of --viewer (the next free one if taken)."),
) -> None:
    """Optimise Gaussians for PROMPT and write model.ply, previews and metrics.json.

    Ctrl-C writes a checkpoint and model.ply first; continue with --resume OUTDIR.
    """
    _quiet_libraries()
    from recdreamer_gs.pipeline import Interrupted

    try:
        if viewer and not 0 <= port <= 65535:
            raise UserError(f"--port: expected 0..65535 (0: any free port), got {port}")
        if resume is not None:
            others = [config, seed, resolution, prior, init_from, method, model, pose_model, templates, pose_control,
                      particles, devices]
            if any(v is not None for v in others) or set_ or preset != "preview" or out != Path("outputs"):
                raise UserError("--resume continues a run with its saved config; it takes only --steps and --device")
            _resume(resume, steps, device, prompt, port if viewer else None)
        else:
            extra = {"method": method, "model": model, "pose_model": pose_model, "templates": templates,
                     "pose_control": pose_control, "particles": particles, "devices": devices,
                     "viewer_port": port if viewer else None}
            _run(prompt or "", preset, config, out, steps, seed, resolution, prior, device, init_from, set_, extra)
    except _known_errors() as err:
        fail(str(err))
    except Interrupted as err:
        err_console.print(f"[yellow]{escape(str(err))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    except KeyboardInterrupt:
        err_console.print("interrupted before training started; nothing was written")
        raise typer.Exit(code=130)


def _fit(viewer_port: Optional[int], cfg, out_dir: Path, fit) -> None:
    """``fit(extra_callbacks)``; with ``--viewer`` a live viewer (rank 0 only) watches it."""
    from recdreamer_gs.distributed import is_secondary_rank

    if viewer_port is None or is_secondary_rank():
        return fit([])
    from recdreamer_gs.viewer import Viewer

    live = Viewer(viewer_port)
    try:
        err_console.print(live.banner(), highlight=False)
        fit([live.training_callback(cfg, out_dir)])
    finally:
        live.stop()


def _resume(run_dir: Path, steps: Optional[int], device: Optional[str], prompt: Optional[str],
            viewer_port: Optional[int] = None) -> None:
    import dataclasses

    from recdreamer_gs import pipeline
    from recdreamer_gs.render import ensure_backend

    if prompt:
        raise UserError("--resume continues a run folder with its own prompt and config; drop the PROMPT")
    cfg, checkpoint = pipeline.read_resume(run_dir)
    if steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    cfg.validate()
    stage = int(checkpoint.get("stage", 0))
    last_stage = stage >= len(cfg.stages) - 1
    stage_steps = cfg.stages[stage].steps if cfg.stages else cfg.train.steps
    if steps is not None and cfg.stages:
        raise UserError("--steps cannot extend a multi-stage run; edit the stages in its config.yaml instead")
    if last_stage and checkpoint["iteration"] >= stage_steps:
        raise UserError(f"--resume {run_dir}: the run already finished {checkpoint['iteration']} of "
                        f"{stage_steps} iterations; pass --steps N with N > {checkpoint['iteration']} to extend it")
    dev = pipeline.resolve_device(cfg.train.device)
    ensure_backend(cfg.render.backend, dev)
    choice = pipeline.build_prior(cfg, dev)
    where = f" of stage {stage + 1}/{len(cfg.stages)}" if cfg.stages else ""
    err_console.print(f"resuming {run_dir} at iteration {checkpoint['iteration']} of {stage_steps}{where}",
                      highlight=False)
    _fit(viewer_port, cfg, Path(run_dir),
         lambda callbacks: pipeline.fit(cfg, Path(run_dir), choice, dev, resume=checkpoint, extra_callbacks=callbacks))
    err_console.print(f"wrote the model into {run_dir}", highlight=False)


def _run(prompt, preset, config, out, steps, seed, resolution, prior, device, init_from, set_, extra) -> None:
    from recdreamer_gs.config import load_config, parse_override
    from recdreamer_gs import pipeline
    from recdreamer_gs.render import ensure_backend

    if not prompt.strip():
        raise UserError("the prompt is empty; give a description, e.g. recdreamer-gs run \"a red teapot\"")
    overrides = [parse_override(s) for s in set_]
    flags: dict = {"prompt": prompt.strip()}
    if steps is not None:
        flags.setdefault("train", {})["steps"] = steps
    if seed is not None:
        flags.setdefault("train", {})["seed"] = seed
    if device is not None:
        flags.setdefault("train", {})["device"] = device
    if resolution is not None:
        flags.setdefault("camera", {})["resolution"] = resolution
        flags.setdefault("prior", {}).setdefault("synthetic", {})["resolution"] = resolution
    if prior is not None:
        flags.setdefault("prior", {})["kind"] = prior
    if init_from is not None:
        if not init_from.is_file():
            raise UserError(f"--init-from: file {init_from} does not exist")
        flags.setdefault("gaussians", {})["init_from"] = str(init_from)
    _model_flags(flags, extra)
    cfg = load_config(preset, config, overrides + [flags])
    if cfg.stages and steps is not None:
        raise UserError(f"--steps does not apply to the {len(cfg.stages)}-stage preset {preset!r}: each stage sets "
                        "its own iterations (stages[i].steps in a --config file)")

    from recdreamer_gs.distributed import is_secondary_rank

    quiet = is_secondary_rank()  # data-parallel ranks above 0 re-run this command: say things once
    dev = pipeline.resolve_device(cfg.train.device)
    ensure_backend(cfg.render.backend, dev)  # before any model loads: a broken gsplat build fails in seconds
    choice = pipeline.build_prior(cfg, dev)
    if choice.notice and not quiet:
        err_console.print(Panel(choice.notice, title="synthetic prior", border_style="yellow"))
    if cfg.gaussians.init_from:
        # Read the init file before creating the run folder so a bad file leaves nothing behind.
        from recdreamer_gs.gaussians import load_points

        load_points(cfg.gaussians.init_from, cfg.gaussians.num_init, cfg.gaussians.init_radius)
    clip = pipeline.build_clip(cfg, dev)  # before the run folder exists: a bad --set output.clip_model leaves nothing
    out_dir = pipeline.make_run_dir(out, cfg.prompt)
    if not quiet:
        err_console.print(f"run folder: {out_dir}  (prior: {choice.prior.name}, device: {dev})", highlight=False)
    _fit(extra["viewer_port"], cfg, out_dir, lambda callbacks: pipeline.fit(cfg, out_dir, choice, dev, clip=clip,
                                                            extra_callbacks=callbacks))
    names = "model.ply" if cfg.train.particles == 1 else f"model_0.ply ... model_{cfg.train.particles - 1}.ply"
    if not quiet:
        err_console.print(f"wrote {out_dir / names}", highlight=False)


def _model_flags(flags: dict, extra: dict) -> None:
    """Shared options of run/templates/classify/eval into the config tree."""
    if extra.get("method"):
        flags.setdefault("distill", {})["method"] = extra["method"]
    if extra.get("particles") is not None:
        flags.setdefault("train", {})["particles"] = extra["particles"]
    if extra.get("devices") is not None:
        flags.setdefault("train", {})["devices"] = extra["devices"]
    if extra.get("model"):
        flags.setdefault("prior", {}).setdefault("sd", {})["model"] = extra["model"]
    rect: dict = {}
    if extra.get("pose_model"):
        rect["classifier"] = {"feature_model": extra["pose_model"]}
    if extra.get("templates"):
        if not Path(extra["templates"]).is_dir():
            raise UserError(f"--templates: folder {extra['templates']} does not exist")
        rect["templates"] = str(extra["templates"])
    if extra.get("pose_control"):
        rect["pose_control"] = extra["pose_control"]
    if rect:
        flags.setdefault("distill", {})["rectifier"] = rect


def _setup(prompt: str, prior: Optional[str], device: Optional[str], extra: dict):
    """Config, device and prior for the templates/classify/eval commands."""
    from recdreamer_gs import pipeline
    from recdreamer_gs.config import load_config

    flags: dict = {"prompt": prompt}
    if prior:
        flags.setdefault("prior", {})["kind"] = prior
    if device:
        flags.setdefault("train", {})["device"] = device
    _model_flags(flags, extra)
    cfg = load_config("preview", None, [flags])
    dev = pipeline.resolve_device(cfg.train.device)
    choice = pipeline.build_prior(cfg, dev)
    if choice.notice:
        err_console.print(Panel(choice.notice, title="synthetic prior", border_style="yellow"))
    return cfg, dev, choice.prior


@app.command("templates")
def templates_cmd(
    prompt: str = typer.Argument(..., help="The prompt whose front/back/side views become templates."),
    out: Path = typer.Option(..., "--out", help="Folder to write: OUT/<class>/NNN.png (edit it, then --templates OUT)."),
    per_view: int = typer.Option(4, "--per-view", help="Candidates per view (keep the good ones)."),
    prior: Optional[str] = typer.Option(None, help="auto | synthetic | sd."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion repo id or local folder."),
    pose_model: Optional[str] = typer.Option(None, "--pose-model", help="DINOv2 repo id or local folder (unused here)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
) -> None:
    """Write candidate pose templates (front, back, left, right = mirrored side) from the prior."""
    _quiet_libraries()
    try:
        from recdreamer_gs.pose.templates import write_template_folder

        if not prompt.strip():
            raise UserError("the prompt is empty")
        if per_view < 1:
            raise UserError(f"--per-view: expected 1 or more, got {per_view}")
        # Templates come from the prior alone (method sds): no DINOv2 to fetch for them.
        cfg, dev, p = _setup(prompt.strip(), prior, device, {"model": model, "pose_model": pose_model, "method": "sds"})
        paths = write_template_folder(p.template_candidates(cfg.prompt, per_view), out)
        err_console.print(f"wrote {len(paths)} templates to {out}", highlight=False)
    except _known_errors() as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write templates to {out}: {err.strerror or err}")


def _pose_setup(cfg, dev, p):
    """The classifier of ``classify``/``eval``: DINOv2 on --templates, or the prior's own one."""
    from recdreamer_gs.pose.setup import folder_pose_setup

    if p is None:
        return folder_pose_setup(cfg.distill.rectifier, dev)
    pose = p.pose_setup(cfg, need=False)
    if pose.classifier is None:
        raise UserError(f"the prior {p.name!r} brings no pose classifier of its own: give --templates DIR")
    return pose


@app.command("classify")
def classify_cmd(
    images: List[Path] = typer.Argument(..., help="Images to classify (PNG/JPG)."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Template folder DIR/<class>/*.png."),
    prior: Optional[str] = typer.Option(None, help="synthetic: the synthetic prior's template classifier."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion repo id or local folder (unused here)."),
    pose_model: Optional[str] = typer.Option(None, "--pose-model", help="DINOv2 repo id or local folder."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
) -> None:
    """Print the pose-class probabilities of each image."""
    _quiet_libraries()
    try:
        import torch
        import torch.nn.functional as F
        from rich.table import Table

        from recdreamer_gs.pose.templates import read_image

        cfg, dev, p = _classifier_setup(templates, prior, pose_model, device)
        pose = _pose_setup(cfg, dev, p)
        table = Table("image", *pose.class_names)
        for path in images:
            x = read_image(path, 256)[None].to(dev)
            if pose.image_size is not None:
                x = F.interpolate(x, size=(pose.image_size,) * 2, mode="bilinear", antialias=True)
            with torch.no_grad():
                probs = pose.classifier(x, torch.ones(1, 3, device=dev))[0]
            table.add_row(path.name, *[f"{v:.3f}" for v in probs.tolist()])
        Console().print(table)
    except _known_errors() as err:
        fail(str(err))


def _classifier_setup(templates: Optional[Path], prior: Optional[str], pose_model: Optional[str],
                      device: Optional[str]):
    """DINOv2 + a template folder, or the classifier a prior brings (``--prior synthetic``)."""
    if templates is not None:
        return _setup_templates_only(templates, pose_model, device)
    if prior is None:
        raise UserError("give --templates DIR (DINOv2 classifier) or --prior synthetic (its template classifier)")
    return _setup("classify", prior, device, {})


def _setup_templates_only(templates: Optional[Path], pose_model: Optional[str], device: Optional[str]):
    from recdreamer_gs import pipeline
    from recdreamer_gs.config import load_config

    flags: dict = {"prompt": "classify", "prior": {"kind": "sd"}}
    if device:
        flags["train"] = {"device": device}
    _model_flags(flags, {"templates": templates, "pose_model": pose_model})
    cfg = load_config("preview", None, [flags])
    return cfg, pipeline.resolve_device(cfg.train.device), None


@app.command("eval")
def eval_cmd(
    ply: Path = typer.Argument(..., help="A 3DGS .ply (viewer frame unless --frame y-up)."),
    prompt: str = typer.Option("", help="The prompt, for cEnt and the CLIP score."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Template folder for pEnt (DINOv2 classifier)."),
    prior: Optional[str] = typer.Option(None, help="synthetic: pEnt with the synthetic prior's classifier."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion repo id or local folder (unused here)."),
    pose_model: Optional[str] = typer.Option(None, "--pose-model", help="DINOv2 repo id or local folder."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP repo id or local folder (cEnt, CLIP score)."),
    resolution: int = typer.Option(64, help="Render size for the evaluation views."),
    frame: str = typer.Option("viewer", help="Frame of the PLY: viewer | y-up."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
) -> None:
    """pEnt (pose entropy over 10 azimuths), and cEnt + CLIP score with --clip-model."""
    _quiet_libraries()
    try:
        import json

        import torch

        from recdreamer_gs.cameras import orbit
        from recdreamer_gs.config import GaussiansConfig
        from recdreamer_gs.export import read_ply
        from recdreamer_gs.gaussians import Gaussians
        from recdreamer_gs.metrics import ClipScorer, pent_views, pose_entropy
        from recdreamer_gs.render import ensure_backend, render

        if templates is None and prior is None and clip_model is None:
            raise UserError("nothing to evaluate: give --templates DIR or --prior synthetic (pEnt), "
                            "and/or --clip-model (cEnt, CLIP score)")
        if templates is None and prior is None:
            cfg, dev, p = _setup_templates_only(None, pose_model, device)
        else:
            cfg, dev, p = _classifier_setup(templates, prior, pose_model, device)
        ensure_backend("auto", dev)
        params = read_ply(ply, frame=frame)
        degree = {0: 0, 3: 1, 8: 2, 15: 3}.get(params["shN"].shape[1], 0)
        gaussians = Gaussians(params, GaussiansConfig(sh_degree=degree)).to(dev)
        pose = _pose_setup(cfg, dev, p) if templates is not None or prior is not None else None
        if pose is not None and pose.image_size is not None:
            resolution = pose.image_size
        n = len(pent_views())
        cams = orbit(n, 15.0, 2.5, 40.0, resolution).to(dev)
        with torch.no_grad():
            rgb = render(gaussians, cams, torch.ones(n, 3, device=dev)).rgb
        result: dict = {}
        if pose is not None:
            with torch.no_grad():
                probs = pose.metric_classifier(rgb * 2 - 1, torch.ones(n, 3, device=dev))
            result["pEnt"] = round(pose_entropy(probs.float().cpu()), 4)
            result["pose_histogram"] = dict(zip(pose.class_names, [round(v, 4) for v in probs.mean(0).tolist()]))
        if clip_model is not None:
            if not prompt:
                raise UserError("--clip-model needs --prompt for cEnt and the CLIP score")
            scorer = ClipScorer.load(clip_model, device=dev)
            with torch.no_grad():
                result["cEnt"] = round(scorer.view_entropy(rgb, prompt), 4)
                result["clip_score"] = round(scorer.clip_score(rgb, prompt), 4)
        Console().print_json(json.dumps(result))
    except _known_errors() as err:
        fail(str(err))


@app.command("render")
def render_cmd(
    ply: Path = typer.Argument(..., help="A 3DGS .ply written by recdreamer-gs (or any standard 3DGS PLY)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for orbit.png, orbit.gif (and orbit.mp4) "
                                       "(default: next to the PLY)."),
    views: int = typer.Option(8, help="Views in the PNG grid."),
    frames: int = typer.Option(36, help="Frames in the GIF (0: no GIF)."),
    resolution: int = typer.Option(128, help="Render size in pixels."),
    elevation: float = typer.Option(15.0, help="Orbit elevation in degrees."),
    radius: float = typer.Option(2.5, help="Orbit radius."),
    fovy: float = typer.Option(40.0, help="Vertical field of view in degrees."),
    frame: str = typer.Option("viewer", help="Frame the PLY was written in: viewer | y-up."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    video: bool = typer.Option(False, "--video", help="Also write the GIF's frames as orbit.mp4 (H.264)."),
) -> None:
    """Render orbit views of a PLY to a PNG grid and a GIF (and an MP4 with --video)."""
    _quiet_libraries()
    try:
        _render(ply, out, views, frames, resolution, elevation, radius, fovy, frame, device, video)
    except _known_errors() as err:
        fail(str(err))


def _render(ply, out, views, frames, resolution, elevation, radius, fovy, frame, device, video) -> None:
    import torch

    from recdreamer_gs.callbacks import image_grid, preview_upscale, save_gif, save_mp4, save_png
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.mesh import load_gaussians
    from recdreamer_gs.pipeline import resolve_device
    from recdreamer_gs.render import ensure_backend, render

    if views < 1 or frames < 0 or resolution < 8 or radius <= 0 or not 1 <= fovy < 170:
        raise UserError("expected --views >= 1, --frames >= 0, --resolution >= 8, --radius > 0, 1 <= --fovy < 170")
    if frame not in ("viewer", "y-up"):
        raise UserError(f"--frame: expected viewer or y-up, got {frame!r}")
    if video and frames < 2:
        raise UserError(f"--video needs --frames 2 or more, got {frames}")
    dev = resolve_device(device)
    ensure_backend("auto", dev)
    gaussians = load_gaussians(ply, frame, dev)
    out_dir = out or ply.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "orbit.png"]
    with torch.no_grad():
        cams = orbit(views, elevation, radius, fovy, resolution).to(dev)
        rgb = render(gaussians, cams, torch.ones(views, 3, device=dev)).rgb
        save_png(image_grid(rgb), out_dir / "orbit.png", preview_upscale(resolution))
        if frames > 0:
            cams = orbit(frames, elevation, radius, fovy, resolution).to(dev)
            rgb = render(gaussians, cams, torch.ones(frames, 3, device=dev)).rgb
            save_gif(rgb, out_dir / "orbit.gif", upscale=preview_upscale(resolution))
            written.append(out_dir / "orbit.gif")
            if video:
                save_mp4(rgb, out_dir / "orbit.mp4", upscale=preview_upscale(resolution))
                written.append(out_dir / "orbit.mp4")
    err_console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@app.command("view")
def view_cmd(
    plys: List[Path] = typer.Argument(..., metavar="PLY", help="3DGS .ply files (or run folders), side by side."),
    port: int = typer.Option(8080, "--port", help="Port on localhost (the next free one if taken; 0: any)."),
    frame: str = typer.Option("viewer", help="Frame the PLYs were written in: viewer | y-up."),
) -> None:
    """Show 3DGS PLY files in the browser (viser) until Ctrl-C."""
    _quiet_libraries()
    try:
        if frame not in ("viewer", "y-up"):
            raise UserError(f"--frame: expected viewer or y-up, got {frame!r}")
        if not 0 <= port <= 65535:
            raise UserError(f"--port: expected 0..65535 (0: any free port), got {port}")
        from recdreamer_gs.viewer import open_plys

        live = open_plys(plys, port, frame)
    except _known_errors() as err:
        fail(str(err))
    err_console.print(f"{live.banner()}  (Ctrl-C to stop)", highlight=False)
    try:
        live.wait()
    finally:
        live.stop()


@app.command("export")
def export_cmd(
    ply: Path = typer.Argument(..., help="Input 3DGS .ply."),
    target: Path = typer.Argument(..., help="Output: .ply or .splat (Gaussians), .glb or .obj (mesh), "
                                  ".ply with --mesh (mesh)."),
    frame_in: str = typer.Option("viewer", "--from-frame", help="Frame of the input: viewer | y-up."),
    frame_out: str = typer.Option("viewer", "--to-frame", help="Frame of the output (Gaussians or mesh): viewer "
                                  "(as model.ply) | y-up (the internal frame; glTF viewers assume +y up)."),
    mesh: bool = typer.Option(False, "--mesh", help="Write a triangle mesh (implied by .glb and .obj)."),
    faces: int = typer.Option(0, "--faces", help="Mesh: decimate to at most N triangles (0: keep all)."),
    resolution: int = typer.Option(0, help="Mesh: render size and voxels across the object "
                                   "(0: 256 on CUDA, 128 on CPU)."),
    device: str = typer.Option("auto", help="Mesh: device for the renders (auto | cpu | cuda)."),
) -> None:
    """Convert a PLY to .splat or between frames, or extract a coloured triangle mesh (.glb/.obj/.ply)."""
    _quiet_libraries()
    try:
        from recdreamer_gs.export import read_ply, write_ply, write_splat

        for name, value in (("--from-frame", frame_in), ("--to-frame", frame_out)):
            if value not in ("viewer", "y-up"):
                raise UserError(f"{name}: expected viewer or y-up, got {value!r}")
        suffix = target.suffix.lower()
        is_mesh = suffix in (".glb", ".obj") or (mesh and suffix == ".ply")
        if not is_mesh and (mesh or faces or resolution):
            raise UserError(f"output {target}: a mesh (--mesh, --faces, --resolution) needs a .glb or .obj file "
                            f"name, or .ply with --mesh; got {suffix or 'no suffix'}")
        if is_mesh:
            from recdreamer_gs.mesh import export_mesh
            from recdreamer_gs.pipeline import resolve_device

            result = export_mesh(ply, target, frame_in, frame_out, faces, resolution, resolve_device(device))
            err_console.print(f"wrote {target} ({result.vertices} vertices, {result.faces} triangles from "
                              f"{result.views} views in {result.seconds:.1f} s)", highlight=False)
            return
        params = read_ply(ply, frame=frame_in)
        if suffix == ".ply":
            n = write_ply(target, params, frame=frame_out)
        elif suffix == ".splat":
            n = write_splat(target, params, frame=frame_out)
        else:
            raise UserError(f"output {target}: expected a .ply, .splat, .glb or .obj file name, "
                            f"got {suffix or 'no suffix'}")
        err_console.print(f"wrote {target} ({n} Gaussians)", highlight=False)
    except _known_errors() as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write {target}: {err.strerror or err}")


@app.command("models")
def models_cmd(
    preset: str = typer.Option("preview", help="Preset in configs/, as for run."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the preset."),
    set_: List[str] = typer.Option([], "--set", help="Any config value, as for run."),
    prior: Optional[str] = typer.Option(None, help="auto | synthetic | sd (auto counts as SD on a CUDA run)."),
    method: Optional[str] = typer.Option(None, help="usd | vsd | sds (USD needs DINOv2)."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion repo id or local diffusers folder."),
    pose_model: Optional[str] = typer.Option(None, "--pose-model", help="DINOv2 repo id or local folder (USD)."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Pose template folder (needs DINOv2)."),
    device: Optional[str] = typer.Option(None, help="Device of the run: auto | cpu | cuda. Default: a CUDA run, "
                                         "also on a machine without GPU (a cluster's login node)."),
    download: bool = typer.Option(False, "--download", help="Fetch the missing models into the Hugging Face cache."),
) -> None:
    """List the models a run with these options loads: source, complete here or not, size.

    With --download the missing ones are fetched (e.g. on a login node; compute nodes then run with
    HF_HUB_OFFLINE=1 on the same cache).
    """
    _quiet_libraries()
    try:
        from recdreamer_gs.config import load_config, parse_override
        from recdreamer_gs.doctor import models_report

        flags: dict = {"prompt": "models"}
        if prior:
            flags["prior"] = {"kind": prior}
        if device:
            flags["train"] = {"device": device}
        _model_flags(flags, {"method": method, "model": model, "pose_model": pose_model, "templates": templates})
        cfg = load_config(preset, config, [parse_override(s) for s in set_] + [flags])
        models_report(cfg, cuda=cfg.train.device != "cpu", download=download, console=Console())
    except _known_errors() as err:
        fail(str(err))


@app.command("doctor")
def doctor_cmd(
    short: bool = typer.Option(False, "--short", help="One line: the torch build and the GPU it sees."),
) -> None:
    """Versions, GPU, build tools, caches and local models, for bug reports (never downloads or builds)."""
    _quiet_libraries()
    from recdreamer_gs import doctor
    from recdreamer_gs.config import load_config

    if short:
        hint = doctor.cuda_mismatch()
        typer.echo(doctor.torch_summary() + (f"\nnote: {hint}" if hint else ""))
        return
    doctor.report(load_config("preview"), Console(soft_wrap=True))


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (finished or not)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Image to write (default: RUN_DIR/report.png)."),
) -> None:
    """Plot a run's training curves (losses, gradient norms, t, Gaussians, pose EMA) to report.png."""
    try:
        from recdreamer_gs.report import write_report

        err_console.print(f"wrote {write_report(run_dir, out)}", highlight=False)
    except _known_errors() as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write the report: {err.strerror or err}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

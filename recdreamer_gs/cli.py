"""Command line: ``recdreamer-gs run | batch | bench | templates | classify | eval | render | view | export | report |
models | doctor``.

The commands map options to the config tree and call the modules that do the work. Every known failure
(a ``recdreamer_gs.errors.UserError`` or an ``OSError``) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from recdreamer_gs import doctor
from recdreamer_gs.errors import Interrupted, TrainingFailed, UserError, os_cause
from recdreamer_gs.ranks import is_secondary_rank

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Text to 3D Gaussians by uniform score distillation (RecDreamer) with gsplat.")
err_console = Console(stderr=True)

# -- options shared by several commands ---------------------------------------------------------

Preset = Annotated[str, typer.Option(help="Preset in configs/: preview (fast look), standard, paper (three "
                                            "stages), synthetic, standin (the SD path on the learned stand-in "
                                            "in assets/standin, CPU), shap-e (a Shap-E start, 1,200 iterations).")]
Init = Annotated[Optional[str], typer.Option(
    "--init", help="sphere | file | shap-e: start from a random ball, the --init-from file, or a Shap-E shape "
                   "made from the prompt (openai/shap-e, downloaded on first use).")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML file merged over the preset (a run folder's config.yaml: that run's settings).")]
Sets = Annotated[Optional[List[str]], typer.Option(
    "--set", help="Any config value, e.g. --set distill.guidance_scale=50.")]
PriorKind = Annotated[Optional[str], typer.Option(
    help="auto | synthetic | sd. auto: SD on a CUDA GPU (weights fetched on first use), else the synthetic prior.")]
PosePrior = Annotated[Optional[str], typer.Option(
    "--prior", help="synthetic: the synthetic prior's own pose classifier (instead of --templates).")]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")]
Model = Annotated[Optional[str], typer.Option(help="Stable Diffusion repo id or local diffusers folder.")]
PoseModel = Annotated[Optional[str], typer.Option(
    "--pose-model", help="DINOv2 repo id or local folder (USD and --templates).")]
Templates = Annotated[Optional[Path], typer.Option(
    "--templates", help="Pose template folder DIR/<class>/*.png for the DINOv2 classifier (USD).")]
Frame = Annotated[str, typer.Option(help="Frame the PLY file(s) were written in: viewer | y-up.")]
UnusedModel = Annotated[Optional[str], typer.Option("--model", help="As for run; unused here.")]
UnusedPoseModel = Annotated[Optional[str], typer.Option("--pose-model", help="As for run; unused here.")]


def command(name: Optional[str] = None, interrupted: str = "interrupted") -> Callable:
    """Register a command: a ``UserError`` or ``OSError`` ends it with one line on stderr and exit 2, a failed
    training with its one line (cause, what was kept, --resume) and its exit code, Ctrl-C with ``interrupted``
    (or a stopped run's own message) and exit 130."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            from recdreamer_gs.console import quiet_libraries  # heavy: keeps --help fast

            quiet_libraries()
            try:
                return fn(*args, **kwargs)
            except (UserError, OSError) as err:
                message = str(err)
                if isinstance(err, OSError):
                    message = f"{err.filename}: {os_cause(err)}" if err.filename else os_cause(err)
                err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=2)
            except TrainingFailed as err:
                err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=err.exit_code)
            except (Interrupted, KeyboardInterrupt) as err:  # a stopped run says where its checkpoint is
                text = f"[yellow]{escape(str(err))}[/]" if isinstance(err, Interrupted) else escape(interrupted)
                err_console.print(text, highlight=False, soft_wrap=True)
                raise typer.Exit(code=130)

        return app.command(name)(guarded)

    return register


def _config(preset: str = "preview", config: Optional[Path] = None, sets: Optional[List[str]] = None, **options):
    """The RunConfig: the preset, then ``--config``, then ``--set``, then the options given (not None)."""
    from recdreamer_gs.config import load_config, option_overrides, parse_override  # heavy: keeps --help fast

    return load_config(preset, config, [parse_override(s) for s in sets or []] + [option_overrides(**options)])


def _notice(text: Optional[str]) -> None:
    """Say why ``--prior auto`` fell back to the synthetic prior."""
    if text:
        err_console.print(Panel(text, title="synthetic prior", border_style="yellow"))


def _fit(port: Optional[int], cfg, out_dir: Path, fit) -> None:
    """``fit(extra_callbacks)``, watched in the browser with ``--viewer`` (live_viewer.py: imported only then)."""
    if port is None:
        return fit([])
    from recdreamer_gs.live_viewer import fit_watched  # heavy: keeps --help fast

    fit_watched(port, cfg, out_dir, fit, lambda text: err_console.print(text, highlight=False))


@command(interrupted="interrupted before training started; nothing was written")
def run(
    prompt: Optional[str] = typer.Argument(None, help="What to make, e.g. 'a kangaroo wearing boxing gloves' "
                                           "(default: the prompt of --config)."),
    preset: Preset = "preview",
    config: ConfigFile = None,
    out: Path = typer.Option(Path("outputs"), "--out", help="Parent folder; the run goes to OUT/<slug>-<time>/."),
    steps: Optional[int] = typer.Option(None, help="Iterations (overrides the preset)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    resolution: Optional[int] = typer.Option(None, help="Render size in pixels (square)."),
    prior: PriorKind = None,
    device: Device = None,
    init: Init = None,
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Point cloud or mesh to start from (open3d), "
                                             "or a 3DGS PLY (its centres and colours); means --init file."),
    method: Optional[str] = typer.Option(None, help="usd | vsd | sds (score distillation flavour)."),
    particles: Optional[int] = typer.Option(None, help="Gaussian sets optimised together (model_0.ply, ...)."),
    devices: Optional[int] = typer.Option(None, help="Processes/GPUs for data-parallel training (particles split)."),
    model: Model = None,
    pose_model: PoseModel = None,
    templates: Templates = None,
    pose_control: Optional[str] = typer.Option(None, "--pose-control", help="Pull every view to one pose class."),
    set_: Sets = None,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its "
                                          "checkpoints/last.ckpt (--steps may extend it)."),
    viewer: bool = typer.Option(False, "--viewer", help="Watch the Gaussians form in a browser (viser, localhost)."),
    port: int = typer.Option(8080, "--port", help="Port of --viewer (the next free one if taken)."),
) -> None:
    """Optimise Gaussians for PROMPT and write model.ply (and .spz/.sog/.splat with output.formats), previews
    and metrics.json.

    Ctrl-C writes a checkpoint and the model files first; continue with --resume OUTDIR.
    """
    from recdreamer_gs import console, run_folder, training  # heavy: keeps --help fast

    if viewer and not 0 <= port <= 65535:
        raise UserError(f"--port: expected 0..65535 (0: any free port), got {port}")
    viewer_port = port if viewer else None
    if resume is not None:
        if set_ or preset != "preview" or out != Path("outputs") or any(v is not None for v in (
                config, seed, resolution, prior, init, init_from, method, model, pose_model, templates,
                pose_control, particles, devices)):
            raise UserError("--resume continues a run with its saved config; it takes only --steps and --device")
        if prompt:
            raise UserError("--resume continues a run folder with its own prompt and config; drop the PROMPT")
        cfg, checkpoint, where = run_folder.prepare_resume(resume, steps, device)
        ready, out_dir = training.prepare(cfg, fresh=False), resume  # the Gaussians come from the checkpoint
        console.progress_echo(f"resuming {resume} {where}")
    else:
        cfg = _config(preset, config, set_, prompt=None if prompt is None else prompt.strip(), steps=steps,
                      seed=seed, device=device, resolution=resolution, prior=prior, init=init, init_from=init_from,
                      method=method, particles=particles, devices=devices, model=model, pose_model=pose_model,
                      templates=templates, pose_control=pose_control)
        if not cfg.prompt.strip():
            raise UserError("the prompt is empty; give a description, e.g. recdreamer-gs run \"a red teapot\"")
        if cfg.stages and steps is not None:
            raise UserError(f"--steps does not apply to the {len(cfg.stages)}-stage preset {preset!r}: each stage "
                            "sets its own iterations (stages[i].steps in a --config file)")
        checkpoint = None
        # Everything that can fail (the starting shape included), before the run folder exists.
        ready = training.prepare(cfg)
        # Data-parallel ranks above 0 re-run this command: they say nothing (progress_echo: rank 0 only).
        _notice(None if is_secondary_rank() else ready.choice.notice)
        out_dir = run_folder.make_run_dir(out, cfg.prompt)
        console.progress_echo(f"run folder: {out_dir}  (prior: {ready.choice.prior.name}, device: {ready.device})")
    _fit(viewer_port, cfg, out_dir, lambda callbacks: training.fit(
        cfg, out_dir, ready.choice, ready.device, resume=checkpoint, clip=ready.clip, extra_callbacks=callbacks,
        start=ready.start))
    from recdreamer_gs.model_files import model_names

    names = model_names(cfg)
    shown = names if len(names) <= 4 else [names[0], "...", names[-1]]
    console.progress_echo(f"wrote {', '.join(shown)} in {out_dir}")


# -- prompt sets (batch.py: Ray is imported only when runs start) ------------------------------

Address = Annotated[Optional[str], typer.Option(
    "--address", help="auto | HOST:PORT: join a running Ray cluster (`ray start --head` on the head node). "
    "Default: a local Ray instance on every GPU and CPU of this machine.")]
GpusPerRun = Annotated[Optional[float], typer.Option(
    "--gpus-per-run", help="GPUs a run takes (default 1 where the cluster has GPUs; 0.5: two runs share one; "
    "0: CPU runs).")]
CpusPerRun = Annotated[Optional[int], typer.Option(
    "--cpus-per-run", help="CPUs a run takes, and its torch thread budget (default 1 with a GPU, else 2).")]
NumCpus = Annotated[Optional[int], typer.Option(
    "--num-cpus", help="CPUs the local Ray instance offers (default: all of them; not with --address).")]
Retries = Annotated[int, typer.Option(
    "--retries", help="Times Ray retries a run whose worker died (it continues from its checkpoint).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="List the runs and what each would do, start nothing.")]
SetSets = Annotated[Optional[List[str]], typer.Option(
    "--set", help="Any config value for every run, e.g. --set train.steps=1000; METHOD:KEY=VALUE for one "
    "method's runs, e.g. --set sds:distill.guidance_scale=100.")]


def _prompt_set(entries, out: Path, preset: str, config: Optional[Path], sets: List[str], methods: Optional[str],
                seeds: Optional[str], address: Optional[str], gpus_per_run: Optional[float],
                cpus_per_run: Optional[int], num_cpus: Optional[int], retries: int, dry_run: bool) -> None:
    """``batch`` and ``bench``: validate every run, then run the set (or list it) and exit with its code."""
    from recdreamer_gs import batch  # heavy: keeps --help fast

    runs = batch.plan_runs(entries, out, preset, config, [batch.parse_set(s) for s in sets],
                           batch.parse_methods(methods) if methods else None,
                           batch.parse_seeds(seeds) if seeds else None)
    console = Console(stderr=True, soft_wrap=True)  # whole lines in a log, however long the paths
    if dry_run:  # one line a run: what a batch would do with it (new, resume, done) and its folder
        for run in runs:
            typer.echo(f"{run.state():<6}  {run.name}")
        err_console.print(f"{len(runs)} runs in {out}", highlight=False)
        return
    code = batch.batch(runs, out, address, gpus_per_run, cpus_per_run, num_cpus, retries, console)
    if code:
        raise typer.Exit(code=code)


@command("batch", interrupted="interrupted; the next batch continues the runs from their checkpoints")
def batch_cmd(
    prompts: Optional[Path] = typer.Argument(None, help="Prompt file: text (one prompt a line, # comments), or "
                                             ".jsonl / .yaml whose entries may carry their own method, seed, "
                                             "templates and set values (docs/batch.md)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the set: one run folder per (prompt, "
                                       "method, seed), summary.csv, summary.md, sheet.png."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Methods, each a run: e.g. usd,vsd,sds "
                                          "(default: the preset's)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds, each a run: e.g. 0,1 (default: the "
                                        "preset's)."),
    preset: Preset = "preview",
    config: ConfigFile = None,
    set_: SetSets = None,
    address: Address = None,
    gpus_per_run: GpusPerRun = None,
    cpus_per_run: CpusPerRun = None,
    num_cpus: NumCpus = None,
    retries: Retries = 3,
    dry_run: DryRun = False,
    summary: Optional[Path] = typer.Option(None, "--summary", help="Only rebuild summary.csv, summary.md and "
                                           "sheet.png of this folder from its run folders."),
) -> None:
    """Run every (prompt, method, seed) of PROMPTS as Ray tasks, locally or on a cluster, and summarise them.

    Each run is an ordinary run folder OUT/<prompt>-<method>-s<seed>/: a second batch skips the runs with
    metrics.json and continues the others from their checkpoint. Exit code 1 when a run failed.
    """
    from recdreamer_gs import batch  # heavy: keeps --help fast

    if summary is not None:
        if prompts is not None or out is not None:
            raise UserError("--summary DIR rebuilds the summary of DIR alone; drop PROMPTS and --out")
        from recdreamer_gs.summary import write_summary

        err_console.print("wrote " + ", ".join(str(p) for p in write_summary(summary)), highlight=False)
        return
    if prompts is None or out is None:
        raise UserError("expected PROMPTS and --out DIR (or --summary DIR), e.g. recdreamer-gs batch prompts.txt "
                        "--out sets/first")
    _prompt_set(batch.read_prompts(prompts), out, preset, config, set_ or [], methods, seeds, address, gpus_per_run,
                cpus_per_run, num_cpus, retries, dry_run)


@command("bench", interrupted="interrupted; the next bench continues the runs from their checkpoints")
def bench_cmd(
    out: Path = typer.Option(..., "--out", help="Folder of the set (as batch --out)."),
    methods: str = typer.Option("sds,vsd,usd", "--methods", help="Methods compared."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, each a run."),
    preset: Preset = "standard",
    config: ConfigFile = None,
    set_: SetSets = None,
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP repo id or folder for cEnt and the "
                                             "CLIP score (default: openai/clip-vit-base-patch32, listed and "
                                             "fetched by `models --bench`)."),
    address: Address = None,
    gpus_per_run: GpusPerRun = None,
    cpus_per_run: CpusPerRun = None,
    num_cpus: NumCpus = None,
    retries: Retries = 3,
    dry_run: DryRun = False,
) -> None:
    """The paper's comparison: its 22 prompts (Table 7) x SDS, VSD, USD, with pEnt, cEnt and the CLIP score.

    Runs as batch does (Ray, locally or --address) and writes the same summary (the per-method means in the
    form of the paper's Table 1; FID/uFID are not computed). SDS runs at CFG 100 as the paper's SDS baseline
    (--set sds:distill.guidance_scale=V to change it).
    """
    from recdreamer_gs import batch  # heavy: keeps --help fast
    from recdreamer_gs.metrics import DEFAULT_CLIP_MODEL

    sets = ["sds:distill.guidance_scale=100", f"output.clip_model={clip_model or DEFAULT_CLIP_MODEL}", *(set_ or [])]
    _prompt_set(batch.read_prompts(batch.paper_prompts()), out, preset, config, sets, methods, seeds, address,
                gpus_per_run, cpus_per_run, num_cpus, retries, dry_run)


@command("templates")
def templates_cmd(
    prompt: str = typer.Argument(..., help="The prompt whose front/back/side views become templates."),
    out: Path = typer.Option(..., "--out", help="Folder to write: OUT/<class>/NNN.png (edit it, then "
                             "--templates OUT)."),
    per_view: int = typer.Option(4, "--per-view", help="Candidates per view (keep the good ones)."),
    prior: PriorKind = None,
    model: Model = None,
    pose_model: UnusedPoseModel = None,
    device: Device = None,
) -> None:
    """Write candidate pose templates (front, back, left, right = mirrored side) from the prior."""
    from recdreamer_gs import devices, prior_choice  # heavy: keeps --help fast
    from recdreamer_gs.pose.templates import write_template_folder

    if not prompt.strip():
        raise UserError("the prompt is empty")
    if per_view < 1:
        raise UserError(f"--per-view: expected 1 or more, got {per_view}")
    # Templates come from the prior alone (method sds): no DINOv2 to fetch for them.
    cfg = _config(prompt=prompt.strip(), prior=prior, device=device, model=model, pose_model=pose_model, method="sds")
    choice = prior_choice.build_prior(cfg, devices.resolve_device(cfg.train.device))
    _notice(choice.notice)
    paths = write_template_folder(choice.prior.template_candidates(cfg.prompt, per_view), out)
    err_console.print(f"wrote {len(paths)} templates to {out}", highlight=False)


def _pose(cfg, templates: Optional[Path], prior: Optional[str], need: bool = True):
    """Config, device and pose classifier of classify/eval: DINOv2 on --templates, or the one --prior brings
    (None when neither is given and ``need`` is False)."""
    from recdreamer_gs.devices import resolve_device  # heavy: keeps --help fast
    from recdreamer_gs.prior_choice import scoring_pose_setup

    if templates is None and prior is None:
        if not need:
            return cfg, resolve_device(cfg.train.device), None
        raise UserError("give --templates DIR (DINOv2 classifier) or --prior synthetic (its template classifier)")
    cfg, device, pose, notice = scoring_pose_setup(cfg, from_templates=templates is not None)
    _notice(notice)
    return cfg, device, pose


@command("classify")
def classify_cmd(
    images: List[Path] = typer.Argument(..., help="Images to classify (PNG/JPG)."),
    templates: Templates = None,
    prior: PosePrior = None,
    model: UnusedModel = None,
    pose_model: PoseModel = None,
    device: Device = None,
) -> None:
    """Print the pose-class probabilities of each image."""
    cfg = _config(prompt="classify", prior=prior, device=device, templates=templates, pose_model=pose_model)
    _, dev, pose = _pose(cfg, templates, prior)
    table = Table("image", *pose.class_names)
    for path, probs in zip(images, pose.classify_files(images, dev).tolist()):
        table.add_row(path.name, *[f"{v:.3f}" for v in probs])
    Console().print(table)


@command("eval")
def eval_cmd(
    ply: Path = typer.Argument(..., help="A 3DGS .ply (viewer frame unless --frame y-up)."),
    prompt: str = typer.Option("", help="The prompt, for cEnt and the CLIP score (default: the run's)."),
    templates: Templates = None,
    prior: PosePrior = None,
    model: UnusedModel = None,
    pose_model: PoseModel = None,
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP repo id or local folder (cEnt, "
                                             "CLIP score)."),
    resolution: Optional[int] = typer.Option(None, help="Render size (default: the config's camera.resolution; a "
                                             "classifier of fixed input size sets its own)."),
    frame: Frame = "viewer",
    device: Device = None,
    preset: Preset = "preview",
    config: ConfigFile = None,
) -> None:
    """pEnt (pose entropy over 10 azimuths), and cEnt + CLIP score with --clip-model, on the views run scores.

    Cameras, render and prior settings come from --config, else the run's config.yaml next to the PLY, else
    the preset.
    """
    from recdreamer_gs.metrics import ClipScorer, evaluate_ply  # heavy: keeps --help fast

    if templates is None and prior is None and clip_model is None:
        raise UserError("nothing to evaluate: give --templates DIR or --prior synthetic (pEnt), "
                        "and/or --clip-model (cEnt, CLIP score)")
    if config is None and (ply.parent / "config.yaml").is_file():
        config = ply.parent / "config.yaml"  # the run's effective config: the views its metrics.json scored
    cfg = _config(preset, config, device=device or "auto", prior=prior, templates=templates, pose_model=pose_model)
    prompt = prompt or cfg.prompt
    if clip_model is not None and not prompt:
        raise UserError("--clip-model needs --prompt for cEnt and the CLIP score")
    cfg, dev, pose = _pose(cfg, templates, prior, need=False)
    clip = ClipScorer.load(clip_model, device=dev) if clip_model is not None else None
    Console().print_json(json.dumps(evaluate_ply(ply, cfg, dev, pose, clip, prompt, frame, resolution)))


@command("render")
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
    frame: Frame = "viewer",
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    video: bool = typer.Option(False, "--video", help="Also write the GIF's frames as orbit.mp4 (H.264)."),
) -> None:
    """Render orbit views of a PLY to a PNG grid and a GIF (and an MP4 with --video)."""
    from recdreamer_gs.devices import resolve_device  # heavy: keeps --help fast
    from recdreamer_gs.gaussians import read_gaussians
    from recdreamer_gs.images import write_orbit
    from recdreamer_gs.render import ensure_backend

    dev = resolve_device(device)
    ensure_backend("auto", dev)
    written = write_orbit(read_gaussians(ply, frame, dev), out or ply.parent, views, frames, resolution, elevation,
                          radius, fovy, video)
    err_console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@command("view")
def view_cmd(
    plys: List[Path] = typer.Argument(..., metavar="PLY", help="3DGS .ply files (or run folders), side by side."),
    port: int = typer.Option(8080, "--port", help="Port on localhost (the next free one if taken; 0: any)."),
    frame: Frame = "viewer",
) -> None:
    """Show 3DGS PLY files in the browser (viser) until Ctrl-C."""
    from recdreamer_gs.viewer import open_plys  # heavy: keeps --help fast

    if not 0 <= port <= 65535:
        raise UserError(f"--port: expected 0..65535 (0: any free port), got {port}")
    live = open_plys(plys, port, frame)
    try:  # from here on Ctrl-C is how a view ends (exit 0), even before the banner is out
        err_console.print(f"{live.banner()}  (Ctrl-C to stop)", highlight=False)
        live.wait()
    except KeyboardInterrupt:
        pass
    finally:
        live.stop()


@command("export")
def export_cmd(
    ply: Path = typer.Argument(..., help="Input 3DGS .ply."),
    target: Path = typer.Argument(..., help="Output: .ply, .splat, .spz or .sog (Gaussians), .glb or .obj "
                                  "(mesh), .ply with --mesh (mesh)."),
    frame_in: str = typer.Option("viewer", "--from-frame", help="Frame of the input: viewer | y-up."),
    frame_out: str = typer.Option("viewer", "--to-frame", help="Frame of the output (Gaussians or mesh): viewer "
                                  "(as model.ply) | y-up (the internal frame; glTF viewers assume +y up)."),
    mesh: bool = typer.Option(False, "--mesh", help="Write a triangle mesh (implied by .glb and .obj)."),
    faces: int = typer.Option(0, "--faces", help="Mesh: decimate to at most N triangles (0: keep all)."),
    resolution: int = typer.Option(0, help="Mesh: render size and voxels across the object "
                                   "(0: 256 on CUDA, 128 on CPU)."),
    device: str = typer.Option("auto", help="Mesh: device for the renders (auto | cpu | cuda)."),
) -> None:
    """Convert a PLY to .splat, .spz (Spark), .sog (SuperSplat, PlayCanvas) or between frames, or extract a
    coloured triangle mesh (.glb/.obj/.ply)."""
    from recdreamer_gs.convert import convert  # heavy: keeps --help fast

    err_console.print(convert(ply, target, frame_in, frame_out, mesh, faces, resolution, device), highlight=False)


@command("models")
def models_cmd(
    preset: Preset = "preview",
    config: ConfigFile = None,
    set_: Sets = None,
    prior: Optional[str] = typer.Option(None, help="auto | synthetic | sd (auto counts as SD on a CUDA run)."),
    method: Optional[str] = typer.Option(None, help="usd | vsd | sds (USD needs DINOv2)."),
    model: Model = None,
    pose_model: PoseModel = None,
    templates: Templates = None,
    init: Init = None,
    device: Optional[str] = typer.Option(None, help="Device of the run: auto | cpu | cuda. Default: a CUDA run, "
                                         "also on a machine without GPU (a cluster's login node)."),
    download: bool = typer.Option(False, "--download", help="Fetch the missing models into the Hugging Face cache."),
    bench: bool = typer.Option(False, "--bench", help="Also the CLIP model of `recdreamer-gs bench` (cEnt, CLIP "
                               "score)."),
) -> None:
    """List the models a run with these options loads: source, complete here or not, size.

    With --download the missing ones are fetched (e.g. on a login node; compute nodes then run with
    HF_HUB_OFFLINE=1 on the same cache).
    """
    from recdreamer_gs.metrics import DEFAULT_CLIP_MODEL
    from recdreamer_gs.prior_choice import run_models  # heavy: keeps --help fast

    if bench:
        set_ = [f"output.clip_model={DEFAULT_CLIP_MODEL}", *(set_ or [])]
    cfg = _config(preset, config, set_, prompt="models", prior=prior, device=device, method=method, model=model,
                  pose_model=pose_model, templates=templates, init=init)
    doctor.models_report(run_models(cfg, cuda=cfg.train.device != "cpu"), download=download, console=Console())


@command("doctor")
def doctor_cmd(
    short: bool = typer.Option(False, "--short", help="One line: the torch build and the GPU it sees."),
) -> None:
    """Versions, GPU, build tools, caches and local models, for bug reports (never downloads or builds)."""
    if short:
        hint = doctor.cuda_mismatch()
        typer.echo(doctor.torch_summary() + (f"\nnote: {hint}" if hint else ""))
        return
    from recdreamer_gs.config import load_config  # heavy: keeps --help fast
    from recdreamer_gs.prior_choice import run_models

    doctor.report(run_models(load_config("preview"), cuda=True), Console(soft_wrap=True))


@command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (finished or not)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Image to write (default: RUN_DIR/report.png)."),
) -> None:
    """Plot a run's training curves (losses, gradient norms, t, Gaussians, pose EMA) to report.png."""
    from recdreamer_gs.report import write_report  # heavy: keeps --help fast

    err_console.print(f"wrote {write_report(run_dir, out)}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Building and running a job from a RunConfig: device, prior choice, output folder, Trainer."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from recdreamer_gs.config import RunConfig
from recdreamer_gs.errors import UserError
from recdreamer_gs.gaussians import StartCloud
from recdreamer_gs.pose.setup import CLASSIFIER_FILE, PoseSetup, saved_pose_setup
from recdreamer_gs.priors.base import Prior


class RunError(UserError, RuntimeError):
    """A run cannot start; the message says what was wrong and what to do."""


@dataclass
class PriorChoice:
    prior: Prior
    kind: str  # the prior.kind that was chosen ("synthetic" or "sd"; never "auto")
    notice: Optional[str]  # shown to the user when auto fell back to the synthetic prior
    load_s: float = 0.0  # seconds spent loading the prior (downloads excluded)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu (synthetic prior) "
                       "or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    return torch.device(device)


def synthetic_notice(reason: str) -> str:
    return (
        f"Using the offline synthetic prior because {reason}. It distils a built-in reference object, "
        "not your prompt. For real text-to-3D run on a CUDA GPU with Stable Diffusion weights (downloaded on "
        "first use; `recdreamer-gs models --download` fetches them ahead, or --model PATH to a local folder)."
    )


def build_prior(cfg: RunConfig, device: torch.device, starting_shape: bool = False) -> PriorChoice:
    """The prior the config asks for; ``auto`` picks SD on a CUDA device when its weights can be had.

    Before SD loads, every model of the run (SD, DINOv2, CLIP, a separate ε_φ UNet, and Shap-E when
    ``starting_shape`` says that a fresh run makes one) is made local: all are checked first and then the
    missing ones downloaded, so a model that cannot be had stops the run with one
    :class:`recdreamer_gs.hub.ModelUnavailable` before gigabytes are fetched or loaded.
    """
    from recdreamer_gs import hub
    from recdreamer_gs.priors.synthetic import SyntheticPrior

    kind, notice = cfg.prior.kind, None
    if kind == "auto":
        kind, notice = _auto_prior(cfg, device)
    if kind == "synthetic":
        return PriorChoice(SyntheticPrior(cfg.prior.synthetic, device), kind, notice)
    hub.prepare(hub.config_models(cfg, cuda=device.type == "cuda", starting_shape=starting_shape))
    from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior

    start = time.perf_counter()
    sd = cfg.prior.sd
    # The tiny decoder serves the rectifier only, so a run without USD does not load it (hub.config_models).
    tiny = sd.tiny_decoder if "usd" in cfg.methods() else None
    prior = StableDiffusionPrior.load(sd.model, cfg.prompt, sd.aux_prompt, device, sd.dtype, sd.latent_resolution,
                                      tiny_decoder=tiny, channels_last=cfg.perf.channels_last and device.type == "cuda")
    return PriorChoice(prior, kind, notice, time.perf_counter() - start)


def effective_config(cfg: RunConfig, choice: PriorChoice, device: torch.device) -> RunConfig:
    """The config that runs: ``auto`` prior and device resolved, the prior's own settings applied
    (``Prior.specialise``). Idempotent: the run folder's config.yaml runs the same again."""
    import dataclasses

    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=choice.kind),
                              train=dataclasses.replace(cfg.train, device=device.type))
    cfg = choice.prior.specialise(cfg)
    cfg.validate()
    return cfg


def run_iterations(cfg: RunConfig) -> int:
    """Iterations of the whole run (all stages)."""
    return sum(steps for _, steps, _ in cfg.stage_plan())


def compile_networks(cfg: RunConfig, device: torch.device, prior: Prior, particle_score, pose: PoseSetup,
                     timings: Optional[dict] = None, echo: Optional[Callable[[str], None]] = None):
    """Route the networks' passes through ``torch.compile`` when ``perf.compile`` asks for it on this run
    (recdreamer_gs.perf); the compiler (None when the run stays eager). The synthetic prior has no
    networks: compiling leaves it as it is."""
    from recdreamer_gs import perf

    compiler = perf.make_compiler(cfg.perf, device, run_iterations(cfg), echo=echo, timings=timings)
    if compiler is not None:
        perf.compile_networks(compiler, prior, particle_score, pose.module)
    return compiler


def progress_echo(text: str) -> None:
    """A progress line on stderr (above Lightning's progress bar), from rank 0 only."""
    from rich.console import Console

    from recdreamer_gs.distributed import is_secondary_rank

    if not is_secondary_rank():
        Console(stderr=True).print(text, highlight=False, markup=False)


def _auto_prior(cfg: RunConfig, device: torch.device) -> tuple[str, Optional[str]]:
    """``auto``: SD on CUDA when its weights are local or can be downloaded now; else synthetic and why."""
    from recdreamer_gs import hub

    if device.type != "cuda":
        from recdreamer_gs.doctor import cuda_mismatch

        asked = cfg.train.device == "cpu"
        hint = None if asked else cuda_mismatch()
        reason = "--device cpu was asked for" if asked else "no CUDA device is in use"
        return "synthetic", synthetic_notice(reason + (f" ({hint})" if hint else ""))
    sd = hub.config_models(cfg, cuda=True)[0]
    try:
        hub.plan(sd)
    except hub.ModelUnavailable as err:
        return "synthetic", synthetic_notice(f"the Stable Diffusion weights {sd.source!r} cannot be had: {err.cause}")
    return "sd", None


def slugify(prompt: str, limit: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return (slug[:limit].rstrip("-") or "run")


def make_run_dir(root: Path, prompt: str) -> Path:
    """``root/<slug>-<YYYYmmdd-HHMMSS>``, created fresh (never reuses an existing folder).

    The processes that a data-parallel launcher starts for ranks above 0 reuse rank 0's folder.
    """
    import os

    from recdreamer_gs.distributed import RUN_DIR_ENV, is_secondary_rank

    if is_secondary_rank() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{slugify(prompt)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    try:
        path.mkdir(parents=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"--out {root}: cannot create the run folder there ({err.strerror or err}); "
                       "choose a writable folder") from None
    os.environ[RUN_DIR_ENV] = str(path)  # inherited by data-parallel ranks started later
    return path


class Interrupted(RuntimeError):
    """Ctrl-C stopped a run after its checkpoint and PLY were written."""


class TrainingFailed(RuntimeError):
    """Training stopped with an error after it started; ``str()`` is one line: the cause, what was kept and the
    ``--resume`` command. ``exit_code`` is 2 for out of memory (the user can lower settings), else 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def training_failure(err: BaseException, system, cfg: RunConfig, out_dir: Path) -> TrainingFailed:
    """The one-line report of an error raised while training: OOM names the settings to lower, a failed write
    names the file and the cause in words (exit code 2 for both), other errors keep their traceback in
    ``error.log`` of the run folder. Each ends with what was kept and how to go on (``kept_state``)."""
    import traceback

    from recdreamer_gs.errors import Diverged, os_cause

    oom = isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()
    failed_write = first_os_error(err)
    if oom:
        cause = (f"out of memory; lower camera.batch_size (now {cfg.camera.batch_size}), the render size "
                 f"camera.resolution (now {cfg.camera.resolution}) or prior.sd.latent_resolution (now "
                 f"{cfg.prior.sd.latent_resolution or 'the model’s own size'}), or the Gaussian cap densify.max_gaussians (now "
                 f"{cfg.densify.max_gaussians}), e.g. --set camera.batch_size=1")
    elif isinstance(err, Diverged):
        cause = str(err)
    elif failed_write is not None:
        cause = f"cannot write {failed_write.filename or out_dir}: {os_cause(failed_write)}"
    else:
        from recdreamer_gs.export import atomic_write_bytes

        first = (str(err).strip().splitlines() or [""])[0]
        log = out_dir / "error.log"
        try:
            atomic_write_bytes(log, "".join(traceback.format_exception(err)).encode())
            where = f"traceback in {log}"
        except OSError as log_err:
            where = f"the traceback could not be saved: {os_cause(log_err)}"
        cause = f"{type(err).__name__}: {first} ({where})"
    kept = kept_state(system, out_dir, failed_write)
    return TrainingFailed(f"training stopped at iteration {system.iteration}: {cause}; {kept}",
                          2 if oom or failed_write is not None else 1)


def first_os_error(err: BaseException) -> Optional[OSError]:
    """The write that failed first when ``err`` is an ``OSError``. Lightning flushes the loggers after the
    callbacks ran, so on a full disk their failure is raised with the first one as its ``__context__``; a write
    through ``export.atomic_path`` is raised again with the target's name, its raw error as context."""
    chain: list[OSError] = []
    while isinstance(err, OSError) and err not in chain:
        chain.append(err)
        err = err.__context__
    named = [e for e in chain if e.filename]
    return (named or chain or [None])[-1]


def kept_files(out_dir: Path) -> str:
    """The files of a run folder that ``--resume`` and the viewers use, e.g. ``checkpoints/last.ckpt
    (iteration 40) and model.ply``; empty when there are none."""
    from recdreamer_gs.outputs import OUTPUTS

    parts = []
    ckpt = out_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        try:  # mmap: only the small entries are read, not the tensors
            saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
            stage = f" of stage {saved['stage'] + 1}" if saved.get("stage") else ""
            parts.append(f"checkpoints/last.ckpt (iteration {saved['iteration']}{stage})")
        except Exception:  # noqa: BLE001 - a foreign or damaged file is still named
            parts.append("checkpoints/last.ckpt")
    suffixes = {o.suffix for o in OUTPUTS if o.kind == "gaussians"}
    parts += sorted(p.name for p in out_dir.glob("model*") if p.suffix in suffixes and p.is_file())
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def kept_state(system, out_dir: Path, failed_write: Optional[OSError] = None) -> str:
    """What a stopped run left in its folder and how to go on: the ``--resume`` command, after what to fix first
    when a write failed (e.g. "free some space"), or to start again when no checkpoint was written."""
    from recdreamer_gs.errors import os_remedy

    failed_write = failed_write or getattr(system, "save_error", None)
    if not out_dir.is_dir():
        return "nothing was kept: the run folder is gone; start the run again"
    fix = os_remedy(failed_write) if failed_write is not None else ""
    then = f"{fix}, then " if fix else ""
    why = ""
    if failed_write is not None and not getattr(system, "saved_on_exception", False):
        why = "nothing more could be written; "
    elif getattr(system, "non_finite", False):
        why = "the Gaussians were no longer finite; "
    files = kept_files(out_dir)
    if (out_dir / "checkpoints" / "last.ckpt").is_file():
        return f"{why}kept {files}; {then}continue with: recdreamer-gs run --resume {out_dir}"
    return f"{why}no checkpoint was written{f' (kept {files})' if files else ''}; {then}start the run again"


def read_resume(out_dir: Path) -> tuple[RunConfig, dict]:
    """The resolved config and last checkpoint of an earlier run folder (``run --resume OUTDIR``)."""
    from recdreamer_gs.config import ConfigError, config_from_data, read_yaml

    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / "last.ckpt"
    if not (out_dir / "config.yaml").is_file() or not ckpt_path.is_file():
        raise RunError(f"--resume {out_dir}: expected a run folder with config.yaml and checkpoints/last.ckpt")
    cfg = config_from_data(read_yaml(out_dir / "config.yaml"))
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise RunError(f"--resume {out_dir}: cannot read {ckpt_path.name} ({err})") from None
    if not isinstance(checkpoint, dict) or "iteration" not in checkpoint:
        raise ConfigError(f"--resume {out_dir}: {ckpt_path.name} is not a recdreamer-gs checkpoint")
    return cfg, checkpoint


def stage_config(cfg: RunConfig, stage) -> RunConfig:
    """The config of one stage of a multi-stage run: its steps and distillation settings."""
    import dataclasses

    return dataclasses.replace(cfg, distill=stage.distill,
                               train=dataclasses.replace(cfg.train, steps=stage.steps), stages=[])


def build_clip(cfg: RunConfig, device: torch.device):
    """The CLIP scorer for cEnt and the CLIP score when ``output.clip_model`` is set (else None)."""
    if not cfg.output.clip_model:
        return None
    from recdreamer_gs.metrics import ClipScorer

    return ClipScorer.load(cfg.output.clip_model, device=device)


def fit(cfg: RunConfig, out_dir: Path, choice: PriorChoice, device: torch.device,
        resume: Optional[dict] = None, extra_callbacks: Optional[list] = None, clip=None,
        start: Optional[StartCloud] = None):
    """Train the Gaussian set(s) with Lightning, stage by stage, and write the run folder (README, "What a
    run makes"). Returns the system of the last stage. ``resume`` is a checkpoint of this run folder;
    ``start`` the starting cloud of a fresh run (written as ``init.ply``; None: the random ball).
    """
    cfg = effective_config(cfg, choice, device)  # what runs, and what config.yaml records
    torch.manual_seed(cfg.train.seed)
    stages = cfg.stages or [None]
    stage_cfgs = [cfg if st is None else stage_config(cfg, st) for st in stages]
    # Phases of the run for metrics.json; the stages add train_s and export_s (callbacks.ExportAndMetrics).
    timings = {"load_s": choice.load_s, "templates_s": 0.0}
    began = time.perf_counter()
    saved = out_dir / CLASSIFIER_FILE
    if resume is not None and saved.is_file():  # the classifier the run was built with, templates embedded
        pose = saved_pose_setup(cfg.first_distill("usd").rectifier, saved, device)
    else:
        pose = choice.prior.pose_setup(cfg, need="usd" in cfg.methods(), timings=timings)
    if pose.templates is not None:
        from recdreamer_gs.pose.templates import write_template_folder

        write_template_folder(pose.templates, out_dir / "templates")
        if pose.module is not None:
            pose.module.save(saved)
    if start is not None and resume is None:
        from recdreamer_gs.export import write_point_cloud

        write_point_cloud(out_dir / "init.ply", start.points, start.rgb, frame=cfg.output.ply_frame)
    particle_score = choice.prior.particle_score(cfg)  # one ε_φ, shared by the run's VSD/USD stages
    if clip is None:
        clip = build_clip(cfg, device)
    timings["load_s"] += time.perf_counter() - began - timings["templates_s"]
    # Compiled lazily in the first iterations; compile_s counts it (it is also part of train_s).
    compiler = compile_networks(cfg, device, choice.prior, particle_score, pose, timings, progress_echo)
    first = int(resume.get("stage", 0)) if resume is not None else 0
    particles, system = None, None
    try:
        for k in range(first, len(stages)):
            stage = stages[k]  # None for a single-stage run
            system = _fit_stage(
                cfg, stage_cfgs[k], out_dir, choice, device, pose, particle_score, particles, k,
                colour_only=stage is not None and stage.params == "colour",
                prefix=f"{stage.name}_" if len(stages) > 1 else "",
                resume=resume if k == first else None, extra_callbacks=extra_callbacks, clip=clip, timings=timings,
                start=start if resume is None else None,
            )
            particles = list(system.particles)
    finally:
        if compiler is not None:
            compiler.close()
    return system


def _fit_stage(run_cfg: RunConfig, cfg: RunConfig, out_dir: Path, choice: PriorChoice, device: torch.device, pose: PoseSetup,
               particle_score, particles, stage: int, colour_only: bool, prefix: str,
               resume: Optional[dict], extra_callbacks: Optional[list], clip=None,
               timings: Optional[dict] = None, start: Optional[StartCloud] = None):
    """One Lightning fit: the system of one stage (its config ``cfg``) with its callbacks; ``start``: where the
    first stage's Gaussians start (later stages continue the particles)."""
    import signal

    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from recdreamer_gs.callbacks import (Checkpointer, ConfigSnapshot, ExportAndMetrics, PoseEMALog, PreviewImages,
                                         make_loggers)
    from recdreamer_gs.data import CameraDataModule
    from recdreamer_gs.distributed import make_strategy
    from recdreamer_gs.rng import derive_seed
    from recdreamer_gs.system import TextTo3DSystem

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available" banners or tips
    system = TextTo3DSystem(cfg, choice.prior, particle_score if cfg.distill.method != "sds" else None,
                            pose.classifier, pose.class_names, particles=particles, metric_classifier=pose.metric,
                            metric_camera=pose.metric_camera, colour_only=colour_only, stage=stage, start=start)
    system.clip_scorer = clip
    first_iteration = 0
    if resume is not None:
        system.restore(resume)
        first_iteration = system.iteration
    if resume is not None and first_iteration >= cfg.train.steps:
        # Training was done but the files of its end were not all written (no metrics.json, e.g. the disk filled
        # up): write them now. Not through Trainer.fit, which skips its end hooks when nothing is left to train.
        system.to(device)
        export = ExportAndMetrics(cfg, out_dir, timings=timings)
        export.start_time, export.start_iteration = time.perf_counter(), first_iteration
        try:
            export.finish(system)
        except OSError as err:
            raise training_failure(err, system, cfg, out_dir) from err
        return system
    data = CameraDataModule(cfg.camera, cfg.train.steps, derive_seed(cfg.train.seed, "stage", stage),
                            cfg.render.background, start=first_iteration)
    callbacks: list = [
        PreviewImages(out_dir, cfg.train.preview_every, prefix),
        Checkpointer(cfg, out_dir, cfg.train.checkpoint_every),
        ExportAndMetrics(cfg, out_dir, timings=timings,
                         stage=f"{stage + 1}/{len(run_cfg.stages)}" if run_cfg.stages else None),
        PoseEMALog(max(cfg.train.log_every, 1)),
        *(extra_callbacks or []),
    ]
    if stage == 0:
        callbacks.insert(0, ConfigSnapshot(run_cfg, out_dir))  # the whole run's config, stages included
    if cfg.train.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=cfg.train.devices,
        strategy=make_strategy(cfg.train.devices, device.type),
        use_distributed_sampler=False,  # every rank runs every iteration on its own cameras
        max_epochs=1,
        callbacks=callbacks,
        logger=make_loggers(cfg, out_dir, prefix.rstrip("_")),
        log_every_n_steps=max(cfg.train.log_every, 1),
        enable_checkpointing=False,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(system, datamodule=data)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after the callbacks ran (Checkpointer saved).
        if system.interrupted:
            raise Interrupted(f"interrupted at iteration {system.iteration}; {kept_state(system, out_dir)}") from None
        raise
    except Exception as err:  # noqa: BLE001 - every failure after training started: Checkpointer kept the state
        raise training_failure(err, system, cfg, out_dir) from err
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
    return system


@dataclass
class Prepared:
    """What a run needs before its folder exists (``prepare``)."""

    device: torch.device
    choice: PriorChoice
    clip: Optional[object] = None  # metrics.ClipScorer when output.clip_model is set
    start: Optional[StartCloud] = None  # the starting cloud of gaussians.init file / shap-e (fresh runs only)


def prepare(cfg: RunConfig, fresh: bool = True) -> Prepared:
    """The device, prior, CLIP scorer and starting cloud of a run, made before its run folder exists, so
    that whatever cannot work (no GPU, a broken gsplat build, a missing model, a bad ``--init-from`` file,
    an empty Shap-E mesh) stops it with one error and nothing written. Every model is made local before
    the starting shape is generated. ``fresh=False`` (a resume: its Gaussians come from the checkpoint)
    makes neither the starting cloud nor CLIP."""
    import dataclasses

    from recdreamer_gs import hub
    from recdreamer_gs.render import ensure_backend
    from recdreamer_gs.shape import starting_cloud

    device = resolve_device(cfg.train.device)
    ensure_backend(cfg.render.backend, device)  # before any model loads: a broken gsplat build fails in seconds
    choice = build_prior(cfg, device, starting_shape=fresh)
    if not fresh:
        return Prepared(device, choice)
    # With the synthetic prior, Shap-E and CLIP are checked (then fetched) here; the SD path did it already.
    chosen = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=choice.kind))
    hub.prepare(hub.config_models(chosen, cuda=device.type == "cuda"))
    start = starting_cloud(cfg, device, progress_echo)
    return Prepared(device, choice, build_clip(cfg, device), start)


def prepare_resume(run_dir: Path, steps: Optional[int] = None, device: Optional[str] = None
                   ) -> tuple[RunConfig, dict, str]:
    """``run --resume RUN_DIR``: its config (``steps``/``device`` applied), last checkpoint, and where it
    continues ("at iteration i of n [of stage k/K]")."""
    import dataclasses

    cfg, checkpoint = read_resume(run_dir)
    if steps is not None:
        if cfg.stages:
            raise RunError("--steps cannot extend a multi-stage run; edit the stages in its config.yaml instead")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    cfg.validate()
    stage = int(checkpoint.get("stage", 0))
    stage_steps = cfg.stages[stage].steps if cfg.stages else cfg.train.steps
    done = checkpoint["iteration"]
    finished = stage >= len(cfg.stages) - 1 and done >= stage_steps
    if finished and (Path(run_dir) / "metrics.json").is_file():
        raise RunError(f"--resume {run_dir}: the run already finished {done} of {stage_steps} iterations; "
                       f"pass --steps N with N > {done} to extend it")
    where = f" of stage {stage + 1}/{len(cfg.stages)}" if cfg.stages else ""
    # A run whose final files were not all written (no metrics.json, e.g. the disk filled up) writes them now.
    return cfg, checkpoint, f"at iteration {done} of {stage_steps}{where}" + (
        " (training done; writing its files)" if finished else "")


def scoring_pose_setup(cfg: RunConfig, from_templates: bool
                       ) -> tuple[RunConfig, torch.device, PoseSetup, Optional[str]]:
    """The pose classifier of ``classify``/``eval``: DINOv2 on the template folder of ``cfg`` (no prior
    loads), or the one the prior brings (``--prior synthetic``). Returns the config as the prior runs it
    (``effective_config``), the device, the classifier and the prior's notice (see ``build_prior``)."""
    from recdreamer_gs.pose.setup import folder_pose_setup

    device = resolve_device(cfg.train.device)
    if from_templates:
        return cfg, device, folder_pose_setup(cfg.distill.rectifier, device), None
    choice = build_prior(cfg, device)
    cfg = effective_config(cfg, choice, device)
    pose = choice.prior.pose_setup(cfg, need=False)
    if pose.classifier is None:
        raise RunError(f"the prior {choice.prior.name!r} brings no pose classifier of its own: give --templates DIR")
    return cfg, device, pose, choice.notice


def quiet_libraries() -> None:
    """Keep Lightning's and the model libraries' chatter out of a command's own output."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

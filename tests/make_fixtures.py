"""Write tiny random-weight models with ``save_pretrained`` so that the real loading code runs offline.

    python tests/make_fixtures.py OUTDIR

writes ``OUTDIR/dinov2`` (DINOv2 with registers), ``OUTDIR/clip`` (CLIP model + tokenizer),
``OUTDIR/sd`` (a Stable Diffusion pipeline folder: tokenizer, text encoder, UNet, VAE, scheduler),
``OUTDIR/taesd`` (an AutoencoderTiny, the optional tiny decoder of x̂0) and ``OUTDIR/shap_e`` (a
ShapEPipeline folder: tokenizer, text encoder, prior, scheduler, renderer).
No file is downloaded: the tokenizer vocabulary is the byte-level alphabet built here.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import torch


def write_clip_tokenizer(out: Path, max_length: int = 77) -> None:
    """A CLIPTokenizer with single-character tokens only (no merges)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())  # CLIP's byte-level alphabet: every byte has a printable symbol
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(out))


TINY_DINOV2 = dict(  # DINOv2-with-registers, 2 layers of width 32, patch 14 (same token layout as ViT-S/14)
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224,
    num_register_tokens=4,
)


TINY_TEXT_ENCODER = dict(  # CLIP text tower over the byte-level vocabulary of write_clip_tokenizer
    vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
)
TINY_UNET = dict(  # SD's blocks (a cross-attention down and up block, 4 latent channels, text cross-attention) at
    # one level, no mid block and a width that runs in milliseconds: the compile tests (test_perf.py) trace and
    # compile every block of it, and nothing in the package reaches into a UNet's blocks (the LoRA adapters sit on
    # the attention projections of whatever blocks there are)
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    use_linear_projection=True,  # as SD 2.x
)
TINY_VAE = dict(  # four blocks: three 2x downsamplings, 8x like SD's VAE
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
)


TINY_TAESD = dict(  # AutoencoderTiny with TAESD's layout (three 2x upsamplings: 8x, 4 latent channels), narrow
    encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
)


def write_dinov2(out: Path, config: dict, dtype: torch.dtype = torch.float32, variant=None) -> Path:
    """A random-weight DINOv2-with-registers model of the given config, saved with ``save_pretrained``."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config)).to(dtype).save_pretrained(str(out), variant=variant)
    return out


def make_dinov2(out: Path) -> Path:
    return write_dinov2(out, TINY_DINOV2)


def make_clip(out: Path) -> Path:
    """CLIP with tiny text and vision towers, plus its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=TINY_TEXT_ENCODER,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(out))
    write_clip_tokenizer(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(out))
    return out


def write_sd_folder(out: Path, text_encoder: dict, unet: dict, vae: dict, dtype: torch.dtype = torch.float32,
                    variant=None) -> Path:
    """A Stable Diffusion pipeline folder with random weights of the given configs, laid out like SD 2.1-base
    (tokenizer, text encoder, UNet, VAE, SD 2.1-base's 1000-step scaled-linear ε-prediction schedule).

    The tokenizer is the byte-level one of :func:`write_clip_tokenizer` (nothing to download). Networks are
    built on the GPU when there is one (an SD-size UNet initialises slowly on a CPU), saved in ``dtype``
    with ``variant`` (e.g. "fp16"). Written to a temporary folder and renamed, so that an interrupted run
    never leaves a folder that looks complete.
    """
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        networks = dict(
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder)),
            unet=UNet2DConditionModel(**unet),
            vae=AutoencoderKL(**vae),
        )
    networks = {k: v.to("cpu", dtype) for k, v in networks.items()}
    scheduler = DDIMScheduler(  # SD 2.1-base's schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    with written_whole(out) as tmp:
        write_clip_tokenizer(tmp / "tokenizer_files")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer_files"))
        shutil.rmtree(tmp / "tokenizer_files")
        pipe = StableDiffusionPipeline(
            **networks, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(str(tmp), variant=variant)
    return out


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed onto it when the block succeeds (removed otherwise), so
    that an interrupted write never leaves a folder that looks complete."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def make_taesd(out: Path) -> Path:
    """A random-weight AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors, as
    madebyollin/taesd lays it out)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(**TINY_TAESD).save_pretrained(str(out))
    return out


TINY_SHAP_E_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, projection_dim=32)  # CLIPTextModelWithProjection
TINY_SHAP_E_PRIOR = dict(  # PriorTransformer laid out as Shap-E's (no extra tokens, layer norm in, gelu time MLP)
    num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32, num_embeddings=32,
    additional_embeddings=0, time_embed_act_fn="gelu", time_embed_dim=128, norm_in_type="layer",
    encoder_hid_proj_type=None, added_emb_type=None, embedding_proj_dim=32, clip_embed_dim=64,
)
TINY_SHAP_E_RENDERER = dict(  # the latent's 32 rows of width 32 become the first four MLP layers of width 8
    param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)), d_latent=32, d_hidden=8, n_output=12,
)


# The 12 edges of a marching-cubes cell as diffusers' MeshDecoder numbers them (_create_flat_edge_indices:
# 4 along x, 4 along y, 4 along z), each as its two corners; corner c = x + 2y + 4z is bit c of a cell's case.
CELL_EDGES = ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7))


def crossing_edge_table() -> tuple[torch.Tensor, torch.Tensor]:
    """A lookup table for MeshDecoder (its ``cases`` [256, 5, 3] and ``masks`` [256, 5] buffers).

    The real table comes with the Shap-E checkpoint; a fresh model holds zeros and so decodes no mesh at
    all. This one lists, for each of the 256 cases, every edge whose corners differ in sign, three per
    "triangle": the decoded vertices are exactly those of marching cubes (one per sign-changing edge), the
    triangles are not a proper surface. The starting shape reads only the vertices.
    """
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case in range(256):
        edges = [e for e, (a, b) in enumerate(CELL_EDGES) if (case >> a & 1) != (case >> b & 1)]
        for t in range(0, len(edges), 3):
            tri = edges[t:t + 3]
            cases[case, t // 3] = torch.tensor(tri + [tri[-1]] * (3 - len(tri)))
            masks[case, t // 3] = True
    return cases, masks


def shap_e_pipeline(text_encoder: dict, prior: dict, renderer: dict, dtype: torch.dtype = torch.float32):
    """A diffusers ShapEPipeline with random weights of the given configs, Shap-E's Heun schedule (1024 steps,
    exponential betas, Karras sigmas, x0 prediction clipped to [-1, 1]), the byte-level tokenizer of
    :func:`write_clip_tokenizer` and the marching-cubes table of :func:`crossing_edge_table`."""
    import tempfile

    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                      use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    networks = dict(prior=PriorTransformer(**prior), shap_e_renderer=ShapERenderer(**renderer),
                    text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder)))
    decoder = networks["shap_e_renderer"].mesh_decoder
    decoder.cases, decoder.masks = crossing_edge_table()
    if dtype != torch.float32:
        networks = {k: v.to(dtype) for k, v in networks.items()}
    return ShapEPipeline(**networks, tokenizer=tokenizer, scheduler=scheduler)


def make_shap_e(out: Path) -> Path:
    """The tiny Shap-E folder of the tests."""
    out = Path(out)
    with written_whole(out) as tmp:
        shap_e_pipeline(TINY_SHAP_E_TEXT_ENCODER, TINY_SHAP_E_PRIOR, TINY_SHAP_E_RENDERER).save_pretrained(str(tmp))
    return out


def make_sd(out: Path) -> Path:
    """The tiny SD folder of the tests: 64² images give 8² latents."""
    return write_sd_folder(out, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE)


def write_hub_snapshot(cache: Path, repo_id: str, source: Path, only=None, commit: str = "1" * 40) -> Path:
    """Lay the files of ``source`` out as huggingface_hub's cache does after a download (no network):
    ``models--owner--name/blobs/<sha256>``, ``snapshots/<commit>/<path>`` links to the blobs, ``refs/main``.

    ``only``: the repo-relative paths to write (what a filtered download fetches); default all files.
    """
    import hashlib
    import os

    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(source).as_posix()
        if only is not None and rel not in only:
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def make_all(root: Path) -> dict[str, Path]:
    root = Path(root)
    paths = {"dinov2": root / "dinov2", "clip": root / "clip", "sd": root / "sd", "taesd": root / "taesd",
             "shap_e": root / "shap_e"}
    if not (paths["dinov2"] / "config.json").exists():
        make_dinov2(paths["dinov2"])
    if not (paths["taesd"] / "config.json").exists():
        make_taesd(paths["taesd"])
    if not (paths["clip"] / "config.json").exists():
        make_clip(paths["clip"])
    if not (paths["shap_e"] / "model_index.json").exists():
        make_shap_e(paths["shap_e"])
    make_sd = globals().get("make_sd")
    if make_sd is not None and not holds(paths["sd"] / "unet" / "config.json", TINY_UNET):
        make_sd(paths["sd"])  # (again, when a checkout's folder has an older UNet size)
    return paths


def holds(config_file: Path, fields: dict) -> bool:
    """Whether a saved ``config_file`` exists and has these values (JSON turns tuples into lists)."""
    if not config_file.is_file():
        return False
    saved = json.loads(config_file.read_text())
    return all(saved.get(key) == json.loads(json.dumps(value)) for key, value in fields.items())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/make_fixtures.py OUTDIR")
    for name, path in make_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")

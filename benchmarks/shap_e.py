"""Time the Shap-E starting shape at the size of ``openai/shap-e`` with random weights; JSON out.

    python benchmarks/shap_e.py --out benchmarks/results/shap_e/cpu.json             # CPU, the run's defaults
    python benchmarks/shap_e.py --device cuda --out benchmarks/results/shap_e/h100.json
    python benchmarks/shap_e.py --small --steps 2 --grid 16 --out /tmp/shap_e.json    # tiny networks, smoke run

Builds a diffusers ShapEPipeline with random weights at Shap-E's sizes (the prior transformer of diffusers'
scripts/convert_shap_e_to_diffusers.py: 24 layers of width 1024 over 1024 latent tokens, 303M parameters;
CLIP ViT-L/14's text tower, 123M; the renderer's latent-to-MLP projections, 226M) in the precision a run
uses on the device, then times what a run calls (recdreamer_gs.shape): ``generate_mesh`` (the prior's
denoising steps, then the mesh decode on a ``--grid``³ grid) and ``mesh_to_cloud`` (the shap-e preset's
50,000 points), and the decode alone once more on the same latent.

Random weights decode a noisy field: far more vertices than a real shape has (the JSON says how many), and
the decode queries the MLP once per grid point and once per vertex, so a real shape decodes faster.
Each phase records wall seconds and the process's CPU seconds (``*_cpu_s``): on a shared machine the wall
time depends on the load, the CPU time much less (2 cores busy: wall ≈ CPU / 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # the package, make_fixtures.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from make_fixtures import (  # noqa: E402
    TINY_SHAP_E_PRIOR, TINY_SHAP_E_RENDERER, TINY_SHAP_E_TEXT_ENCODER, shap_e_pipeline,
)

from recdreamer_gs.config import ShapEConfig  # noqa: E402
from recdreamer_gs.shape import generate_mesh, mesh_to_cloud, shap_e_dtype  # noqa: E402

PROMPT = "a kangaroo wearing boxing gloves"
# openai/clip-vit-large-patch14's text tower with its projection; token ids of the byte-level test tokenizer.
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                    bos_token_id=512, eos_token_id=513, pad_token_id=513)
# diffusers' scripts/convert_shap_e_to_diffusers.py PRIOR_CONFIG (output: mean and variance, 2 x 1024).
PRIOR = dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024, num_embeddings=1024,
             additional_embeddings=0, time_embed_act_fn="gelu", time_embed_dim=4096, norm_in_type="layer",
             encoder_hid_proj_type=None, added_emb_type=None, embedding_proj_dim=768, clip_embed_dim=2048)
RENDERER: dict = {}  # ShapERenderer's defaults are Shap-E's: 4 MLP layers of width 256 from the 1024 x 1024 latent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """Wall and CPU seconds of a block (the device synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timed":
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=ShapEConfig.steps, help="denoising steps (run default 64)")
    parser.add_argument("--grid", type=int, default=ShapEConfig.grid_size, help="mesh grid (run default 128)")
    parser.add_argument("--points", type=int, default=50_000, help="starting points (the shap-e preset's)")
    parser.add_argument("--small", action="store_true", help="the test fixture's tiny networks")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = ShapEConfig(steps=args.steps, grid_size=args.grid)
    dtype = shap_e_dtype(cfg.dtype, device)
    sizes = (TINY_SHAP_E_TEXT_ENCODER, TINY_SHAP_E_PRIOR, TINY_SHAP_E_RENDERER) if args.small else (
        TEXT_ENCODER, PRIOR, RENDERER)
    with Timed(device) as build:
        pipe = shap_e_pipeline(*sizes, dtype=dtype).to(device)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("text_encoder", "prior", "shap_e_renderer")}
    with Timed(device) as generate:
        mesh = generate_mesh(pipe, PROMPT, cfg, seed=0, progress=False)
    latents = pipe(PROMPT, num_inference_steps=1, guidance_scale=cfg.guidance_scale,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    with Timed(device) as decode, torch.no_grad():
        decoded = pipe.shap_e_renderer.decode_to_mesh(latents[:1], device, grid_size=cfg.grid_size)
    with Timed(device) as to_cloud:
        cloud = mesh_to_cloud(mesh, args.points, cfg, 0.6, torch.Generator().manual_seed(0))

    result = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "small": args.small,
        "steps": cfg.steps, "grid_size": cfg.grid_size, "guidance_scale": cfg.guidance_scale,
        "parameters": params, "build_s": round(build.wall, 1),
        "generate_mesh_s": round(generate.wall, 1), "generate_mesh_cpu_s": round(generate.cpu, 1),
        "decode_to_mesh_s": round(decode.wall, 1), "decode_to_mesh_cpu_s": round(decode.cpu, 1),
        # the denoising steps: generate_mesh less a decode (of another latent: one step, see its vertices)
        "per_step_s_estimate": round((generate.wall - decode.wall) / cfg.steps, 2),
        "per_step_cpu_s_estimate": round((generate.cpu - decode.cpu) / cfg.steps, 2),
        "vertices": len(mesh.verts), "decode_alone_vertices": len(decoded.verts),
        "mesh_to_cloud_s": round(to_cloud.wall, 2), "mesh_to_cloud_cpu_s": round(to_cloud.cpu, 2),
        "points": len(cloud.points),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "torch": torch.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

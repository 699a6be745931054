"""The Stable Diffusion path on the learned stand-in (docs/standin.md): what it draws, how well the pose classifier
built from its templates sees poses, and whether SDS, VSD and USD distil it, all scored by the synthetic prior's
exact class posterior (the stand-in was trained on renders of that prior's reference object).

    python benchmarks/standin.py samples --per-view 64 --plain 64 --keep 2    # writes OUT/templates
    python benchmarks/standin.py classifier                                   # on OUT/templates
    python benchmarks/standin.py runs --templates benchmarks/results/standin/templates
    python benchmarks/standin.py sheet                                        # runs.png, run folders cut down

(OUT: benchmarks/results/standin; the committed results were made with OMP_NUM_THREADS=1.)

``samples`` draws through the project's own ``templates`` command (DDIM, "a creature, <view> view") and through
the prior's sampler for the plain prompt; each image is classified by the exact posterior (its background read
off its border) and compared with the reference views (PSNR to the nearest one). ``classifier`` builds the DINOv2
classifier from a template folder twice, with the stand-in feature model and with random weights of the same
layout, and scores both on reference renders of known pose. ``runs`` makes each (method, seed) with the real CLI
(``run --preset standin --prior sd --model ... --pose-model ...``), scores its model.ply with
``recdreamer-gs eval PLY --prior synthetic`` and measures resemblance and, for VSD/USD, whether the LoRA ε_φ learnt
the particle (its denoising loss against the frozen UNet's on the same noisy renders, and with the camera off),
and for USD the run's own classifier against the exact posterior on the metric views. ``sheet`` puts every run's
final preview in one picture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "assets" / "standin"
PROMPT = "a creature"
CLASSES = ("front", "left", "back", "right")  # the synthetic prior's order


def cli(*args: str) -> subprocess.CompletedProcess:
    """The installed command line, as a user runs it (one process per command)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "recdreamer_gs.cli", *args], capture_output=True, text=True,
                          env=env, check=False)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(result.args)}\n{result.stderr[-3000:]}")
    return result


# -- scoring with the exact posterior ------------------------------------------------------------


def synthetic_prior(resolution: int, components: int = 24, jitter: float = 40.0):
    """The synthetic prior as a scorer of images drawn at any elevation 0-30° and azimuth: ``components`` views per
    class spread ±``jitter``° in azimuth and ±``jitter``/2° in elevation around the class's canonical view, the same
    number for every class (so its class prior is uniform). Its default five-component classes at elevation 15±6°
    mislabel a fifth of the stand-in's training renders; this one labels 97% right (the rest at bin edges)."""
    from recdreamer_gs.config import SyntheticPriorConfig
    from recdreamer_gs.priors.synthetic import SyntheticPrior

    return SyntheticPrior(SyntheticPriorConfig(resolution=resolution, front_views=components,
                                               views_per_class=components, jitter_deg=jitter))


def border_background(images: torch.Tensor) -> torch.Tensor:
    """[B, 3] median colour of each image's one-pixel border, in [0, 1] (images in [-1, 1])."""
    top, bottom = images[..., 0, :], images[..., -1, :]
    left, right = images[..., :, 0], images[..., :, -1]
    ring = torch.cat([top, bottom, left, right], dim=-1)
    return ((ring.median(dim=-1).values + 1) / 2).clamp(0, 1)


@torch.no_grad()
def exact_classes(images: torch.Tensor, prior) -> torch.Tensor:
    """[B, 4] exact class posterior of images in [-1, 1] on solid backgrounds, resized to the prior's size."""
    r = prior.cfg.resolution
    x = images.float()
    if x.shape[-1] != r:
        x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
    return prior.clean_class_posterior(x, border_background(images))


@torch.no_grad()
def reference_views(resolution: int, n: int = 120, elevation: float = 15.0) -> torch.Tensor:
    """[n, 3, r, r] renders of the reference object on white in [0, 1] at ``n`` azimuths (the metric views'
    elevation, radius and field of view)."""
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.priors.synthetic import reference_object
    from recdreamer_gs.render import render

    obj = reference_object()
    cams = orbit(n, elevation, 2.5, 40.0, resolution)
    return torch.cat([render(obj, cams[i:i + 24], torch.ones(len(cams[i:i + 24]), 3), backend="torch").rgb
                      for i in range(0, n, 24)])


def psnr_to_nearest(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[B] PSNR (dB, images in [0, 1]) of each image to its nearest reference view."""
    mse = ((images[:, None] - references[None]) ** 2).flatten(2).mean(-1).min(dim=1).values
    return -10 * torch.log10(mse.clamp_min(1e-10))


def on_white(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images on a solid background -> [0, 1] with that background replaced by white (for PSNR against
    the white reference views): pixels within 0.08 of the border colour count as background."""
    bg = border_background(images)[:, :, None, None]
    x = (images + 1) / 2
    mask = ((x - bg).abs().amax(dim=1, keepdim=True) < 0.08).float()
    return x * (1 - mask) + mask


# -- samples -------------------------------------------------------------------------------------


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from recdreamer_gs.pose.templates import read_image

    out = {}
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.png"))
        out[cls.name] = torch.stack([read_image(f, read_size(f)) for f in files])
    return out


def read_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0]


def grid_png(rows: dict[str, torch.Tensor], labels: dict[str, list[str]], path: Path, scale: int = 3) -> None:
    """Rows of [-1, 1] images with a caption per row and a label under each image."""
    from PIL import Image, ImageDraw

    n = max(len(v) for v in rows.values())
    s = next(iter(rows.values())).shape[-1] * scale
    left, label_h = 150, 12
    canvas = Image.new("RGB", (left + n * s, len(rows) * (s + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        y = r * (s + label_h)
        draw.text((4, y + s // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr).resize((s, s), Image.Resampling.NEAREST), (left + c * s, y))
            draw.text((left + c * s + 2, y + s), labels[name][c], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def samples(args) -> dict[str, Any]:
    """View-phrase samples through ``templates``, plain-prompt samples through the prior's sampler."""
    from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior

    out: Path = args.out
    folder = Path(tempfile.mkdtemp(prefix="standin-templates-"))  # every candidate: only the curated ones are kept
    start = time.perf_counter()
    check(cli("templates", PROMPT, "--out", str(folder), "--per-view", str(args.per_view), "--prior", "sd",
              "--model", str(args.model), "--device", "cpu"))
    templates_s = time.perf_counter() - start
    views = read_folder(folder)
    sd = StableDiffusionPrior.load(str(args.model), PROMPT, aux_prompt="", device="cpu", dtype="fp32")
    plain = sd.sample(None, args.plain, generator=torch.Generator().manual_seed(1))
    scorer = synthetic_prior(sd.latent_resolution)
    refs = reference_views(sd.latent_resolution)
    report: dict[str, Any] = {"model": str(args.model), "per_view": args.per_view, "plain": args.plain,
                              "templates_command_s": round(templates_s, 1), "phrases": {}}
    rows, labels = {}, {}
    # "side view" samples are the left/ folder (right/ holds their mirrors, not samples).
    for phrase, images in (("front", views["front"]), ("side", views["left"]), ("back", views["back"]),
                           ("plain", plain)):
        probs = exact_classes(images, scorer)
        names = [CLASSES[i] for i in probs.argmax(-1).tolist()]
        hist = {c: round(names.count(c) / len(names), 3) for c in CLASSES}
        wanted = {"front": ("front",), "side": ("left", "right"), "back": ("back",), "plain": CLASSES}[phrase]
        psnr = psnr_to_nearest(on_white(images), refs)
        report["phrases"][phrase] = {
            "n": len(names), "histogram": hist,
            "accuracy": round(sum(n in wanted for n in names) / len(names), 3) if phrase != "plain" else None,
            "classes": names, "psnr_to_nearest_reference_db": round(float(psnr.mean()), 2),
            "confidence": round(float(probs.max(-1).values.mean()), 4),
        }
        key = f'"{PROMPT}' + (f', {phrase} view"' if phrase != "plain" else '"')
        rows[key] = images[:16]
        labels[key] = names[:16]
    report["curated_templates"] = curate(views, scorer, out / "templates", args.keep)
    shutil.rmtree(folder)
    grid_png(rows, labels, out / "samples.png")
    (out / "samples.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def curate(views: dict[str, torch.Tensor], scorer, folder: Path, keep: int) -> dict[str, list[int]]:
    """What a user of ``templates`` does by eye, done by the exact posterior: keep the ``keep`` candidates of each
    view phrase that show that view most surely (a side sample may show either side), and write them as a template
    folder in the command's own convention (left = the side sample, right = its mirror)."""
    from recdreamer_gs.pose.templates import write_template_folder

    picked, chosen = {}, {}
    for phrase, folder_name, wanted in (("front", "front", (0,)), ("back", "back", (2,)), ("side", "left", (1, 3))):
        probs = exact_classes(views[folder_name], scorer)
        score = probs[:, list(wanted)].sum(-1)
        order = score.argsort(descending=True)[:keep].tolist()
        chosen[phrase] = order
        picked[phrase] = views[folder_name][order]
    if folder.exists():
        shutil.rmtree(folder)
    write_template_folder({"front": list(picked["front"]), "back": list(picked["back"]), "left": list(picked["side"]),
                           "right": list(picked["side"].flip(-1))}, folder)
    return chosen


# -- the pose classifier -------------------------------------------------------------------------


@torch.no_grad()
def known_poses(resolution: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference renders of known pose at 36 azimuths x elevations 5, 15, 25 on random solid backgrounds, [-1, 1],
    and their class index (90° bins around front, left, back, right)."""
    from recdreamer_gs.cameras import Cameras, look_at
    from recdreamer_gs.priors.synthetic import azimuth_to_class, reference_object
    from recdreamer_gs.render import render

    az = torch.arange(36, dtype=torch.float32).repeat(3) * 10 - 180 + 5  # off the bin edges
    el = torch.tensor([5.0, 15.0, 25.0]).repeat_interleave(36)
    n = az.shape[0]
    bg = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    cams = Cameras(look_at(az, el, torch.full((n,), 2.5)), torch.full((n,), math.radians(40)), resolution, resolution,
                   az, el)
    rgb = torch.cat([render(reference_object(), cams[i:i + 27], bg[i:i + 27], backend="torch").rgb
                     for i in range(0, n, 27)])
    return rgb * 2 - 1, azimuth_to_class(az)


def classifier_accuracy(feature_model: str, templates: Path, images: torch.Tensor, truth: torch.Tensor,
                        cfg) -> dict[str, Any]:
    from recdreamer_gs.pose.classifier import PoseClassifier
    from recdreamer_gs.pose.features import DinoFeatures
    from recdreamer_gs.pose.templates import load_template_folder

    c = cfg.distill.rectifier.classifier
    features = DinoFeatures.load(feature_model, input_size=c.input_size, grid_size=c.grid_size)
    classifier = PoseClassifier.from_templates(features, load_template_folder(templates, c.template_size), c)
    with torch.no_grad():
        probs = torch.cat([classifier(images[i:i + 36]) for i in range(0, len(images), 36)])
    names = classifier.classes  # e.g. front, back, left, right
    predicted = [names[i] for i in probs.argmax(-1).tolist()]
    true = [CLASSES[i] for i in truth.tolist()]
    side = {"left": "side", "right": "side"}
    return {
        "feature_model": feature_model,
        "accuracy": round(sum(p == t for p, t in zip(predicted, true)) / len(true), 3),
        "accuracy_front_side_back": round(sum(side.get(p, p) == side.get(t, t) for p, t in zip(predicted, true))
                                          / len(true), 3),
        "mean_confidence": round(float(probs.max(-1).values.mean()), 3),
        "confusion": {t: {p: sum(1 for a, b in zip(true, predicted) if a == t and b == p) for p in names}
                      for t in CLASSES},
    }


def random_twin(model: Path, out: Path) -> Path:
    """The feature model's layout with random weights (the same seed-0 initialisation the tests use)."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out)
    return out


def classifier(args) -> dict[str, Any]:
    from recdreamer_gs.config import load_config

    cfg = load_config("standin")
    templates = args.templates or (args.out / "templates")
    images, truth = known_poses(cfg.camera.resolution)
    report = {"templates": str(templates), "images": len(truth),
              "standin": classifier_accuracy(str(args.pose_model), templates, images, truth, cfg),
              "random_weights": classifier_accuracy(str(random_twin(args.pose_model, Path(tempfile.mkdtemp()))),
                                                    templates, images, truth, cfg)}
    (args.out / "classifier.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# -- runs ----------------------------------------------------------------------------------------


@torch.no_grad()
def particle_score_learnt(run_dir: Path, n: int = 64, seed: int = 0) -> dict[str, float]:
    """The LoRA ε_φ of a finished VSD/USD run against the frozen UNet, on noisy latents of the run's own Gaussians
    (fresh cameras of the run's ranges, t uniform): denoising MSE of each, and how much ε_φ changes with the
    camera zeroed (relative RMS)."""
    from recdreamer_gs.cameras import sample_cameras
    from recdreamer_gs.config import config_from_data, read_yaml
    from recdreamer_gs.gaussians import read_gaussians
    from recdreamer_gs.priors.particle_score import LoRAParticleScore
    from recdreamer_gs.priors.stable_diffusion import StableDiffusionPrior
    from recdreamer_gs.render import render
    from recdreamer_gs.priors.diffusion import add_noise, alpha_sigma

    cfg = config_from_data(read_yaml(run_dir / "config.yaml"))
    sd = cfg.prior.sd
    prior = StableDiffusionPrior.load(sd.model, cfg.prompt, sd.aux_prompt, "cpu", sd.dtype, sd.latent_resolution)
    score = LoRAParticleScore.from_prior(prior, cfg.distill.particle_score)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    score.load_state_dict({k[len("particle_score."):]: v for k, v in state.items()
                           if k.startswith("particle_score.")})
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(cfg.camera, n, g)
    gaussians = read_gaussians(run_dir / "model.ply", "viewer", "cpu")
    rgb = render(gaussians, cams, torch.rand(n, 3, generator=g), backend="torch").rgb
    z = prior.encode(rgb, generator=g)
    t = torch.randint(20, 980, (n,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    alpha, sigma = alpha_sigma(prior.alphas_cumprod, t)
    x_t = add_noise(z, noise, alpha, sigma)
    frozen = prior.unet_pred(x_t, t, prior.cond_embedding.expand(n, -1, -1))
    lora = score.eps_phi(x_t, t, cams.c2w)
    no_camera = score.eps_phi(x_t, t, torch.zeros_like(cams.c2w))
    return {"frozen_unet_mse": round(F.mse_loss(frozen, noise).item(), 5),
            "lora_mse": round(F.mse_loss(lora, noise).item(), 5),
            "camera_off_relative_change": round(((lora - no_camera).norm() / lora.norm()).item(), 4)}


@torch.no_grad()
def classifier_vs_exact(run_dir: Path, pose_model: Path) -> dict[str, Any]:
    """On the 10 metric views (the synthetic prior's reference orbit, on white): the class the run's own DINOv2
    classifier gives each view against the exact posterior's."""
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.gaussians import read_gaussians
    from recdreamer_gs.pose.classifier import PoseClassifier
    from recdreamer_gs.pose.features import DinoFeatures
    from recdreamer_gs.render import render

    classifier = PoseClassifier.load(run_dir / "pose_classifier.pt", DinoFeatures.load(str(pose_model)))
    size = classifier.cfg.template_size
    gaussians = read_gaussians(run_dir / "model.ply", "viewer", "cpu")
    own = render(gaussians, orbit(10, 15.0, 2.5, 40.0, size), torch.ones(10, 3), backend="torch").rgb
    exact = render(gaussians, orbit(10, 15.0, 2.5, 40.0, 64), torch.ones(10, 3), backend="torch").rgb
    mine = [classifier.classes[i] for i in classifier(own * 2 - 1).argmax(-1).tolist()]
    truth = [CLASSES[i] for i in synthetic_prior_default().clean_class_posterior(exact * 2 - 1, torch.ones(10, 3))
             .argmax(-1).tolist()]
    return {"classifier": mine, "exact": truth, "agreement": sum(a == b for a, b in zip(mine, truth)) / 10}


def synthetic_prior_default():
    from recdreamer_gs.config import SyntheticPriorConfig
    from recdreamer_gs.priors.synthetic import SyntheticPrior

    return SyntheticPrior(SyntheticPriorConfig())


def logged_terms(run_dir: Path) -> dict[str, Any]:
    """Means over the run of the logged gradient norms and LoRA loss, and the pose EMA of every interval at the end."""
    import csv

    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    out: dict[str, Any] = {}
    for key in ("grad/sds_norm", "grad/vsd_norm", "grad/rect_norm", "loss/lora"):
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            out[key + "_mean"] = round(sum(values) / len(values), 5)
            out[key + "_last_quarter"] = round(sum(values[-len(values) // 4:]) / len(values[-len(values) // 4:]), 5)
    ema = {k: float(v) for r in rows for k, v in r.items() if k.startswith("pose_ema/") and v}
    if ema:
        out["pose_ema_final"] = {k[len("pose_ema/"):]: round(v, 3) for k, v in sorted(ema.items())}
    return out


@torch.no_grad()
def resemblance(ply: Path, refs: torch.Tensor) -> float:
    """Mean PSNR (dB) of the metric views (the synthetic prior's reference orbit, on white) to their nearest
    reference view."""
    from recdreamer_gs.cameras import orbit
    from recdreamer_gs.gaussians import read_gaussians
    from recdreamer_gs.render import render

    cams = orbit(10, 15.0, 2.5, 40.0, refs.shape[-1])
    rgb = render(read_gaussians(ply, "viewer", "cpu"), cams, torch.ones(10, 3), backend="torch").rgb
    return round(float(psnr_to_nearest(rgb, refs).mean()), 2)


def one_run(method: str, seed: int, args, refs: torch.Tensor) -> dict[str, Any]:
    from recdreamer_gs.config import needs

    out = args.out / "runs" / f"{method}-seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    command = ["run", PROMPT, "--preset", "standin", "--prior", "sd", "--model", str(args.model), "--pose-model",
               str(args.pose_model), "--method", method, "--seed", str(seed), "--device", "cpu", "--out", str(out),
               *[x for s in args.set for x in ("--set", s)]]
    if args.templates:
        command += ["--templates", str(args.templates)]
    start = time.perf_counter()
    check(cli(*command))
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = check(cli("eval", str(run_dir / "model.ply"), "--prior", "synthetic", "--device", "cpu")).stdout
    scored = json.loads(printed[printed.index("{"):])
    row = {"method": method, "seed": seed, "pEnt": scored["pEnt"], "pose_histogram": scored["pose_histogram"],
           "resemblance_psnr_db": resemblance(run_dir / "model.ply", refs),
           "ms_per_iteration": metrics["ms_per_iteration"], "iterations": metrics["iterations"],
           "gaussians": metrics["gaussians"], "wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(ROOT))
           if run_dir.is_relative_to(ROOT) else str(run_dir),
           "command": "recdreamer-gs " + " ".join(command).replace(f"{ROOT}/", "")}  # paths from the repository root
    row["logged"] = logged_terms(run_dir)
    if needs(method).pose_classifier:
        row["classifier_vs_exact"] = classifier_vs_exact(run_dir, args.pose_model)
    if needs(method).particle_score:
        row["particle_score"] = particle_score_learnt(run_dir)
    print(json.dumps({k: v for k, v in row.items() if k not in ("command", "run_dir")}), flush=True)
    return row


@torch.no_grad()
def init_resemblance(refs: torch.Tensor, seed: int = 0) -> float:
    """The resemblance measure of a run's starting Gaussians (the preset's ball, before any iteration): the floor a
    run's number is read against."""
    from recdreamer_gs.config import load_config
    from recdreamer_gs.export import write_ply
    from recdreamer_gs.gaussians import Gaussians
    from recdreamer_gs.rng import derive_seed

    cfg = load_config("standin")
    ball = Gaussians.create(cfg.gaussians, torch.Generator().manual_seed(derive_seed(seed, "gaussians", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        write_ply(Path(tmp) / "init.ply", ball.params)
        return resemblance(Path(tmp) / "init.ply", refs)


def runs(args) -> dict[str, Any]:
    path = args.out / "runs.json"
    report = json.loads(path.read_text()) if path.is_file() and args.add else {"runs": []}
    refs = reference_views(64)
    report["init_resemblance_psnr_db"] = init_resemblance(refs)
    for method in args.methods.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            report["runs"] = [r for r in report["runs"] if (r["method"], r["seed"]) != (method, seed)]
            report["runs"].append(one_run(method, seed, args, refs))
            report["summary"] = summarise(report["runs"])
            path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def sheet(args) -> dict[str, Any]:
    """runs.png: the final preview of every run in runs.json, one row per run (method, seed, pEnt); then each run
    folder is cut down to what the table cites (metrics.json, config.yaml, preview/final.png) unless --keep-runs."""
    from PIL import Image, ImageDraw

    report = json.loads((args.out / "runs.json").read_text())
    rows = sorted(report["runs"], key=lambda r: (("sds", "vsd", "usd").index(r["method"]), r["seed"]))
    previews = [Image.open(ROOT / r["run_dir"] / "preview" / "final.png").convert("RGB") for r in rows]
    w, h = previews[0].size
    left = 220
    canvas = Image.new("RGB", (left + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (r, im) in enumerate(zip(rows, previews)):
        canvas.paste(im, (left, i * h))
        draw.text((6, i * h + h // 2 - 14), f"{r['method']} seed {r['seed']}\nexact pEnt {r['pEnt']:.2f}\n"
                  f"PSNR {r['resemblance_psnr_db']:.1f} dB", fill="black")
    canvas.save(args.out / "runs.png")
    if not args.keep_runs:
        for r in rows:
            run_dir = ROOT / r["run_dir"]
            for path in sorted(run_dir.rglob("*"), reverse=True):
                keep = path.name in ("metrics.json", "config.yaml", "final.png", "preview")
                if path.is_file() and not keep:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
    return {"sheet": str(args.out / "runs.png"), "runs": len(rows)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        pents = [r["pEnt"] for r in mine]
        out[method] = {"seeds": [r["seed"] for r in mine], "pEnt": pents,
                       "pEnt_mean": round(sum(pents) / len(pents), 4), "pEnt_min": min(pents),
                       "resemblance_psnr_db_mean": round(sum(r["resemblance_psnr_db"] for r in mine) / len(mine), 2),
                       "ms_per_iteration_mean": round(sum(r["ms_per_iteration"] for r in mine) / len(mine), 1)}
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("samples", "classifier", "runs", "sheet"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "standin")
    parser.add_argument("--model", type=Path, default=STANDIN / "sd")
    parser.add_argument("--pose-model", type=Path, default=STANDIN / "dinov2")
    parser.add_argument("--templates", type=Path, default=None, help="template folder for classifier/runs "
                        "(default: classifier reads OUT/templates; runs generate their own)")
    parser.add_argument("--per-view", type=int, default=16, help="samples: candidates per view phrase")
    parser.add_argument("--plain", type=int, default=64, help="samples: plain-prompt samples")
    parser.add_argument("--keep", type=int, default=1, help="samples: curated templates kept per view phrase")
    parser.add_argument("--methods", default="sds,vsd,usd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], help="runs: extra --set for every run")
    parser.add_argument("--add", action="store_true", help="runs: keep the rows of an existing runs.json")
    parser.add_argument("--keep-runs", action="store_true", help="sheet: keep the run folders whole")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    report = {"samples": samples, "classifier": classifier, "runs": runs, "sheet": sheet}[args.what](args)
    print(json.dumps(report.get("summary", report), indent=2)[:4000])


if __name__ == "__main__":
    main()

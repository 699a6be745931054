"""The synthetic 3D experiment with several particles: pose uniformity of SDS, VSD and USD per particle count.

    nice -n 10 python benchmarks/particles_3d.py --counts 1,2,4 --methods sds,vsd,usd --seeds 3,5,7 \\
        --out benchmarks/results/particles_3d/after.json --jobs 2

Every run is the real ``TextTo3DSystem`` fitted by ``training.fit`` (preview preset, synthetic prior, CPU,
``prior.synthetic.view_conditioned=false`` so that only the method decides the poses), one process per run.
The JSON holds, per run and averaged over seeds per (count, method): pEnt (mean over particles, as
metrics.json), pEnt per particle, the pEnt of the pooled views of all particles, the pooled pose histogram
and each particle's histogram, from the exact class posterior of clean renders at 10 azimuths.

``--diagnostics K`` also records, every K iterations and per particle, the terms of one extra USD/VSD
evaluation on fixed cameras (its own random streams, so training is untouched): ‖g_vsd‖, ‖g_rect‖ before
and after the clamp, the EMA marginal of every interval, the training classifier on x̂0 against the exact
posterior of the same x̂0 and of the clean render, the kernel ε_φ's posterior weights on each particle's
render (how strongly the particles pull on each other), and the Gaussian count, mean opacity and resets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE_SETS = [
    "prior.kind=synthetic", "train.device=cpu", "prior.synthetic.view_conditioned=false",
    "train.progress_bar=false", "train.preview_every=0", "output.turntable_frames=0",
]


# -- one run (in its own process) ------------------------------------------------------------------


def entropy(p: torch.Tensor) -> float:
    from recdreamer_gs.metrics import normalised_entropy

    return round(normalised_entropy(p), 4) + 0.0


class Diagnostics:
    """A Lightning callback: every ``every`` iterations, one side evaluation of the USD terms per particle."""

    def __init__(self, every: int, n_views: int = 8, seed: int = 12345):
        import lightning as L

        self.every, self.n_views, self.seed = every, n_views, seed
        self.rows: list[dict[str, Any]] = []
        # A callback class built at run time so that importing this script does not need lightning.
        self.callback = type("DiagnosticsCallback", (L.Callback,), {"on_train_batch_end": self._on_batch_end})()

    def _on_batch_end(self, trainer, system, outputs, batch, batch_idx) -> None:
        it = system.iteration  # already advanced: the state after iteration it - 1
        if it % self.every and it != system.cfg.train.steps:
            return
        self.rows.append(self.measure(system, it))

    def measure(self, system, iteration: int) -> dict[str, Any]:
        from recdreamer_gs.cameras import orbit
        from recdreamer_gs.config import needs
        from recdreamer_gs.distill import grads
        from recdreamer_gs.distill.rectifier import interval_index, log_r, rectifier_objective
        from recdreamer_gs.priors import diffusion
        from recdreamer_gs.priors.synthetic import mixture_posterior

        cfg, prior, d = system.cfg, system.prior, system.cfg.distill
        g = torch.Generator().manual_seed(self.seed + iteration)
        P, B = len(system.particles), self.n_views
        c = cfg.camera
        offset = float(torch.rand((), generator=g)) * 360.0
        cams = orbit(B, 0.5 * sum(c.elevation_range), 0.5 * sum(c.radius_range), 0.5 * sum(c.fovy_range),
                     system.render_resolution, start_azimuth=offset).to(system.device)
        background = torch.rand(B, 3, generator=g)
        row: dict[str, Any] = {"iteration": iteration}
        with torch.no_grad():
            renders = [system.render(cams, background, particle=i).rgb for i in range(P)]
        z = prior.encode(torch.cat(renders)).requires_grad_(True)  # [P·B], particle-major
        bg = background.repeat(P, 1)
        lo, hi = system.cfg.distill.t_min, system.cfg.distill.t_max
        from recdreamer_gs import schedule

        lo, hi = schedule.t_range(d.time_schedule, max(iteration - 1, 0), cfg.train.steps, d.t_min, d.t_max,
                                  t_end=d.t_anneal_to, t5_switch=d.t5_switch, bnf_intervals=system.bnf_intervals,
                                  T=prior.num_train_timesteps)
        t = torch.randint(lo, hi, (1,), generator=g).expand(P * B)
        alpha, sigma = diffusion.alpha_sigma(prior.alphas_cumprod, t)
        eps = torch.randn(z.shape, generator=g)
        x_t = diffusion.add_noise(z, eps, alpha, sigma)
        eps_hat = prior.eps(x_t, t, d.guidance_scale, bg)
        x0_hat = diffusion.tweedie_x0(x_t, eps_hat, alpha, sigma)
        probs = prior.classify(x0_hat, bg)
        per = lambda v: v.detach().view(P, B, *v.shape[1:])  # noqa: E731
        norms = lambda v: [round(float(x), 4) for x in per(v).flatten(2).norm(dim=2).pow(2).sum(1).sqrt()]  # noqa: E731
        row["t"] = int(t[0])
        with torch.no_grad():
            exact_x0 = prior.clean_class_posterior(x0_hat.detach(), bg)
            exact_clean = prior.clean_class_posterior(z.detach(), bg)
            matcher_clean = prior.classify(z.detach(), bg)
        for name, value in (("matcher_x0hat", probs), ("exact_x0hat", exact_x0), ("exact_clean", exact_clean),
                            ("matcher_clean", matcher_clean)):
            row[f"probs/{name}"] = [[round(float(v), 3) for v in p] for p in per(value).mean(1)]
        # One EMA shared by all particles (pooled) or one per particle.
        rect = system.rectifier if needs(d.method).rectifier else None
        if rect is not None:
            k = int(interval_index(t[:1], rect.stats.n_intervals, rect.stats.T))
            row["ema/interval"] = k
            row["ema/marginal_at_t"] = [[round(float(v), 3) for v in s.marginal[k]] for s in rect.groups]
            row["ema/marginal_all"] = [[[round(float(v), 3) for v in m] for m in s.marginal] for s in rect.groups]
        if needs(cfg.distill.method).particle_score:
            with torch.no_grad():
                same_camera = z.detach().view(P, B, *z.shape[1:]).transpose(0, 1).repeat(P, *[1] * z.dim())
                eps_phi = system.particle_score.eps_phi(x_t.detach(), t, None, particles=same_camera)
                g_vsd = grads.vsd_grad(eps_hat.detach(), eps_phi, sigma)
                # The kernel ε_φ's posterior over the particles' renders: row i = samples of particle i.
                kw = system.particle_score.kernel_width
                var = alpha.view(-1) ** 2 * kw**2 + sigma.view(-1) ** 2
                w = mixture_posterior(x_t.detach(), same_camera, torch.zeros(P), alpha.view(-1), var)
            row["kernel_weights"] = [[round(float(v), 3) for v in r] for r in per(w).mean(1)]
            row["norm/vsd"] = norms(g_vsd)
            if rect is not None:
                lr = log_r(probs, rect.marginal(t, P))
                (g_rect,) = torch.autograd.grad(-rectifier_objective(lr, alpha, sigma), z)
                clamped = rect.clamp(g_rect, g_vsd, P)  # gain, then the per-particle cap of the run
                row["norm/rect_raw"] = norms(d.rectifier.gain * g_rect)
                row["norm/rect_clamped"] = norms(clamped)
                row["rect/log_r"] = [round(float(v), 3) for v in per(lr).mean(1)]
        row["gaussians"] = [len(gs) for gs in system.particles]
        row["opacity_mean"] = [round(float(torch.sigmoid(gs.params["opacities"].detach()).mean()), 3) for gs in system.particles]
        row["resets"] = [dn.n_resets for dn in system.densifiers]
        return row


def pose_summary(system) -> dict[str, Any]:
    """pEnt per particle, of the pooled views, and the histograms, from the exact posterior of clean renders."""
    probs = []
    for i in range(len(system.particles)):
        rgb = system.metric_views(particle=i)
        white = torch.ones(rgb.shape[0], 3)
        probs.append(system.metric_classifier(rgb * 2.0 - 1.0, white).float().cpu())
    per = [p.mean(0) for p in probs]
    pooled = torch.stack(per).mean(0)
    pents = [entropy(h) for h in per]
    return {
        "pEnt": round(sum(pents) / len(pents), 4),
        "pEnt_per_particle": pents,
        "pEnt_pooled": entropy(pooled),
        "pose_histogram": [round(float(v), 4) for v in pooled],
        "histogram_per_particle": [[round(float(v), 3) for v in h] for h in per],
        "collapsed_particles": sum(p < 0.05 for p in pents),
    }


def run_one(count: int, method: str, seed: int, steps: int, sets: list[str], diagnostics: int,
            preset: str = "preview") -> dict[str, Any]:
    """Fit one run in this process and return its pose summary (and diagnostics rows)."""
    from recdreamer_gs import prior_choice, training
    from recdreamer_gs.config import load_config, parse_override

    torch.set_num_threads(1)
    overrides = [parse_override(s) for s in BASE_SETS + [f"train.particles={count}", f"distill.method={method}",
                                                          f"train.seed={seed}", f"train.steps={steps}", *sets]]
    cfg = load_config(preset, None, overrides + [{"prompt": "particles"}])
    device = torch.device("cpu")
    choice = prior_choice.build_prior(cfg, device)
    diag = Diagnostics(diagnostics) if diagnostics else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        system = training.fit(cfg, Path(tmp), choice, device, extra_callbacks=[diag.callback] if diag else [])
        result: dict[str, Any] = {"count": count, "method": method, "seed": seed, "steps": steps}
        result.update(pose_summary(system))
        result["gaussians"] = [len(g) for g in system.particles]
        result["opacity_resets"] = [dn.n_resets for dn in system.densifiers]
    result["seconds"] = round(time.perf_counter() - start, 1)
    if diag is not None:
        result["diagnostics"] = diag.rows
    return result


# -- the sweep --------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per (count, method)."""
    table: dict[str, Any] = {}
    for key in sorted({(r["count"], r["method"]) for r in runs}):
        rs = [r for r in runs if (r["count"], r["method"]) == key]
        mean = lambda k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
        per = [sum(r["pEnt_per_particle"][i] for r in rs) / len(rs) for i in range(key[0])]
        table[f"{key[0]}x{key[1]}"] = {
            "count": key[0], "method": key[1], "seeds": [r["seed"] for r in rs],
            "pEnt": mean("pEnt"), "pEnt_pooled": mean("pEnt_pooled"),
            "pEnt_per_particle": [round(v, 4) for v in per],  # particle i, mean over seeds
            "pEnt_min_particle": round(min(min(r["pEnt_per_particle"]) for r in rs), 4),
            "pose_histogram": [round(sum(r["pose_histogram"][c] for r in rs) / len(rs), 4) for c in range(4)],
            "collapsed_particles": sum(r["collapsed_particles"] for r in rs),
            "seconds": mean("seconds"),
        }
    return table


def spawn(job: tuple[int, str, int], args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    count, method, seed = job
    out = tmpdir / f"{count}_{method}_{seed}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{count},{method},{seed}", "--steps",
           str(args.steps), "--one-out", str(out), "--diagnostics", str(args.diagnostics)]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {job} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    print(f"{count} x {method} seed {seed}: pEnt {result['pEnt']} per particle {result['pEnt_per_particle']} "
          f"pooled {result['pose_histogram']} ({result['seconds']} s)", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,2,4", help="particle counts, comma-separated")
    parser.add_argument("--methods", default="sds,vsd,usd")
    parser.add_argument("--seeds", default="3,5,7")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (repeatable)")
    parser.add_argument("--diagnostics", type=int, default=0, help="record the per-particle terms every K iterations")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/particles_3d/sweep.json"))
    parser.add_argument("--add", action="store_true",
                        help="keep the runs already in --out (same settings) and run only the missing ones")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # COUNT,METHOD,SEED: run one in this process
    parser.add_argument("--one-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        count, method, seed = args.one.split(",")
        result = run_one(int(count), method, int(seed), args.steps, args.set, args.diagnostics)
        args.one_out.write_text(json.dumps(result) + "\n")
        return result

    jobs = [(int(n), m, int(s)) for n in args.counts.split(",") for m in args.methods.split(",")
            for s in args.seeds.split(",")]
    jobs.sort(key=lambda j: -j[0])  # longest first
    start = time.perf_counter()
    command = "python benchmarks/particles_3d.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fixed = BASE_SETS + ["preset=preview", f"train.steps={args.steps}"] + args.set
    runs: list[dict[str, Any]] = []
    commands, wall_before = [command], 0.0
    if args.add and args.out.exists():  # one table from several invocations, e.g. methods added later
        earlier = json.loads(args.out.read_text())
        if earlier["fixed_settings"] != fixed:
            sys.exit(f"--add: {args.out} was measured with {earlier['fixed_settings']}, this sweep uses {fixed}")
        runs = earlier["runs"]
        commands, wall_before = earlier["commands"] + commands, earlier["wall_seconds"]
        done = {(r["count"], r["method"], r["seed"]) for r in runs}
        jobs = [j for j in jobs if j not in done]
    n_jobs = len(runs) + len(jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> dict[str, Any]:  # after every run, so a stopped sweep keeps what it measured
        done = sorted(runs, key=lambda r: (r["count"], r["method"], r["seed"]))
        report = {
            "commands": commands,
            "fixed_settings": fixed,
            "classes": ["front", "left", "back", "right"],
            "complete": len(done) == n_jobs,
            "summary": summarise(done),
            "runs": done,
            "wall_seconds": round(wall_before + time.perf_counter() - start, 1),
        }
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        return report

    def one(job: tuple[int, str, int], tmp: Path) -> None:
        result = spawn(job, args, tmp)
        runs.append(result)
        write()

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: one(j, Path(tmp)), jobs))
    report = write()
    for key, row in report["summary"].items():
        print(f"{key:8s} pEnt {row['pEnt']:.3f} pooled {row['pEnt_pooled']:.3f} per particle "
              f"{row['pEnt_per_particle']} hist {row['pose_histogram']} collapsed {row['collapsed_particles']}")
    return report


if __name__ == "__main__":
    main()

"""The LightningModule: wires Gaussians, renderer, prior, ε_φ and the rectifier; the maths lives elsewhere.

Manual optimisation: one ``training_step`` is one iteration of DESIGN section 4, counted by
``self.iteration`` (``trainer.global_step`` counts every optimizer.step(), seven or so per iteration).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning as L
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from recdreamer_gs import schedule
from recdreamer_gs.cameras import Cameras, preview_orbit
from recdreamer_gs.config import RunConfig
from recdreamer_gs.data import cameras_from_batch
from recdreamer_gs.densify import Densifier
from recdreamer_gs.distributed import average_gradients
from recdreamer_gs.gaussians import Gaussians
from recdreamer_gs.priors.base import ParticleScore, Prior
from recdreamer_gs.render import RenderOut, render
from recdreamer_gs.usd import distill
from recdreamer_gs.usd.rectifier import PoseStatistics, log_r, pose_control_log_r, rectifier_objective

# A pose classifier on images in [-1, 1]: probabilities over the pose classes (differentiable).
Classifier = Callable[[Float[Tensor, "B 3 H W"], Optional[Float[Tensor, "B 3"]]], Float[Tensor, "B C"]]


class TextTo3DSystem(L.LightningModule):
    """Score distillation (SDS, VSD or USD) of a 2D prior into one or more sets of 3D Gaussians (particles)
    that share ε_φ and the rectifier statistics."""

    def __init__(
        self,
        cfg: RunConfig,
        prior: Prior,
        particle_score: Optional[ParticleScore] = None,
        classifier: Optional[Classifier] = None,
        class_names: tuple[str, ...] = (),
        particles: Optional[list[Gaussians]] = None,
        metric_classifier: Optional[Classifier] = None,
        colour_only: bool = False,
        stage: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        n = cfg.train.particles
        self.particles = nn.ModuleList(particles if particles is not None else [
            Gaussians.create(cfg.gaussians, torch.Generator().manual_seed(cfg.train.seed + 7919 * i))
            for i in range(n)
        ])
        self.particle_ids = list(range(n))  # global indices of the particles this process owns
        self.colour_only = colour_only  # a texture stage: positions and shapes frozen
        self.stage = stage  # index of this stage in a multi-stage run
        # The frozen prior and the classifier stay out of the module tree: they are not saved in
        # checkpoints and Lightning does not move them (they are built on the right device).
        object.__setattr__(self, "prior", prior)
        object.__setattr__(self, "classifier", classifier)
        object.__setattr__(self, "metric_classifier", metric_classifier or classifier)
        self.particle_score = particle_score  # an nn.Module: LoRA + camera MLP are checkpointed
        self.class_names = class_names
        rect = cfg.distill.rectifier
        self.pose_stats = PoseStatistics(len(class_names), rect.n_intervals, rect.n_ema, prior.num_train_timesteps) \
            if class_names else None
        self.pose_control_index = class_names.index(rect.pose_control) if rect.pose_control else None
        # BNF with n_i = 2 for one particle and 10 for several unless the config says otherwise (DESIGN 7).
        self.bnf_intervals = cfg.distill.bnf_intervals or (2 if n == 1 else 10)
        self.densifiers = [Densifier(cfg.densify, scene_scale=cfg.gaussians.init_radius, total_iterations=cfg.train.steps,
                                     n_intervals=self.bnf_intervals) for _ in range(n)]
        self.iteration = 0  # the system's own counter: one per training_step
        self.noise_generator: Optional[torch.Generator] = None  # ε, ε', LoRA draws (per rank)
        self.t_generator: Optional[torch.Generator] = None  # t (the same on every rank)
        self.clip_scorer = None  # metrics.ClipScorer for cEnt and the CLIP score (output.clip_model)
        self.interrupted = False  # set when Ctrl-C stopped the run (callbacks.Checkpointer)
        self._resume: Optional[dict[str, Any]] = None  # a checkpoint to continue from (restore())

    # -- Lightning hooks ------------------------------------------------------------------------

    @property
    def gaussians(self) -> Gaussians:
        """The first particle (the only one in a single-particle run)."""
        return self.particles[0]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # One dict per particle.
        self.gaussian_optimizers = [g.make_optimizers(colour_only=self.colour_only) for g in self.particles]
        optimizers = []
        for g, opts, densifier in zip(self.particles, self.gaussian_optimizers, self.densifiers):
            densifier.check(g.params, opts)
            optimizers += list(opts.values())
        self.lora_optimizer = None
        if self.particle_score is not None:
            self.lora_optimizer = self.particle_score.make_optimizer(self.cfg.distill.particle_score.lr)
        if self.lora_optimizer is not None:
            optimizers.append(self.lora_optimizer)
        if self._resume is not None:  # Adam moments of the resumed run (shapes match the resized set)
            for opt, state in zip(optimizers, self._resume["optimizer_states"]):
                opt.load_state_dict(state)
        return optimizers

    def setup(self, stage: str) -> None:
        """Under data parallelism keep this rank's share of the particles; average the rectifier statistics."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1 and len(self.particle_ids) == len(self.particles):
            keep = list(range(rank, len(self.particles), world))
            self.particles = nn.ModuleList([self.particles[i] for i in keep])
            self.densifiers = [self.densifiers[i] for i in keep]
            self.particle_ids = keep
            if self.pose_stats is not None:
                self.pose_stats.reduce = lambda mean: self.trainer.strategy.reduce(mean, reduce_op="mean")

    def on_fit_start(self) -> None:
        if self.noise_generator is None:
            seed = self.cfg.train.seed + 1 + 1_000_003 * self.trainer.global_rank
            self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
            # t is drawn identically on every rank, so the rectifier statistics of an iteration update the same
            # interval everywhere and their mean over ranks is one shared estimate.
            self.t_generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 2)
        if self.pose_stats is not None:
            self.pose_stats.to(self.device)
        if self._resume is not None:
            self.noise_generator.set_state(self._resume["noise_generator"])
            self.t_generator.set_state(self._resume["t_generator"])
            torch.set_rng_state(self._resume["torch_rng"])
            self._resume = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["iteration"] = self.iteration
        checkpoint["stage"] = self.stage
        checkpoint["densify"] = [d.state_dict() for d in self.densifiers]
        checkpoint["noise_generator"] = self.noise_generator.get_state()
        checkpoint["t_generator"] = self.t_generator.get_state()
        checkpoint["torch_rng"] = torch.get_rng_state()  # gsplat's split sampling draws from it
        if self.pose_stats is not None:
            checkpoint["pose_stats"] = self.pose_stats.state_dict()

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint of this run: Gaussians resized to the saved count, ε_φ, iteration,
        densifier and rectifier statistics now; optimizer moments and random states when fitting starts."""
        state = checkpoint["state_dict"]
        for i, g in enumerate(self.particles):
            for name in list(g.params.keys()):
                g.params[name] = nn.Parameter(state[f"particles.{i}.params.{name}"].clone())
        # A stage without ε_φ (SDS) ignores the LoRA weights saved by another stage of the run.
        own = self.state_dict().keys()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"checkpoint does not fit this run: missing {missing[:3]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        self.iteration = int(checkpoint["iteration"])
        for densifier, dstate in zip(self.densifiers, checkpoint["densify"]):
            densifier.load_state_dict(dstate)
        if self.pose_stats is not None and "pose_stats" in checkpoint:
            self.pose_stats.load_state_dict(checkpoint["pose_stats"])
        self._resume = checkpoint

    # -- one iteration -------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        d = self.cfg.distill
        method = d.method
        rectify = method == "usd" and self.iteration % d.rectifier.rectify_every == 0
        shared_noise = d.rectifier.noise == "shared"

        # 1. Cameras and random solid backgrounds; render x0 = g(θ, c) for every particle (same cameras).
        cameras = cameras_from_batch(batch, self.render_resolution).to(self.device)
        P, B = len(self.particles), len(cameras)
        view_background = batch["background"].to(self.device)
        outs = [self.render(cameras, view_background, particle=i) for i in range(P)]
        for g, opts, densifier, out in zip(self.particles, self.gaussian_optimizers, self.densifiers, outs):
            densifier.pre_backward(g.params, opts, self.iteration, out.meta)
        # The particles' views form one batch of P·B samples (particle-major) from here on.
        background = view_background.repeat(P, 1)
        c2w = cameras.c2w.repeat(P, 1, 1)

        # 2. Encode into the prior's diffusion space (with gradient).
        z = self.prior.encode(torch.cat([out.rgb for out in outs]))

        # 3. Sample t from the time schedule and noise: x_t = α_t z + σ_t ε. Under USD x_t keeps
        #    its graph to z, because the rectifier differentiates through it (step 6).
        t = self.sample_t(z.shape[0])
        alpha, sigma = distill.alpha_sigma(self.prior.alphas_cumprod, t)
        eps = self.randn_like(z)
        x_t = distill.add_noise(z if (rectify and shared_noise) else z.detach(), eps, alpha, sigma)

        # 4. Pretrained score with CFG; one UNet pass, kept differentiable only when step 6 needs it.
        azimuth = cameras.azimuth.repeat(P) if d.view_prompts else None
        with torch.set_grad_enabled(rectify and shared_noise):
            eps_hat = self.prior.eps(x_t, t, d.guidance_scale, background, azimuth=azimuth)

        # 5. Distillation gradient: SDS against the injected noise, VSD/USD against ε_φ (no gradient).
        if method == "sds":
            grad_distill = distill.sds_grad(eps_hat.detach(), eps, sigma)
        else:
            with torch.no_grad():
                # Every particle's render at the same camera (the kernel ε_φ's components; the LoRA ignores it).
                same_camera = z.detach().view(P, B, *z.shape[1:]).transpose(0, 1).repeat(P, *[1] * z.dim())
                eps_phi = self.particle_score.eps_phi(x_t.detach(), t, c2w, particles=same_camera)
            grad_distill = distill.vsd_grad(eps_hat.detach(), eps_phi, sigma)
        grad_distill = distill.clamp_elements(grad_distill, d.grad_clip)

        # 6. Rectifier (USD): x̂0 → decode → classify → log r; g_rect = −∂/∂z[ω σ/α log r] (paper eq. 13).
        grad_rect = torch.zeros_like(grad_distill)
        probs = None
        if method == "usd":
            if rectify and not shared_noise:  # the release draws fresh noise for this branch
                x_t = distill.add_noise(z, self.randn_like(z), alpha, sigma)
                eps_hat = self.prior.eps(x_t, t, d.guidance_scale, background, azimuth=azimuth)
            with torch.set_grad_enabled(rectify):
                x0_hat = distill.tweedie_x0(x_t, eps_hat, alpha, sigma)
                probs = self.classifier(self.prior.decode(x0_hat), background)
                log_r_value = self.log_r(probs, t)
                if rectify:
                    (grad_rect,) = torch.autograd.grad(-rectifier_objective(log_r_value, alpha, sigma), z)
            # 7. Clamp: gain, then at most norm_coef·‖g_vsd‖ (whole-tensor norms, DESIGN 4 step 7).
            grad_rect = d.rectifier.weight * distill.clamp_to_norm(
                grad_rect, grad_distill, d.rectifier.gain, d.rectifier.norm_coef)
        grad = distill.nan_to_zero(grad_distill + grad_rect)

        # 8. Reparameterised loss 0.5‖z − (z − g).detach()‖² / B (gradient g / B); step the Gaussians,
        #    then densify in the BNF-aligned window (densify.py) and clamp the log-scales.
        loss_distill = d.grad_weight * distill.reparameterised_loss(z, grad)
        optimizers = [opt for opts in self.gaussian_optimizers for opt in opts.values()]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss_distill)
        for opt in optimizers:
            opt.step()
        dens = {"count": 0, "grown": 0, "pruned": 0}
        for g, opts, densifier, out in zip(self.particles, self.gaussian_optimizers, self.densifiers, outs):
            counts = densifier.post_backward(g.params, opts, self.iteration, out.meta,
                                             lr_means=opts["means"].param_groups[0]["lr"] if "means" in opts else 0.0)
            dens = {k: dens[k] + counts[k] for k in dens}
            g.clamp_()

        # 9. Rectifier statistics: the EMA of the interval of t moves towards the batch's p(c̄|x̂0).
        if probs is not None:
            self.pose_stats.update(t, probs.detach())  # mean over every particle's views

        # 10. LoRA step for ε_φ on the detached renders (fresh t', ε'; DESIGN 4 step 10).
        loss_lora = torch.zeros((), device=self.device)
        if self.lora_optimizer is not None:
            loss_lora = self.particle_score.lora_loss(z.detach(), c2w, generator=self.noise_generator)
            ps = self.cfg.distill.particle_score
            for group in self.lora_optimizer.param_groups:
                group["lr"] = ps.lr * schedule.warmup_factor(self.iteration, ps.warmup_iters)
            self.lora_optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss_lora)
            if self.trainer.world_size > 1:  # one shared ε_φ: average its gradients over ranks
                average_gradients(self.particle_score.trainable_parameters(), self.trainer.strategy)
            self.lora_optimizer.step()

        # 11. Log every term; advance the iteration counter.
        logs = {
            f"loss/{method}": loss_distill.detach(),
            f"grad/{'sds' if method == 'sds' else 'vsd'}_norm": grad_distill.norm().detach(),
            "grad/rect_norm": grad_rect.norm().detach(),
            "loss/lora": loss_lora.detach(),
            "t": t.float().mean(),
            "gaussians/count": float(dens["count"]),
            "gaussians/grown": float(dens["grown"]),
            "gaussians/pruned": float(dens["pruned"]),
            "render/alpha_mean": torch.stack([out.alpha.mean() for out in outs]).mean().detach(),
        }
        if probs is not None:
            logs["rect/log_r"] = log_r_value.detach().mean()
            for i, name in enumerate(self.class_names):
                logs[f"pose/{name}"] = probs[:, i].detach().mean()
        self.log_dict(logs, on_step=True, batch_size=z.shape[0])
        self.iteration += 1

    # -- helpers -------------------------------------------------------------------------------

    def log_r(self, probs: Float[Tensor, "B C"], t: Int[Tensor, "B"]) -> Float[Tensor, "B"]:
        if self.pose_control_index is not None:
            return pose_control_log_r(probs, self.pose_control_index)
        return log_r(probs, self.pose_stats.get(t))

    def randn_like(self, z: Tensor) -> Tensor:
        return torch.randn(z.shape, generator=self.noise_generator, device=z.device, dtype=z.dtype)

    @property
    def render_resolution(self) -> int:
        return self.cfg.camera.resolution

    def render(self, cameras: Cameras, background: Float[Tensor, "B 3"], particle: int = 0) -> RenderOut:
        rcfg = self.cfg.render
        return render(self.particles[particle], cameras, background, backend=rcfg.backend, eps2d=rcfg.eps2d,
                      near_plane=rcfg.near_plane)

    def sample_t(self, batch: int) -> Tensor:
        """One t per iteration (shared by the batch, as in the release), from the configured schedule."""
        d = self.cfg.distill
        lo, hi = schedule.t_range(
            d.time_schedule, self.iteration, self.cfg.train.steps, d.t_min, d.t_max, t_end=d.t_anneal_to,
            t5_switch=d.t5_switch, bnf_intervals=self.bnf_intervals, T=self.prior.num_train_timesteps,
        )
        t = torch.randint(lo, hi, (1,), generator=self.t_generator, device=self.device)
        return t.expand(batch)

    @torch.no_grad()
    def render_preview(self, n: Optional[int] = None, particle: Optional[int] = None) -> Float[Tensor, "N 3 H W"]:
        """Views on the fixed preview orbit on a white background: one particle, or all of them (particle-major)."""
        cameras = preview_orbit(self.cfg.camera, n)
        cameras.width = cameras.height = self.render_resolution
        cameras = cameras.to(self.device)
        background = torch.ones(len(cameras), 3, device=self.device)
        which = range(len(self.particles)) if particle is None else [particle]
        return torch.cat([self.render(cameras, background, particle=i).rgb for i in which])

    @torch.no_grad()
    def metric_views(self, particle: int = 0, n_views: int = 10) -> Float[Tensor, "V 3 H W"]:
        """Renders at n uniform azimuths on a white background, the views pEnt, cEnt and CLIP score use."""
        from recdreamer_gs.metrics import metric_cameras

        cams = metric_cameras(self.cfg.camera, self.render_resolution, n_views).to(self.device)
        return self.render(cams, torch.ones(n_views, 3, device=self.device), particle=particle).rgb

    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        """pEnt per particle (entropy of the mean pose probabilities over 10 azimuths, normalised), and
        cEnt + CLIP score of the first particle when a CLIP scorer is set."""
        from recdreamer_gs.metrics import pose_entropy

        views = [self.metric_views(particle=i) for i in range(len(self.particles))]
        out: dict[str, Any] = {"pEnt": None}
        if self.clip_scorer is not None:
            out["cEnt"] = round(self.clip_scorer.view_entropy(views[0], self.cfg.prompt), 4)
            out["clip_score"] = round(self.clip_scorer.clip_score(views[0], self.cfg.prompt), 4)
        if self.metric_classifier is None:
            return out
        white = torch.ones(views[0].shape[0], 3, device=self.device)
        probs = [self.metric_classifier(rgb * 2.0 - 1.0, white).float().cpu() for rgb in views]
        pents = [round(pose_entropy(p), 4) + 0.0 for p in probs]  # + 0.0: no "-0.0"
        mean = torch.stack(probs).mean(dim=(0, 1))
        out.update({
            "pEnt": round(sum(pents) / len(pents), 4),
            "pose_histogram": {n: round(float(v), 4) for n, v in zip(self.class_names, mean.tolist())},
        })
        if len(pents) > 1:
            out["pEnt_per_particle"] = pents
        return out

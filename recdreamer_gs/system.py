"""The LightningModule: wires Gaussians, renderer, prior, ε_φ and the rectifier; the maths lives elsewhere.

Manual optimisation: one ``training_step`` is one iteration of docs/iteration.md, counted by
``self.iteration`` (``trainer.global_step`` counts every optimizer.step(), seven or so per iteration).
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from jaxtyping import Float
from torch import Tensor, nn

from recdreamer_gs import schedule
from recdreamer_gs.cameras import Cameras, preview_orbit
from recdreamer_gs.config import CameraConfig, RunConfig, needs
from recdreamer_gs.data import cameras_from_batch
from recdreamer_gs.densify import Densifier
from recdreamer_gs.distill import grads
from recdreamer_gs.distill.rectifier import PoseStatistics, Rectifier
from recdreamer_gs.distill.step import distill_step
from recdreamer_gs.distributed import average_gradients
from recdreamer_gs.errors import Diverged
from recdreamer_gs.gaussians import Gaussians, StartCloud
from recdreamer_gs.metrics import classify_views, metric_cameras, pose_scores, view_scores
from recdreamer_gs.pose.setup import Classifier
from recdreamer_gs.priors.base import ParticleScore, Prior
from recdreamer_gs.render import RenderOut, render
from recdreamer_gs.rng import derive_seed


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
        metric_camera: Optional[CameraConfig] = None,
        colour_only: bool = False,
        stage: int = 0,
        start: Optional[StartCloud] = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        n = cfg.train.particles
        # Every particle starts from the same cloud (init file or Shap-E), or from its own random ball.
        self.particles = nn.ModuleList(particles if particles is not None else [
            Gaussians.create(cfg.gaussians, torch.Generator().manual_seed(derive_seed(cfg.train.seed, "gaussians", i)),
                             start)
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
        self.metric_camera = metric_camera or cfg.camera  # the orbit pEnt is measured on (PoseSetup.metric_camera)
        self.particle_score = particle_score  # an nn.Module: LoRA + camera MLP are checkpointed
        self.class_names = class_names
        # Classifier, pose statistics and clamps of USD (distill/rectifier.py); the statistics are kept (and
        # checkpointed) whenever the run has pose classes, so a USD stage after an SDS stage continues them.
        self.rectifier = Rectifier(cfg.distill.rectifier, classifier, class_names, prior.num_train_timesteps,
                                   particles=n) if class_names else None
        # BNF with n_i = 2 for one particle and 10 for several unless the config says otherwise (docs/schedules.md).
        self.bnf_intervals = schedule.bnf_intervals(cfg.distill.bnf_intervals, n)
        self.densifiers = [Densifier(cfg.densify, scene_scale=cfg.gaussians.init_radius, total_iterations=cfg.train.steps,
                                     n_intervals=self.bnf_intervals, texture_only=colour_only) for _ in range(n)]
        self.iteration = 0  # the system's own counter: one per training_step
        self.noise_generator: Optional[torch.Generator] = None  # ε, ε', LoRA draws (per rank)
        self.t_generator: Optional[torch.Generator] = None  # t (the same on every rank)
        # Divergence guard: iterations in a row whose gradient was non-finite everywhere, counted on the
        # device and read only every train.log_every iterations (check_divergence).
        self.bad_iterations: Optional[Tensor] = None
        # The terms of the last iteration, on the device (no host read per iteration): loss/<method>, loss/lora,
        # the rectifier's terms, pose/<class>, t, Gaussian counts. Not LightningModule.log (callbacks.MetricsLog).
        self.logged: dict[str, Tensor | float] = {}
        self.clip_scorer = None  # metrics.ClipScorer for cEnt and the CLIP score (output.clip_model)
        self.interrupted = False  # set when Ctrl-C stopped the run (callbacks.Checkpointer)
        self._resume: Optional[dict[str, Any]] = None  # a checkpoint to continue from (restore())

    # -- Lightning hooks ------------------------------------------------------------------------

    @property
    def pose_stats(self) -> Optional[PoseStatistics]:
        """The rectifier's running pose marginal p̄_t (None without pose classes)."""
        return self.rectifier.stats if self.rectifier is not None else None

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
            if self.rectifier is not None:
                self.rectifier.keep(keep)
                self.rectifier.reduce = lambda mean: self.trainer.strategy.reduce(mean, reduce_op="mean")

    def on_fit_start(self) -> None:
        if self.noise_generator is None:
            seed = derive_seed(self.cfg.train.seed, "noise", self.stage, self.trainer.global_rank)
            self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
            # t is drawn identically on every rank, so the rectifier statistics of an iteration update the same
            # interval everywhere and their mean over ranks is one shared estimate.
            seed = derive_seed(self.cfg.train.seed, "t", self.stage)
            self.t_generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.rectifier is not None:
            self.rectifier.to(self.device)
        self.bad_iterations = torch.zeros((), dtype=torch.long, device=self.device)
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
        if self.rectifier is not None:
            checkpoint["pose_stats"] = self.rectifier.state_dict()

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
        if self.rectifier is not None and "pose_stats" in checkpoint:
            self.rectifier.load_state_dict(checkpoint["pose_stats"])
        self._resume = checkpoint

    # -- one iteration -------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        d = self.cfg.distill

        # 1. Cameras and random solid backgrounds; render x0 = g(θ, c) for every particle (same cameras).
        cameras = cameras_from_batch(batch, self.render_resolution).to(self.device)
        P = len(self.particles)
        view_background = batch["background"].to(self.device)
        outs = [self.render(cameras, view_background, particle=i) for i in range(P)]
        for g, opts, densifier, out in zip(self.particles, self.gaussian_optimizers, self.densifiers, outs):
            densifier.pre_backward(g.params, opts, self.iteration, out.meta)

        # 2. Encode into the prior's diffusion space (with gradient). The particles' views form one batch
        #    of P·B samples (particle-major) from here on.
        z = self.prior.encode(torch.cat([out.rgb for out in outs]))
        background, c2w = view_background.repeat(P, 1), cameras.c2w.repeat(P, 1, 1)

        # 3-7, 9. The distillation step (distill/step.py): t from the time schedule and noise, ε̂ with CFG,
        #    ε_φ, the rectifier with its per-particle clamps, and the rectifier statistics.
        t = self.sample_t(z.shape[0])
        step = distill_step(self.prior, self.particle_score, self.rectifier if needs(d.method).rectifier else None, d,
                            z, P, t, self.noise_generator, background, c2w, cameras.azimuth.repeat(P), self.iteration)

        # 8. Reparameterised loss 0.5‖z − (z − g).detach()‖² / B (gradient g / B, B the views of one particle,
        #    so each particle steps and gathers densification statistics as a single one would); step the
        #    Gaussians, then densify in the BNF-aligned window (densify.py) and clamp the log-scales.
        loss_distill = d.grad_weight * grads.reparameterised_loss(z, step.grad, views=len(cameras))
        dens = self.step_gaussians(loss_distill, outs)

        # 10. LoRA step for ε_φ on the detached renders (fresh t', ε'; docs/iteration.md step 10).
        loss_lora = self.step_particle_score(z.detach(), c2w)

        # 11. Divergence guard; keep every term for the loggers (callbacks.MetricsLog writes them every
        #     train.log_every iterations); advance the iteration counter.
        self.bad_iterations = torch.where(step.bad, self.bad_iterations + 1, 0)
        if (self.iteration + 1) % self.cfg.train.log_every == 0:
            self.check_divergence()
        logs = {
            f"loss/{d.method}": loss_distill.detach(),
            **step.log_terms(self.class_names),
            "loss/lora": loss_lora.detach(),
            "t": t.float().mean(),
            **{f"gaussians/{k}": float(v) for k, v in dens.items()},
            "render/alpha_mean": torch.stack([out.alpha.mean() for out in outs]).mean().detach(),
        }
        self.logged = logs
        self.iteration += 1

    # -- helpers -------------------------------------------------------------------------------

    def step_gaussians(self, loss: Tensor, outs: list[RenderOut]) -> dict[str, int]:
        """Backward of the distillation loss, one Adam step per Gaussian parameter, densification and the
        log-scale clamp; the Gaussian counts (summed over particles)."""
        optimizers = [opt for opts in self.gaussian_optimizers for opt in opts.values()]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        dens = {"count": 0, "grown": 0, "pruned": 0}
        for g, opts, densifier, out in zip(self.particles, self.gaussian_optimizers, self.densifiers, outs):
            counts = densifier.post_backward(g.params, opts, self.iteration, out.meta,
                                             lr_means=opts["means"].param_groups[0]["lr"] if "means" in opts else 0.0)
            dens = {k: dens[k] + counts[k] for k in dens}
            g.clamp_()
        return dens

    def step_particle_score(self, z: Tensor, c2w: Tensor) -> Tensor:
        """One AdamW step of ε_φ's LoRA on the detached renders (warm-up lr); its loss (0 without one)."""
        if self.lora_optimizer is None:
            return torch.zeros((), device=self.device)
        loss = self.particle_score.lora_loss(z, c2w, generator=self.noise_generator)
        ps = self.cfg.distill.particle_score
        for group in self.lora_optimizer.param_groups:
            group["lr"] = ps.lr * schedule.warmup_factor(self.iteration, ps.warmup_iters)
        self.lora_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.trainer.world_size > 1:  # one shared ε_φ: average its gradients over ranks
            average_gradients(self.particle_score.trainable_parameters(), self.trainer.strategy)
        self.lora_optimizer.step()
        return loss

    def check_divergence(self) -> None:
        """Raise :class:`Diverged` when the last ``train.max_bad_iterations`` iterations all had a gradient
        that was non-finite everywhere (reads the device counter: one host sync, so only when logging)."""
        count = int(self.bad_iterations)
        if count >= self.cfg.train.max_bad_iterations:
            raise Diverged(f"training diverged: at iteration {self.iteration} the last {count} iterations in a row "
                           f"had a non-finite gradient everywhere (train.max_bad_iterations = "
                           f"{self.cfg.train.max_bad_iterations})")

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
        cameras = preview_orbit(self.cfg.camera, n, self.render_resolution).to(self.device)
        background = torch.ones(len(cameras), 3, device=self.device)
        which = range(len(self.particles)) if particle is None else [particle]
        return torch.cat([self.render(cameras, background, particle=i).rgb for i in which])

    @torch.no_grad()
    def metric_views(self, particle: int = 0, n_views: int = 10) -> Float[Tensor, "V 3 H W"]:
        """Renders at n uniform azimuths on a white background, the views pEnt, cEnt and CLIP score use."""
        cams = metric_cameras(self.metric_camera, self.render_resolution, n_views).to(self.device)
        return self.render(cams, torch.ones(n_views, 3, device=self.device), particle=particle).rgb

    @torch.no_grad()
    def final_metrics(self) -> dict[str, Any]:
        """pEnt per particle (entropy of the mean pose probabilities over 10 azimuths, normalised), and
        cEnt + CLIP score of the first particle when a CLIP scorer is set."""
        views = [self.metric_views(particle=i) for i in range(len(self.particles))]
        out: dict[str, Any] = {"pEnt": None}
        if self.clip_scorer is not None:
            out.update(view_scores(views[0], clip=self.clip_scorer, prompt=self.cfg.prompt))
        if self.metric_classifier is not None:
            out.update(pose_scores([classify_views(rgb, self.metric_classifier) for rgb in views], self.class_names))
        return out

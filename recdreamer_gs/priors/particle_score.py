"""ε_φ for VSD/USD: the particles' own score, a camera-conditioned LoRA on a Stable Diffusion UNet
(docs/iteration.md, steps 5 and 10; the settings follow the reference release).

By default the LoRA adapters (peft, rank 4, on every attention projection) sit on the *same* frozen
UNet as the pretrained prior, so one UNet is in memory: adapters are disabled for ε̂ and enabled for
ε_φ. The camera embedding (flattened 4x4 camera-to-world -> MLP 16 -> W -> W, W the UNet's
time-embedding width, 1280 for SD) is added to the timestep embedding through the UNet's
``class_embedding`` slot, in the LoRA branch only. :func:`lora_branch` switches both together.

``base: separate`` puts the LoRA on a second UNet instead (the release uses SD 2.1, v-prediction).

The ε_φ pass and the LoRA loss (with its backward) can run compiled (:meth:`LoRAParticleScore.compile_passes`,
docs/performance.md). The adapters are switched outside the compiled functions, so each compiled function
always sees one adapter state and never recompiles; random draws stay outside too.
"The release" is the authors' code release, linked in docs/README.md ("The authors' release").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from recdreamer_gs.config import ParticleScoreConfig  # re-exported for callers of this module
from recdreamer_gs.priors.diffusion import add_noise, alpha_sigma, to_eps
from recdreamer_gs.priors.sd_weights import load_separate_unet

ADAPTER = "eps_phi"  # peft adapter name on the UNet
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention, as the release


class CameraEmbedding(nn.Module):
    """Flattened 4x4 camera-to-world -> Linear(16, W) -> SiLU -> Linear(W, W), added to the time embedding.

    The output layer starts at zero (as peft starts LoRA's B at zero), so that ε_φ begins as the
    pretrained conditional ε and the camera's effect is learned.
    """

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, c2w_flat: Float[Tensor, "B 16"]) -> Float[Tensor, "B W"]:
        return self.net(c2w_flat.to(self.net[0].weight.dtype))


@dataclass
class AdapterHandles:
    """A UNet's peft layers, found once: walking SD's thousands of modules on every switch (as
    ``unet.enable_adapters()`` does) costs milliseconds per ε_φ pass."""

    layers: list  # peft BaseTunerLayer modules (the LoRA-wrapped projections)

    @classmethod
    def find(cls, unet) -> "AdapterHandles":
        from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: peft loads only when needed

        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ValueError("lora_branch: expected a UNet with peft adapters (unet.add_adapter), found none")
        if not all(hasattr(layer, "_disable_adapters") for layer in layers):
            import peft

            raise RuntimeError(f"lora_branch: peft {peft.__version__} keeps no _disable_adapters flag on its "
                               "layers; expected a BaseTunerLayer that has it (peft 0.21 does)")
        return cls(layers)

    def switch(self, on: bool) -> None:
        """Adapters on or off: only the flag peft's forward reads. peft's ``enable_adapters`` also resets
        ``requires_grad`` of every adapter weight on each call (about 15,000 Python calls per switch on SD's
        128 projections); our adapter weights stay trainable, so that work is skipped."""
        off = not on
        for layer in self.layers:
            object.__setattr__(layer, "_disable_adapters", off)  # a plain flag: skip Module.__setattr__'s checks


@contextmanager
def lora_branch(
    unet, camera_embedding: Optional[nn.Module], handles: Optional[AdapterHandles] = None
) -> Iterator[None]:
    """Inside: LoRA adapters on and the camera embedding installed as ``unet.class_embedding``
    (callers pass the flattened camera as ``class_labels``). On exit both are undone, so the frozen ε̂
    pass sees the pure pretrained UNet (diffusers raises if ``class_embedding`` is set without labels).

    The adapter weights keep ``requires_grad`` throughout (the LoRA loss is built inside the branch and
    backpropagated after it); the frozen pass never reaches them while the adapters are off.
    ``handles`` (from :meth:`AdapterHandles.find`) saves a walk over the UNet's modules.
    """
    if unet.class_embedding is not None:
        raise RuntimeError(
            "lora_branch: expected a UNet without class embedding, got one with "
            f"{type(unet.class_embedding).__name__} (nested lora_branch, or a class-conditional UNet)"
        )
    handles = AdapterHandles.find(unet) if handles is None else handles
    handles.switch(True)
    unet.class_embedding = camera_embedding
    try:
        yield
    finally:
        unet.class_embedding = None
        handles.switch(False)


def lora_target(
    z: Float[Tensor, "B C h w"], noise: Float[Tensor, "B C h w"], alpha: Tensor, sigma: Tensor,
    prediction_type: Literal["epsilon", "v_prediction"],
) -> Float[Tensor, "B C h w"]:
    """Regression target of the LoRA loss: ε, or v = α ε − σ z (diffusers' ``get_velocity``)."""
    return noise if prediction_type == "epsilon" else alpha * noise - sigma * z


class LoRAParticleScore(nn.Module):
    """Camera-conditioned LoRA ε_φ(x_t, t, y, c) on a frozen SD UNet.

    The UNet is deliberately *not* a registered submodule: it belongs to the prior and must not be
    saved, moved or counted with this module. ``state_dict()`` holds only the LoRA weights (under
    ``lora.``, peft's adapter-name-free keys) and the camera MLP (under ``camera.``); it also works
    when this module is nested in a LightningModule.
    """

    def __init__(
        self,
        unet,
        text_embedding: Float[Tensor, "1 L D"],
        alphas_cumprod: Float[Tensor, "T"],
        prediction_type: Literal["epsilon", "v_prediction"],
        cfg: Optional[ParticleScoreConfig] = None,
    ):
        super().__init__()
        from peft import LoraConfig  # heavy: peft loads only when needed

        self.cfg = cfg or ParticleScoreConfig()
        if unet.class_embedding is not None:
            raise ValueError(
                "LoRAParticleScore: expected a UNet without class embedding (class_embed_type None), got "
                f"{type(unet.class_embedding).__name__}; the camera embedding needs that slot"
            )
        if text_embedding.shape[-1] != unet.config.cross_attention_dim:
            raise ValueError(
                f"text embedding width {text_embedding.shape[-1]} does not match the UNet's cross_attention_dim "
                f"{unet.config.cross_attention_dim} (a separate base must use the prior's text encoder)"
            )
        self.__dict__["unet"] = unet  # unregistered on purpose (see class docstring)
        device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod.to(device, torch.float32)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.text_embedding = text_embedding.to(device, self.dtype)

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, init_lora_weights="gaussian",
                       target_modules=list(ATTENTION_PROJECTIONS)),
            adapter_name=ADAPTER,
        )
        unet.disable_adapters()  # add_adapter activates it; the prior's pass must see the pure UNet
        self._handles = AdapterHandles.find(unet)
        # The passes of an iteration; compile_passes() replaces them by compiled versions of themselves.
        self._eps_phi = self._eps_phi_eager
        self._lora_loss = self._lora_loss_eager
        self._lora_params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{ADAPTER}." in n]
        for p in self._lora_params:  # trainable weights in fp32 next to an fp16 UNet (diffusers' LoRA recipe)
            p.data = p.data.float()
            p.requires_grad_(True)  # unused while the adapters are off, so the frozen pass never reaches them
        width = unet.time_embedding.linear_2.out_features  # 1280 for SD
        self.camera = CameraEmbedding(width).to(device)

    @classmethod
    def from_prior(cls, prior, cfg: Optional[ParticleScoreConfig] = None) -> "LoRAParticleScore":
        """ε_φ for a :class:`StableDiffusionPrior`: on its UNet (``shared``) or on ``cfg.separate_model``."""
        cfg = cfg or ParticleScoreConfig()
        if cfg.base == "shared":
            return cls(prior.unet, prior.cond_embedding, prior.alphas_cumprod, prior.prediction_type, cfg)
        if cfg.base != "separate":
            raise ValueError(f"particle score base: expected 'shared' or 'separate', got {cfg.base!r}")
        if not cfg.separate_model:
            raise ValueError("particle score base 'separate' needs separate_model (a repo id or folder), got None")
        unet, scheduler = load_separate_unet(cfg.separate_model, prior.device, prior.dtype,
                                             prior.channels_last)
        alphas = scheduler.alphas_cumprod.to(prior.alphas_cumprod.device)
        if alphas.shape != prior.alphas_cumprod.shape or not torch.allclose(alphas, prior.alphas_cumprod, atol=1e-5):
            raise ValueError(
                f"separate ε_φ base {cfg.separate_model!r} has a different noise schedule from the prior "
                f"{prior.name!r}; ε_φ and ε̂ must share x_t, so their ᾱ_t must match"
            )
        return cls(unet, prior.cond_embedding, prior.alphas_cumprod, scheduler.config.prediction_type, cfg)

    def compile_passes(self, compiler) -> None:
        """Run the ε_φ pass and the LoRA loss (forward and backward) through ``compiler`` (a
        :class:`recdreamer_gs.perf.Compiler`). Each is its own function around the adapters-on UNet, so
        neither ever sees the frozen pass's adapter state."""
        self._eps_phi = compiler(self._eps_phi_eager, "ε_φ pass")
        self._lora_loss = compiler(self._lora_loss_eager, "LoRA step")

    # ---- ε_φ and its training ---------------------------------------------------------------

    def _text(self, b: int, text_embedding: Optional[Tensor]) -> Float[Tensor, "B L D"]:
        text = self.text_embedding if text_embedding is None else text_embedding
        return text.to(self.dtype).expand(b, -1, -1)

    def _forward(self, x: Float[Tensor, "B C h w"], t: Int[Tensor, "B"], labels: Float[Tensor, "B 16"],
                 text: Float[Tensor, "B L D"]) -> Float[Tensor, "B C h w"]:
        """The UNet with adapters on (inside :func:`lora_branch`); raw output, fp32."""
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=text, class_labels=labels).sample.float()

    def predict(
        self,
        x: Float[Tensor, "B C h w"],
        t: Int[Tensor, "B"],
        c2w: Float[Tensor, "B 4 4"],
        text_embedding: Optional[Float[Tensor, "B L D"]] = None,
    ) -> Float[Tensor, "B C h w"]:
        """Raw LoRA-branch output (ε or v, as the base predicts), fp32."""
        b = x.shape[0]
        with lora_branch(self.unet, self.camera, self._handles):
            return self._forward(x, t.to(x.device), c2w.reshape(b, 16).float(), self._text(b, text_embedding))

    def eps_phi(
        self,
        x_t: Float[Tensor, "B C h w"],
        t: Int[Tensor, "B"],
        c2w: Float[Tensor, "B 4 4"],
        text_embedding: Optional[Float[Tensor, "B L D"]] = None,
        particles: Optional[Tensor] = None,
    ) -> Float[Tensor, "B C h w"]:
        """ε_φ(x_t, t, y, c): conditional text only, no CFG (the release's effective scale 1), as ε.

        Callers wrap it in ``torch.no_grad()`` for the VSD gradient (docs/iteration.md, step 5). ``particles``
        (the current renders) is part of the shared ε_φ signature; the LoRA does not need it because it
        learns the particles' distribution through :meth:`lora_loss`.
        """
        b = x_t.shape[0]
        with lora_branch(self.unet, self.camera, self._handles):
            return self._eps_phi(x_t, t.to(x_t.device), c2w.reshape(b, 16).float(), self._text(b, text_embedding))

    def _eps_phi_eager(self, x_t: Float[Tensor, "B C h w"], t: Int[Tensor, "B"], labels: Float[Tensor, "B 16"],
                       text: Float[Tensor, "B L D"]) -> Float[Tensor, "B C h w"]:
        pred = self._forward(x_t, t, labels, text)
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        return to_eps(pred, x_t.float(), alpha, sigma, self.prediction_type)

    def lora_loss(
        self,
        z: Float[Tensor, "B C h w"],
        c2w: Float[Tensor, "B 4 4"],
        generator: Optional[torch.Generator] = None,
        text_embedding: Optional[Float[Tensor, "B L D"]] = None,
    ) -> Tensor:
        """docs/iteration.md, step 10: fresh t' ~ U[0, T), ε', x = α z + σ ε'; MSE to ε or v (the base's
        prediction type); each sample's camera zeroed with probability ``camera_dropout``.

        ``z`` is detached here (the LoRA never trains the Gaussians). Random draws use ``generator``
        (on its own device) in the order t', ε', dropout.
        """
        z = z.detach().float()
        b = z.shape[0]
        draw_device = generator.device if generator is not None else z.device
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=draw_device).to(z.device)
        noise = torch.randn(z.shape, generator=generator, device=draw_device).to(z.device)
        keep = torch.rand(b, generator=generator, device=draw_device) >= self.cfg.camera_dropout
        labels = c2w.reshape(b, 16).float() * keep.to(z.device, torch.float32).view(b, 1)  # zero pose = "no camera"
        with lora_branch(self.unet, self.camera, self._handles):
            return self._lora_loss(z, noise, t, labels, self._text(b, text_embedding))

    def _lora_loss_eager(self, z: Float[Tensor, "B C h w"], noise: Float[Tensor, "B C h w"], t: Int[Tensor, "B"],
                         labels: Float[Tensor, "B 16"], text: Float[Tensor, "B L D"]) -> Tensor:
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t)
        pred = self._forward(add_noise(z, noise, alpha, sigma), t, labels, text)
        return F.mse_loss(pred, lora_target(z, noise, alpha, sigma, self.prediction_type))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights and camera MLP, all fp32."""
        return list(self._lora_params) + list(self.camera.parameters())

    def make_optimizer(self, lr: Optional[float] = None) -> torch.optim.AdamW:
        """AdamW over :meth:`trainable_parameters` (lr defaults to ``cfg.lr``, 1e-4), fused: one kernel
        for all 260 weights of SD's LoRA instead of a loop or a dozen multi-tensor launches."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.cfg.lr if lr is None else lr, fused=True)

    # ---- checkpoints: LoRA + camera only ----------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        from peft import get_peft_model_state_dict  # heavy: peft loads only when needed

        for key, value in get_peft_model_state_dict(self.unet, adapter_name=ADAPTER).items():
            destination[f"{prefix}lora.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict  # heavy: peft loads only when needed

        lora_prefix = f"{prefix}lora."
        lora = {k[len(lora_prefix):]: v for k, v in state_dict.items() if k.startswith(lora_prefix)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(lora_prefix)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        expected = set(get_peft_model_state_dict(self.unet, adapter_name=ADAPTER))
        missing_keys.extend(lora_prefix + k for k in sorted(expected - set(lora)))
        unexpected_keys.extend(lora_prefix + k for k in sorted(set(lora) - expected))
        known = {k: v for k, v in lora.items() if k in expected}
        if known:
            set_peft_model_state_dict(self.unet, known, adapter_name=ADAPTER)

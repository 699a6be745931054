"""Stable Diffusion's networks read from a local folder that ``hub.ensure`` made whole: the UNet and noise schedule
(of the pipeline, or a separate ε_φ base) and the tiny decoder. Every loading failure ends as one
``hub.ModelUnavailable`` line."""

from __future__ import annotations

import torch

from recdreamer_gs import hub


def read_unet(where: hub.Resolved, spec: hub.ModelSpec, device: torch.device | str, dtype: torch.dtype,
               channels_last: bool = False):
    from diffusers import UNet2DConditionModel  # heavy: diffusers loads only when needed

    try:
        unet = UNet2DConditionModel.from_pretrained(
            where.folder, subfolder="unet", variant=where.variant("unet"), torch_dtype=dtype, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
        raise hub.load_error(spec, err) from err
    unet = unet.to(device).requires_grad_(False).eval()
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


def load_tiny_decoder(source: str, device: torch.device | str, dtype: torch.dtype, channels_last: bool = False):
    """A frozen ``AutoencoderTiny`` (TAESD, e.g. ``madebyollin/taesd`` for SD 1.x/2.x) from a repo id or folder."""
    from diffusers import AutoencoderTiny  # heavy: diffusers loads only when needed

    spec = hub.ModelSpec(hub.TINY_DECODER, source, half=dtype != torch.float32)
    where = hub.ensure(spec)
    try:
        tiny = AutoencoderTiny.from_pretrained(where.folder, variant=where.variant(), torch_dtype=dtype,
                                               local_files_only=True)
    except Exception as err:  # noqa: BLE001 - every loading failure becomes the one message
        raise hub.load_error(spec, err) from err
    tiny = tiny.to(device).requires_grad_(False).eval()
    return tiny.to(memory_format=torch.channels_last) if channels_last else tiny


def read_scheduler(where: hub.Resolved, spec: hub.ModelSpec):
    """The pipeline's noise schedule as a ``DDPMScheduler`` (only its constants are used)."""
    from diffusers import DDPMScheduler  # heavy: diffusers loads only when needed

    try:
        return DDPMScheduler.from_pretrained(where.folder, subfolder="scheduler", local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise hub.load_error(spec, err) from err


def load_separate_unet(model: str, device: torch.device | str, dtype: torch.dtype, channels_last: bool = False):
    """A frozen UNet and its noise schedule from a repo id or folder (a separate ε_φ base)."""
    spec = hub.ModelSpec(hub.UNET, model, half=dtype != torch.float32)
    where = hub.ensure(spec)
    return read_unet(where, spec, device, dtype, channels_last), read_scheduler(where, spec)


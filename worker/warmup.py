"""Start-up work that keeps the first user request from being the slow one.

`compile_dits` wraps every DiT of a pipeline in torch.compile (`--compile`); `warm_up` runs a
synthetic two-step request through every stage for each shape bucket (`--warmup`), so kernel
selection, autotuning and compilation happen before the worker says Hello.
"""

from __future__ import annotations

import io
import logging
import time

import torch
from torch import nn

from diffserve.kernels import attention
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb
from diffserve.worker.models import dits

log = logging.getLogger(__name__)


def compile_dits(pipeline, backend: str = "inductor", mode: str | None = None) -> int:
    """Compiles each DiT's forward in place; returns how many were compiled."""
    models = dits(pipeline)
    for model in models:
        prepare_attention(model)
        model.forward = torch.compile(model.forward, backend=backend, mode=mode, dynamic=False)
    return len(models)


def prepare_attention(model: nn.Module) -> None:
    """Resolves the attention backend for the DiT's device, dtype and head size before it is traced
    (kernels/attention.prepare: otherwise its second compiled call recompiles)."""
    param = next((p for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    param = param if param is not None else next(model.parameters())
    attention.prepare(param.device, param.dtype, model.config.attention_head_dim)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'480x832x81' -> (height, width, frames); 'HxW' means one frame."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or min(parts) <= 0:
        raise ValueError(f"warm-up shape {text!r}: expected HEIGHTxWIDTH[xFRAMES]")
    return tuple(parts)


def _gray_png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def warm_up(pipeline, shapes: list[tuple[int, int, int]] | None = None) -> None:
    """Runs a two-step request (with CFG rows where the model defaults to CFG) per shape."""
    card = pipeline.card
    d = card.defaults
    shapes = shapes or [(d.height or 1024, d.width or 1024, d.num_frames)]
    for height, width, frames in shapes:
        # The card defaults as the scheduler resolves them (scheduler/requests.py).
        request = wpb.Request(
            prompt="warm-up", negative_prompt=d.negative_prompt, height=height, width=width, num_frames=frames,
            num_inference_steps=2, seed=0,
        )
        if card.guidance_kind in (pb.GUIDANCE_KIND_CFG, pb.GUIDANCE_KIND_CFG_NORM_RESCALE) and d.guidance_scale > 1:
            request.cfg_scales.extend([d.guidance_scale] + ([d.guidance_scale_2] if d.guidance_scale_2 else []))
        elif card.guidance_kind == pb.GUIDANCE_KIND_EMBEDDED:
            request.embedded_guidance = d.guidance_scale
        if card.limits.image_required:
            request.images.append(_gray_png(width, height))
        started = time.perf_counter()
        state = pipeline.admit("warm-up", request)
        pipeline.encode(state)
        pipeline.prepare(state)
        while state.step < request.num_inference_steps:
            pipeline.denoise_step([state])
        pipeline.decode(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        log.info("warmed up %dx%dx%d in %.1f s", height, width, frames, time.perf_counter() - started)

"""The worker's view of a job: the public GenerationParams, resolved (validation.resolve_params),
turned into a worker.v1.Request whose fields need no further interpretation on the worker."""

from __future__ import annotations

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

CFG_KINDS = (pb.GUIDANCE_KIND_CFG, pb.GUIDANCE_KIND_CFG_NORM_RESCALE)


def worker_request(params: pb.GenerationParams, model: pb.Model) -> wpb.Request:
    """`params` must be resolved already (every optional field set, images fetched as bytes)."""
    request = wpb.Request(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        seed=params.seed,
        images=[image.data for image in params.images],
    )
    if model.guidance_kind in CFG_KINDS and params.guidance_scale > 1:
        request.cfg_scales.append(params.guidance_scale)
        if params.HasField("guidance_scale_2"):  # two-expert models: the low-noise expert's scale
            request.cfg_scales.append(params.guidance_scale_2)
    elif model.guidance_kind == pb.GUIDANCE_KIND_EMBEDDED:
        request.embedded_guidance = params.guidance_scale
    return request

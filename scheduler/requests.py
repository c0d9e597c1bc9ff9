"""The worker's view of a job: the public GenerationParams, resolved (validation.resolve_params),
turned into a worker.v1.Request whose fields need no further interpretation on the worker, and
the public stage of a job as the worker's RunStage stage."""

from __future__ import annotations

from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

# UNSPECIFIED reads as CFG: a card that does not say runs guidance as CFG, as every model did
# before cards said it.
CFG_KINDS = (pb.GUIDANCE_KIND_CFG, pb.GUIDANCE_KIND_CFG_NORM_RESCALE, pb.GUIDANCE_KIND_UNSPECIFIED)

_WORKER_STAGES = {
    pb.STAGE_ENCODE: wpb.WORKER_STAGE_ENCODE,
    pb.STAGE_PREPARE: wpb.WORKER_STAGE_PREPARE,
    pb.STAGE_DECODE: wpb.WORKER_STAGE_DECODE,
}


def uses_cfg(model: pb.Model) -> bool:
    """Whether the model's guidance_scale is a classifier-free guidance scale."""
    return model.guidance_kind in CFG_KINDS


def num_experts(model: pb.Model) -> int:
    return max(1, model.num_experts)


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
    if uses_cfg(model) and params.guidance_scale > 1:  # CFG runs only above 1 (diffusers' rule)
        # Highest-noise expert first; the others take guidance_scale_2 (diffusers: defaults to guidance_scale).
        low_noise = params.guidance_scale_2 if params.HasField("guidance_scale_2") else params.guidance_scale
        request.cfg_scales.extend([params.guidance_scale] + [low_noise] * (num_experts(model) - 1))
    elif model.guidance_kind == pb.GUIDANCE_KIND_EMBEDDED:
        request.embedded_guidance = params.guidance_scale
    if params.cache.policy:
        # The worker's StepCache has the public one's fields and numbers (tests/unit/test_request_unit.py).
        request.cache.ParseFromString(params.cache.SerializeToString())
    for lora in params.loras:  # scales resolved: an unset one is 1.0 by now
        request.loras.add(name=lora.name, scale=lora.scale)
    return request


def worker_stage(stage: int) -> int:
    """The RunStage stage (worker.v1.WorkerStage) of a public stage that runs on a worker."""
    try:
        return _WORKER_STAGES[stage]
    except KeyError:
        raise ValueError(f"stage {pb.Stage.Name(stage)} is not a RunStage stage") from None

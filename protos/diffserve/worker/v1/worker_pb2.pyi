from diffserve.v1 import generation_pb2 as _generation_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_1: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_2: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_3: _ClassVar[ProtocolVersion]

class WorkerStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STAGE_UNSPECIFIED: _ClassVar[WorkerStage]
    WORKER_STAGE_ENCODE: _ClassVar[WorkerStage]
    WORKER_STAGE_PREPARE: _ClassVar[WorkerStage]
    WORKER_STAGE_DECODE: _ClassVar[WorkerStage]

class GuidanceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_KIND_UNSPECIFIED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_CFG: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_CFG_NORM_RESCALE: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_EMBEDDED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_NONE: _ClassVar[GuidanceKind]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_1: ProtocolVersion
PROTOCOL_VERSION_2: ProtocolVersion
PROTOCOL_VERSION_3: ProtocolVersion
WORKER_STAGE_UNSPECIFIED: WorkerStage
WORKER_STAGE_ENCODE: WorkerStage
WORKER_STAGE_PREPARE: WorkerStage
WORKER_STAGE_DECODE: WorkerStage
GUIDANCE_KIND_UNSPECIFIED: GuidanceKind
GUIDANCE_KIND_CFG: GuidanceKind
GUIDANCE_KIND_CFG_NORM_RESCALE: GuidanceKind
GUIDANCE_KIND_EMBEDDED: GuidanceKind
GUIDANCE_KIND_NONE: GuidanceKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "frame")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    frame: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., frame: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "welcome", "admit", "run_stage", "denoise_step", "free", "shutdown", "reregister", "free_all", "finished_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    RUN_STAGE_FIELD_NUMBER: _ClassVar[int]
    DENOISE_STEP_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    FREE_ALL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_IDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    welcome: Welcome
    admit: Admit
    run_stage: RunStage
    denoise_step: DenoiseStep
    free: Free
    shutdown: Shutdown
    reregister: Reregister
    free_all: FreeAll
    finished_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., admit: _Optional[_Union[Admit, _Mapping]] = ..., run_stage: _Optional[_Union[RunStage, _Mapping]] = ..., denoise_step: _Optional[_Union[DenoiseStep, _Mapping]] = ..., free: _Optional[_Union[Free, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., reregister: _Optional[_Union[Reregister, _Mapping]] = ..., free_all: _Optional[_Union[FreeAll, _Mapping]] = ..., finished_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class Admit(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: Request
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[Request, _Mapping]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "seed", "cfg_scales", "embedded_guidance", "images", "cache", "loras")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    seed: int
    cfg_scales: _containers.RepeatedScalarFieldContainer[float]
    embedded_guidance: float
    images: _containers.RepeatedScalarFieldContainer[bytes]
    cache: StepCache
    loras: _containers.RepeatedCompositeFieldContainer[LoraAdapter]
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., seed: _Optional[int] = ..., cfg_scales: _Optional[_Iterable[float]] = ..., embedded_guidance: _Optional[float] = ..., images: _Optional[_Iterable[bytes]] = ..., cache: _Optional[_Union[StepCache, _Mapping]] = ..., loras: _Optional[_Iterable[_Union[LoraAdapter, _Mapping]]] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class StepCache(_message.Message):
    __slots__ = ("policy", "threshold", "interval", "max_order", "warmup_steps", "cooldown_step", "max_skip_steps", "mag_ratios")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_ORDER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_SKIP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAG_RATIOS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    threshold: float
    interval: int
    max_order: int
    warmup_steps: int
    cooldown_step: int
    max_skip_steps: int
    mag_ratios: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, policy: _Optional[str] = ..., threshold: _Optional[float] = ..., interval: _Optional[int] = ..., max_order: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., cooldown_step: _Optional[int] = ..., max_skip_steps: _Optional[int] = ..., mag_ratios: _Optional[_Iterable[float]] = ...) -> None: ...

class RunStage(_message.Message):
    __slots__ = ("stage", "request_ids")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    stage: WorkerStage
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[_Union[WorkerStage, str]] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DenoiseStep(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StepEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[StepEntry, _Mapping]]] = ...) -> None: ...

class StepEntry(_message.Message):
    __slots__ = ("request_id", "step_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step_index: int
    def __init__(self, request_id: _Optional[str] = ..., step_index: _Optional[int] = ...) -> None: ...

class Free(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class FreeAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Reregister(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "result", "goodbye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    result: Result
    goodbye: Goodbye
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "description", "card", "max_batch_size", "max_resident", "world_size", "concurrent_stages")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_STAGES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    description: str
    card: ModelCard
    max_batch_size: int
    max_resident: int
    world_size: int
    concurrent_stages: bool
    def __init__(self, protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., description: _Optional[str] = ..., card: _Optional[_Union[ModelCard, _Mapping]] = ..., max_batch_size: _Optional[int] = ..., max_resident: _Optional[int] = ..., world_size: _Optional[int] = ..., concurrent_stages: _Optional[bool] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "family", "task", "defaults", "limits", "guidance_kind", "num_experts", "packs_mixed_shapes", "cache_policies", "quantizations", "lora_adapters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PACKS_MIXED_SHAPES_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICIES_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATIONS_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    task: str
    defaults: ModelDefaults
    limits: ModelLimits
    guidance_kind: GuidanceKind
    num_experts: int
    packs_mixed_shapes: bool
    cache_policies: _containers.RepeatedScalarFieldContainer[str]
    quantizations: _containers.RepeatedScalarFieldContainer[str]
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., task: _Optional[str] = ..., defaults: _Optional[_Union[ModelDefaults, _Mapping]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., guidance_kind: _Optional[_Union[GuidanceKind, str]] = ..., num_experts: _Optional[int] = ..., packs_mixed_shapes: _Optional[bool] = ..., cache_policies: _Optional[_Iterable[str]] = ..., quantizations: _Optional[_Iterable[str]] = ..., lora_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelDefaults(_message.Message):
    __slots__ = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps", "negative_prompt", "sampler", "flow_shift", "guidance_scale_2")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    FLOW_SHIFT_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    negative_prompt: str
    sampler: str
    flow_shift: float
    guidance_scale_2: float
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., fps: _Optional[int] = ..., negative_prompt: _Optional[str] = ..., sampler: _Optional[str] = ..., flow_shift: _Optional[float] = ..., guidance_scale_2: _Optional[float] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("size_multiple", "max_height", "max_width", "max_pixels", "frame_step", "max_num_frames", "max_num_inference_steps", "prompt_required", "image_required", "max_images")
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FRAME_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    size_multiple: int
    max_height: int
    max_width: int
    max_pixels: int
    frame_step: int
    max_num_frames: int
    max_num_inference_steps: int
    prompt_required: bool
    image_required: bool
    max_images: int
    def __init__(self, size_multiple: _Optional[int] = ..., max_height: _Optional[int] = ..., max_width: _Optional[int] = ..., max_pixels: _Optional[int] = ..., frame_step: _Optional[int] = ..., max_num_frames: _Optional[int] = ..., max_num_inference_steps: _Optional[int] = ..., prompt_required: _Optional[bool] = ..., image_required: _Optional[bool] = ..., max_images: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "status")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    status: _generation_pb2.WorkerStatus
    def __init__(self, sequence: _Optional[int] = ..., status: _Optional[_Union[_generation_pb2.WorkerStatus, _Mapping]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("command_id", "elapsed_ms", "requests")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    elapsed_ms: float
    requests: _containers.RepeatedCompositeFieldContainer[RequestResult]
    def __init__(self, command_id: _Optional[int] = ..., elapsed_ms: _Optional[float] = ..., requests: _Optional[_Iterable[_Union[RequestResult, _Mapping]]] = ...) -> None: ...

class RequestResult(_message.Message):
    __slots__ = ("request_id", "status", "frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: _status_pb2.Status
    frames: Tensor
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., frames: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_NPY: _ClassVar[OutputFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_PREPARE: _ClassVar[Stage]
    STAGE_DENOISE: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]
    STAGE_SAVE: _ClassVar[Stage]

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_NOT_SERVING: _ClassVar[ServingState]

class GuidanceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_KIND_UNSPECIFIED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_CFG: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_CFG_NORM_RESCALE: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_EMBEDDED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_NONE: _ClassVar[GuidanceKind]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_NPY: OutputFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
STAGE_UNSPECIFIED: Stage
STAGE_ENCODE: Stage
STAGE_PREPARE: Stage
STAGE_DENOISE: Stage
STAGE_DECODE: Stage
STAGE_SAVE: Stage
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_NOT_SERVING: ServingState
GUIDANCE_KIND_UNSPECIFIED: GuidanceKind
GUIDANCE_KIND_CFG: GuidanceKind
GUIDANCE_KIND_CFG_NORM_RESCALE: GuidanceKind
GUIDANCE_KIND_EMBEDDED: GuidanceKind
GUIDANCE_KIND_NONE: GuidanceKind

class GenerationParams(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "seed", "fps", "output_format", "images", "guidance_scale_2", "cache", "loras")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    output_format: OutputFormat
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    guidance_scale_2: float
    cache: StepCache
    loras: _containers.RepeatedCompositeFieldContainer[LoraAdapter]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_frames: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., fps: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., guidance_scale_2: _Optional[float] = ..., cache: _Optional[_Union[StepCache, _Mapping]] = ..., loras: _Optional[_Iterable[_Union[LoraAdapter, _Mapping]]] = ...) -> None: ...

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

class ImageInput(_message.Message):
    __slots__ = ("data", "path", "url")
    DATA_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    path: str
    url: str
    def __init__(self, data: _Optional[bytes] = ..., path: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "client_request_id", "state", "params", "stage", "step", "total_steps", "queue_position", "create_time", "start_time", "end_time", "artifact", "error", "priority", "attempt")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    id: str
    client_request_id: str
    state: JobState
    params: GenerationParams
    stage: Stage
    step: int
    total_steps: int
    queue_position: int
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    artifact: Artifact
    error: _status_pb2.Status
    priority: int
    attempt: int
    def __init__(self, id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., queue_position: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., priority: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("id", "file_name", "media_type", "size_bytes", "width", "height", "num_frames", "sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    file_name: str
    media_type: str
    size_bytes: int
    width: int
    height: int
    num_frames: int
    sha256: str
    def __init__(self, id: _Optional[str] = ..., file_name: _Optional[str] = ..., media_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "time", "queued", "stage_started", "step_completed", "completed", "failed", "cancelled", "restarted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    STEP_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    queued: Queued
    stage_started: StageStarted
    step_completed: StepCompleted
    completed: Completed
    failed: Failed
    cancelled: Cancelled
    restarted: Restarted
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., stage_started: _Optional[_Union[StageStarted, _Mapping]] = ..., step_completed: _Optional[_Union[StepCompleted, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., cancelled: _Optional[_Union[Cancelled, _Mapping]] = ..., restarted: _Optional[_Union[Restarted, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class StageStarted(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ...) -> None: ...

class StepCompleted(_message.Message):
    __slots__ = ("step", "total_steps", "step_ms", "batch_jobs")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOBS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    step_ms: float
    batch_jobs: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., step_ms: _Optional[float] = ..., batch_jobs: _Optional[int] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Cancelled(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Restarted(_message.Message):
    __slots__ = ("attempt", "reason")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    reason: str
    def __init__(self, attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("params", "client_request_id", "timeout", "priority")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    params: GenerationParams
    client_request_id: str
    timeout: _duration_pb2.Duration
    priority: int
    def __init__(self, params: _Optional[_Union[GenerationParams, _Mapping]] = ..., client_request_id: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: Job
    created: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("params", "client_request_id", "priority")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    params: GenerationParams
    client_request_id: str
    priority: int
    def __init__(self, params: _Optional[_Union[GenerationParams, _Mapping]] = ..., client_request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class StreamJobEventsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "family", "task", "defaults", "limits", "state", "workers", "guidance_kind", "num_experts", "packs_mixed_shapes", "cache_policies", "quantizations", "lora_adapters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
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
    state: ServingState
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    guidance_kind: GuidanceKind
    num_experts: int
    packs_mixed_shapes: bool
    cache_policies: _containers.RepeatedScalarFieldContainer[str]
    quantizations: _containers.RepeatedScalarFieldContainer[str]
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., task: _Optional[str] = ..., defaults: _Optional[_Union[ModelDefaults, _Mapping]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., state: _Optional[_Union[ServingState, str]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., guidance_kind: _Optional[_Union[GuidanceKind, str]] = ..., num_experts: _Optional[int] = ..., packs_mixed_shapes: _Optional[bool] = ..., cache_policies: _Optional[_Iterable[str]] = ..., quantizations: _Optional[_Iterable[str]] = ..., lora_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

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

class WorkerStatus(_message.Message):
    __slots__ = ("id", "alive", "resident_jobs", "step_commands", "batched_step_commands", "denoise_rows", "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    STEP_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEP_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_ROWS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    alive: bool
    resident_jobs: int
    step_commands: int
    batched_step_commands: int
    denoise_rows: int
    gpu_memory_allocated_bytes: int
    gpu_memory_reserved_bytes: int
    def __init__(self, id: _Optional[str] = ..., alive: _Optional[bool] = ..., resident_jobs: _Optional[int] = ..., step_commands: _Optional[int] = ..., batched_step_commands: _Optional[int] = ..., denoise_rows: _Optional[int] = ..., gpu_memory_allocated_bytes: _Optional[int] = ..., gpu_memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DownloadArtifactResponse(_message.Message):
    __slots__ = ("data", "media_type", "total_bytes", "file_name")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    total_bytes: int
    file_name: str
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ..., total_bytes: _Optional[int] = ..., file_name: _Optional[str] = ...) -> None: ...

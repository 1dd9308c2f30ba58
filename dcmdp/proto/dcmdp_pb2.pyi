from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("weight_version", "pool", "worker_id", "trainer_instance")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    weight_version: int
    pool: str
    worker_id: str
    trainer_instance: str
    def __init__(self, weight_version: _Optional[int] = ..., pool: _Optional[str] = ..., worker_id: _Optional[str] = ..., trainer_instance: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("header", "engine", "precision")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    header: Header
    engine: str
    precision: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("header", "run_name", "manifest_json", "model_files", "weight_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: Header
    run_name: str
    manifest_json: str
    model_files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    weight_version: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., run_name: _Optional[str] = ..., manifest_json: _Optional[str] = ..., model_files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., weight_version: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("header", "max_prompts")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    max_prompts: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., max_prompts: _Optional[int] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("index", "token_ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("header", "lease_id", "prompts", "group_size", "max_new_tokens", "temperature", "seed", "expires_unix_ms", "finished", "retry_after_ms", "eval", "step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    lease_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    group_size: int
    max_new_tokens: int
    temperature: float
    seed: int
    expires_unix_ms: int
    finished: bool
    retry_after_ms: int
    eval: bool
    step: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., lease_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., group_size: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., finished: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., eval: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("prompt_index", "response_ids", "logprobs", "finish_reason")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    response_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    def __init__(self, prompt_index: _Optional[int] = ..., response_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class RolloutBatch(_message.Message):
    __slots__ = ("header", "lease_id", "samples", "sampling_seconds", "generated_tokens")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    lease_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    sampling_seconds: float
    generated_tokens: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., lease_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., sampling_seconds: _Optional[float] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("header", "accepted", "reason", "accepted_samples")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    header: Header
    accepted: bool
    reason: str
    accepted_samples: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., accepted_samples: _Optional[int] = ...) -> None: ...

class WeightRequest(_message.Message):
    __slots__ = ("header", "version", "dtype", "offset", "chunk_size", "length", "held_group")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HELD_GROUP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    version: int
    dtype: str
    offset: int
    chunk_size: int
    length: int
    held_group: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., version: _Optional[int] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ..., length: _Optional[int] = ..., held_group: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightManifest(_message.Message):
    __slots__ = ("header", "version", "dtype", "tensors", "total_bytes", "chunk_size")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    header: Header
    version: int
    dtype: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    total_bytes: int
    chunk_size: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., version: _Optional[int] = ..., dtype: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class BroadcastTicket(_message.Message):
    __slots__ = ("header", "manifest", "group", "store_host", "store_port", "rank", "world_size", "timeout_ms", "backend", "join_timeout_ms", "part_bytes", "proof", "ring", "ring_nonce", "ring_slots", "ring_slot_bytes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    JOIN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PART_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    RING_NONCE_FIELD_NUMBER: _ClassVar[int]
    RING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RING_SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    header: Header
    manifest: WeightManifest
    group: str
    store_host: str
    store_port: int
    rank: int
    world_size: int
    timeout_ms: int
    backend: str
    join_timeout_ms: int
    part_bytes: int
    proof: bytes
    ring: str
    ring_nonce: bytes
    ring_slots: int
    ring_slot_bytes: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., manifest: _Optional[_Union[WeightManifest, _Mapping]] = ..., group: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., backend: _Optional[str] = ..., join_timeout_ms: _Optional[int] = ..., part_bytes: _Optional[int] = ..., proof: _Optional[bytes] = ..., ring: _Optional[str] = ..., ring_nonce: _Optional[bytes] = ..., ring_slots: _Optional[int] = ..., ring_slot_bytes: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "offset", "data", "crc32")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    data: bytes
    crc32: int
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "prob_diff_mean", "tolerance", "tokens", "workers", "reward_mean", "version_lag_mean", "rollouts_dropped_stale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROB_DIFF_MEAN_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    VERSION_LAG_MEAN_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    prob_diff_mean: float
    tolerance: float
    tokens: int
    workers: int
    reward_mean: float
    version_lag_mean: float
    rollouts_dropped_stale: int
    def __init__(self, name: _Optional[str] = ..., prob_diff_mean: _Optional[float] = ..., tolerance: _Optional[float] = ..., tokens: _Optional[int] = ..., workers: _Optional[int] = ..., reward_mean: _Optional[float] = ..., version_lag_mean: _Optional[float] = ..., rollouts_dropped_stale: _Optional[int] = ..., **kwargs) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "pool", "weight_version", "last_seen_unix_ms", "leases")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pool: str
    weight_version: int
    last_seen_unix_ms: int
    leases: int
    def __init__(self, worker_id: _Optional[str] = ..., pool: _Optional[str] = ..., weight_version: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., leases: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("header", "run_name", "phase", "step", "total_steps", "weight_version", "reward_mean", "prob_diff_mean", "run_lambda", "tolerance", "pools", "queue_depth", "leases_outstanding", "leases_expired", "rollouts_dropped_stale", "workers", "finished", "message", "checkpoint_step", "eval_accuracy", "updated_unix_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    PROB_DIFF_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUN_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LEASES_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    run_name: str
    phase: str
    step: int
    total_steps: int
    weight_version: int
    reward_mean: float
    prob_diff_mean: float
    run_lambda: float
    tolerance: float
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    queue_depth: int
    leases_outstanding: int
    leases_expired: int
    rollouts_dropped_stale: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    finished: bool
    message: str
    checkpoint_step: int
    eval_accuracy: float
    updated_unix_ms: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., run_name: _Optional[str] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., weight_version: _Optional[int] = ..., reward_mean: _Optional[float] = ..., prob_diff_mean: _Optional[float] = ..., run_lambda: _Optional[float] = ..., tolerance: _Optional[float] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., leases_outstanding: _Optional[int] = ..., leases_expired: _Optional[int] = ..., rollouts_dropped_stale: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., finished: _Optional[bool] = ..., message: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., eval_accuracy: _Optional[float] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

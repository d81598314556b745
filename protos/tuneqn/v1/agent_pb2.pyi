from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class GetInfoRequest(_message.Message):
    __slots__ = ("client_version", "contract_version", "contract_revision")
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    contract_version: str
    contract_revision: int
    def __init__(self, client_version: _Optional[str] = ..., contract_version: _Optional[str] = ..., contract_revision: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "device_class", "backend", "runtime_versions", "cpu", "gpu", "capabilities", "simulated", "simulated_latency_ms_per_sample", "queue_length", "running_job_id", "healthy", "status", "target", "rpc_key", "remote", "supported_ops", "remote_servers", "prediction_slots")
    class RuntimeVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_LATENCY_MS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RPC_KEY_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_OPS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_SERVERS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SLOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    device_class: str
    backend: str
    runtime_versions: _containers.ScalarMap[str, str]
    cpu: str
    gpu: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    simulated: bool
    simulated_latency_ms_per_sample: float
    queue_length: int
    running_job_id: str
    healthy: bool
    status: str
    target: str
    rpc_key: str
    remote: str
    supported_ops: _containers.RepeatedScalarFieldContainer[str]
    remote_servers: int
    prediction_slots: int
    def __init__(self, name: _Optional[str] = ..., device_class: _Optional[str] = ..., backend: _Optional[str] = ..., runtime_versions: _Optional[_Mapping[str, str]] = ..., cpu: _Optional[str] = ..., gpu: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., simulated: _Optional[bool] = ..., simulated_latency_ms_per_sample: _Optional[float] = ..., queue_length: _Optional[int] = ..., running_job_id: _Optional[str] = ..., healthy: _Optional[bool] = ..., status: _Optional[str] = ..., target: _Optional[str] = ..., rpc_key: _Optional[str] = ..., remote: _Optional[str] = ..., supported_ops: _Optional[_Iterable[str]] = ..., remote_servers: _Optional[int] = ..., prediction_slots: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_version", "contract_version", "contract_revision", "agent_id", "hostname", "queue_length", "running_job_id", "devices", "running_job_ids", "caches", "last_failure", "jobs_by_state", "started_at")
    class JobsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHES_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    contract_version: str
    contract_revision: int
    agent_id: str
    hostname: str
    queue_length: int
    running_job_id: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    running_job_ids: _containers.RepeatedScalarFieldContainer[str]
    caches: _containers.RepeatedCompositeFieldContainer[CacheUsage]
    last_failure: JobFailure
    jobs_by_state: _containers.ScalarMap[str, int]
    started_at: float
    def __init__(self, agent_version: _Optional[str] = ..., contract_version: _Optional[str] = ..., contract_revision: _Optional[int] = ..., agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., queue_length: _Optional[int] = ..., running_job_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., running_job_ids: _Optional[_Iterable[str]] = ..., caches: _Optional[_Iterable[_Union[CacheUsage, _Mapping]]] = ..., last_failure: _Optional[_Union[JobFailure, _Mapping]] = ..., jobs_by_state: _Optional[_Mapping[str, int]] = ..., started_at: _Optional[float] = ...) -> None: ...

class CacheUsage(_message.Message):
    __slots__ = ("name", "used_bytes", "limit_bytes", "entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    used_bytes: int
    limit_bytes: int
    entries: int
    def __init__(self, name: _Optional[str] = ..., used_bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class JobFailure(_message.Message):
    __slots__ = ("job_id", "device", "error", "at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: str
    error: str
    at: float
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[str] = ..., error: _Optional[str] = ..., at: _Optional[float] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("sha256", "total_size", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("sha256", "size", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class HasBlobsRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class HasBlobsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class OrtOptions(_message.Message):
    __slots__ = ("disabled_optimizers", "intra_op_threads")
    DISABLED_OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    disabled_optimizers: _containers.RepeatedScalarFieldContainer[str]
    intra_op_threads: int
    def __init__(self, disabled_optimizers: _Optional[_Iterable[str]] = ..., intra_op_threads: _Optional[int] = ...) -> None: ...

class BackendOptions(_message.Message):
    __slots__ = ("ort", "tvm")
    ORT_FIELD_NUMBER: _ClassVar[int]
    TVM_FIELD_NUMBER: _ClassVar[int]
    ort: OrtOptions
    tvm: TvmOptions
    def __init__(self, ort: _Optional[_Union[OrtOptions, _Mapping]] = ..., tvm: _Optional[_Union[TvmOptions, _Mapping]] = ...) -> None: ...

class TvmOptions(_message.Message):
    __slots__ = ("tuning_trials", "tuning_group", "latency_number", "latency_min_repeat_ms", "latency_cooldown_ms")
    TUNING_TRIALS_FIELD_NUMBER: _ClassVar[int]
    TUNING_GROUP_FIELD_NUMBER: _ClassVar[int]
    LATENCY_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MIN_REPEAT_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COOLDOWN_MS_FIELD_NUMBER: _ClassVar[int]
    tuning_trials: int
    tuning_group: str
    latency_number: int
    latency_min_repeat_ms: int
    latency_cooldown_ms: int
    def __init__(self, tuning_trials: _Optional[int] = ..., tuning_group: _Optional[str] = ..., latency_number: _Optional[int] = ..., latency_min_repeat_ms: _Optional[int] = ..., latency_cooldown_ms: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("job_id", "device", "model_sha256", "dataset_sha256", "input_name", "top_k", "chunk_size", "latency_warmup", "latency_repeats", "backend_options", "attempt", "remeasure_token", "max_executions")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_WARMUP_FIELD_NUMBER: _ClassVar[int]
    LATENCY_REPEATS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REMEASURE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: str
    model_sha256: str
    dataset_sha256: str
    input_name: str
    top_k: int
    chunk_size: int
    latency_warmup: int
    latency_repeats: int
    backend_options: BackendOptions
    attempt: int
    remeasure_token: str
    max_executions: int
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[str] = ..., model_sha256: _Optional[str] = ..., dataset_sha256: _Optional[str] = ..., input_name: _Optional[str] = ..., top_k: _Optional[int] = ..., chunk_size: _Optional[int] = ..., latency_warmup: _Optional[int] = ..., latency_repeats: _Optional[int] = ..., backend_options: _Optional[_Union[BackendOptions, _Mapping]] = ..., attempt: _Optional[int] = ..., remeasure_token: _Optional[str] = ..., max_executions: _Optional[int] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "state", "already_known")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_KNOWN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    already_known: bool
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., already_known: _Optional[bool] = ...) -> None: ...

class LatencyStats(_message.Message):
    __slots__ = ("median_ms", "p90_ms", "p10_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "count")
    MEDIAN_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P10_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    STD_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    median_ms: float
    p90_ms: float
    p10_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    count: int
    def __init__(self, median_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p10_ms: _Optional[float] = ..., mean_ms: _Optional[float] = ..., std_ms: _Optional[float] = ..., min_ms: _Optional[float] = ..., max_ms: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "device", "device_class", "agent_id", "state", "error", "num_samples", "top_k", "topk_indices", "model_size_bytes", "latency", "simulated_latency_ms_per_sample", "inference_seconds", "started_at", "finished_at", "runtime_versions", "attempt", "executions", "infeasible", "unsupported_ops", "compile_seconds", "tuning_seconds", "tuned", "compile_cache_hit", "executed_on")
    class RuntimeVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOPK_INDICES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_LATENCY_MS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    INFEASIBLE_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_OPS_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TUNING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TUNED_FIELD_NUMBER: _ClassVar[int]
    COMPILE_CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_ON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: str
    device_class: str
    agent_id: str
    state: JobState
    error: str
    num_samples: int
    top_k: int
    topk_indices: bytes
    model_size_bytes: int
    latency: LatencyStats
    simulated_latency_ms_per_sample: float
    inference_seconds: float
    started_at: float
    finished_at: float
    runtime_versions: _containers.ScalarMap[str, str]
    attempt: int
    executions: int
    infeasible: bool
    unsupported_ops: _containers.RepeatedScalarFieldContainer[str]
    compile_seconds: float
    tuning_seconds: float
    tuned: bool
    compile_cache_hit: bool
    executed_on: str
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[str] = ..., device_class: _Optional[str] = ..., agent_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., error: _Optional[str] = ..., num_samples: _Optional[int] = ..., top_k: _Optional[int] = ..., topk_indices: _Optional[bytes] = ..., model_size_bytes: _Optional[int] = ..., latency: _Optional[_Union[LatencyStats, _Mapping]] = ..., simulated_latency_ms_per_sample: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., runtime_versions: _Optional[_Mapping[str, str]] = ..., attempt: _Optional[int] = ..., executions: _Optional[int] = ..., infeasible: _Optional[bool] = ..., unsupported_ops: _Optional[_Iterable[str]] = ..., compile_seconds: _Optional[float] = ..., tuning_seconds: _Optional[float] = ..., tuned: _Optional[bool] = ..., compile_cache_hit: _Optional[bool] = ..., executed_on: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "heartbeat_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    heartbeat_ms: int
    def __init__(self, job_id: _Optional[str] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "stage", "done", "total", "final", "result", "timestamp", "heartbeat")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    stage: str
    done: int
    total: int
    final: bool
    result: JobResult
    timestamp: float
    heartbeat: bool
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., final: _Optional[bool] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., timestamp: _Optional[float] = ..., heartbeat: _Optional[bool] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

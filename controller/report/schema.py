"""report.json as pydantic models: the one definition of the report's shape.

:func:`tuneqn.controller.report.write.write_json` and ``write_report`` validate the
finalized report dict into :class:`Report` and write report.json from the model; the HTML
page (:mod:`.html`) reads the models. ``docs/report.schema.json`` is
``Report.model_json_schema()`` (``make schema`` regenerates it; a test compares it).

Schema version (:data:`SCHEMA_VERSION`, ``"MAJOR.MINOR"``): bump MINOR when a key or a
section is added (old readers keep working: they ignore it); bump MAJOR when a key is
removed or renamed, or its type, unit or meaning changes (old readers would misread it).
Every change to these models regenerates the checked-in JSON Schema.

Unknown keys are refused (``extra="forbid"``) everywhere but in the free-form parts
(``study.settings``, ``devices[].info``, ``searches[].params``, a result's ``latency``
statistics, a candidate's ``runtime`` options and ``dataset.preprocess``): a key written
by one part of the controller and not declared here is a bug this catches.  Keys the
producers do not always fill default to None / empty, so a report from an older tuneqn
(or a base report without the sections other parts add) still validates.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

#: The report's schema version, ``"MAJOR.MINOR"`` (see the module docstring for when to bump).
SCHEMA_VERSION = "2.0"

#: A model note starting with this is a warning the page shows at the top.
WARNING_PREFIX = "WARNING: "

Status = Literal["done", "failed", "unreachable", "infeasible", "pending", "running"]
Level = Literal["full", "screen", "build"]


class _Strict(BaseModel):
    """A part of the report whose keys are all declared."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A free-form part of the report: declared keys are typed, others are kept as they are."""

    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- study, devices, models


class StudyInfo(_Strict):
    name: str
    out_dir: str
    settings: dict[str, Any] = Field(default_factory=dict, description="the resolved study configuration")


class ObjectiveInfo(_Strict):
    name: str = Field(description="a name of tuneqn.controller.objectives.OBJECTIVES")
    direction: Literal["min", "max"]
    max: float | None = None
    min: float | None = None
    unit: str | None = Field(None, description="unit of the stored value: fraction, bytes or ms")
    label: str | None = None


class DeviceInfo(_Open):
    """What the agent reported about a device (more keys may follow from newer agents)."""

    backend: str | None = None
    cpu: str | None = None
    gpu: str | None = None
    hostname: str | None = None
    agent: str | None = None
    runtime_versions: dict[str, str] = Field(
        default_factory=dict, description="runtime stack of the device, e.g. {'onnxruntime': '1.23.0', 'tvm': ''}"
    )
    simulated: bool | None = None
    target: str | None = None
    rpc_key: str | None = None
    remote: str | None = None
    remote_servers: int | None = None
    tvm_version: str | None = None
    supported_ops: int | None = None


class Device(_Strict):
    name: str
    device_class: str | None = None
    info: dict[str, Any] = Field(default_factory=dict, description="what the agent reported (DeviceInfo keys)")

    @property
    def details(self) -> DeviceInfo:
        """``info`` read through :class:`DeviceInfo` (typed known keys)."""
        return DeviceInfo.model_validate(self.info)

    @property
    def versions(self) -> dict[str, str]:
        """The device's runtime versions that matter for results (ONNX Runtime, TVM), non-empty only."""
        info = self.details
        out = {k: v for k, v in info.runtime_versions.items() if v and k in ("onnxruntime", "tvm")}
        if info.tvm_version and "tvm" not in out:
            out["tvm"] = info.tvm_version
        return out


class ModelInfo(_Strict):
    name: str
    source: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    opset_original: int | None = None
    opset_used: int | None = None
    upgraded: bool = False
    input_name: str | None = None
    input_shape: list[int | str | None] | None = None
    notes: list[str] = Field(default_factory=list, description=f"notes; {WARNING_PREFIX!r}… ones are warnings")

    @property
    def warnings(self) -> list[str]:
        """The notes that are warnings, without their prefix."""
        return [n[len(WARNING_PREFIX) :] for n in self.notes if n.startswith(WARNING_PREFIX)]


class SkippedInput(_Strict):
    file: str
    reason: str


class Layer(_Strict):
    """One quantizable layer of the error analysis (the paper's ranking)."""

    model: str
    mode: str
    recipe: str | None = None
    name: str
    op_type: str | None = None
    index: int | None = None
    qdq_err: float | None = None
    xmodel_err: float | None = None
    norm_qdq: float | None = None
    norm_xmodel: float | None = None
    score: float | None = None
    rank: int | None = None


class RankedLayer(_Strict):
    """One layer of a measured ranking: what keeping only it in float wins back, per byte."""

    name: str
    gain: float | None = Field(None, description="top-1 agreement gained (worst device, screening sample)")
    overlap_gain: float | None = Field(None, description="top-k overlap gained (the tie-breaker)")
    bytes: int | None = Field(None, description="bytes the layer adds in float")
    fixes: int | None = Field(None, description="(sample, device) disagreements of the base set it fixes")
    cover: bool | None = Field(None, description="in the greedy set cover of the base set's disagreements")
    rank: int | None = None


class Ranking(_Strict):
    """A ranking computed from evaluations (``measured``)."""

    model: str
    mode: str
    recipe: str | None = None
    name: str
    layers: list[RankedLayer] = Field(default_factory=list)
    created_at: float | None = None


# --------------------------------------------------------------------------- searches


class Proposal(_Strict):
    candidate_id: str
    level: Level
    model: str | None = None
    mode: str | None = None
    recipe: str | None = None
    label: str | None = None
    seq: int | None = None
    created_at: float | None = None


class _Found(_Strict):
    """The smallest candidate a target search found meeting ``max_loss`` (``id`` None: none), and when."""

    id: str | None = None
    recipe: str | None = None
    label: str | None = None
    size_bytes: int | None = None
    worst_agreement: float | None = None
    found_after_s: float | None = None


class TargetPart(_Found):
    """One part of a target across a recipe split: the candidate found for its devices."""

    devices: list[str] = Field(default_factory=list)


class TargetDevice(_Found):
    """A target search's candidate found for one device."""

    device: str


class Target(_Found):
    """A target search's answer for one model; across a recipe split (a variant planned on some devices) one
    candidate per part (``parts``)."""

    model: str
    parts: list[TargetPart] = Field(default_factory=list)
    devices: list[TargetDevice] = Field(default_factory=list)


class Search(_Strict):
    name: str
    strategy: str | None = None
    ranking: str | None = None
    budget: int | None = None
    max_loss: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    proposals: list[Proposal] = Field(default_factory=list)
    # added by finalize (the search's ablation totals)
    hypervolume: float | None = None
    hv_vs_sweep: float | None = None
    evaluations: int | None = None
    screenings: int | None = None
    builds: int | None = None
    seconds: float | None = None
    found_after_s: float | None = None
    front_done_after_s: float | None = None
    recipe: str | None = None
    recipes: list[str] = Field(default_factory=list)
    targets: list[Target] | None = None
    target: Target | None = None


# --------------------------------------------------------------------------- baselines and candidates


class _RunDetails(_Strict):
    """How a result was produced (backend, compile/tuning time, cache, remote server)."""

    backend: str | None = None
    compile_seconds: float | None = None
    tuning_seconds: float | None = None
    device_seconds: float | None = None
    tuned: bool | None = None
    untuned: bool = False
    compile_cache_hit: bool | None = None
    executed_on: str | None = None


class Baseline(_RunDetails):
    """The FP32 model on one device."""

    model: str
    device: str
    status: Status
    accuracy: float | None = None
    accuracy_top5: float | None = None
    latency_ms: float | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    size_bytes: int | None = None
    error: str | None = None
    unsupported_ops: list[str] = Field(default_factory=list)


class Result(_RunDetails):
    """A candidate's full result on one device (whole evaluation sample, with latency)."""

    device: str
    status: Status
    agreement: float | None = Field(None, description="top-1 agreement with FP32 on this device")
    accuracy: float | None = Field(None, description="top-1 vs labels (labelled samples only)")
    accuracy_top5: float | None = None
    latency_ms: float | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    seconds: float | None = None
    finished_at: float | None = None
    num_samples: int | None = None
    error: str | None = None
    unsupported_ops: list[str] = Field(default_factory=list)
    latency: dict[str, Any] | None = Field(None, description="latency statistics (done results)")
    simulated_latency_ms_per_sample: float | None = None
    # added by finalize
    objectives: dict[str, float | None] | None = None
    feasible: bool | None = None
    reason: str | None = None
    front: int | None = None
    recipe_front: int | None = None


class Screening(_Strict):
    """A candidate's screening result on one device (the recipe's screening sample, no latency)."""

    device: str
    status: Status
    agreement: float | None = None
    accuracy: float | None = None
    seconds: float | None = None
    finished_at: float | None = None
    num_samples: int | None = None
    error: str | None = None


class ProposedBy(_Strict):
    search: str
    label: str | None = None
    level: Level


class CandidateRuntime(_Open):
    """Session options a candidate needs to run as measured."""

    ort_disabled_optimizers: list[str] = Field(default_factory=list)


class Candidate(_Strict):
    id: str
    model: str
    mode: str
    recipe: str | None = None
    k: int | None = None
    kind: str | None = Field(None, description="set (a search's k), explicit, ranked (old reports)")
    label: str | None = None
    excluded: list[str] = Field(default_factory=list, description="layers kept in float, by name")
    levels: dict[str, str] = Field(
        default_factory=dict,
        description="precision levels other than fp32 and the recipe's int8, by layer name (fp16: float with its "
        "weight stored as float16; int4: 4-bit weights per channel)",
    )
    size_bytes: int | None = None
    sha256: str | None = None
    runtime: CandidateRuntime = Field(default_factory=CandidateRuntime)
    level: Level = "full"
    results: list[Result] = Field(default_factory=list)
    screening: list[Screening] = Field(default_factory=list)
    proposed_by: list[ProposedBy] = Field(default_factory=list)

    @property
    def name(self) -> str:
        """How tables name the candidate: its label, else k, else its id."""
        if self.kind == "ranked" and self.k is not None:
            return f"k={self.k}"
        if self.label:
            return self.label
        return f"k={self.k}" if self.k is not None else self.id


# --------------------------------------------------------------------------- feasibility


class TriedRecipe(_Strict):
    recipe: str
    unsupported: list[str] = Field(default_factory=list)
    error: str | None = None


class Feasibility(_Strict):
    model: str
    recipe: str
    device: str
    planned: str
    status: Literal["feasible", "adapted", "gave-up"]
    unsupported: list[str] = Field(default_factory=list)
    tried: list[TriedRecipe] = Field(default_factory=list)
    text: str


class InfeasibleCandidate(_Strict):
    candidate: str
    model: str
    recipe: str
    label: str | None = None
    unsupported_ops: list[str] = Field(default_factory=list)
    error: str | None = None


class InfeasibleOnDevice(_Strict):
    device: str
    candidates: list[InfeasibleCandidate] = Field(default_factory=list)


# --------------------------------------------------------------------------- finalized sections


class Fronts(_Strict):
    """Top fronts of one (model, recipe, device)."""

    model: str
    mode: str
    recipe: str | None = None
    device: str
    fronts: list[list[str]] = Field(default_factory=list)


class RecipeFronts(_Strict):
    """Top fronts of one (model, device) over every recipe."""

    model: str
    device: str
    recipes: list[str] = Field(default_factory=list)
    fronts: list[list[str]] = Field(default_factory=list)
    selected: str | None = None


class CrossDeviceCandidate(_Strict):
    id: str
    k: int | None = None
    label: str | None = None
    worst: dict[str, float | None] = Field(default_factory=dict)
    front: int | None = None


class Excluded(_Strict):
    candidate: str
    reason: str


class CrossDevice(_Strict):
    """Fronts of one (model, recipe) over the worst value on its devices."""

    model: str
    mode: str
    recipe: str | None = None
    devices: list[str] = Field(default_factory=list)
    fronts: list[list[str]] = Field(default_factory=list)
    selected: str | None = None
    candidates: list[CrossDeviceCandidate] = Field(default_factory=list)
    excluded: list[Excluded] = Field(default_factory=list)


class NotOnFront(_Strict):
    candidate: str
    device: str
    reason: str | None = None


class Summary(_Strict):
    """The paper's Tables I/II for one (model, recipe, device)."""

    model: str
    mode: str
    recipe: str | None = None
    device: str
    selected: str | None = None
    selected_k: int | None = None
    selected_label: str | None = None
    fq_candidate: str | None = None
    accuracy_loss: float | None = None
    fq_accuracy_loss: float | None = None
    accuracy_loss_decrease_pct: float | None = None
    size_bytes: int | None = None
    fq_size_bytes: int | None = None
    original_size_bytes: int | None = None
    size_decrease_pct: float | None = None
    latency_ms: float | None = None
    fq_latency_ms: float | None = None
    original_latency_ms: float | None = None
    latency_decrease_pct: float | None = None
    accuracy: float | None = None
    fq_accuracy: float | None = None
    original_accuracy: float | None = None


class Ablation(_Strict):
    """One ablation row: a search on one (model, recipe, device), or its totals (model None)."""

    search: str
    model: str | None = None
    recipe: str | None = None
    mode: str | None = None
    device: str | None = None
    front: list[str] | None = None
    hypervolume: float | None = None
    hv_vs_sweep: float | None = None
    evaluations: int | None = None
    screenings: int | None = None
    builds: int | None = None
    seconds: float | None = None
    found_after_s: float | None = None
    front_done_after_s: float | None = None


# --------------------------------------------------------------------------- dataset, answer, recipe selection


class Dataset(_Strict):
    """The samples behind every number (the n of agreements and accuracies)."""

    eval_samples: int | None = Field(None, description="images in the evaluation sample: n of every full agreement")
    labelled_eval_samples: int | None = Field(None, description="of those, with a label: n of every accuracy")
    calibration_samples: int | None = None
    analysis_samples: int | None = None
    screen_samples: int | None = Field(None, description="n of the screening agreements")
    preprocess: dict[str, Any] = Field(default_factory=dict)
    preprocess_description: str | None = None


class Constraint(_Strict):
    max_loss: float | None = None
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None


class PickRuntime(_Open):
    ort_disabled_optimizers: list[str] = Field(default_factory=list)


class PickPart(_Strict):
    """One part of a cross-device pick whose recipe is split across devices: the file those devices run."""

    recipe: str | None = None
    devices: list[str] = Field(default_factory=list)
    candidate: str | None = None
    label: str | None = None
    k: int | None = None
    file: str | None = Field(None, description="relative to the out dir")
    sha256: str | None = None
    size_bytes: int | None = None
    accuracy_loss: float | None = None
    float_layers: list[str] = Field(default_factory=list)
    levels: dict[str, str] = Field(default_factory=dict, description="layers at fp16 or int4, by name")
    export_command: str | None = None


class Pick(_Strict):
    """What to ship on one device (``scope`` device) or on all of a model's devices (cross-device)."""

    scope: Literal["device", "cross-device"]
    model: str
    device: str | None = None
    devices: list[str] = Field(default_factory=list)
    met: bool = False
    candidate: str | None = None
    recipe: str | None = None
    label: str | None = None
    k: int | None = None
    file: str | None = Field(None, description="relative to the out dir")
    sha256: str | None = None
    size_bytes: int | None = None
    fp32_size_bytes: int | None = None
    fq_size_bytes: int | None = None
    agreement: float | None = None
    accuracy_loss: float | None = None
    n: int | None = None
    loss_ci95: tuple[float, float] | None = Field(None, description="Wilson 95 % interval of the loss for n samples")
    accuracy: float | None = None
    accuracy_n: int | None = None
    fp32_accuracy: float | None = None
    latency_ms: float | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    fp32_latency_ms: float | None = None
    fp32_latency_p10_ms: float | None = None
    fp32_latency_p90_ms: float | None = None
    float_layers: list[str] = Field(default_factory=list)
    levels: dict[str, str] = Field(
        default_factory=dict, description="layers at another precision than fp32 (float) or int8 (fp16, int4), by name"
    )
    runtime: PickRuntime = Field(default_factory=PickRuntime)
    runtime_note: str | None = None
    export_command: str | None = None
    parts: list[PickPart] = Field(default_factory=list, description="a recipe split across the devices: one file each")
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None


class Answer(_Strict):
    constraint: Constraint = Field(default_factory=Constraint)
    rule: str | None = None
    picks: list[Pick] = Field(default_factory=list)


class RecipeDevicePoint(_Strict):
    device: str
    accuracy_loss: float | None = None
    size_bytes: int | None = None
    n: int | None = Field(None, description="evaluation samples behind accuracy_loss")
    candidate: str | None = Field(
        None,
        description="the fully quantized candidate measured on this device "
        "(a variant recipe's where feasibility planning chose one)",
    )
    error: str | None = Field(None, description="why this device has no point (its evaluation failed)")


class RecipeChoice(_Strict):
    recipe: str
    status: Literal["searched", "stopped", "pending"]
    reason: str | None = None
    fq_candidate: str | None = None
    devices: list[RecipeDevicePoint] = Field(default_factory=list)


class RecipeSelection(_Strict):
    model: str
    rule: str | None = None
    recipes: list[RecipeChoice] = Field(default_factory=list)


# --------------------------------------------------------------------------- the report


class Report(_Strict):
    """report.json."""

    model_config = ConfigDict(extra="forbid", title="tuneqn report.json")

    schema_version: str = Field(SCHEMA_VERSION, description="MAJOR.MINOR; see tuneqn.controller.report.schema")
    tuneqn_version: str
    generated_at: str
    partial: bool
    study: StudyInfo
    objectives: list[ObjectiveInfo]
    devices: list[Device] = Field(default_factory=list)
    models: list[ModelInfo] = Field(default_factory=list)
    dataset: Dataset | None = None
    answer: Answer | None = None
    recipe_selection: list[RecipeSelection] = Field(default_factory=list)
    skipped_inputs: list[SkippedInput] = Field(default_factory=list)
    layers: list[Layer] = Field(default_factory=list)
    rankings: list[Ranking] = Field(default_factory=list)
    searches: list[Search] = Field(default_factory=list)
    baselines: list[Baseline] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    feasibility: list[Feasibility] = Field(default_factory=list)
    infeasible_by_device: list[InfeasibleOnDevice] = Field(default_factory=list)
    fronts: list[Fronts] = Field(default_factory=list)
    cross_device: list[CrossDevice] = Field(default_factory=list)
    recipe_fronts: list[RecipeFronts] = Field(default_factory=list)
    infeasible: list[NotOnFront] = Field(default_factory=list)
    summary: list[Summary] = Field(default_factory=list)
    ablation: list[Ablation] = Field(default_factory=list)

    _by_id: dict[str, Candidate] | None = PrivateAttr(None)

    def candidate(self, cid: str | None) -> Candidate | None:
        """The candidate with id ``cid`` (None if unknown)."""
        if self._by_id is None:
            self._by_id = {c.id: c for c in self.candidates}
        return None if cid is None else self._by_id.get(cid)

    def warnings(self) -> list[tuple[str, str]]:
        """(model, warning text) of every model note that is a warning."""
        return [(m.name, w) for m in self.models for w in m.warnings]


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of report.json (``docs/report.schema.json``)."""
    schema = Report.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = f"tuneqn report.json schema {SCHEMA_VERSION}; generated by `make schema`, do not edit"
    return schema


def json_schema_text() -> str:
    """:func:`json_schema` as the text of ``docs/report.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def main() -> None:
    """Print the JSON Schema (``make schema`` writes it to ``docs/report.schema.json``)."""
    print(json_schema_text(), end="")

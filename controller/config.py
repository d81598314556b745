"""Study configuration: one TOML file per study, validated with pydantic.

Every relative path in the file is resolved against the file's folder. Validation
errors become a single line naming the key path, e.g.
``models[1].input_shape: expected list of int``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import read_user_file
from tuneqn.controller.objectives import OBJECTIVES, objective

Mode = Literal["static", "dynamic"]
QuantTypeName = Literal["int8", "uint8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of the study: a local file or an ONNX Model Hub name."""

    name: str | None = None
    path: Path | None = None
    hub: str | None = None
    opset: Annotated[int, Field(ge=7)] | None = None
    input_shape: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self

    @property
    def display_name(self) -> str:
        """Name used in the store, reports and `tuneqn export --model`."""
        if self.name:
            return self.name
        if self.path is not None:
            return self.path.stem
        return str(self.hub)


class LabelsSpec(_Strict):
    """Where ground-truth labels come from (at most one source)."""

    csv: Path | None = None
    subfolders: bool = False
    regex: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LabelsSpec:
        given = sum([self.csv is not None, self.subfolders, self.regex is not None])
        if given > 1:
            raise ValueError("give at most one of 'csv', 'subfolders', 'regex'")
        return self

    @property
    def any(self) -> bool:
        """True when a label source is configured."""
        return self.csv is not None or self.subfolders or self.regex is not None


PresetName = Literal["imagenet", "inception", "lite", "raw", "unit"]

#: Image preprocessing presets (``[dataset.preprocess] preset``, ``--preprocess``): the values each sets
#: unless the study gives the key itself. ``crop_fraction = 0.875``: the short side is resized to
#: crop / 0.875 (256 for 224) and the centre crop is the model's H×W. Normalization is
#: ``((x · scale + offset) − mean) / std`` on 0–255 pixel values.
PREPROCESS_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"crop_fraction": 0.875, "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "inception": {"crop_fraction": 0.875, "scale": 1 / 127.5, "offset": -1.0},
    # EfficientNet-Lite's reference preprocessing resizes bicubic (bilinear changes 3 % of Lite0's top-1).
    "lite": {"crop_fraction": 0.875, "interpolation": "bicubic", "scale": 1 / 128, "offset": -127 / 128},
    "raw": {"crop_fraction": 0.875, "scale": 1.0},
    "unit": {"scale": 1 / 255},  # what a study without preset (and the quick form) always did
}
#: The keys a preset sets (an explicit key overrides the preset's value).
PRESET_KEYS = ("crop_fraction", "interpolation", "scale", "offset", "mean", "std")
#: Resampling when neither the study nor its preset names one.
DEFAULT_INTERPOLATION = "bilinear"


class PreprocessSpec(_Strict):
    """Image preprocessing: RGB/BGR pixels 0–255 → resize/crop → ``((x · scale + offset) − mean) / std``.

    ``preset`` fills the keys of :data:`PREPROCESS_PRESETS` that are not given. Geometry: ``crop_fraction``
    resizes the short side to crop / fraction and centre-crops (``crop``, else the model's H×W);
    otherwise ``resize`` (short side) and ``crop`` as given; without either the image is resized to the
    model's H×W. Without ``scale``: 1/255, or 1 (pixel units) when mean/std are given.
    """

    preset: PresetName | None = None
    resize: Annotated[int, Field(ge=1)] | None = None
    crop: Annotated[int, Field(ge=1)] | None = None
    crop_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    #: None: the preset's, else :data:`DEFAULT_INTERPOLATION`.
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    scale: float | None = None
    offset: float | None = None
    color: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and len(v) not in (1, 3):
            raise ValueError(f"needs 1 or 3 values (one per colour channel), got {len(v)}")
        return v

    @field_validator("std")
    @classmethod
    def _no_zero_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s == 0 for s in v):
            raise ValueError("must not contain 0")
        return v

    @field_validator("scale")
    @classmethod
    def _no_zero_scale(cls, v: float | None) -> float | None:
        if v is not None and v == 0:
            raise ValueError("must not be 0 (every pixel would become the same value)")
        return v

    @model_validator(mode="after")
    def _norm(self) -> PreprocessSpec:
        r = self.resolved()
        if (r.mean is None) != (r.std is None):
            raise ValueError("give both 'mean' and 'std' or neither")
        if r.resize is not None and r.crop is not None and r.crop > r.resize:
            raise ValueError(f"'crop' ({r.crop}) is larger than 'resize' ({r.resize})")
        return self

    def resolved(self) -> PreprocessSpec:
        """This spec with the preset's values filled in where no key was given (``preset`` kept), and the
        default interpolation where neither gives one."""
        fill = (
            {}
            if self.preset is None
            else {k: v for k, v in PREPROCESS_PRESETS[self.preset].items() if getattr(self, k) is None}
        )
        if self.interpolation is None:
            fill.setdefault("interpolation", DEFAULT_INTERPOLATION)
        return self.model_copy(update=fill) if fill else self


class DatasetSpec(_Strict):
    """Evaluation data: an image folder or a .npy/.npz tensor file."""

    images: Path | None = None
    tensors: Path | None = None
    labels: LabelsSpec = LabelsSpec()
    preprocess: PreprocessSpec = PreprocessSpec()
    eval: Annotated[int, Field(ge=1)] = 300
    calibration: Annotated[int, Field(ge=1)] = 50
    analysis: Annotated[int, Field(ge=1)] = 16
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.images is None) == (self.tensors is None):
            raise ValueError("give exactly one of 'images' or 'tensors'")
        return self


#: Recipe names anyone can use with ``--recipe`` without defining them: each starts from the
#: study's ``[quantization]`` settings and overrides these.
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    "static": {"mode": "static"},
    "dynamic": {"mode": "dynamic"},
    "per-tensor": {"mode": "static", "per_channel": False},
    "per-channel": {"mode": "static", "per_channel": True},
    "per-channel-symmetric": {
        "mode": "static",
        "per_channel": True,
        "activation_type": "int8",
        "activation_symmetric": True,
    },
    "per-channel-percentile": {"mode": "static", "per_channel": True, "calibration_method": "percentile"},
    "per-channel-entropy": {"mode": "static", "per_channel": True, "calibration_method": "entropy"},
    "per-tensor-percentile": {"mode": "static", "per_channel": False, "calibration_method": "percentile"},
    "per-tensor-entropy": {"mode": "static", "per_channel": False, "calibration_method": "entropy"},
}

#: The recipes ``recipes = "auto"`` (the default when no recipe is given) tries on every model: static
#: per-tensor and per-channel weights (symmetric), min/max and percentile activation ranges. Left out,
#: by measurement on EfficientNet-Lite0 (see docs/ARCHITECTURE.md): ``*-entropy`` (ONNX Runtime's entropy
#: calibrator with its default 128 histogram bins has one candidate threshold, the min/max range: the
#: same model as min/max at 4x its calibration time) and ``per-channel-symmetric`` (symmetric int8
#: activations: 17 % loss where per-channel has 6 %).
AUTO_RECIPES: tuple[str, ...] = ("per-tensor", "per-channel", "per-tensor-percentile", "per-channel-percentile")
#: Added to :data:`AUTO_RECIPES` for a model whose quantizable layers are MatMul/Gemm-heavy
#: (see :func:`tuneqn.controller.quantize.auto.auto_recipes`).
AUTO_DYNAMIC = "dynamic"
AUTO = "auto"

_RECIPE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class QuantizerKeys(_Strict):
    """The settings of ONNX Runtime's quantizer a recipe decides besides its mode: written once here, they are
    the ``[quantization]`` section's defaults, a recipe's overrides and a resolved recipe's values."""

    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = False
    reduce_range: bool = False
    activation_type: QuantTypeName = "uint8"
    weight_type: QuantTypeName = "int8"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    #: Symmetric activation ranges (ORT ``ActivationSymmetric``); weights are symmetric by default.
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    #: The op types to quantize (None: the quantizer's defaults for the mode).
    op_types: tuple[str, ...] | None = None


class QuantizerSettings(QuantizerKeys):
    """Every setting of ONNX Runtime's quantizer that a recipe decides (its name and exclusions aside)."""

    mode: Mode = "static"


class RecipeSpec(QuantizerSettings):
    """A named quantization recipe (``[[quantization.recipes]]``): the ``[quantization]`` settings with the
    ones it gives overridden. Only the given settings count (and are written back): the others, and a None,
    mean the section's value."""

    name: Annotated[str, Field(pattern=_RECIPE_NAME)]
    #: Op types left in float (taken out of ``op_types``, or of the quantizer's defaults).
    exclude_op_types: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _none_is_not_given(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set or k == "name"}

    def overrides(self) -> dict[str, Any]:
        """The settings this recipe gives (its name aside)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k != "name"}


class Recipe(RecipeSpec):
    """A resolved recipe: every quantizer setting of one search dimension value (variant names included)."""

    name: str


#: Suffix of a variant recipe that switches a QOperator recipe to QDQ (``<recipe>.qdq``).
VARIANT_QDQ = "qdq"
#: Prefix of the suffix of a variant recipe that leaves op types in float (``<recipe>.float-Conv-Gemm``).
VARIANT_FLOAT = "float-"


def variant_name(base: str, *, qdq: bool = False, float_ops: tuple[str, ...] | list[str] = ()) -> str:
    """The name of a variant of recipe ``base``: ``<base>.qdq`` or ``<base>.float-<Op>-<Op>`` (sorted)."""
    if qdq:
        return f"{base}.{VARIANT_QDQ}"
    if not float_ops:
        raise ValueError("a variant changes the format or leaves op types in float")
    return f"{base}.{VARIANT_FLOAT}{'-'.join(sorted(set(float_ops)))}"


class QuantizationSpec(QuantizerKeys):
    """How candidates are quantized (ONNX Runtime quantizer settings).

    The study's recipes are ``recipes`` when it is a list, else one per entry of ``modes`` (named
    after the mode) with this section's settings, else — ``recipes = "auto"``, the default when
    neither is given — :data:`AUTO_RECIPES` (plus ``dynamic`` for MatMul/Gemm-heavy models), which
    the recipe gate narrows per model (``controller/search/gate.py``). A recipe overrides any setting.
    """

    modes: list[Mode] | None = None
    #: Pre-process every model as ONNX Runtime advises before analysis and quantization (shape
    #: inference, constant folding, Pad fused into Conv, …); layer names stay the original ones.
    preprocess: bool = True
    #: Named recipes (a search dimension): each gets its own calibration, ranking and candidates;
    #: ``"auto"``: chosen per model by the recipe gate (the default without ``recipes`` and ``modes``).
    recipes: list[RecipeSpec] | Literal["auto"] = []

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one mode")
        if len(set(v)) != len(v):
            raise ValueError("modes must not repeat")
        return v

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, v: list[RecipeSpec] | str) -> list[RecipeSpec] | str:
        if isinstance(v, str):
            return v
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"recipe names must be unique (repeated: {', '.join(dup)})")
        return v

    @property
    def auto(self) -> bool:
        """Whether the recipes are chosen automatically: ``recipes = "auto"``, or neither recipes nor modes given."""
        return self.recipes == AUTO or (not self.recipes and self.modes is None)

    @property
    def recipe_specs(self) -> list[RecipeSpec]:
        """The ``[[quantization.recipes]]`` tables (none with ``recipes = "auto"``)."""
        return [] if isinstance(self.recipes, str) else list(self.recipes)

    def recipe_names(self) -> list[str]:
        """Names of the study's recipes, in order (with auto: every recipe auto may choose, ``dynamic`` last;
        :meth:`tuneqn.controller.study.Study.recipes` gives a model's)."""
        if self.recipe_specs:
            return [r.name for r in self.recipe_specs]
        if self.auto:
            return [*AUTO_RECIPES, AUTO_DYNAMIC]
        return list(self.modes or [])

    def resolve(self, name: str) -> Recipe:
        """The recipe called ``name``: a study recipe, a mode of ``modes``, a preset, or a variant of one of
        them (``<recipe>.qdq``, ``<recipe>.float-Conv``; see :func:`variant_name`) (ValueError if none)."""
        spec = next((r for r in self.recipe_specs if r.name == name), None)
        if spec is not None:
            over = spec.overrides()
        elif name in RECIPE_PRESETS:
            over = dict(RECIPE_PRESETS[name])
        elif "." in name:
            return self._resolve_variant(name)
        else:
            known = sorted({*self.recipe_names(), *RECIPE_PRESETS})
            raise ValueError(f"unknown recipe {name!r} (known: {', '.join(known)})")
        values = {**{k: getattr(self, k) for k in QuantizerKeys.model_fields}, "mode": "static", **over}
        values["op_types"] = values["op_types"] or None
        values["exclude_op_types"] = tuple(sorted(set(values.get("exclude_op_types") or ())))
        return Recipe(name=name, **values)

    def _resolve_variant(self, name: str) -> Recipe:
        """A variant recipe planned for a device (``<base>.qdq`` or ``<base>.float-<Op>-…``)."""
        base_name, _, suffix = name.rpartition(".")
        base = self.resolve(base_name)
        if suffix == VARIANT_QDQ:
            if base.mode != "static":
                raise ValueError(f"recipe {name!r}: {base_name!r} is {base.mode}, only static recipes have a QDQ form")
            return base.model_copy(update={"name": name, "format": "qdq"})
        if suffix.startswith(VARIANT_FLOAT) and len(suffix) > len(VARIANT_FLOAT):
            ops = suffix[len(VARIANT_FLOAT) :].split("-")
            if not all(op and op.replace("_", "").isalnum() for op in ops):
                raise ValueError(f"recipe {name!r}: bad op type list {suffix[len(VARIANT_FLOAT) :]!r}")
            return base.model_copy(
                update={"name": name, "exclude_op_types": tuple(sorted({*base.exclude_op_types, *ops}))}
            )
        known = sorted({*self.recipe_names(), *RECIPE_PRESETS})
        raise ValueError(
            f"unknown recipe {name!r} (known: {', '.join(known)}; variants end in "
            f"'.{VARIANT_QDQ}' or '.{VARIANT_FLOAT}<OpType>')"
        )

    def with_recipes(self, names: list[str]) -> QuantizationSpec:
        """This section restricted to (or extended by presets to) the recipes ``names`` (``--recipe``)."""
        # ValueError naming the known recipes; every setting given, so each reads the same in the stored config
        chosen = [RecipeSpec(**self.resolve(name).model_dump()) for name in names]
        return self.model_copy(update={"recipes": chosen})


LevelName = Literal["fp32", "fp16", "a16", "int8", "int4"]


class ExclusionSet(_Strict):
    """An explicit candidate: exactly these layers stay in float (and the layers of ``levels`` take that
    precision: ``fp16`` float with its weight stored as float16, ``a16`` its input at 16 bits, ``int4`` 4-bit
    weights; static QDQ recipes)."""

    name: str
    layers: list[str] = []
    levels: dict[str, LevelName] = {}


Ranking = Literal["paper", "qdq", "xmodel", "measured"]
StrategyName = Literal["sweep", "decremental", "greedy", "budget", "target"]


#: The precision levels the default search gives layers (see ``SearchRun.levels``).
SearchLevel = Literal["fp32", "int8", "int4"]
DEFAULT_SEARCH_LEVELS: tuple[SearchLevel, ...] = ("fp32", "int8", "int4")


class SearchRun(_Strict):
    """One search over the study's recipes: a layer ranking and a strategy (and their parameters)."""

    ranking: Ranking = "measured"
    #: The default: the best front per unit of work in ``bench/search.py`` (see docs/reference.md, Search).
    strategy: StrategyName = "budget"
    #: ``budget``: full evaluations per (model, recipe, device); None = 30% of the sweep's.
    budget: Annotated[int, Field(ge=1)] | None = None
    #: ``target``: the largest accuracy loss (1 − agreement with FP32) allowed on every device.
    max_loss: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    #: Only these of the study's recipes (and the variants planned from them for a device); None: every recipe.
    #: E.g. the paper's sweep beside the main search on the paper's recipe only.
    recipes: Annotated[list[str], Field(min_length=1)] | None = None
    #: ``budget``: the precision levels its candidates give layers (``controller/quantize/levels.py``): ``fp32``
    #: (left in float) and ``int8`` (the recipe's), plus ``int4`` weights where measurement shows they cost no
    #: agreement (static QDQ recipes); ``["fp32", "int8"]``: the paper's in-or-out candidates only.
    levels: list[SearchLevel] = list(DEFAULT_SEARCH_LEVELS)

    @model_validator(mode="after")
    def _params(self) -> SearchRun:
        if self.strategy == "target" and self.max_loss is None:
            raise ValueError("strategy 'target' needs 'max_loss' (e.g. 0.01)")
        if not {"fp32", "int8"} <= set(self.levels) or len(set(self.levels)) != len(self.levels):
            raise ValueError("'levels' lists fp32 and int8 (a layer left in float or quantized), each once")
        return self

    @property
    def name(self) -> str:
        """``greedy/measured``, ``budget30/measured``, ``target1%/measured``, ``sweep/paper``; a search of some
        recipes only names them: ``sweep/paper[per-tensor]``."""
        strategy: str = "sweep" if self.strategy == "decremental" else self.strategy
        if self.strategy == "budget" and self.budget is not None:
            strategy += str(self.budget)
        if self.strategy == "target" and self.max_loss is not None:
            strategy += f"{self.max_loss * 100:g}%"
        only = f"[{','.join(self.recipes)}]" if self.recipes else ""
        levels = "" if self.strategy != "budget" or set(self.levels) == set(DEFAULT_SEARCH_LEVELS) else "{binary}"
        return f"{strategy}/{self.ranking}{only}{levels}"

    @property
    def int4(self) -> bool:
        """Whether the search may give layers int4 weights (``budget`` with ``int4`` in ``levels``)."""
        return self.strategy == "budget" and "int4" in self.levels


class SearchSpec(SearchRun):
    """Which candidates are evaluated: the main search, searches to compare it with, and their settings."""

    step: Annotated[int, Field(ge=1)] = 1
    max_k: Annotated[int, Field(ge=0)] | None = None
    layer_op_types: list[str] = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    xmodel_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    exclusion_sets: list[ExclusionSet] = []
    #: Samples of the evaluation sample used for screening (the measured ranking and the cheap
    #: first look at a candidate): per recipe, where its fully quantized model disagrees with
    #: FP32, then where it is least sure (see ``Study.screen_split``).
    screen_samples: Annotated[int, Field(ge=1)] = 32
    #: ``greedy``: re-measure the remaining layers' gains on the current set every this many steps.
    regain_every: Annotated[int, Field(ge=1)] = 4
    #: More searches over the same recipes, shown beside the main one (ranking ablation).
    compare: list[SearchRun] = []

    def runs(self) -> list[SearchRun]:
        """The main search, then the compared ones (without repeats)."""
        out: list[SearchRun] = []
        main = SearchRun(**{name: getattr(self, name) for name in SearchRun.model_fields})
        for run in [main, *self.compare]:
            if run.name not in {r.name for r in out}:
                out.append(run)
        return out


#: The answer's default accuracy-loss limit when neither ``[answer]`` nor ``[search]`` sets one (1 %).
DEFAULT_MAX_LOSS = 0.01


class AnswerSpec(_Strict):
    """The constraint of the report's answer (the file to ship per device): the smallest file whose
    accuracy loss is at most ``max_loss`` and whose size and latency stay under the optional caps."""

    #: Largest accuracy loss (1 − top-1 agreement with FP32 on the device); None: ``[search] max_loss``
    #: when set, else :data:`DEFAULT_MAX_LOSS`.
    max_loss: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    #: Largest file size in MB (10**6 bytes); None: no cap.
    max_size_mb: Annotated[float, Field(gt=0.0)] | None = None
    #: Largest median latency in ms on the device; None: no cap.
    max_latency_ms: Annotated[float, Field(gt=0.0)] | None = None


class ObjectiveSpec(_Strict):
    """One objective of the Pareto analysis (a name of :data:`OBJECTIVES`), with optional feasibility bounds."""

    name: str
    direction: Literal["min", "max"] | None = None
    max: float | None = None
    min: float | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        objective(value)  # ValueError naming the known objectives
        return value

    @property
    def resolved_direction(self) -> str:
        """The given direction, or the objective's natural one."""
        return self.direction or OBJECTIVES[self.name].direction


class AgentSpec(_Strict):
    """An agent the controller dispatches to."""

    address: str
    #: A label for messages and ``tuneqn agents`` (default: the address).
    name: str | None = None
    #: The device class this agent serves, when known in advance: its jobs are planned from the
    #: start and end as ``unreachable`` if no agent of the class answers within ``device_wait_s``.
    device_class: str | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


class EvaluationSpec(_Strict):
    """How agents evaluate candidates."""

    top_k: Annotated[int, Field(ge=1)] = 5
    chunk_size: Annotated[int, Field(ge=1)] = 32
    latency_warmup: Annotated[int, Field(ge=0)] = 3
    latency_repeats: Annotated[int, Field(ge=0)] = 20  # 0 = no latency measurement
    intra_op_threads: Annotated[int, Field(ge=0)] = 0  # 0 = the runtime's default
    #: Safety net for a job whose controller-side watcher died: renewed by every event of the job
    #: (the agent sends a heartbeat every ``heartbeat_s``), so it only runs out when nothing is heard.
    lease_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    heartbeat_s: Annotated[float, Field(gt=0)] = 2.0
    #: An agent that sends nothing (not even a heartbeat or a keepalive answer) this long is unreachable.
    silent_after_s: Annotated[float, Field(gt=0)] = 15.0
    #: Jobs of an unreachable agent run elsewhere after this grace (taken back if it returns first).
    unreachable_grace_s: Annotated[float, Field(ge=0)] = 20.0
    #: A device class with no live agent this long ends its jobs as ``unreachable``.
    device_wait_s: Annotated[float, Field(gt=0)] = 600.0
    #: An agent that has not answered once since the study started is given up after this long (a wrong
    #: address should not cost ``device_wait_s``); a class it declared then ends its jobs as ``unreachable``.
    agent_connect_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    #: Measure only on these device classes (empty = every class the agents serve): one lab file, many studies.
    device_classes: list[str] = []
    #: Devices that cannot run every op type (``Device.supported_ops``, e.g. a TVM agent): ``adapt`` plans on
    #: each device only recipes it can run (a QDQ or partly-float variant where needed); ``report``
    #: dispatches everything and reports what the device could not run as infeasible.
    feasibility: Literal["adapt", "report"] = "adapt"
    #: TVM agents: MetaSchedule trials per candidate (0 = untuned builds; latency is then marked untuned).
    tvm_tuning_trials: Annotated[int, Field(ge=0)] = 0
    #: TVM ``time_evaluator``: runs per timed repeat, its minimum duration and the pause between repeats.
    tvm_latency_number: Annotated[int, Field(ge=1)] = 1
    tvm_min_repeat_ms: Annotated[int, Field(ge=0)] = 0
    tvm_cooldown_ms: Annotated[int, Field(ge=0)] = 0


class StudyConfig(_Strict):
    """A whole study."""

    name: str | None = None
    out_dir: Path = Path("out")
    hub_cache_dir: Path | None = None
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    dataset: DatasetSpec
    quantization: QuantizationSpec = QuantizationSpec()
    search: SearchSpec = SearchSpec()
    objectives: list[ObjectiveSpec] = [ObjectiveSpec(name="accuracy_loss"), ObjectiveSpec(name="size")]
    agents: list[AgentSpec] = []
    evaluation: EvaluationSpec = EvaluationSpec()
    answer: AnswerSpec = AnswerSpec()

    def answer_max_loss(self) -> float:
        """The answer's accuracy-loss limit: ``[answer] max_loss``, else ``[search] max_loss``, else 1 %."""
        for value in (self.answer.max_loss, self.search.max_loss):
            if value is not None:
                return float(value)
        return DEFAULT_MAX_LOSS

    @model_validator(mode="after")
    def _unique_names(self) -> StudyConfig:
        names = [m.display_name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique (repeated: {', '.join(dup)}); set 'name'")
        objs = [o.name for o in self.objectives]
        if not objs or len(set(objs)) != len(objs):
            raise ValueError("objectives must be a non-empty list without repeats")
        # a recipe name that is no recipe at all (a typo); a preset the study does not run leaves the search idle
        known = list(dict.fromkeys([*self.quantization.recipe_names(), *RECIPE_PRESETS]))
        for run in self.search.runs():
            unknown = [r for r in run.recipes or [] if r not in known]
            if unknown:
                raise ValueError(
                    f"search {run.name}: unknown recipe {unknown[0]!r} in 'recipes' (known: {', '.join(known)})"
                )
        return self


# --------------------------------------------------------------------------- errors


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _schema_at(schema: dict[str, Any], loc: tuple[Any, ...]) -> dict[str, Any] | None:
    """Follow a pydantic error location through the JSON schema (best effort)."""
    defs = schema.get("$defs", {})

    def deref(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        if "anyOf" in node:
            options = [deref(o) for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) == 1:
                return options[0]
        return node

    node = deref(schema)
    for part in loc:
        if isinstance(part, int):
            if node.get("type") != "array":
                return None
            node = deref(node.get("items", {}))
        else:
            props = node.get("properties", {})
            if part not in props:
                return None
            node = deref(props[part])
    return node


def _describe(node: dict[str, Any]) -> str:
    t = node.get("type")
    if t == "array":
        return "list of " + _describe(node.get("items", {}))
    if t == "integer":
        return "int"
    if t == "number":
        return "float"
    if t == "string":
        if "enum" in node:
            return "one of " + ", ".join(repr(v) for v in node["enum"])
        return "string"
    if t == "boolean":
        return "bool"
    if t == "object" or "properties" in node:
        return "table"
    if "enum" in node:
        return "one of " + ", ".join(repr(v) for v in node["enum"])
    return "a valid value"


_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "enum", "bool_", "int_from_float")


def format_validation_error(exc: ValidationError, schema: dict[str, Any]) -> str:
    """The first validation error as one line: ``key.path: what is wrong`` (an unknown key first: a
    misspelt key also makes the key it meant missing, and the misspelling is the one to name)."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        return f"{_loc_str(loc)}: unknown key"
    if etype == "missing":
        return f"{_loc_str(loc)}: missing required key"
    if any(t in etype for t in _TYPE_ERRORS):
        # Report a bad list element as a bad list: `input_shape: expected list of int`.
        trimmed = loc
        while trimmed and isinstance(trimmed[-1], int):
            trimmed = trimmed[:-1]
        node = _schema_at(schema, trimmed)
        if node is not None:
            return f"{_loc_str(trimmed)}: expected {_describe(node)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{_loc_str(loc)}: {msg}"


# --------------------------------------------------------------------------- loading


def _under(base: Path, p: Path | None) -> Path | None:
    """``p`` with ``~`` expanded, resolved against ``base`` when relative (None stays None)."""
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def resolve_agent_paths(agents: list[AgentSpec], base: Path) -> list[AgentSpec]:
    """``[[agents]]`` with their token and TLS file paths resolved against ``base`` (a study's or lab file's folder)."""
    return [
        a.model_copy(
            update={key: _under(base, getattr(a, key)) for key in ("token_file", "tls_ca", "tls_cert", "tls_key")}
        )
        for a in agents
    ]


def _resolve_paths(cfg: StudyConfig, base: Path) -> StudyConfig:
    def rel(p: Path | None) -> Path | None:
        return _under(base, p)

    models = [m.model_copy(update={"path": rel(m.path)}) for m in cfg.models]
    labels = cfg.dataset.labels.model_copy(update={"csv": rel(cfg.dataset.labels.csv)})
    dataset = cfg.dataset.model_copy(
        update={"images": rel(cfg.dataset.images), "tensors": rel(cfg.dataset.tensors), "labels": labels}
    )
    agents = resolve_agent_paths(cfg.agents, base)
    return cfg.model_copy(
        update={
            "out_dir": rel(cfg.out_dir),
            "hub_cache_dir": rel(cfg.hub_cache_dir),
            "models": models,
            "dataset": dataset,
            "agents": agents,
        }
    )


def parse_config(data: dict[str, Any], base_dir: Path) -> StudyConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, StudyConfig.model_json_schema())) from None
    return _resolve_paths(cfg, base_dir)


def load_config(path: Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    raw = read_user_file(path, "config file", "a study TOML file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    cfg = parse_config(data, path.resolve().parent)
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": path.stem})
    return cfg

"""Model orchestrator: load local files or ONNX Model Hub models and prepare them.

Preparation is deterministic: check the model, upgrade it to the opset the quantizer
needs, fix dynamic dims from the config, give every node a name, pre-process it as
ONNX Runtime advises before quantization (:func:`preprocess`; ``quantization.preprocess``,
on by default) and save it into the study's folder. Everything downstream (calibration,
analysis, candidates and the FP32 baseline) works on the prepared file.

The hub client follows the ONNX Model Hub protocol and cache layout of ``onnx.hub``
(removed from onnx >= 1.20): a manifest ``ONNX_HUB_MANIFEST.json`` and model files
under ``<cache>/<model_path with the sha prefix>``. Offline, only the cache is used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import shape_inference, version_converter
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxruntime.quantization.quant_utils import add_pre_process_metadata

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import atomic_write_bytes, file_sha256, read_user_file
from tuneqn.controller.config import ModelSpec

log = logging.getLogger(__name__)

#: The ONNX Runtime quantizer needs opset >= 13 for per-channel QDQ; older models are upgraded.
MIN_OPSET = 13
HUB_REPO = "onnx/models:main"
HUB_MANIFEST = "ONNX_HUB_MANIFEST.json"
#: ORT basic-level fusions pre-processing leaves out: MatMul+Add → Gemm would take MatMul layers
#: away from the dynamic quantizer (it quantizes MatMul and Conv, not Gemm) and change their op type.
PREPROCESS_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
#: Layers whose names rankings, exclusion sets and reports use; pre-processing keeps (or gets back) them.
_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class PreparedModel:
    """A model ready for quantization, as stored in the study."""

    name: str
    source: str
    path: Path
    sha256: str
    source_sha256: str
    size_bytes: int
    opset_original: int
    opset_used: int
    upgraded: bool
    input_name: str
    input_shape: list[int | str]
    notes: list[str] = field(default_factory=list)
    #: Whether the prepared file went through :func:`preprocess` (not a store column: it is in the notes).
    preprocessed: bool = False

    def to_row(self) -> dict[str, Any]:
        """Row for the study store."""
        row = asdict(self)
        del row["preprocessed"]
        row["path"] = str(self.path)
        row["input_shape"] = json.dumps(self.input_shape)
        row["notes"] = json.dumps(self.notes)
        return row


def default_hub_cache() -> Path:
    """The hub cache: $TUNEQN_HUB_CACHE, else $XDG_CACHE_HOME/tuneqn/hub (~/.cache/tuneqn/hub)."""
    env = os.environ.get("TUNEQN_HUB_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tuneqn" / "hub"


def _hub_base_url(repo: str) -> str:
    owner_name, _, ref = repo.partition(":")
    return f"https://raw.githubusercontent.com/{owner_name}/{ref or 'main'}/"


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` into a temporary file unique to this download, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, os.fdopen(fd, "wb") as f:  # noqa: S310 - https URL
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hub_manifest(cache: Path, repo: str = HUB_REPO) -> list[dict[str, Any]]:
    """The hub manifest, from the cache or (when online) downloaded into it."""
    path = cache / HUB_MANIFEST
    if not path.is_file():
        try:
            _download(_hub_base_url(repo) + HUB_MANIFEST, path)
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"ONNX Model Hub manifest not cached in {cache} and the hub is unreachable ({exc.__class__.__name__})"
            ) from None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt ONNX Model Hub manifest") from None


def hub_fetch(name: str, cache: Path, opset: int | None = None, repo: str = HUB_REPO) -> Path:
    """Path of a hub model in the cache, downloading it when online; sha256-verified."""
    items = [m for m in hub_manifest(cache, repo) if str(m.get("model", "")).lower() == name.lower()]
    if opset is not None:
        items = [m for m in items if m.get("opset_version") == opset]
    if not items:
        raise UserError(f"hub model '{name}'" + (f" (opset {opset})" if opset else "") + " is not in the hub manifest")
    item = max(items, key=lambda m: m.get("opset_version", 0))
    parts = str(item["model_path"]).split("/")
    sha = (item.get("metadata") or {}).get("model_sha")
    if sha:
        parts[-1] = f"{sha}_{parts[-1]}"
    local = cache.joinpath(*parts)
    if not local.is_file():
        try:
            _download(_hub_base_url(repo) + str(item["model_path"]), local)
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"hub model '{name}' is not cached in {cache} and the hub is unreachable ({exc.__class__.__name__})"
            ) from None
    if sha and file_sha256(local) != sha:
        raise UserError(f"hub model '{name}': cached file {local} does not match its sha256 {sha[:12]}…")
    return local


def load_bytes(path: Path, label: str) -> onnx.ModelProto:
    data = read_user_file(path, "model file", "an .onnx file", label)
    if not data:
        raise UserError(f"{label}: {path} is empty")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise UserError(f"{label}: {path} is not a valid ONNX model (corrupt, truncated or another format)") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{label}: {path} is not a valid ONNX model (no graph)")
    return model


def load_checked(path: Path, label: str) -> onnx.ModelProto:
    """The ONNX model in ``path``, readable and passing the ONNX checker (else a one-line :class:`UserError`)."""
    model = load_bytes(path, label)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise UserError(f"{label}: {path} fails the ONNX checker: {first}") from None
    return model


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _fix_input_dims(model: onnx.ModelProto, shape: list[int] | None, label: str, notes: list[str]) -> None:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{label}: expected one graph input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
    dims = inputs[0].type.tensor_type.shape.dim
    if shape is not None:
        if len(shape) != len(dims):
            raise UserError(f"{label}.input_shape: model input has rank {len(dims)}, got {len(shape)} dims")
        changed = False
        for d, want in zip(dims, shape, strict=True):
            if d.HasField("dim_value") and d.dim_value != want:
                raise UserError(f"{label}.input_shape: {list(shape)} contradicts the model's fixed input shape")
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = want
                changed = True
        if changed:
            notes.append(f"fixed dynamic input dims to {list(shape)}")
            del model.graph.value_info[:]
            for out in model.graph.output:
                for od in out.type.tensor_type.shape.dim:
                    if not od.HasField("dim_value"):
                        od.Clear()
    else:
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if any(i != 0 for i in dynamic):
            raise UserError(
                f"{label}: input '{inputs[0].name}' has dynamic dims at {dynamic}; set input_shape to fix them"
            )


def _name_nodes(model: onnx.ModelProto, notes: list[str]) -> None:
    used = {n.name for n in model.graph.node if n.name}
    unnamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            unnamed += 1
    if unnamed:
        notes.append(f"named {unnamed} unnamed nodes as <op_type>_<index>")


def restore_layer_names(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    """Give layers the optimizer renamed their original names back; the number renamed.

    A Conv/ConvTranspose/Gemm/MatMul of ``after`` whose name is not an original layer's
    gets the name of the original layer that wrote the same output tensor, else of the
    original layer its name extends (``conv1/SomeFusion`` → ``conv1``), when that name is free.
    """
    orig = [n for n in before.graph.node if n.op_type in _LAYER_OPS]
    by_output = {n.output[0]: n.name for n in orig if n.output}
    orig_names = {n.name for n in orig}
    used = {n.name for n in after.graph.node}
    renamed = 0
    for node in after.graph.node:
        if node.op_type not in _LAYER_OPS or node.name in orig_names:
            continue
        want = by_output.get(node.output[0]) if node.output else None
        if want is None:
            prefixes = [o for o in orig_names if node.name.startswith(o + "/") or node.name.startswith(o + "_")]
            want = max(prefixes, key=len) if prefixes else None
        if want is not None and want not in used:
            used.discard(node.name)
            node.name = want
            used.add(want)
            renamed += 1
    return renamed


def preprocess(model: onnx.ModelProto, label: str = "model") -> tuple[onnx.ModelProto, str]:
    """Pre-process a model for quantization as ONNX Runtime advises; (model, note saying what changed).

    The steps of ``onnxruntime.quantization.shape_inference.quant_pre_process`` with
    ``skip_symbolic_shape=True`` (symbolic shape inference is for transformer-style symbolic
    dims; ONNX shape inference runs after optimization as there): ORT's basic graph
    optimizations (constant folding, redundant-node elimination, Pad/BatchNorm/Mul/Add fused
    into Conv, …) without :data:`PREPROCESS_DISABLED_OPTIMIZERS`, then ONNX shape inference,
    and ORT's pre-process tag (so the quantizer no longer advises pre-processing). Layer
    (Conv/ConvTranspose/Gemm/MatMul) names stay the original ones (:func:`restore_layer_names`).
    The result is numerically the float model (up to float rounding of folded constants).
    """
    before_bytes = model.ByteSize()
    with tempfile.TemporaryDirectory(prefix="tuneqn-pre-") as tmp:
        src, opt = Path(tmp) / "in.onnx", Path(tmp) / "optimized.onnx"
        src.write_bytes(model.SerializeToString())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(opt)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(
                str(src),
                so,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(PREPROCESS_DISABLED_OPTIMIZERS),
            )
        except (
            ort_state.Fail,
            ort_state.InvalidGraph,
            ort_state.InvalidArgument,
            ort_state.NotImplemented,
            RuntimeError,
        ) as exc:
            first = (str(exc).strip().splitlines() or ["?"])[0]
            raise UserError(
                f"{label}: ONNX Runtime cannot pre-process the model ({first}); "
                "set quantization.preprocess = false to skip pre-processing"
            ) from None
        out = onnx.load(str(opt))
    try:
        out = shape_inference.infer_shapes(out, strict_mode=False)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise UserError(f"{label}: shape inference after pre-processing failed: {exc}") from None
    renamed = restore_layer_names(model, out)
    _name_nodes(out, [])
    add_pre_process_metadata(out)
    after_names = {n.name for n in out.graph.node}
    pads_fused = sum(1 for n in model.graph.node if n.op_type == "Pad" and n.name not in after_names)
    n0, n1 = len(model.graph.node), len(out.graph.node)
    other = n0 - n1 - pads_fused
    parts = [f"Pad fused into Conv: {pads_fused}"] if pads_fused else []
    parts.append(f"other nodes folded, fused or removed: {other}" if other >= 0 else f"nodes added: {-other}")
    if renamed:
        parts.append(f"{renamed} renamed layers given their original names back")
    note = (
        f"pre-processed (ONNX Runtime shape inference + basic optimizations): {n0} nodes → {n1} nodes "
        f"({'; '.join(parts)}), size {_mb(before_bytes)} → {_mb(out.ByteSize())}"
    )
    return out, note


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def prepare_model(
    spec: ModelSpec, work_dir: Path, hub_cache: Path | None = None, label: str = "model", preprocess_model: bool = True
) -> PreparedModel:
    """Load, check, upgrade, fix and (unless ``preprocess_model`` is false) pre-process a model;
    save it as ``work_dir/<name>.onnx``."""
    name = spec.display_name
    if spec.hub is not None:
        cache = hub_cache or default_hub_cache()
        src_path = hub_fetch(spec.hub, cache, opset=spec.opset)
        source = f"hub:{spec.hub}"
    else:
        src_path = Path(spec.path)  # type: ignore[arg-type]
        source = str(src_path)
    model = load_checked(src_path, label)
    notes: list[str] = []
    opset_original = _opset(model)
    # For hub models `opset` picks the hub variant; for files it is the opset to upgrade to.
    target = MIN_OPSET if spec.hub is not None else max(spec.opset or 0, MIN_OPSET)
    upgraded = False
    if opset_original < target:
        try:
            model = version_converter.convert_version(model, target)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{label}: cannot upgrade opset {opset_original} -> {target}: {exc}") from None
        upgraded = True
        notes.append(f"upgraded opset {opset_original} -> {target} with onnx.version_converter")
    _fix_input_dims(model, spec.input_shape, label, notes)
    _name_nodes(model, notes)
    try:
        model = shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise UserError(f"{label}: shape inference failed: {exc}") from None
    if preprocess_model:
        model, note = preprocess(model, label)
        notes.append(note)
    out = work_dir / f"{name}.onnx"
    data = model.SerializeToString()
    # Rewrite only when the bytes differ: a reader of the prepared model (another process quantizing
    # it) never sees it replaced, and a change is written to a unique temporary file and renamed.
    if not out.is_file() or out.read_bytes() != data:
        atomic_write_bytes(out, data)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    shape: list[int | str] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inp.type.tensor_type.shape.dim
    ]
    for n in notes:
        log.info("%s: %s", name, n)
    return PreparedModel(
        name=name,
        source=source,
        path=out,
        sha256=file_sha256(out),
        source_sha256=file_sha256(src_path),
        size_bytes=src_path.stat().st_size,
        opset_original=opset_original,
        opset_used=_opset(model),
        upgraded=upgraded,
        input_name=inp.name,
        input_shape=shape,
        notes=notes,
        preprocessed=preprocess_model,
    )

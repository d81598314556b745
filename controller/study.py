"""A study: the controller's pipeline before any device is involved.

prepare (models + data) → calibrate once per (model, data, settings) → fully quantize
→ analyze and rank layers → plan candidates → build candidates (calibration reused).
Everything is recorded in the study store and reused on re-runs unless ``fresh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from tuneqn import __version__
from tuneqn.controller.analysis import LayerError, analyze_dynamic, analyze_qoperator, analyze_static, rank_layers
from tuneqn.controller.config import StudyConfig
from tuneqn.controller.dataset import PreparedData, Split, prepare_data
from tuneqn.controller.errors import UserError
from tuneqn.controller.modelio import PreparedModel, prepare_model
from tuneqn.controller.quantize import QuantSettings, calibrate, file_digest, quantize_candidate, runtime_options
from tuneqn.controller.report.layer_plot import layer_errors_plot
from tuneqn.controller.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidatePlan:
    """A candidate to build: which layers of (model, mode) stay in float."""

    id: str
    model: str
    mode: str
    k: int | None
    kind: str  # "ranked" | "explicit"
    label: str
    excluded: tuple[str, ...]


def candidate_id(model: str, mode: str, k: int | None = None, label: str | None = None) -> str:
    """Stable candidate id: ``model:mode:k3`` or ``model:mode:set:NAME``."""
    return f"{model}:{mode}:k{k}" if k is not None else f"{model}:{mode}:set:{label}"


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    """The controller side of one study (one out dir, one store)."""

    def __init__(self, cfg: StudyConfig, fresh: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(self.out_dir)
        if fresh:
            self.store.reset()
        self.store.set_meta("config", cfg.model_dump_json())
        self.store.set_meta("name", cfg.name or "study")
        self.store.set_meta("tuneqn_version", __version__)
        self.models: dict[str, PreparedModel] = {}
        self.data: dict[str, PreparedData] = {}
        self._layers: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    # ------------------------------------------------------------------ prepare
    def prepare(self) -> None:
        """Load and prepare every model and its data samples."""
        for i, spec in enumerate(self.cfg.models):
            pm = prepare_model(spec, self.out_dir / "models", self.cfg.hub_cache_dir, label=f"models[{i}]")
            self.models[pm.name] = pm
            self.store.put_model(pm.to_row())
            data = prepare_data(self.cfg.dataset, pm.input_shape, self.out_dir / "data" / pm.name)
            self.data[pm.name] = data
            for split in (data.eval, data.calibration, data.analysis):
                self.store.put_dataset(f"{pm.name}/{split.name}", split.path, split.sha256, split.items, split.labels)
        self._check_exclusion_sets()

    def _check_exclusion_sets(self) -> None:
        for i, ex in enumerate(self.cfg.search.exclusion_sets):
            for pm in self.models.values():
                names = {n.name for n in onnx.load(str(pm.path), load_external_data=False).graph.node}
                unknown = [layer for layer in ex.layers if layer not in names]
                if unknown:
                    raise UserError(
                        f"search.exclusion_sets[{i}].layers: unknown layer '{unknown[0]}' in model '{pm.name}'"
                    )

    def modes(self) -> list[str]:
        """Quantization modes of the study."""
        return list(self.cfg.quantization.modes)

    def settings(self, mode: str) -> QuantSettings:
        """Quantizer settings for a mode."""
        return QuantSettings.from_spec(self.cfg.quantization, mode)

    # ------------------------------------------------------------------ calibration
    def calibration_cache(self, model: str, mode: str) -> Path | None:
        """ORT calibration cache of (model, calibration sample, settings); created once."""
        if mode != "static":
            return None
        pm, data = self.models[model], self.data[model]
        settings = self.settings(mode)
        key = _hash(pm.sha256, data.calibration.sha256, settings.key())
        path = self.out_dir / "calibration" / f"{model}-{key}.json"
        if not path.is_file():
            t0 = time.perf_counter()
            calibrate(pm.path, pm.input_name, pm.input_shape[0], data.calibration.load(), settings, path)
            log.info("%s: calibrated on %d samples in %.1fs", model, data.calibration.size, time.perf_counter() - t0)
            self.store.put_calibration(key, model, settings.__dict__, path)
        return path

    # ------------------------------------------------------------------ analysis
    def analysis_key(self, model: str, mode: str) -> str:
        """What the ranking of (model, mode) depends on."""
        pm, data = self.models[model], self.data[model]
        s = self.cfg.search
        return _hash(pm.sha256, data.calibration.sha256, data.analysis.sha256, self.settings(mode).key(),
                     s.layer_op_types, s.xmodel_weight, __version__)

    def analyze(self, model: str, mode: str) -> list[dict[str, Any]]:
        """Ranked layers of (model, mode): stored ones when still valid, else measured now."""
        key = self.analysis_key(model, mode)
        stored = self.store.analysis(model, mode)
        if stored is not None and stored["key"] == key:
            rows = self.store.layers(model, mode)
            if rows:
                self._layers[(model, mode)] = rows
                return rows
        pm = self.models[model]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tuneqn-fq-") as tmp:
            fq = Path(tmp) / "fq.onnx"
            settings = self.settings(mode)
            cache = self.calibration_cache(model, mode)
            quantize_candidate(pm.path, fq, settings, [], cache)
            analysis_data = self.data[model].analysis.load()
            op_types = self.cfg.search.layer_op_types
            if mode == "static" and settings.format == "qoperator":
                # qdq_err from the QDQ form (same settings and calibration cache → same scales),
                # xmodel_err from the real QOperator model (see analysis.analyze_qoperator).
                fq_qdq = Path(tmp) / "fq-qdq.onnx"
                quantize_candidate(pm.path, fq_qdq, replace(settings, format="qdq"), [], cache)
                errors = analyze_qoperator(pm.path, fq_qdq, fq, pm.input_name, analysis_data, op_types)
            elif mode == "static":
                errors = analyze_static(pm.path, fq, pm.input_name, analysis_data, op_types)
            else:
                errors = analyze_dynamic(pm.path, fq, pm.input_name, analysis_data, op_types, self.settings(mode))
            fq_sha, _ = file_digest(fq)
        if not errors:
            raise UserError(
                f"model '{model}': no quantized layer of types {', '.join(self.cfg.search.layer_op_types)} in {mode} mode"
            )
        ranked: list[LayerError] = rank_layers(errors, self.cfg.search.xmodel_weight)
        rows = [e.to_dict() for e in ranked]
        self.store.put_analysis(model, mode, key, fq_sha, time.perf_counter() - t0, rows)
        rows = self.store.layers(model, mode)
        self._layers[(model, mode)] = rows
        return rows

    def analyze_all(self) -> list[dict[str, Any]]:
        """Analyze every (model, mode); write layers.json and layer_errors.png."""
        rows: list[dict[str, Any]] = []
        for model in self.models:
            for mode in self.modes():
                rows.extend(self.analyze(model, mode))
        self.write_layer_outputs(rows)
        return rows

    def write_layer_outputs(self, rows: list[dict[str, Any]]) -> None:
        """``layers.json`` (rank order within each (model, mode)) and ``layer_errors.png``."""
        out = [
            {
                "model": r["model"], "mode": r["mode"], "name": r["name"], "op_type": r["op_type"],
                "index": r["idx"], "output": r["output"], "fused_activation": r["fused_activation"],
                "qdq_err": r["qdq_err"], "xmodel_err": r["xmodel_err"], "norm_qdq": r["norm_qdq"],
                "norm_xmodel": r["norm_xmodel"], "score": r["score"], "rank": r["rank"],
            }
            for r in rows
        ]
        tmp = self.out_dir / "layers.json.part"
        tmp.write_text(json.dumps(out, indent=1, allow_nan=True))
        os.replace(tmp, self.out_dir / "layers.json")
        layer_errors_plot(out, self.out_dir / "layer_errors.png")

    # ------------------------------------------------------------------ candidates
    def plan(self, model: str, mode: str) -> list[CandidatePlan]:
        """Candidates of (model, mode): k = 0, step, … ≤ max_k over the ranking, then explicit sets."""
        ranking = self._layers.get((model, mode)) or self.analyze(model, mode)
        names = [r["name"] for r in ranking]
        s = self.cfg.search
        top = len(names) if s.max_k is None else min(s.max_k, len(names))
        ks = list(range(0, top + 1, s.step))
        plans = [
            CandidatePlan(candidate_id(model, mode, k), model, mode, k, "ranked", f"k={k}", tuple(names[:k]))
            for k in ks
        ]
        for ex in s.exclusion_sets:
            plans.append(
                CandidatePlan(candidate_id(model, mode, label=ex.name), model, mode, None, "explicit", ex.name,
                              tuple(ex.layers))
            )
        return plans

    def all_plans(self) -> list[CandidatePlan]:
        """Every candidate of the study."""
        return [p for model in self.models for mode in self.modes() for p in self.plan(model, mode)]

    def candidate_path(self, plan: CandidatePlan) -> Path:
        """Where a candidate's file lives in the study."""
        stem = f"k{plan.k:03d}" if plan.k is not None else f"set-{plan.label}"
        return self.out_dir / "candidates" / plan.model / plan.mode / f"{stem}.onnx"

    def build(self, plan: CandidatePlan, out: Path | None = None) -> dict[str, Any]:
        """Build (or reuse) a candidate file and record it; returns its row."""
        settings = self.settings(plan.mode)
        stored = self.store.candidate(plan.id)
        path = out or self.candidate_path(plan)
        if (
            out is None and stored is not None and stored["settings_key"] == settings.key()
            and stored["excluded"] == list(plan.excluded) and path.is_file()
            and file_digest(path)[0] == stored["sha256"]
        ):
            return stored
        pm = self.models[plan.model]
        quantize_candidate(pm.path, path, settings, list(plan.excluded), self.calibration_cache(plan.model, plan.mode))
        sha, size = file_digest(path)
        runtime = runtime_options(onnx.load(str(path), load_external_data=False), list(plan.excluded))
        row = {
            "id": plan.id, "model": plan.model, "mode": plan.mode, "k": plan.k, "kind": plan.kind,
            "label": plan.label, "excluded": list(plan.excluded), "settings_key": settings.key(),
            "path": str(path), "size_bytes": size, "sha256": sha, "runtime": runtime,
        }
        if out is None:
            self.store.put_candidate(row)
        return row

    def find_plan(self, model: str, mode: str, k: int | None = None, label: str | None = None) -> CandidatePlan:
        """The plan of ``--candidate K`` (a number or an exclusion set's name)."""
        if model not in self.models:
            raise UserError(f"--model: unknown model '{model}' (known: {', '.join(self.models)})")
        if mode not in self.modes():
            raise UserError(f"--mode: mode '{mode}' is not part of this study ({', '.join(self.modes())})")
        for p in self.plan(model, mode):
            if (k is not None and p.k == k) or (label is not None and p.label == label):
                return p
        n = len(self.plan(model, mode))
        raise UserError(f"--candidate: no candidate {k if k is not None else label!r} for {model}/{mode} ({n} candidates)")

    def eval_split(self, model: str) -> Split:
        """The evaluation sample of a model."""
        return self.data[model].eval

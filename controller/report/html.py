"""One self-contained HTML page for a finalized report, rendered from a Jinja2 template.

``templates/report.html.j2`` holds the page; this module only prepares what it shows
(numbers formatted through the objectives table, cells, image data URIs). Autoescaping
is on, so every piece of text from the report is escaped by the template. Images are
embedded as base64 data URIs and the style is inline, so the file can be mailed or
archived alone: no scripts, no external URLs.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from tuneqn.controller.objectives import OBJECTIVES, Objective

from .finalize import HV_REFERENCE, SWEEP_SEARCH
from .plots import PLOT_KINDS, plot_key, recipe_plot_key
from .schema import Device, Pick, Report
from .write import report_dict, validate_report

logger = logging.getLogger(__name__)

LAYERS_TOP = 20
#: Screened-candidate tables longer than this start collapsed.
SCREENED_OPEN = 30
TEMPLATE = "report.html.j2"

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}
_PLOT_CAPTIONS = {
    "objectives": "Objectives per candidate k, each min-max normalized to 0-100 % over the candidates shown; "
    "vertical lines: top-3 Pareto fronts (paper Fig. 3).",
    "tradeoff": "Accuracy loss vs model size of every evaluated candidate (labels: k); fronts connected.",
}
_LOSS, _ACC = OBJECTIVES["accuracy_loss"], OBJECTIVES["accuracy"]
_SIZE, _LAT = OBJECTIVES["size"], OBJECTIVES["latency"]


@dataclass(frozen=True)
class Cell:
    """One table cell: plain text (escaped by the template), optionally wrapped in a styled span."""

    text: str
    left: bool = False
    sel: bool = False
    title: str | None = None
    span: str | None = None

    @property
    def cls(self) -> str:
        return " ".join(c for c in ("t" if self.left else "", "sel" if self.sel else "") if c)


def _missing(sel: bool = False) -> Cell:
    return Cell("–", sel=sel, span="muted")


def _num(value: Any, fmt: str = "{:.2f}", *, sel: bool = False) -> Cell:
    if value is None:
        return _missing(sel)
    try:
        return Cell(fmt.format(value), sel=sel)
    except (TypeError, ValueError):
        return Cell(str(value), sel=sel)


def _pct(fraction: Any) -> Cell:
    """A fraction (0.25) as a percentage (25.00)."""
    return _num(None if fraction is None else 100.0 * float(fraction))


def _obj(o: Objective, value: Any, *, sel: bool = False) -> Cell:
    """A value of objective ``o`` in its display unit (the unit is in the column heading)."""
    text = o.fmt(value, unit=False)
    return _missing(sel) if text == "–" else Cell(text, sel=sel)


#: How an untuned TVM latency is marked (its build had no tuning: it says little about the device).
UNTUNED = "untuned"


def _latency(r: dict[str, Any], value: Any, *, sel: bool = False) -> Cell:
    """A latency value, marked when it comes from an untuned TVM build."""
    cell = _obj(_LAT, value, sel=sel)
    if r.get("untuned") and cell.text != "–":
        return Cell(f"{cell.text} ({UNTUNED})", sel=sel, title="latency of a TVM build without tuning")
    return cell


def _spread(r: dict[str, Any]) -> Cell:
    """The p10–p90 interval of a latency, or a muted dash."""
    lo, hi = r.get("latency_p10_ms"), r.get("latency_p90_ms")
    if lo is None or hi is None:
        return _missing()
    return Cell(f"{_LAT.fmt(lo, unit=False)}–{_LAT.fmt(hi, unit=False)}")


def _front(front: Any, *, sel: bool = False) -> Cell:
    if front is None:
        return _missing(sel)
    return Cell(str(int(front)), sel=sel, span=f"f{int(front)}")


def _cand_name(c: dict[str, Any] | None) -> str:
    """How tables name a candidate: a search's label (``paper k=3``), an exclusion set's name, or k."""
    if c is None:
        return "–"
    if c.get("kind") == "ranked" and c.get("k") is not None:  # reports from before searches
        return f"k={c['k']}"
    if c.get("label"):
        return str(c["label"])
    if c.get("k") is not None:
        return f"k={c['k']}"
    return str(c.get("id"))


def _searches_of(c: dict[str, Any]) -> str:
    """The searches that asked for a candidate (each once)."""
    names = list(dict.fromkeys(str(p.get("search")) for p in c.get("proposed_by") or []))
    return ", ".join(names) or "–"


def _is_full(c: dict[str, Any]) -> bool:
    level: str = c.get("level", "full")
    return level == "full"


def _seconds(value: Any) -> Cell:
    return _num(value, "{:.1f}")


def _data_uri(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        logger.warning("cannot embed image %s: %s", path, exc)
        return None
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _study_objectives(report: dict[str, Any]) -> list[Objective]:
    return [OBJECTIVES[o["name"]] for o in report.get("objectives") or [] if o.get("name") in OBJECTIVES]


def _runtime_text(d: Device) -> str:
    """A device's runtime versions as one phrase ("ONNX Runtime 1.23.0", "TVM 0.20.0"), or "–"."""
    names = {"onnxruntime": "ONNX Runtime", "tvm": "TVM"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in d.versions.items()) or "–"


def _header(rep: Report) -> dict[str, Any]:
    objectives = []
    for o in rep.objectives:
        bounds = []
        if o.max is not None:
            bounds.append(f"≤ {o.max}")
        if o.min is not None:
            bounds.append(f"≥ {o.min}")
        objectives.append(f"{o.name} ({o.direction}{', ' + ' and '.join(bounds) if bounds else ''})")
    models = [
        f"{m.name} ({_SIZE.fmt(m.size_bytes)}, opset {m.opset_used}"
        f"{' upgraded from ' + str(m.opset_original) if m.upgraded else ''})"
        for m in rep.models
    ]

    def device(d: Device) -> str:
        text = f"{d.name} ({d.device_class})" if d.device_class else d.name
        runtime = _runtime_text(d)
        return text if runtime == "–" else f"{text}: {runtime}"

    return {
        "name": rep.study.name,
        "generated_at": rep.generated_at,
        "version": rep.tuneqn_version,
        "schema_version": rep.schema_version,
        "out_dir": rep.study.out_dir,
        "partial": rep.partial,
        "objectives": ", ".join(objectives) or "–",
        "devices": ", ".join(device(d) for d in rep.devices) or "–",
        "models": ", ".join(models) or "–",
    }


@dataclass(frozen=True)
class SampleSizes:
    """The n behind the page's agreements and accuracies (None: unknown)."""

    eval: int | None
    labelled: int | None
    screen: int | None

    @classmethod
    def of(cls, rep: Report) -> SampleSizes:
        """From ``dataset``, else from the results' ``num_samples`` when they agree."""
        d = rep.dataset
        full = {r.num_samples for c in rep.candidates for r in c.results if r.num_samples is not None}
        screen = {x.num_samples for c in rep.candidates for x in c.screening if x.num_samples is not None}
        n_eval = d.eval_samples if d and d.eval_samples is not None else (full.pop() if len(full) == 1 else None)
        n_screen = (
            d.screen_samples if d and d.screen_samples is not None else (screen.pop() if len(screen) == 1 else None)
        )
        return cls(n_eval, d.labelled_eval_samples if d else None, n_screen)

    @property
    def agreement(self) -> str:
        """``n = 100`` (or ``n = ?``)."""
        return f"n = {self.eval if self.eval is not None else '?'}"

    @property
    def accuracy(self) -> str:
        """``n = 14 labelled`` (or ``labelled samples only``)."""
        return f"n = {self.labelled} labelled" if self.labelled is not None else "labelled samples only"

    @property
    def screening(self) -> str:
        return f"n = {self.screen if self.screen is not None else '?'}"

    def heading(self, o: Objective) -> str:
        """An objective's column heading with the n of its values."""
        if o.name == "accuracy_loss":
            return f"{o.name} ({o.display_unit}, {self.agreement})"
        if o.name in ("accuracy", "accuracy_top5"):
            return f"{o.name} ({o.display_unit}, {self.accuracy})"
        return o.heading


def _loss_text(loss: float | None, ci: tuple[float, float] | None, n: int | None) -> str:
    """``1.00 % (95 % interval 0.18–5.45 %, n = 100)``."""
    if loss is None:
        return "–"
    text = _LOSS.fmt(loss)
    parts = []
    if ci is not None:
        parts.append(f"95 % interval {_LOSS.fmt(ci[0], unit=False)}–{_LOSS.fmt(ci[1])}")
    parts.append(f"n = {n if n is not None else '?'}")
    return f"{text} ({', '.join(parts)})"


def _latency_text(median: float | None, p10: float | None, p90: float | None) -> str:
    if median is None:
        return "–"
    spread = f" (p10–p90 {_LAT.fmt(p10, unit=False)}–{_LAT.fmt(p90)})" if p10 is not None and p90 is not None else ""
    return f"{_LAT.fmt(median)}{spread}"


def _pick(rep: Report, p: Pick, several_models: bool) -> dict[str, Any]:
    """One pick of the answer box: what to ship and everything needed to trust and load it."""
    where = p.device if p.scope == "device" else f"every device ({', '.join(p.devices)}): worst values"
    title = f"{p.model} · {where}" if several_models else str(where)
    rows: list[tuple[str, str]] = []
    if p.candidate is not None:
        size = _SIZE.fmt(p.size_bytes)
        if p.size_bytes and p.fp32_size_bytes:
            size += f" ({100.0 * p.size_bytes / p.fp32_size_bytes:.1f} % of FP32 {_SIZE.fmt(p.fp32_size_bytes)})"
        if p.fq_size_bytes:
            size += f"; fully quantized: {_SIZE.fmt(p.fq_size_bytes)}"
        rows.append(("size", size))
        rows.append(("accuracy loss (1 − top-1 agreement with FP32)", _loss_text(p.accuracy_loss, p.loss_ci95, p.n)))
        if p.accuracy is not None:
            acc = f"{_ACC.fmt(p.accuracy)} (n = {p.accuracy_n} labelled"
            acc += f"; FP32 {_ACC.fmt(p.fp32_accuracy)})" if p.fp32_accuracy is not None else ")"
            rows.append(("accuracy vs labels", acc))
        lat = _latency_text(p.latency_ms, p.latency_p10_ms, p.latency_p90_ms)
        if p.fp32_latency_ms is not None:
            lat += f" vs FP32 {_latency_text(p.fp32_latency_ms, p.fp32_latency_p10_ms, p.fp32_latency_p90_ms)}"
        rows.append(("latency (median)", lat))
        rows.append(("recipe", f"{p.recipe} · {p.label or p.candidate}"))
        for part in p.parts:  # a recipe split across the devices: one file per part
            rows.append(
                (
                    f"on {', '.join(part.devices)}",
                    f"{part.file} · {part.recipe} · {part.label or part.candidate}, {_SIZE.fmt(part.size_bytes)}, "
                    f"loss {_LOSS.fmt(part.accuracy_loss)}; export: {part.export_command}",
                )
            )
        rows.append(
            (
                "runtime option",
                p.runtime_note
                or (
                    "session option disabled_optimizers=" + json.dumps(p.runtime.ort_disabled_optimizers)
                    if p.runtime.ort_disabled_optimizers
                    else "none: a plain onnxruntime.InferenceSession(path)"
                ),
            )
        )
    return {
        "title": title,
        "scope": p.scope,
        "met": p.met,
        "candidate": p.candidate,
        "file": p.file,
        "sha256": p.sha256,
        "rows": rows,
        "float_layers": p.float_layers,
        "levels": sorted(p.levels.items()),
        "warnings": p.warnings,
        "export_command": p.export_command,
        "reason": p.reason,
    }


def _answer(rep: Report) -> dict[str, Any] | None:
    """The answer box: one pick per device (and across devices), constraint and rule."""
    a = rep.answer
    if a is None:
        return None
    c = a.constraint
    bounds = []
    if c.max_loss is not None:
        bounds.append(f"accuracy loss ≤ {_LOSS.fmt(c.max_loss)}")
    if c.max_size_bytes is not None:
        bounds.append(f"size ≤ {_SIZE.fmt(c.max_size_bytes)}")
    if c.max_latency_ms is not None:
        bounds.append(f"latency ≤ {_LAT.fmt(c.max_latency_ms)}")
    several = len({p.model for p in a.picks}) > 1
    picks = [p for p in a.picks if p.scope == "device"] + [p for p in a.picks if p.scope != "device"]
    return {"constraint": ", ".join(bounds) or "none", "rule": a.rule, "picks": [_pick(rep, p, several) for p in picks]}


def _dataset(rep: Report, ns: SampleSizes) -> dict[str, Any] | None:
    """The samples behind the numbers (n of every agreement and accuracy) and the preprocessing."""
    d = rep.dataset
    if d is None:
        return None
    rows = [
        ("evaluation sample (n of every agreement)", d.eval_samples),
        ("of those labelled (n of every accuracy)", d.labelled_eval_samples),
        ("screening sample (n of screening agreements)", d.screen_samples),
        ("calibration sample", d.calibration_samples),
        ("analysis sample", d.analysis_samples),
    ]
    one = f"one image is {100.0 / d.eval_samples:.2g} % of the agreement" if d.eval_samples else None
    return {
        "rows": [(k, "–" if v is None else str(v)) for k, v in rows],
        "one_image": one,
        "preprocess": d.preprocess_description or (json.dumps(d.preprocess, sort_keys=True) if d.preprocess else None),
    }


def _recipe_selection(rep: Report, ns: SampleSizes) -> list[dict[str, Any]]:
    """Per model: which recipes went on to the search and why the others stopped."""
    out = []
    for sel in rep.recipe_selection:
        devices = list(dict.fromkeys(d.device for r in sel.recipes for d in r.devices))
        rows = []
        for r in sel.recipes:
            by_dev = {d.device: d for d in r.devices}
            row = [
                Cell(r.recipe, left=True),
                Cell(r.status, left=True, span=f"rs-{r.status}"),
                Cell(r.reason or "–", left=True),
            ]
            for dev in devices:
                d = by_dev.get(dev)
                row += [_obj(_LOSS, d.accuracy_loss if d else None), _obj(_SIZE, d.size_bytes if d else None)]
            rows.append(row)
        out.append({"model": sel.model, "rule": sel.rule, "devices": devices, "rows": rows})
    return out


def _runtime_options(rep: Report) -> list[dict[str, Any]]:
    """Per (model, recipe): the candidates that need ONNX Runtime session options, and which."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    totals: dict[tuple[str, str], int] = {}
    for c in rep.candidates:
        totals[(c.model, c.mode)] = totals.get((c.model, c.mode), 0) + 1
        opts = tuple(c.runtime.ort_disabled_optimizers)
        if opts:
            groups.setdefault((c.model, c.mode, opts), []).append(c.name)
    return [
        {
            "model": model,
            "recipe": recipe,
            "option": json.dumps(list(opts)),
            "count": len(names),
            "total": totals[(model, recipe)],
            "names": names,
        }
        for (model, recipe, opts), names in groups.items()
    ]


def _summary(report: dict[str, Any], cands: dict[str, dict[str, Any]], ns: SampleSizes) -> dict[str, Any]:
    entries = report.get("summary") or []
    has_latency = any(s.get("latency_ms") is not None or s.get("original_latency_ms") is not None for s in entries)
    rows = []
    for s in entries:
        sel = cands.get(s.get("selected")) if s.get("selected") else None
        row = [
            Cell(str(s.get("model")), left=True),
            Cell(str(s.get("recipe") or s.get("mode")), left=True),
            Cell(str(s.get("device")), left=True),
            Cell(_cand_name(sel), left=True, title=s.get("selected"))
            if sel
            else Cell("no feasible candidate", left=True, span="muted"),
            _obj(_LOSS, s.get("accuracy_loss")),
            _obj(_LOSS, s.get("fq_accuracy_loss")),
            _num(s.get("accuracy_loss_decrease_pct")),
            _obj(_SIZE, s.get("size_bytes")),
            _obj(_SIZE, s.get("fq_size_bytes")),
            _obj(_SIZE, s.get("original_size_bytes")),
            _num(s.get("size_decrease_pct")),
        ]
        if has_latency:
            row += [
                _obj(_LAT, s.get("latency_ms")),
                _obj(_LAT, s.get("original_latency_ms")),
                _num(s.get("latency_decrease_pct")),
            ]
        rows.append(row)
    return {"rows": rows, "has_latency": has_latency, "loss": _LOSS, "size": _SIZE, "latency": _LAT, "n": ns.agreement}


@dataclass(frozen=True)
class _Page:
    """What the front sections of the page read: the report, its figures, candidates by id and objectives."""

    report: dict[str, Any]
    images: dict[str, Path]
    cands: dict[str, dict[str, Any]]
    objs: list[Objective]
    ns: SampleSizes

    def front_members(
        self, entry: dict[str, Any], device: str | None, selected: str | None
    ) -> Iterator[tuple[int, str, dict[str, Any], dict[str, Any], bool]]:
        """Per member of ``entry``'s fronts: its front number, id, candidate, result on ``device``, selected."""
        for n, front in enumerate(entry.get("fronts") or [], start=1):
            for cid in front:
                c = self.cands.get(cid, {})
                r: dict[str, Any] = next((x for x in c.get("results") or [] if x.get("device") == device), {})
                yield n, cid, c, r, cid == selected


def _cross_device(page: _Page) -> list[dict[str, Any]]:
    """Cross-device fronts of the (model, recipe)s that ran on several devices (one device: none)."""
    cands, objs, ns = page.cands, page.objs, page.ns
    out = []
    for x in page.report.get("cross_device") or []:
        if len(x.get("devices") or []) < 2:
            continue
        members = [c for c in x.get("candidates") or [] if c.get("front") is not None]
        members.sort(key=lambda c: (c["front"], c.get("k") if c.get("k") is not None else 10**9))
        rows = []
        for c in members:
            sel = c.get("id") == x.get("selected")
            rows.append(
                [
                    _front(c["front"], sel=sel),
                    Cell(_cand_name(cands.get(c["id"]) or c), left=True, sel=sel, title=c.get("id")),
                    *(_obj(o, (c.get("worst") or {}).get(o.name), sel=sel) for o in objs),
                ]
            )
        out.append(
            {
                "title": f"{x.get('model')} · {x.get('recipe') or x.get('mode')} · devices: "
                f"{', '.join(x.get('devices') or [])}",
                "headers": ["front", "candidate", *(f"worst {ns.heading(o)}" for o in objs)],
                "rows": rows,
                "selected": _cand_name(cands.get(x.get("selected"))) if x.get("selected") else "–",
                "excluded": [
                    f"{_cand_name(cands.get(e.get('candidate')))}: {e.get('reason')}" for e in x.get("excluded") or []
                ],
            }
        )
    return out


def _groups(page: _Page) -> list[dict[str, Any]]:
    images, objs, ns = page.images, page.objs, page.ns
    summary = {(s.get("model"), s.get("mode"), s.get("device")): s for s in page.report.get("summary") or []}
    out = []
    for entry in page.report.get("fronts") or []:
        model, mode, device = entry.get("model"), entry.get("mode"), entry.get("device")
        figures = []
        for kind in PLOT_KINDS:
            figures.append(
                {
                    "kind": kind,
                    "uri": _data_uri(images.get(plot_key(kind, model, mode, device))),
                    "alt": f"{kind} plot for {model} {mode} {device}",
                    "caption": _PLOT_CAPTIONS.get(kind, kind),
                }
            )
        selected = (summary.get((model, mode, device)) or {}).get("selected")
        rows = [
            [
                _front(n, sel=sel),
                Cell(_cand_name(c or {"id": cid}), left=True, sel=sel, title=cid),
                Cell(str(len(c.get("excluded") or [])), sel=sel),
                *(
                    _latency(r, (r.get("objectives") or {}).get(o.name), sel=sel)
                    if o.name == "latency"
                    else _obj(o, (r.get("objectives") or {}).get(o.name), sel=sel)
                    for o in objs
                ),
            ]
            for n, cid, c, r, sel in page.front_members(entry, device, selected)
        ]
        out.append(
            {
                "title": f"{model} · {mode} · {device}",
                "recipe": mode,
                "figures": figures,
                "headers": ["front", "candidate", "#excluded", *(ns.heading(o) for o in objs)],
                "rows": rows,
            }
        )
    return out


def _baselines(report: dict[str, Any]) -> list[list[Cell]]:
    rows = []
    for b in report.get("baselines") or []:
        status = str(b.get("status"))
        rows.append(
            [
                Cell(str(b.get("model")), left=True),
                Cell(str(b.get("device")), left=True),
                Cell(status, left=True, span=f"st-{status}", title=b.get("error")),
                _obj(_ACC, b.get("accuracy")),
                _obj(OBJECTIVES["accuracy_top5"], b.get("accuracy_top5")),
                _latency(b, b.get("latency_ms")),
                _spread(b),
                _obj(_SIZE, b.get("size_bytes")),
            ]
        )
    return rows


def _candidates(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates evaluated in full, per (model, recipe), with every device's full result."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in report.get("candidates") or []:
        if _is_full(c):
            groups.setdefault((c.get("model"), c.get("mode")), []).append(c)
    dev_order = [d.get("name") for d in report.get("devices") or []]
    out = []
    for (model, mode), members in groups.items():
        seen = [r.get("device") for c in members for r in c.get("results") or []]
        devices = [d for d in dev_order if d in seen] + [d for d in dict.fromkeys(seen) if d not in dev_order]
        members = sorted(
            members,
            key=lambda c: (0, int(c["k"])) if c.get("kind") != "explicit" and c.get("k") is not None else (1, 0),
        )
        # Compile and tuning time apart from the device's own time, where a backend compiles (TVM).
        times = any(
            r.get("compile_seconds") or r.get("tuning_seconds") or r.get("backend") == "tvm"
            for c in members
            for r in c.get("results") or []
        )
        per_device = 6 + (3 if times else 0)
        rows = []
        for c in members:
            screened = [x for x in c.get("screening") or [] if x.get("status") == "done"]
            row = [
                Cell(str(c["k"])) if c.get("k") is not None else _missing(),
                Cell(_cand_name(c), left=True, title=c.get("id")),
                Cell(str(len(c.get("excluded") or []))),
                _obj(_SIZE, c.get("size_bytes")),
                Cell(_searches_of(c), left=True),
                Cell(
                    "screened",
                    left=True,
                    span="badge scr",
                    title="; ".join(
                        f"{x.get('device')}: agreement {_pct(x.get('agreement')).text} % on "
                        f"{x.get('num_samples')} samples"
                        for x in screened
                    ),
                )
                if screened
                else _missing(),
            ]
            by_dev = {r.get("device"): r for r in c.get("results") or []}
            for d in devices:
                r = by_dev.get(d)
                if r is None:
                    row += [_missing()] * (per_device - 1) + [Cell("not planned here", left=True, span="muted")]
                    continue
                status = str(r.get("status"))
                shown = status if r.get("feasible") is not False or status != "done" else "done, infeasible"
                if status == "infeasible" and r.get("unsupported_ops"):
                    shown = f"infeasible: {', '.join(r['unsupported_ops'])}"
                row += [
                    _pct(r.get("agreement")),
                    _obj(_ACC, r.get("accuracy")),
                    _latency(r, r.get("latency_ms")),
                    _spread(r),
                    _front(r.get("front")),
                ]
                if times:
                    row += [
                        _seconds(r.get("device_seconds")),
                        _seconds(r.get("compile_seconds")),
                        _seconds(r.get("tuning_seconds")),
                    ]
                row.append(Cell(shown, left=True, span=f"st-{status}", title=r.get("reason")))
            rows.append(row)
        out.append(
            {"title": f"{model} · {mode}", "devices": devices, "rows": rows, "times": times, "per_device": per_device}
        )
    return out


def _screened(report: dict[str, Any]) -> dict[str, Any]:
    """Candidates with screening results, per (model, recipe): compact, never on a front."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    built_only = 0
    for c in report.get("candidates") or []:
        if c.get("screening"):
            groups.setdefault((c.get("model"), c.get("mode")), []).append(c)
        elif c.get("level") == "build":
            built_only += 1
    dev_order = [d.get("name") for d in report.get("devices") or []]
    out = []
    n_only = 0
    for (model, mode), members in groups.items():
        seen = [x.get("device") for c in members for x in c.get("screening") or []]
        devices = [d for d in dev_order if d in seen] + [d for d in dict.fromkeys(seen) if d not in dev_order]
        rows = []
        for c in sorted(members, key=lambda c: (not _is_full(c), c.get("k") if c.get("k") is not None else 10**9)):
            only = not _is_full(c)
            n_only += only
            by_dev = {x.get("device"): x for x in c.get("screening") or []}
            row = [
                Cell("screened only" if only else "also full", left=True, span="badge scr" if only else "muted"),
                Cell(str(c["k"])) if c.get("k") is not None else _missing(),
                Cell(_cand_name(c), left=True, title=c.get("id")),
                _obj(_SIZE, c.get("size_bytes")),
                Cell(_searches_of(c), left=True),
            ]
            for d in devices:
                x = by_dev.get(d)
                if x is None:
                    row += [_missing(), _missing()]
                    continue
                status = str(x.get("status"))
                row += [
                    _pct(x.get("agreement"))
                    if status == "done"
                    else Cell(status, left=True, span=f"st-{status}", title=x.get("error")),
                    Cell(str(x.get("num_samples"))) if x.get("num_samples") is not None else _missing(),
                ]
            rows.append(row)
        out.append(
            {"title": f"{model} · {mode}", "devices": devices, "rows": rows, "collapsed": len(rows) > SCREENED_OPEN}
        )
    return {"groups": out, "screened_only": n_only, "built_only": built_only}


def _searches(report: dict[str, Any], ns: SampleSizes) -> dict[str, Any]:
    """The ranking ablation table (per search and (model, recipe, device), then per-search totals)."""
    rows = []
    n_models = len({r.get("model") for r in report.get("ablation") or [] if r.get("model") is not None})
    order = {s.get("name"): i for i, s in enumerate(report.get("searches") or [])}
    for a in sorted(
        report.get("ablation") or [], key=lambda a: (order.get(a.get("search"), len(order)), a.get("model") is None)
    ):
        total = a.get("model") is None
        where = (
            [Cell("all", left=True, sel=total, span="muted")] * 2
            if total
            else [
                Cell(f"{a.get('model')} · {a.get('recipe')}" if n_models > 1 else str(a.get("recipe")), left=True),
                Cell(str(a.get("device")), left=True),
            ]
        )
        rows.append(
            [
                Cell(str(a.get("search")), left=True, sel=total),
                *where,
                _num(a.get("hypervolume"), "{:.4f}", sel=total),
                _num(a.get("hv_vs_sweep"), "{:.3f}", sel=total),
                Cell(str(len(a.get("front") or [])), sel=total) if not total else _missing(sel=total),
                Cell(str(a.get("evaluations")), sel=total),
                Cell(str(a.get("screenings")), sel=total),
                Cell(str(a.get("builds")), sel=total),
                _num(a.get("seconds"), "{:.1f}", sel=total),
                _num(a.get("found_after_s"), "{:.1f}", sel=total),
                _num(a.get("front_done_after_s"), "{:.1f}", sel=total),
            ]
        )
    targets = []
    for s in report.get("searches") or []:
        for t in s.get("targets") or []:
            loss = f"{100.0 * float(s['max_loss']):g} %" if s.get("max_loss") is not None else "?"
            if t.get("id") is None:
                targets.append(
                    f"{s.get('name')} ({t.get('model')}): no candidate with accuracy loss ≤ {loss} on every device"
                )
            elif len(t.get("parts") or []) > 1:  # a recipe split across the devices: one candidate per part
                per_part = "; ".join(
                    f"{', '.join(p.get('devices') or [])}: {p.get('label') or p.get('id')} "
                    f"[{p.get('recipe')}], {_SIZE.fmt(p.get('size_bytes'))}"
                    for p in t["parts"]
                )
                targets.append(
                    f"{s.get('name')} ({t.get('model')}): {per_part}; worst agreement "
                    f"{_pct(t.get('worst_agreement')).text} % ({ns.agreement}), loss ≤ {loss} on every device; "
                    f"found after {_seconds(t.get('found_after_s')).text} s"
                )
            else:
                targets.append(
                    f"{s.get('name')} ({t.get('model')}): {t.get('label') or t.get('id')} [{t.get('recipe')}], "
                    f"{_SIZE.fmt(t.get('size_bytes'))}, worst agreement {_pct(t.get('worst_agreement')).text} % "
                    f"({ns.agreement}), "
                    f"loss ≤ {loss} on every device; found after {_seconds(t.get('found_after_s')).text} s"
                )
    return {
        "rows": rows,
        "targets": targets,
        "sweep": any(s.get("name") == SWEEP_SEARCH for s in report.get("searches") or []),
    }


def _recipe_fronts(page: _Page) -> list[dict[str, Any]]:
    """Per (model, device) with several recipes: the top fronts over all of them."""
    objs, ns = page.objs, page.ns
    out = []
    for entry in page.report.get("recipe_fronts") or []:
        if len(entry.get("recipes") or []) < 2:  # one recipe: the per-device fronts say it all
            continue
        model, device = entry.get("model"), entry.get("device")
        rows = [
            [
                _front(n, sel=sel),
                Cell(str(c.get("recipe") or c.get("mode")), left=True, sel=sel),
                Cell(_cand_name(c or {"id": cid}), left=True, sel=sel, title=cid),
                Cell(str(len(c.get("excluded") or [])), sel=sel),
                *(_obj(o, (r.get("objectives") or {}).get(o.name), sel=sel) for o in objs),
            ]
            for n, cid, c, r, sel in page.front_members(entry, device, entry.get("selected"))
        ]
        out.append(
            {
                "title": f"{model} · {device} · recipes: {', '.join(entry.get('recipes') or [])}",
                "uri": _data_uri(page.images.get(recipe_plot_key(model, device))),
                "alt": f"recipes plot for {model} {device}",
                "headers": ["front", "recipe", "candidate", "#excluded", *(ns.heading(o) for o in objs)],
                "rows": rows,
            }
        )
    return out


def _devices(rep: Report) -> list[list[Cell]]:
    """The devices table: backend, runtime versions, TVM target, RPC key and where the device is reached."""
    rows = []
    for d in rep.devices:
        info = d.details
        extra = info.model_extra or {}
        rows.append(
            [
                Cell(d.name, left=True),
                Cell(d.device_class or "–", left=True),
                Cell((info.backend or "–") + (" (simulated)" if info.simulated else ""), left=True),
                Cell(_runtime_text(d), left=True),
                Cell(info.target or "–", left=True),
                Cell(info.rpc_key or "–", left=True),
                Cell(info.remote or ("agent host" if info.backend else "–"), left=True),
                Cell(str(info.remote_servers)) if info.remote_servers else _missing(),
                Cell(str(info.supported_ops)) if info.supported_ops else Cell("any", span="muted"),
                Cell(str(info.agent or extra.get("declared_by") or "–"), left=True),
                Cell((info.cpu or "–")[:48], left=True),
            ]
        )
    return rows


def _feasibility(report: dict[str, Any]) -> list[dict[str, Any]]:
    """What feasibility planning did per device (one line each)."""
    return [{"text": str(f.get("text")), "status": str(f.get("status"))} for f in report.get("feasibility") or []]


def _infeasible_by_device(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per device, the candidates it cannot run, with the exact op types."""
    out = []
    for entry in report.get("infeasible_by_device") or []:
        rows = []
        for it in entry.get("candidates") or []:
            c = cands.get(it.get("candidate")) or {"id": it.get("candidate"), "label": it.get("label")}
            rows.append(
                [
                    Cell(str(it.get("model")), left=True),
                    Cell(str(it.get("recipe")), left=True),
                    Cell(_cand_name(c), left=True, title=it.get("candidate")),
                    Cell(", ".join(it.get("unsupported_ops") or []) or "–", left=True),
                    Cell(str(it.get("error") or ""), left=True),
                ]
            )
        out.append({"device": entry.get("device"), "rows": rows})
    return out


def _infeasible(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> list[list[Cell]]:
    rows = []
    for it in report.get("infeasible") or []:
        c = cands.get(it.get("candidate")) or {}
        rows.append(
            [
                Cell(str(c.get("model")), left=True),
                Cell(str(c.get("recipe") or c.get("mode")), left=True),
                Cell(_cand_name(c or {"id": it.get("candidate")}), left=True, title=it.get("candidate")),
                Cell(str(it.get("device")), left=True),
                Cell(str(it.get("reason")), left=True),
            ]
        )
    return rows


def _layers(report: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for layer in report.get("layers") or []:
        groups.setdefault((layer.get("model"), layer.get("mode")), []).append(layer)

    def row(layer: dict[str, Any]) -> list[Cell]:
        return [
            Cell(str(layer.get("rank"))),
            Cell(str(layer.get("name")), left=True),
            Cell(str(layer.get("op_type")), left=True),
            Cell(str(layer.get("index"))),
            _num(layer.get("qdq_err"), "{:.4g}"),
            _num(layer.get("xmodel_err"), "{:.4g}"),
            _num(layer.get("score"), "{:.4f}"),
        ]

    out = []
    for (model, mode), layers in groups.items():
        layers = sorted(
            layers,
            key=lambda L: (
                L.get("rank") is None,
                L.get("rank") if L.get("rank") is not None else 0,
                -(L.get("score") or 0.0),
            ),
        )
        out.append(
            {
                "title": f"{model} · {mode}: top {min(LAYERS_TOP, len(layers))} of {len(layers)}",
                "top": [row(L) for L in layers[:LAYERS_TOP]],
                "all": [row(L) for L in layers],
            }
        )
    return out


def _rankings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rankings computed from evaluations (``measured``): per layer its gain per byte."""

    def row(layer: dict[str, Any]) -> list[Cell]:
        return [
            Cell(str(layer.get("rank"))),
            Cell(str(layer.get("name")), left=True),
            _pct(layer.get("gain")),
            _pct(layer.get("overlap_gain")),
            _num(layer.get("bytes"), "{:,}"),
        ]

    out = []
    for r in report.get("rankings") or []:
        layers = sorted(r.get("layers") or [], key=lambda L: (L.get("rank") is None, L.get("rank") or 0))
        out.append(
            {
                "title": f"{r.get('model')} · {r.get('recipe') or r.get('mode')} · {r.get('name')}: "
                f"top {min(LAYERS_TOP, len(layers))} of {len(layers)}",
                "top": [row(L) for L in layers[:LAYERS_TOP]],
                "all": [row(L) for L in layers],
            }
        )
    return out


def _other_images(images: dict[str, Path], report: dict[str, Any]) -> list[dict[str, str]]:
    known = {
        plot_key(kind, e.get("model"), e.get("mode"), e.get("device"))
        for e in report.get("fronts") or []
        for kind in PLOT_KINDS
    } | {recipe_plot_key(e.get("model"), e.get("device")) for e in report.get("recipe_fronts") or []}
    out = []
    for key, path in images.items():
        if key in known:
            continue
        uri = _data_uri(path)
        if uri is None:
            continue
        try:
            caption = " · ".join(str(x) for x in json.loads(key))
        except (ValueError, TypeError):
            caption = key
        out.append({"uri": uri, "caption": caption})
    return out


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("tuneqn.controller.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _toc(context: dict[str, Any]) -> list[tuple[str, str]]:
    """The table of contents: (anchor, title) of each section the page has, in page order."""
    entries = [
        ("answer", "The answer: what to ship", True),
        ("dataset", "Samples and preprocessing", context["dataset"] is not None),
        ("recipe-selection", "Recipes chosen", bool(context["recipe_selection"])),
        ("runtime-options", "Runtime options the candidates need", bool(context["runtime_options"])),
        ("summary", "Summary per recipe and device", True),
        ("cross-device", "Cross-device fronts", bool(context["cross_device"])),
        ("searches", "Searches", bool(context["searches"]["rows"])),
        ("recipes", "Recipes compared", bool(context["recipe_fronts"])),
        ("per-device", "Per device: plots and Pareto fronts", True),
        ("baselines", "FP32 baselines", True),
        ("candidates", "All candidates evaluated in full", True),
        ("screening", "Screening results", bool(context["screened"]["groups"] or context["screened"]["built_only"])),
        ("not-on-front", "Not in any front", True),
        ("layers", "Layer ranking", True),
        ("rankings", "Measured rankings", bool(context["rankings"])),
        ("devices", "Devices and runtimes", bool(context["devices"])),
        ("feasibility", "Feasibility planning", bool(context["feasibility"])),
        ("infeasible-by-device", "Infeasible on a device", bool(context["infeasible_by_device"])),
        ("skipped", "Skipped inputs", bool(context["skipped"])),
        ("others", "Other figures", bool(context["others"])),
    ]
    return [(anchor, title) for anchor, title, shown in entries if shown]


def render_html(report: dict[str, Any] | Report, images: dict[str, Path]) -> str:
    """Render a finalized report as one self-contained HTML page.

    ``report`` is validated into :class:`~tuneqn.controller.report.schema.Report` (a dict
    that does not match the schema raises ``ValueError``). ``images`` maps
    :func:`tuneqn.controller.report.plots.plot_key` keys to image files, which are embedded
    as data URIs; images under other keys are shown in an "Other figures" section.
    """
    rep = validate_report(report)
    report = report_dict(rep)
    cands = {c.get("id"): c for c in report.get("candidates") or []}
    objs = _study_objectives(report)
    ns = SampleSizes.of(rep)
    page = _Page(report, images, cands, objs, ns)
    context = {
        "header": _header(rep),
        "warnings": rep.warnings(),
        "answer": _answer(rep),
        "dataset": _dataset(rep, ns),
        "recipe_selection": _recipe_selection(rep, ns),
        "runtime_options": _runtime_options(rep),
        "ns": ns,
        "skipped": report.get("skipped_inputs") or [],
        "summary": _summary(report, cands, ns),
        "cross_device": _cross_device(page),
        "groups": _groups(page),
        "latency_ties": any(o.name == "latency" for o in objs),
        "baselines": _baselines(report),
        "candidates": _candidates(report),
        "screened": _screened(report),
        "searches": _searches(report, ns),
        "recipe_fronts": _recipe_fronts(page),
        "rankings": _rankings(report),
        "ranking_headers": ["rank", "layer", "gain (agreement, %)", "gain (top-k overlap, %)", "bytes added"],
        "infeasible": _infeasible(report, cands),
        "devices": _devices(rep),
        "feasibility": _feasibility(report),
        "infeasible_by_device": _infeasible_by_device(report, cands),
        "layers": _layers(report),
        "layer_headers": ["rank", "layer", "op type", "index", "qdq_err", "xmodel_err", "score"],
        "others": _other_images(images, report),
        "loss": _LOSS,
        "acc": _ACC,
        "size": _SIZE,
        "latency": _LAT,
        "hv_reference": HV_REFERENCE,
        "sweep_search": SWEEP_SEARCH,
    }
    context["toc"] = _toc(context)
    return _environment().get_template(TEMPLATE).render(**context)

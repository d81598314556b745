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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from tuneqn.controller.objectives import OBJECTIVES, Objective

from .plots import PLOT_KINDS, plot_key

logger = logging.getLogger(__name__)

LAYERS_TOP = 20
TEMPLATE = "report.html.j2"

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}
_PLOT_CAPTIONS = {
    "objectives": "Objectives per candidate k, each min-max normalized to 0-100 % over the candidates shown; "
    "vertical lines: top-3 Pareto fronts (paper Fig. 3).",
    "tradeoff": "Accuracy loss vs model size of every evaluated candidate (labels: k); fronts connected.",
}
_LOSS, _ACC, _SIZE, _LAT = OBJECTIVES["accuracy_loss"], OBJECTIVES["accuracy"], OBJECTIVES["size"], OBJECTIVES["latency"]


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
    if c is None:
        return "–"
    if c.get("kind") == "ranked" and c.get("k") is not None:
        return f"k={c['k']}"
    return str(c.get("label") or c.get("id"))


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


def _header(report: dict[str, Any]) -> dict[str, Any]:
    study = report.get("study") or {}
    objectives = []
    for o in report.get("objectives") or []:
        bounds = []
        if o.get("max") is not None:
            bounds.append(f"≤ {o['max']}")
        if o.get("min") is not None:
            bounds.append(f"≥ {o['min']}")
        objectives.append(f"{o.get('name')} ({o.get('direction')}{', ' + ' and '.join(bounds) if bounds else ''})")
    models = [
        f"{m.get('name')} ({_SIZE.fmt(m.get('size_bytes'))}, opset {m.get('opset_used')}"
        f"{' upgraded from ' + str(m.get('opset_original')) if m.get('upgraded') else ''})"
        for m in report.get("models") or []
    ]
    return {
        "name": study.get("name", "study"),
        "generated_at": report.get("generated_at"),
        "version": report.get("tuneqn_version"),
        "out_dir": study.get("out_dir"),
        "partial": bool(report.get("partial")),
        "objectives": ", ".join(objectives) or "–",
        "devices": ", ".join(
            f"{d.get('name')} ({d.get('device_class')})" if d.get("device_class") else str(d.get("name"))
            for d in report.get("devices") or []
        ) or "–",
        "models": ", ".join(models) or "–",
    }


def _summary(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> dict[str, Any]:
    entries = report.get("summary") or []
    has_latency = any(s.get("latency_ms") is not None or s.get("original_latency_ms") is not None for s in entries)
    rows = []
    for s in entries:
        sel = cands.get(s.get("selected")) if s.get("selected") else None
        row = [
            Cell(str(s.get("model")), left=True),
            Cell(str(s.get("mode")), left=True),
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
            row += [_obj(_LAT, s.get("latency_ms")), _obj(_LAT, s.get("original_latency_ms")),
                    _num(s.get("latency_decrease_pct"))]
        rows.append(row)
    return {"rows": rows, "has_latency": has_latency, "loss": _LOSS, "size": _SIZE, "latency": _LAT}


def _cross_device(report: dict[str, Any], cands: dict[str, dict[str, Any]], objs: list[Objective]) -> list[dict[str, Any]]:
    out = []
    for x in report.get("cross_device") or []:
        members = [c for c in x.get("candidates") or [] if c.get("front") is not None]
        members.sort(key=lambda c: (c["front"], c.get("k") if c.get("k") is not None else 10**9))
        rows = []
        for c in members:
            sel = c.get("id") == x.get("selected")
            rows.append([
                _front(c["front"], sel=sel),
                Cell(_cand_name(cands.get(c["id"]) or c), left=True, sel=sel, title=c.get("id")),
                *(_obj(o, (c.get("worst") or {}).get(o.name), sel=sel) for o in objs),
            ])
        out.append({
            "title": f"{x.get('model')} · {x.get('mode')} · devices: {', '.join(x.get('devices') or [])}",
            "headers": ["front", "candidate", *(f"worst {o.heading}" for o in objs)],
            "rows": rows,
            "selected": _cand_name(cands.get(x.get("selected"))) if x.get("selected") else "–",
            "excluded": [f"{_cand_name(cands.get(e.get('candidate')))}: {e.get('reason')}"
                         for e in x.get("excluded") or []],
        })
    return out


def _groups(report: dict[str, Any], images: dict[str, Path], cands: dict[str, dict[str, Any]],
            objs: list[Objective]) -> list[dict[str, Any]]:
    summary = {(s.get("model"), s.get("mode"), s.get("device")): s for s in report.get("summary") or []}
    out = []
    for entry in report.get("fronts") or []:
        model, mode, device = entry.get("model"), entry.get("mode"), entry.get("device")
        figures = []
        for kind in PLOT_KINDS:
            figures.append({
                "kind": kind,
                "uri": _data_uri(images.get(plot_key(kind, model, mode, device))),
                "alt": f"{kind} plot for {model} {mode} {device}",
                "caption": _PLOT_CAPTIONS.get(kind, kind),
            })
        selected = (summary.get((model, mode, device)) or {}).get("selected")
        rows = []
        for n, front in enumerate(entry.get("fronts") or [], start=1):
            for cid in front:
                c = cands.get(cid, {})
                r: dict[str, Any] = next((x for x in c.get("results") or [] if x.get("device") == device), {})
                sel = cid == selected
                rows.append([
                    _front(n, sel=sel),
                    Cell(_cand_name(c or {"id": cid}), left=True, sel=sel, title=cid),
                    Cell(str(len(c.get("excluded") or [])), sel=sel),
                    *(_obj(o, (r.get("objectives") or {}).get(o.name), sel=sel) for o in objs),
                ])
        out.append({
            "title": f"{model} · {mode} · {device}",
            "figures": figures,
            "headers": ["front", "candidate", "#excluded", *(o.heading for o in objs)],
            "rows": rows,
        })
    return out


def _baselines(report: dict[str, Any]) -> list[list[Cell]]:
    rows = []
    for b in report.get("baselines") or []:
        status = str(b.get("status"))
        rows.append([
            Cell(str(b.get("model")), left=True),
            Cell(str(b.get("device")), left=True),
            Cell(status, left=True, span=f"st-{status}", title=b.get("error")),
            _obj(_ACC, b.get("accuracy")),
            _obj(OBJECTIVES["accuracy_top5"], b.get("accuracy_top5")),
            _obj(_LAT, b.get("latency_ms")),
            _spread(b),
            _obj(_SIZE, b.get("size_bytes")),
        ])
    return rows


def _candidates(report: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in report.get("candidates") or []:
        groups.setdefault((c.get("model"), c.get("mode")), []).append(c)
    dev_order = [d.get("name") for d in report.get("devices") or []]
    out = []
    for (model, mode), members in groups.items():
        seen = [r.get("device") for c in members for r in c.get("results") or []]
        devices = [d for d in dev_order if d in seen] + [d for d in dict.fromkeys(seen) if d not in dev_order]
        members = sorted(
            members,
            key=lambda c: (0, int(c["k"])) if c.get("kind") == "ranked" and c.get("k") is not None else (1, 0),
        )
        rows = []
        for c in members:
            row = [
                Cell(str(c["k"])) if c.get("k") is not None else _missing(),
                Cell(str(c.get("label")), left=True, title=c.get("id")),
                Cell(str(len(c.get("excluded") or []))),
                _obj(_SIZE, c.get("size_bytes")),
            ]
            by_dev = {r.get("device"): r for r in c.get("results") or []}
            for d in devices:
                r = by_dev.get(d)
                if r is None:
                    row += [_missing()] * 5 + [Cell("no result", left=True, span="muted")]
                    continue
                status = str(r.get("status"))
                shown = status if r.get("feasible") is not False or status != "done" else "done, infeasible"
                row += [
                    _pct(r.get("agreement")),
                    _obj(_ACC, r.get("accuracy")),
                    _obj(_LAT, r.get("latency_ms")),
                    _spread(r),
                    _front(r.get("front")),
                    Cell(shown, left=True, span=f"st-{status}", title=r.get("reason")),
                ]
            rows.append(row)
        out.append({"title": f"{model} · {mode}", "devices": devices, "rows": rows})
    return out


def _infeasible(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> list[list[Cell]]:
    rows = []
    for it in report.get("infeasible") or []:
        c = cands.get(it.get("candidate")) or {}
        rows.append([
            Cell(str(c.get("model")), left=True),
            Cell(str(c.get("mode")), left=True),
            Cell(_cand_name(c or {"id": it.get("candidate")}), left=True, title=it.get("candidate")),
            Cell(str(it.get("device")), left=True),
            Cell(str(it.get("reason")), left=True),
        ])
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
        out.append({
            "title": f"{model} · {mode}: top {min(LAYERS_TOP, len(layers))} of {len(layers)}",
            "top": [row(L) for L in layers[:LAYERS_TOP]],
            "all": [row(L) for L in layers],
        })
    return out


def _other_images(images: dict[str, Path], report: dict[str, Any]) -> list[dict[str, str]]:
    known = {
        plot_key(kind, e.get("model"), e.get("mode"), e.get("device"))
        for e in report.get("fronts") or []
        for kind in PLOT_KINDS
    }
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


def render_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    """Render a finalized report as one self-contained HTML page.

    ``images`` maps :func:`tuneqn.controller.report.plots.plot_key` keys to image
    files, which are embedded as data URIs; images under other keys are shown in
    an "Other figures" section.
    """
    cands = {c.get("id"): c for c in report.get("candidates") or []}
    objs = _study_objectives(report)
    context = {
        "header": _header(report),
        "skipped": report.get("skipped_inputs") or [],
        "summary": _summary(report, cands),
        "cross_device": _cross_device(report, cands, objs),
        "groups": _groups(report, images, cands, objs),
        "latency_ties": any(o.name == "latency" for o in objs),
        "baselines": _baselines(report),
        "candidates": _candidates(report),
        "infeasible": _infeasible(report, cands),
        "layers": _layers(report),
        "layer_headers": ["rank", "layer", "op type", "index", "qdq_err", "xmodel_err", "score"],
        "others": _other_images(images, report),
        "loss": _LOSS,
        "acc": _ACC,
        "size": _SIZE,
        "latency": _LAT,
    }
    return _environment().get_template(TEMPLATE).render(**context)

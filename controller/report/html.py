"""One self-contained HTML page for a finalized report.

Images are embedded as base64 data URIs and the style is inline, so the file can
be mailed or archived alone: no scripts, no external URLs.  Every piece of text
from the report goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .plots import PLOT_KINDS, plot_key

logger = logging.getLogger(__name__)

MB = 1e6
LAYERS_TOP = 20

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}
_PLOT_CAPTIONS = {
    "objectives": "Objectives per candidate k, each min-max normalized to 0-100 % over the candidates shown; "
    "vertical lines: top-3 Pareto fronts (paper Fig. 3).",
    "tradeoff": "Accuracy loss vs model size of every evaluated candidate (labels: k); fronts connected.",
}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px;color:#222;
  background:#fff;line-height:1.4;font-size:14px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #ddd;padding-bottom:3px}
h3{font-size:16px;margin:18px 0 6px}
.meta{color:#555;font-size:13px}
.banner{background:#fff3cd;border:1px solid #e0b000;color:#6b4e00;padding:8px 12px;margin:12px 0;border-radius:4px;
  font-weight:bold}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f1f3f5}
td.t,th.t{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.f1{color:#b71c1c;font-weight:bold}.f2{color:#6a3d9a;font-weight:bold}.f3{color:#7b4a32;font-weight:bold}
.sel{background:#e8f5e9 !important}
.st-failed{color:#b71c1c}.st-pending,.st-running{color:#8a6d00}
.muted{color:#888}
.figs{display:flex;flex-wrap:wrap;gap:4px 16px}
figure{margin:8px 0 12px;max-width:100%}
figure img{max-width:100%;width:880px;border:1px solid #ddd}
figcaption{font-size:12px;color:#555;max-width:880px}
details{margin:6px 0 16px}summary{cursor:pointer;color:#0b5394}
code{font-size:12px}
ul.inf{font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return '<span class="muted">–</span>'
    try:
        return _e(fmt.format(value))
    except (TypeError, ValueError):
        return _e(value)


def _pct(value: Any) -> str:
    """A fraction (0.25) shown as a percentage (25.00)."""
    if value is None:
        return _num(None)
    return _num(100.0 * float(value))


def _mb(value: Any) -> str:
    if value is None:
        return _num(None)
    return _num(float(value) / MB)


def _cand_name(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    if c.get("kind") == "ranked" and c.get("k") is not None:
        return f"k={c['k']}"
    return str(c.get("label") or c.get("id"))


def _data_uri(path: Path) -> str | None:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        logger.warning("cannot embed image %s: %s", path, exc)
        return None
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _table(
    headers: Iterable[str],
    rows: Iterable[Iterable[str]],
    *,
    head_html: str | None = None,
    cls: str = "",
    text_cols: Iterable[int] = (),
) -> str:
    """A table; ``headers`` are escaped text (``text_cols`` left-aligned), cells are already-escaped HTML."""
    out = [f'<table class="{_e(cls)}">' if cls else "<table>"]
    left = set(text_cols)
    if head_html is None:
        head_html = (
            "<tr>"
            + "".join(
                f'<th class="t">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(headers)
            )
            + "</tr>"
        )
    out.append(head_html)
    for row in rows:
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _td(cell: str, *, text: bool = False, cls: str = "", title: str | None = None) -> str:
    classes = " ".join(x for x in ("t" if text else "", cls) if x)
    attrs = f' class="{classes}"' if classes else ""
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{cell}</td>"


def _front_cell(front: Any) -> str:
    if front is None:
        return _num(None)
    return f'<span class="f{int(front)}">{int(front)}</span>'


def _header(report: dict[str, Any]) -> str:
    study = report.get("study") or {}
    parts = [f"<h1>TuneQn report: {_e(study.get('name', 'study'))}</h1>"]
    parts.append(
        '<div class="meta">'
        f"generated {_e(report.get('generated_at'))} by tuneqn {_e(report.get('tuneqn_version'))}"
        f" · output folder <code>{_e(study.get('out_dir'))}</code></div>"
    )
    if report.get("partial"):
        parts.append(
            '<div class="banner">PARTIAL REPORT: the study has not finished; some candidates are not evaluated '
            "yet and the fronts below may change.</div>"
        )
    objs = []
    for o in report.get("objectives") or []:
        bounds = []
        if o.get("max") is not None:
            bounds.append(f"≤ {o['max']}")
        if o.get("min") is not None:
            bounds.append(f"≥ {o['min']}")
        objs.append(
            f"{_e(o.get('name'))} ({_e(o.get('direction'))}{', ' + _e(' and '.join(bounds)) if bounds else ''})"
        )
    parts.append(f'<div class="meta">Objectives: {", ".join(objs) or "–"}</div>')
    devs = [f"{_e(d.get('name'))} ({_e(d.get('device_class'))})" for d in report.get("devices") or []]
    parts.append(f'<div class="meta">Devices: {", ".join(devs) or "–"}</div>')
    models = [
        f"{_e(m.get('name'))} ({_mb(m.get('size_bytes'))} MB, opset {_e(m.get('opset_used'))}"
        f"{' upgraded from ' + _e(m.get('opset_original')) if m.get('upgraded') else ''})"
        for m in report.get("models") or []
    ]
    parts.append(f'<div class="meta">Models: {", ".join(models) or "–"}</div>')
    return "\n".join(parts)


def _summary(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> str:
    entries = report.get("summary") or []
    has_latency = any(s.get("latency_ms") is not None or s.get("original_latency_ms") is not None for s in entries)
    head = (
        '<tr><th class="t" rowspan="2">Model</th><th class="t" rowspan="2">Mode</th>'
        '<th class="t" rowspan="2">Device</th><th class="t" rowspan="2">Selected</th>'
        '<th colspan="3">Accuracy loss (%, 1 − top-1 agreement)</th><th colspan="4">Size (MB)</th>'
        + ('<th colspan="3">Latency (ms)</th>' if has_latency else "")
        + "</tr><tr><th>selected</th><th>FQ</th><th>decrease %</th>"
        "<th>selected</th><th>FQ</th><th>original</th><th>decrease %</th>"
        + ("<th>selected</th><th>FP32</th><th>decrease %</th>" if has_latency else "")
        + "</tr>"
    )
    rows = []
    for s in entries:
        sel = cands.get(s.get("selected")) if s.get("selected") else None
        row = [
            _td(_e(s.get("model")), text=True),
            _td(_e(s.get("mode")), text=True),
            _td(_e(s.get("device")), text=True),
            _td(
                _e(_cand_name(sel)) if sel else '<span class="muted">no feasible candidate</span>',
                text=True,
                title=s.get("selected"),
            ),
            _td(_pct(s.get("accuracy_loss"))),
            _td(_pct(s.get("fq_accuracy_loss"))),
            _td(_num(s.get("accuracy_loss_decrease_pct"))),
            _td(_mb(s.get("size_bytes"))),
            _td(_mb(s.get("fq_size_bytes"))),
            _td(_mb(s.get("original_size_bytes"))),
            _td(_num(s.get("size_decrease_pct"))),
        ]
        if has_latency:
            row += [
                _td(_num(s.get("latency_ms"))),
                _td(_num(s.get("original_latency_ms"))),
                _td(_num(s.get("latency_decrease_pct"))),
            ]
        rows.append(row)
    note = (
        '<p class="meta">Selected = the member of Pareto front 1 closest to the ideal point after min-max '
        "normalizing each objective over that front (ties: lowest k). Accuracy-loss decrease is relative to the "
        "fully quantized (FQ, k=0) model, size decrease relative to the original FP32 model (paper Tables I/II). "
        "1 MB = 10<sup>6</sup> bytes.</p>"
    )
    return "<h2>Summary (best top-front candidate)</h2>\n" + _table([], rows, head_html=head, cls="summary") + note


def _objective_cells(values: dict[str, Any] | None, names: list[str]) -> list[str]:
    out = []
    for n in names:
        v = (values or {}).get(n)
        if n in ("accuracy_loss", "accuracy", "accuracy_top5"):
            out.append(_td(_pct(v)))
        elif n == "size":
            out.append(_td(_mb(v)))
        else:
            out.append(_td(_num(v)))
    return out


def _objective_headers(names: list[str]) -> list[str]:
    units = {"accuracy_loss": " (%)", "accuracy": " (%)", "accuracy_top5": " (%)", "size": " (MB)", "latency": " (ms)"}
    return [f"{n}{units.get(n, '')}" for n in names]


def _cross_device(report: dict[str, Any], cands: dict[str, dict[str, Any]], names: list[str]) -> str:
    entries = report.get("cross_device") or []
    if not entries:
        return ""
    parts = ["<h2>Cross-device fronts (worst value over devices)</h2>"]
    for x in entries:
        parts.append(
            f"<h3>{_e(x.get('model'))} · {_e(x.get('mode'))} · devices: {_e(', '.join(x.get('devices') or []))}</h3>"
        )
        members = [c for c in x.get("candidates") or [] if c.get("front") is not None]
        members.sort(key=lambda c: (c["front"], c.get("k") if c.get("k") is not None else 10**9))
        rows = []
        for c in members:
            cls = "sel" if c.get("id") == x.get("selected") else ""
            name = _cand_name(cands.get(c["id"]) or c)
            rows.append(
                [
                    _td(_front_cell(c["front"]), cls=cls),
                    _td(_e(name), text=True, cls=cls, title=c.get("id")),
                    *_objective_cells(c.get("worst"), names),
                ]
            )
        if rows:
            parts.append(
                _table(["front", "candidate"] + [f"worst {h}" for h in _objective_headers(names)], rows, text_cols=(1,))
            )
            sel = cands.get(x.get("selected")) if x.get("selected") else None
            parts.append(f'<p class="meta">Selected across devices (highlighted): {_e(_cand_name(sel))}</p>')
        else:
            parts.append('<p class="muted">No candidate is done and feasible on every device yet.</p>')
        excluded = x.get("excluded") or []
        if excluded:
            items = "".join(
                f"<li>{_e(_cand_name(cands.get(ex.get('candidate'))))}: {_e(ex.get('reason'))}</li>" for ex in excluded
            )
            parts.append(
                f'<details><summary>{len(excluded)} candidates excluded</summary><ul class="inf">{items}</ul></details>'
            )
    return "\n".join(parts)


def _groups(report: dict[str, Any], images: dict[str, Path], cands: dict[str, dict[str, Any]], names: list[str]) -> str:
    parts = ["<h2>Per device: plots and Pareto fronts</h2>"]
    summary = {(s.get("model"), s.get("mode"), s.get("device")): s for s in report.get("summary") or []}
    for entry in report.get("fronts") or []:
        model, mode, device = entry.get("model"), entry.get("mode"), entry.get("device")
        parts.append(f"<h3>{_e(model)} · {_e(mode)} · {_e(device)}</h3>")
        parts.append('<div class="figs">')
        for kind in PLOT_KINDS:
            path = images.get(plot_key(kind, model, mode, device))
            uri = _data_uri(path) if path is not None else None
            if uri is None:
                parts.append(f'<p class="muted">{_e(kind)} plot not available.</p>')
                continue
            parts.append(
                f'<figure><img src="{uri}" alt="{_e(kind)} plot for {_e(model)} {_e(mode)} {_e(device)}">'
                f"<figcaption>{_e(_PLOT_CAPTIONS.get(kind, kind))}</figcaption></figure>"
            )
        parts.append("</div>")
        selected = (summary.get((model, mode, device)) or {}).get("selected")
        rows = []
        for n, front in enumerate(entry.get("fronts") or [], start=1):
            for cid in front:
                c = cands.get(cid, {})
                r: dict[str, Any] = next((x for x in c.get("results") or [] if x.get("device") == device), {})
                cls = "sel" if cid == selected else ""
                rows.append(
                    [
                        _td(_front_cell(n), cls=cls),
                        _td(_e(_cand_name(c or {"id": cid})), text=True, cls=cls, title=cid),
                        _td(_e(len(c.get("excluded") or [])), cls=cls),
                        *_objective_cells(r.get("objectives"), names),
                    ]
                )
        if rows:
            parts.append(_table(["front", "candidate", "#excluded", *_objective_headers(names)], rows, text_cols=(1,)))
            parts.append('<p class="meta">Highlighted row: the selected candidate.</p>')
        else:
            parts.append('<p class="muted">No done and feasible candidate on this device yet.</p>')
    return "\n".join(parts)


def _candidates(report: dict[str, Any]) -> str:
    parts = ["<h2>All candidates</h2>"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in report.get("candidates") or []:
        groups.setdefault((c.get("model"), c.get("mode")), []).append(c)
    dev_order = [d.get("name") for d in report.get("devices") or []]
    for (model, mode), members in groups.items():
        seen = [r.get("device") for c in members for r in c.get("results") or []]
        devices = [d for d in dev_order if d in seen] + [d for d in dict.fromkeys(seen) if d not in dev_order]
        members = sorted(
            members,
            key=lambda c: (0, int(c["k"])) if c.get("kind") == "ranked" and c.get("k") is not None else (1, 0),
        )
        head = (
            '<tr><th rowspan="2">k</th><th class="t" rowspan="2">label</th><th rowspan="2">#excluded</th>'
            '<th rowspan="2">size (MB)</th>'
            + "".join(f'<th colspan="5">{_e(d)}</th>' for d in devices)
            + "</tr><tr>"
            + "<th>agreement (%)</th><th>accuracy (%)</th><th>latency (ms)</th><th>front</th>"
            '<th class="t">status</th>' * len(devices) + "</tr>"
        )
        rows = []
        for c in members:
            row = [
                _td(_e(c.get("k")) if c.get("k") is not None else '<span class="muted">–</span>'),
                _td(_e(c.get("label")), text=True, title=c.get("id")),
                _td(_e(len(c.get("excluded") or []))),
                _td(_mb(c.get("size_bytes"))),
            ]
            by_dev = {r.get("device"): r for r in c.get("results") or []}
            for d in devices:
                r = by_dev.get(d)
                if r is None:
                    row += [_td(_num(None))] * 4 + [_td('<span class="muted">no result</span>', text=True)]
                    continue
                status = str(r.get("status"))
                shown = status if r.get("feasible") is not False or status != "done" else "done, infeasible"
                row += [
                    _td(_pct(r.get("agreement"))),
                    _td(_pct(r.get("accuracy"))),
                    _td(_num(r.get("latency_ms"))),
                    _td(_front_cell(r.get("front"))),
                    _td(f'<span class="st-{_e(status)}">{_e(shown)}</span>', text=True, title=r.get("reason")),
                ]
            rows.append(row)
        parts.append(f"<h3>{_e(model)} · {_e(mode)}</h3>")
        parts.append(_table([], rows, head_html=head))
    return "\n".join(parts)


def _infeasible(report: dict[str, Any], cands: dict[str, dict[str, Any]]) -> str:
    items = report.get("infeasible") or []
    parts = [f"<h2>Not in any front ({len(items)})</h2>"]
    if not items:
        parts.append('<p class="muted">Every evaluated candidate was feasible.</p>')
        return "\n".join(parts)
    rows = []
    for it in items:
        c = cands.get(it.get("candidate")) or {}
        rows.append(
            [
                _td(_e(c.get("model")), text=True),
                _td(_e(c.get("mode")), text=True),
                _td(_e(_cand_name(c or {"id": it.get("candidate")})), text=True, title=it.get("candidate")),
                _td(_e(it.get("device")), text=True),
                _td(_e(it.get("reason")), text=True),
            ]
        )
    parts.append(_table(["model", "mode", "candidate", "device", "reason"], rows, cls="infeasible", text_cols=range(5)))
    return "\n".join(parts)


def _layers(report: dict[str, Any]) -> str:
    parts = ["<h2>Layer ranking (paper IV-C: score = 0.5·norm qdq_err + 0.5·norm xmodel_err)</h2>"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for layer in report.get("layers") or []:
        groups.setdefault((layer.get("model"), layer.get("mode")), []).append(layer)
    if not groups:
        parts.append('<p class="muted">No layer analysis in this report.</p>')
    headers = ["rank", "layer", "op type", "index", "qdq_err", "xmodel_err", "score"]

    def row(layer: dict[str, Any]) -> list[str]:
        return [
            _td(_e(layer.get("rank"))),
            _td(_e(layer.get("name")), text=True),
            _td(_e(layer.get("op_type")), text=True),
            _td(_e(layer.get("index"))),
            _td(_num(layer.get("qdq_err"), "{:.4g}")),
            _td(_num(layer.get("xmodel_err"), "{:.4g}")),
            _td(_num(layer.get("score"), "{:.4f}")),
        ]

    for (model, mode), layers in groups.items():
        layers = sorted(
            layers,
            key=lambda L: (
                L.get("rank") is None,
                L.get("rank") if L.get("rank") is not None else 0,
                -(L.get("score") or 0.0),
            ),
        )
        parts.append(f"<h3>{_e(model)} · {_e(mode)}: top {min(LAYERS_TOP, len(layers))} of {len(layers)}</h3>")
        parts.append(_table(headers, (row(L) for L in layers[:LAYERS_TOP]), cls="layers-top", text_cols=(1, 2)))
        parts.append(
            f"<details><summary>all {len(layers)} layers</summary>"
            + _table(headers, (row(L) for L in layers), cls="layers-all", text_cols=(1, 2))
            + "</details>"
        )
    return "\n".join(parts)


def _other_images(images: dict[str, Path], report: dict[str, Any]) -> str:
    known = {
        plot_key(kind, e.get("model"), e.get("mode"), e.get("device"))
        for e in report.get("fronts") or []
        for kind in PLOT_KINDS
    }
    extra = [(k, p) for k, p in images.items() if k not in known]
    if not extra:
        return ""
    parts = ["<h2>Other figures</h2>"]
    for key, path in extra:
        uri = _data_uri(path)
        if uri is None:
            continue
        try:
            caption = " · ".join(str(x) for x in json.loads(key))
        except (ValueError, TypeError):
            caption = key
        parts.append(f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')
    return "\n".join(parts)


def render_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    """Render a finalized report as one self-contained HTML page.

    ``images`` maps :func:`tuneqn.controller.report.plots.plot_key` keys to image
    files, which are embedded as data URIs; images under other keys are shown in
    an "Other figures" section.
    """
    cands = {c.get("id"): c for c in report.get("candidates") or []}
    names = [o.get("name") for o in report.get("objectives") or []]
    title = f"TuneQn report: {(report.get('study') or {}).get('name', 'study')}"
    body = [
        _header(report),
        _summary(report, cands),
        _cross_device(report, cands, names),
        _groups(report, images, cands, names),
        _candidates(report),
        _infeasible(report, cands),
        _layers(report),
        _other_images(images, report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )

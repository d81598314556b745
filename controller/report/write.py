"""Write the report: ``report.json`` (atomically), the PNG plots and ``report.html``.

The report dict is validated into :class:`~tuneqn.controller.report.schema.Report` first
(a report that does not match the schema raises ``ValueError`` and nothing is written);
report.json is written from the model. Plots and HTML (matplotlib, Jinja2) are imported
only when the full report is written; the cheap checkpoint view (:func:`write_json`)
needs neither.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from tuneqn.controller import accuracy
from tuneqn.controller.common.files import atomic_write_bytes
from tuneqn.controller.common.versions import cpu_cores
from tuneqn.controller.store import Store

from .answer import Constraint
from .compute import compute_report
from .schema import Report

logger = logging.getLogger(__name__)

JSON_NAME = "report.json"
HTML_NAME = "report.html"


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with non-finite floats as None and paths as strings (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def validate_report(report: dict[str, Any] | Report) -> Report:
    """``report`` as a :class:`Report` (raises ``ValueError`` naming what does not match the schema)."""
    if isinstance(report, Report):
        return report
    try:
        return Report.model_validate(json_safe(report))
    except ValidationError as exc:
        raise ValueError(f"the report does not match the report schema: {exc}") from exc


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON form of a report (what report.json holds)."""
    return report.model_dump(mode="json")


def _write_json_file(report: dict[str, Any] | Report, out_dir: Path) -> Path:
    path = Path(out_dir) / JSON_NAME
    text = json.dumps(report_dict(validate_report(report)), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "x"


def write_report(report: dict[str, Any] | Report, out_dir: Path, plot_workers: int = 1) -> dict[str, Path]:
    """Write a finalized ``report`` under ``out_dir``: report.json, plots/*.png, report.html.

    Raises ``ValueError`` when the report is not finalized or does not match the schema. ``plot_workers``:
    processes that draw the plots (:func:`render_plots`).

    Returns ``{"json": path, "html": path, plot_key(...): png path, ...}`` (see
    :func:`tuneqn.controller.report.plots.plot_key`; with several recipes also one
    :func:`~tuneqn.controller.report.plots.recipe_plot_key` plot per (model, device)).
    """
    from .html import render_html

    if isinstance(report, dict) and ("fronts" not in report or "summary" not in report):
        raise ValueError("report is not finalized; call finalize_report() first")
    typed = validate_report(report)
    report = report_dict(typed)  # the plots read the JSON form
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"json": _write_json_file(typed, out_dir)}

    images = render_plots(report, out_dir, workers=plot_workers)
    paths.update(images)
    layer_png = out_dir / "layer_errors.png"  # paper Fig. 2, written by the analysis
    if layer_png.is_file():
        images["layer_errors"] = layer_png

    html_path = out_dir / HTML_NAME
    atomic_write_bytes(html_path, render_html(typed, images).encode("utf-8"))
    paths["html"] = html_path
    logger.info("report written to %s (%d plots)", out_dir, len(images))
    return paths


PLOT_KEYS = ".plot-keys.json"


def plot_input(report: dict[str, Any], model: str) -> dict[str, Any]:
    """What the plots of ``model`` read from a report (its JSON form): its candidates, its summary rows, its
    ``models`` entry and the objectives. A plot is rendered from this part alone, so it is the same picture
    whenever this part is the same (what :func:`render_plots` keys its cache by)."""
    return {
        "candidates": [c for c in report.get("candidates") or [] if c.get("model") == model],
        "summary": [s for s in report.get("summary") or [] if s.get("model") == model],
        "models": [m for m in report.get("models") or [] if m.get("name") == model],
        "objectives": report.get("objectives") or [],
    }


#: Fewer plots to draw than this are drawn in this process (starting a worker costs about as much as a few plots).
POOL_MIN_PLOTS = 12


def _draw(what: tuple[str, ...], sub: dict[str, Any], png: Path) -> str | None:
    """Draw one plot (``what``: kind, model, recipe, device, or ``recipes``, model, device) from its part of the
    report; the reason when it cannot be drawn. Module level: process-pool workers run it."""
    from .plots import recipes_scatter, render_plot

    try:
        if what[0] == "recipes":
            recipes_scatter(sub, what[1], what[2], png)
        else:
            render_plot(what[0], sub, what[1], what[2], what[3], png)
    except ValueError as exc:
        return str(exc)
    return None


def render_plots(
    report: dict[str, Any],
    out_dir: Path,
    models: set[str] | None = None,
    workers: int = 1,
    cancel: Callable[[], bool] | None = None,
) -> dict[str, Path]:
    """The plots of a finalized report (its JSON form) under ``out_dir/plots``: per (model, recipe, device)
    each of ``PLOT_KINDS``, per (model, device) with several recipes the recipes plot; only those of
    ``models`` when given. A plot whose input (:func:`plot_input`, the tuneqn and matplotlib versions) is
    the one it was last rendered from, and whose file is still there, is not rendered again
    (``plots/.plot-keys.json``): a run renders a finished model's plots while others still run, and the
    final report redraws only what changed. With ``workers`` > 1 and enough plots to draw, they are drawn
    by a pool of that many processes. Drawing in this process stops early when ``cancel()`` says so (what
    was not drawn is drawn by the next call). Returns {plot key: png path}."""
    import matplotlib

    from tuneqn import __version__

    from .plots import PLOT_KINDS, plot_key, recipe_plot_key

    out_dir = Path(out_dir)
    index_path = out_dir / "plots" / PLOT_KEYS
    try:
        index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    except (OSError, ValueError):
        index = {}
    inputs: dict[str, dict[str, Any]] = {}
    wanted: list[tuple[str, tuple[str, ...], Path]] = []  # (plot key, what, png)
    used: set[str] = set()
    for entry in report["fronts"]:
        model, mode, device = entry["model"], entry["mode"], entry["device"]
        stem = _unique(f"{_slug(model)}__{_slug(mode)}__{_slug(device)}", used)
        if models is None or model in models:
            wanted += [
                (
                    plot_key(kind, model, mode, device),
                    (kind, model, mode, device),
                    out_dir / "plots" / f"{stem}__{kind}.png",
                )
                for kind in PLOT_KINDS
            ]
    for entry in report.get("recipe_fronts") or []:
        if len(entry.get("recipes") or []) < 2:  # one recipe: the tradeoff plot shows it
            continue
        model, device = entry["model"], entry["device"]
        stem = _unique(f"{_slug(model)}__recipes__{_slug(device)}", used)
        if models is None or model in models:
            wanted.append(
                (recipe_plot_key(model, device), ("recipes", model, device), out_dir / "plots" / f"{stem}.png")
            )
    todo: list[tuple[tuple[str, ...], dict[str, Any], Path, str]] = []  # (what, its input, png, cache key)
    for _, what, png in wanted:
        sub = inputs.setdefault(what[1], plot_input(report, what[1]))
        key = hashlib.sha256(
            json.dumps([what, sub, __version__, matplotlib.__version__], sort_keys=True, default=str).encode()
        ).hexdigest()
        if index.get(png.name) != key or not png.is_file():
            todo.append((what, sub, png, key))
    if workers > 1 and len(todo) >= POOL_MIN_PLOTS:
        # spawn: the controller's threads (gRPC) must not be forked
        with concurrent.futures.ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            problems = list(pool.map(_draw, *zip(*[(w, sub, png) for w, sub, png, _ in todo], strict=True)))
    else:
        problems = []
        for w, sub, png, _ in todo:
            if cancel is not None and cancel():
                break
            problems.append(_draw(w, sub, png))
    failed = {png for _, _, png, _ in todo[len(problems) :]}  # not drawn (cancelled)
    for (_, _, png, key), problem in zip(todo, problems):  # noqa: B905 - a cancelled call drew fewer
        if problem is None:
            index[png.name] = key
        else:
            logger.warning("skipping plot %s: %s", png.name, problem)
            failed.add(png)
    if todo:
        atomic_write_bytes(index_path, json.dumps(index, indent=0, sort_keys=True).encode("utf-8"))
    return {key: png for key, _, png in wanted if png not in failed}


def write_checkpoint(
    store: Store, out_dir: Path, plot_models: set[str] | None = None, cancel: Callable[[], bool] | None = None
) -> float:
    """:func:`write_json`, and the plots of ``plot_models`` from the same report (:func:`render_plots`), ahead of
    the full report. Returns the seconds report.json took (the plots aside)."""
    t0 = time.monotonic()
    accuracy.backfill(store)
    typed = validate_report(compute_report(store))
    _write_json_file(typed, Path(out_dir))
    took = time.monotonic() - t0
    if plot_models:
        render_plots(report_dict(typed), Path(out_dir), plot_models, cancel=cancel)
    return took


def write_json(store: Store, out_dir: Path) -> Path:
    """Rewrite ``report.json`` from the store (the cheap checkpoint view; no plots, no HTML)."""
    accuracy.backfill(store)
    return _write_json_file(compute_report(store), Path(out_dir))


def write_full_report(store: Store, out_dir: Path, answer_constraint: Constraint | None = None) -> dict[str, Path]:
    """Write report.json, the plots and report.html from the store (see :func:`write_report`);
    ``answer_constraint`` replaces the study's constraint of the answer."""
    accuracy.backfill(store)
    return write_report(compute_report(store, answer_constraint), Path(out_dir), plot_workers=cpu_cores())


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, … if taken; marks it as used."""
    out, n = stem, 2
    while out in used:
        out = f"{stem}-{n}"
        n += 1
    used.add(out)
    return out

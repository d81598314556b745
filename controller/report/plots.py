"""PNG plots of a finalized report (paper, section IV-F and Fig. 3), rendered headless.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, so importing
this module never touches pyplot or the global backend.  Both plots read the keys
that :func:`tuneqn.controller.report.finalize.finalize_report` adds
(``results[].objectives``, ``results[].front``, ``results[].feasible``).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tuneqn.controller.files import atomic_write_bytes
from tuneqn.controller.objectives import OBJECTIVES

logger = logging.getLogger(__name__)

FIGSIZE = (8.0, 4.5)
DPI = 110

#: Line style of fronts 1, 2, 3 (colour, line style, width).
FRONT_STYLES: dict[int, tuple[str, str, float]] = {
    1: ("#d62728", "-", 2.0),
    2: ("#9467bd", "--", 1.6),
    3: ("#8c564b", ":", 1.8),
}
_OBJECTIVE_COLORS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#17becf", "#bcbd22"]
_OBJECTIVE_MARKERS = ["o", "s", "^", "D", "v"]

#: How a latency legend entry says that (some of) its values come from untuned TVM builds.
UNTUNED_LABEL = "untuned TVM build"

#: The plots :func:`render_plot` knows, in the order the HTML shows them.
PLOT_KINDS = ("objectives", "tradeoff")


def plot_key(kind: str, model: str, mode: str, device: str) -> str:
    """Key of one plot in the ``images`` mapping shared by write_report and render_html."""
    return json.dumps([kind, model, mode, device], ensure_ascii=False)


def _new_figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(Path(path), buf.getvalue())
    logger.debug("wrote plot %s", path)
    return Path(path)


def recipe_plot_key(model: str, device: str) -> str:
    """Key of the plot of every recipe's results of (model, device) (:func:`recipes_scatter`)."""
    return plot_key("recipes", model, "", device)


def _group(
    report: dict[str, Any], model: str, mode: str | None, device: str
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(candidate, full result on device) pairs of one (model, recipe) (every recipe: ``mode`` None),
    search-proposed candidates by k first."""
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for c in report.get("candidates") or []:
        if c.get("model") != model or (mode is not None and c.get("mode") != mode):
            continue
        if c.get("level", "full") != "full":  # screening results are never plotted
            continue
        for r in c.get("results") or []:
            if r.get("device") == device:
                if "objectives" not in r:
                    raise ValueError("report is not finalized; call finalize_report() first")
                pairs.append((c, r))
    ranked = sorted((p for p in pairs if _is_ranked(p[0])), key=lambda p: int(p[0]["k"]))
    return ranked + [p for p in pairs if not _is_ranked(p[0])]


def _selected_id(report: dict[str, Any], model: str, mode: str, device: str) -> str | None:
    for s in report.get("summary") or []:
        if (s.get("model"), s.get("mode"), s.get("device")) == (model, mode, device):
            selected = s.get("selected")
            return None if selected is None else str(selected)
    return None


def _fmt_objective(name: str, value: float) -> str:
    o = OBJECTIVES[name]
    return o.fmt(value, 1 if o.display_unit == "%" else 2)


def _is_ranked(c: dict[str, Any]) -> bool:
    """A candidate with a place on the k axis: proposed by a search (``set``; ``ranked`` before searches)."""
    return c.get("kind") in ("set", "ranked") and c.get("k") is not None


def objectives_vs_candidate(report: dict[str, Any], model: str, mode: str, device: str, path: Path) -> Path:
    """Paper Fig. 3: every objective (min-max normalized to 0-100 %) against candidate k.

    Only search-proposed candidates are drawn (explicit sets have no place on the k axis);
    the top-3 fronts are vertical lines, failed, infeasible and not yet evaluated candidates
    are shaded.  When several candidates share a k (sets of different searches), points are
    not joined by lines.  A latency from untuned TVM builds says so in its legend entry.
    Returns ``path``.
    """
    return _save(objectives_figure(report, model, mode, device), path)


def objectives_figure(report: dict[str, Any], model: str, mode: str, device: str) -> Figure:
    """The figure of :func:`objectives_vs_candidate` (not saved)."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    pairs = [p for p in _group(report, model, mode, device) if _is_ranked(p[0])]
    objectives = [o["name"] for o in report.get("objectives") or []]
    # One slot per ranked candidate; not-done ones stay NaN so that lines break there.
    ks = np.array([int(c["k"]) for c, _ in pairs], dtype=float)
    joined = len(set(ks.tolist())) == len(ks)

    plotted = False
    for i, name in enumerate(objectives):
        vals = np.array(
            [
                float(r["objectives"][name])
                if r.get("status") == "done" and r["objectives"].get(name) is not None
                else np.nan
                for _, r in pairs
            ],
            dtype=float,
        )
        ok = ~np.isnan(vals)
        if not ok.any():
            continue
        lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
        norm = (vals - lo) / (hi - lo) * 100.0 if hi > lo else np.where(ok, 0.0, np.nan)
        direction = next((o.get("direction") for o in report["objectives"] if o["name"] == name), "min")
        label = f"{name} ({direction}): {_fmt_objective(name, lo)} = 0%, {_fmt_objective(name, hi)} = 100%"
        if name == "latency" and any(r.get("untuned") for _, r in pairs if r.get("status") == "done"):
            label += f" [{UNTUNED_LABEL}]"
        ax.plot(
            ks,
            norm,
            color=_OBJECTIVE_COLORS[i % len(_OBJECTIVE_COLORS)],
            marker=_OBJECTIVE_MARKERS[i % len(_OBJECTIVE_MARKERS)],
            markersize=4,
            linewidth=1.4 if joined else 0.0,
            linestyle="-" if joined else "none",
            label=label,
            zorder=3,
        )
        plotted = True

    shaded: set[str] = set()
    for c, r in pairs:
        k = int(c["k"])
        if r.get("status") in ("failed", "unreachable", "infeasible"):
            kind, color = "failed / unreachable / infeasible on device", "#bbbbbb"
        elif r.get("status") == "done" and r.get("feasible") is False:
            kind, color = "infeasible (bounds / missing metric)", "#f4c7c3"
        elif r.get("status") in ("pending", "running"):
            kind, color = "not evaluated yet", "#fff3c4"
        else:
            continue
        ax.axvspan(k - 0.5, k + 0.5, color=color, alpha=0.6, zorder=1, label=None if kind in shaded else kind)
        shaded.add(kind)

    off_axis: list[str] = []
    for n in sorted(FRONT_STYLES):
        color, style, width = FRONT_STYLES[n]
        labelled = False
        for c, r in _group(report, model, mode, device):
            if r.get("front") != n:
                continue
            if not _is_ranked(c):
                off_axis.append(f"front {n}: {c.get('label') or c['id']}")
                continue
            ax.axvline(
                int(c["k"]),
                color=color,
                linestyle=style,
                linewidth=width,
                zorder=2,
                label=None if labelled else f"front {n}",
            )
            labelled = True

    selected = _selected_id(report, model, mode, device)
    sel_k = [int(c["k"]) for c, _ in pairs if c["id"] == selected]
    if sel_k:
        ax.scatter(
            sel_k,
            [103.0],
            marker="v",
            s=70,
            color="#2e7d32",
            zorder=5,
            clip_on=False,
            label="selected (compromise on front 1)",
        )

    if not plotted:
        ax.text(0.5, 0.5, "no evaluated candidates with a k yet", ha="center", va="center", transform=ax.transAxes)
    all_ks = [int(c["k"]) for c, _ in pairs]
    if all_ks:
        ax.set_xlim(min(all_ks) - 0.6, max(all_ks) + 0.6)
    ax.set_ylim(-5, 105)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("candidate k (layers left in FP32; 0 = fully quantized)")
    ax.set_ylabel("objective, min-max normalized\nover these candidates (%)")
    ax.set_title(f"{model} · recipe {mode} on {device}:\nobjectives per candidate, top-3 Pareto fronts", fontsize=10)
    ax.grid(True, alpha=0.3, zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7.5, frameon=False)
    if off_axis:
        fig.text(0.01, 0.01, "explicit candidates on fronts (not on the k axis): " + ", ".join(off_axis), fontsize=7)
    fig.tight_layout()
    return fig


def tradeoff_scatter(report: dict[str, Any], model: str, mode: str, device: str, path: Path) -> Path:
    """Accuracy loss vs size (MB) of every evaluated candidate, fronts connected.

    Points are labelled with k (explicit candidates with their label); the FP32
    model (size from ``models[]``, loss 0 by definition) and the fully quantized
    model (k = 0) are marked.  Returns ``path``.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    pts: list[tuple[dict[str, Any], dict[str, Any], float, float]] = []
    for c, r in _group(report, model, mode, device):
        agreement = r.get("agreement")
        size = c.get("size_bytes")
        if r.get("status") != "done" or agreement is None or size is None:
            continue
        if not (np.isfinite(float(agreement)) and np.isfinite(float(size))):
            continue
        x, y = OBJECTIVES["size"].display(size), OBJECTIVES["accuracy_loss"].display(1.0 - float(agreement))
        if x is not None and y is not None:
            pts.append((c, r, x, y))

    for c, r, x, y in pts:
        front = r.get("front")
        color = FRONT_STYLES[front][0] if front in FRONT_STYLES else "#7f7f7f"
        hollow = r.get("feasible") is False
        ax.scatter(
            [x],
            [y],
            s=28,
            zorder=3,
            marker="o",
            facecolors="none" if hollow else color,
            edgecolors=color,
            linewidths=1.2,
        )
        text = str(c["k"]) if _is_ranked(c) else str(c.get("label") or c["id"])
        ax.annotate(text, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7, color="#333333")

    for n in sorted(FRONT_STYLES):
        color, style, width = FRONT_STYLES[n]
        members = sorted(((x, y) for c, r, x, y in pts if r.get("front") == n))
        if members:
            xs, ys = zip(*members, strict=False)
            ax.plot(
                xs,
                ys,
                color=color,
                linestyle=style,
                linewidth=width,
                marker="o",
                markersize=5,
                label=f"front {n}",
                zorder=2,
            )

    if any(r.get("front") not in FRONT_STYLES and r.get("feasible") is not False for _, r, _, _ in pts):
        ax.scatter([], [], s=28, color="#7f7f7f", label="other evaluated")
    if any(r.get("feasible") is False for _, r, _, _ in pts):
        ax.scatter([], [], s=28, facecolors="none", edgecolors="#7f7f7f", label="infeasible (bounds)")

    selected = _selected_id(report, model, mode, device)
    sel = [(x, y) for c, _, x, y in pts if c["id"] == selected]
    if sel:
        ax.scatter(
            [sel[0][0]],
            [sel[0][1]],
            s=150,
            marker="s",
            facecolors="none",
            edgecolors="#2e7d32",
            linewidths=1.8,
            zorder=4,
            label="selected (compromise on front 1)",
        )
    fq = [(x, y) for c, _, x, y in pts if _is_ranked(c) and int(c["k"]) == 0]
    if fq:
        ax.scatter(
            [fq[0][0]],
            [fq[0][1]],
            s=160,
            facecolors="none",
            edgecolors="black",
            linewidths=1.5,
            zorder=4,
            label="fully quantized (k=0)",
        )
    orig = next((m.get("size_bytes") for m in report.get("models") or [] if m.get("name") == model), None)
    if orig is not None:
        ax.scatter(
            [OBJECTIVES["size"].display(orig)],
            [0.0],
            s=140,
            marker="*",
            color="gold",
            edgecolors="black",
            zorder=5,
            label="FP32 original (loss 0)",
        )

    return _finish_loss_vs_size(fig, ax, bool(pts), f"{model} · recipe {mode} on {device}: accuracy loss vs size",
                                path)


_RECIPE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_RECIPE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<"]


def recipes_scatter(report: dict[str, Any], model: str, device: str, path: Path) -> Path:
    """Accuracy loss vs size of every full result of every recipe of ``model`` on ``device``.

    Colour and marker by recipe; front 1 over all recipes (``results[].recipe_front``)
    is drawn larger and connected; the FP32 model is a star.  Returns ``path``.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    recipes: list[str] = []
    pts: list[tuple[str, float, float, bool]] = []
    for c, r in _group(report, model, None, device):
        recipe = str(c.get("recipe") or c.get("mode"))
        if recipe not in recipes:
            recipes.append(recipe)
        agreement, size = r.get("agreement"), c.get("size_bytes")
        if r.get("status") != "done" or agreement is None or size is None:
            continue
        x, y = OBJECTIVES["size"].display(size), OBJECTIVES["accuracy_loss"].display(1.0 - float(agreement))
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
            continue
        pts.append((recipe, x, y, r.get("recipe_front") == 1))
    for i, recipe in enumerate(recipes):
        mine = [(x, y, f1) for rc, x, y, f1 in pts if rc == recipe]
        if not mine:
            continue
        color, marker = _RECIPE_COLORS[i % len(_RECIPE_COLORS)], _RECIPE_MARKERS[i % len(_RECIPE_MARKERS)]
        ax.scatter([x for x, _, f1 in mine if not f1], [y for _, y, f1 in mine if not f1], s=18, marker=marker,
                   color=color, alpha=0.55, zorder=3, label=recipe)
        front = [(x, y) for x, y, f1 in mine if f1]
        if front:
            ax.scatter(*zip(*front, strict=True), s=60, marker=marker, color=color, edgecolors="black",
                       linewidths=1.0, zorder=5, label=f"{recipe}: on front 1")
    front = sorted((x, y) for _, x, y, f1 in pts if f1)
    if front:
        color, style, width = FRONT_STYLES[1]
        ax.plot(*zip(*front, strict=True), color=color, linestyle=style, linewidth=width, zorder=4,
                label="front 1 over all recipes")
    orig = next((m.get("size_bytes") for m in report.get("models") or [] if m.get("name") == model), None)
    if orig is not None:
        ax.scatter([OBJECTIVES["size"].display(orig)], [0.0], s=140, marker="*", color="gold", edgecolors="black",
                   zorder=6, label="FP32 original (loss 0)")
    return _finish_loss_vs_size(fig, ax, bool(pts), f"{model} on {device}: every recipe, accuracy loss vs size", path)


def _finish_loss_vs_size(fig: Any, ax: Any, any_points: bool, title: str, path: Path) -> Path:
    """Labels, grid and legend of an accuracy-loss-vs-size plot; saves it."""
    if not any_points:
        ax.text(0.5, 0.5, "no evaluated candidates yet", ha="center", va="center", transform=ax.transAxes)
    loss = OBJECTIVES["accuracy_loss"]
    ax.set_xlabel(f"model size ({OBJECTIVES['size'].display_unit})")
    ax.set_ylabel(f"{loss.name} ({loss.display_unit})\n1 − top-1 agreement with FP32")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=7.5)
    fig.tight_layout()
    return _save(fig, path)


def render_plot(kind: str, report: dict[str, Any], model: str, mode: str, device: str, path: Path) -> Path:
    """Render plot ``kind`` (one of :data:`PLOT_KINDS`) to ``path``."""
    if kind == "objectives":
        return objectives_vs_candidate(report, model, mode, device, path)
    if kind == "tradeoff":
        return tradeoff_scatter(report, model, mode, device, path)
    raise ValueError(f"unknown plot kind {kind!r}; known: {PLOT_KINDS}")

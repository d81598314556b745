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
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tuneqn.controller.common.files import atomic_write_bytes
from tuneqn.controller.objectives import OBJECTIVES
from tuneqn.controller.report.pareto import top_fronts
from tuneqn.controller.store import is_fully_quantized

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


def _fp32_star(ax: Any, size_bytes: float, zorder: int) -> None:
    """The FP32 original on a (size, loss) plot: a gold star at its size and no loss."""
    fp32_x = OBJECTIVES["size"].display(size_bytes)  # None (a non-finite size) is drawn as nothing, as NaN is
    ax.scatter(
        [math.nan if fp32_x is None else fp32_x],
        [0.0],
        s=140,
        marker="*",
        color="gold",
        edgecolors="black",
        zorder=zorder,
        label="FP32 original (loss 0)",
    )


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


def _ring(ax: Any, point: tuple[float, float], **style: Any) -> None:
    """An unfilled marker around one plotted point (the selected or the fully quantized candidate)."""
    ax.scatter([point[0]], [point[1]], facecolors="none", zorder=4, **style)


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


#: Marker of each ranking's candidates (the label's word before " k=": the searches' ranking).
_FAMILY_MARKERS = {"paper": "^", "measured": "o", "qdq": "v", "xmodel": "D"}
_OTHER_MARKERS = ["P", "X", "<", ">", "h"]


def _family(c: dict[str, Any]) -> str | None:
    """The ranking that ordered a search-proposed candidate (``paper k=3`` → ``paper``; None if none says)."""
    label = str(c.get("label") or "")
    if _is_ranked(c) and " k=" in label:
        return label.rsplit(" k=", 1)[0].strip() or None
    return None


def _families(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, tuple[str, list[str]]]:
    """Ranking → (marker, the searches that proposed its candidates), in order of appearance."""
    out: dict[str, tuple[str, list[str]]] = {}
    for c, _ in pairs:
        fam = _family(c)
        if fam is None:
            continue
        marker = _FAMILY_MARKERS.get(fam) or _OTHER_MARKERS[len(out) % len(_OTHER_MARKERS)]
        searches = out.setdefault(fam, (marker, []))[1]
        for p in c.get("proposed_by") or []:
            if p.get("search") and p["search"] not in searches:
                searches.append(str(p["search"]))
    return out


def _family_label(fam: str, searches: list[str]) -> str:
    """Legend text of a ranking: ``paper ranking (sweep/paper)``."""
    return f"{fam} ranking" + (f" ({', '.join(searches)})" if searches else "")


def _point_label(c: dict[str, Any], several: bool) -> str:
    """A point's label: k, prefixed with the ranking's initial when several rankings share the plot (``p18``)."""
    if not _is_ranked(c):
        return str(c.get("label") or c["id"])
    fam = _family(c)
    return f"{fam[0]}{c['k']}" if several and fam else str(c["k"])


def _boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(
    fig: Figure,
    ax: Any,
    labels: list[tuple[float, float, str]],
    points: list[tuple[float, float]],
    fontsize: float = 7.0,
    big: Sequence[tuple[float, float]] = (),
) -> int:
    """Annotate ``labels`` (x, y, text) next to their points where the text overlaps no other label, no
    point and stays inside the axes (tried around the point in turn); a label without such a place is left
    out.  ``big``: points drawn with a large marker (selected, fully quantized, FP32).  Call after the layout is
    final.  Returns how many were left out."""
    fig.canvas.draw()
    px = fig.dpi / 72.0
    to_px = ax.transData.transform
    frame = ax.get_window_extent()
    r = 4.5  # half a marker, pixels
    marks = [(float(x) - r, float(y) - r, float(x) + r, float(y) + r) for x, y in (to_px(p) for p in points)]
    R = 9.0  # half a large marker
    marks += [(float(x) - R, float(y) - R, float(x) + R, float(y) + R) for x, y in (to_px(p) for p in big)]
    taken: list[tuple[float, float, float, float]] = []
    left_out = 0
    for x, y, text in labels:
        cx, cy = (float(v) for v in to_px((x, y)))
        w, h = len(text) * fontsize * 0.62 * px, fontsize * 1.2 * px
        own = (cx - r, cy - r, cx + r, cy + r)
        hp = fontsize * 1.2  # text height, points
        for dx, dy in (
            (3, 2),
            (3, -2 - hp),
            (-3, 2),
            (-3, -2 - hp),
            (7, 6),
            (7, -6 - hp),
            (-7, 6),
            (-7, -6 - hp),
            (3, 9),
            (3, -9 - hp),
        ):
            x0 = cx + dx * px - (w if dx < 0 else 0.0)
            y0 = cy + dy * px
            box = (x0, y0, x0 + w, y0 + h)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if (
                inside
                and not any(_boxes_overlap(box, m) for m in marks if m != own)
                and not any(_boxes_overlap(box, t) for t in taken)
            ):
                taken.append(box)
                ax.annotate(
                    text,
                    (x, y),
                    xytext=(x0 - cx, y0 - cy),
                    textcoords="offset pixels",
                    fontsize=fontsize,
                    color="#333333",
                    ha="left",
                    va="bottom",
                    annotation_clip=False,
                )
                break
        else:
            left_out += 1
    return left_out


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
    families = _families(pairs)
    by_family = len(families) > 1  # paper and measured candidates: the marker says which ranking

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
        color = _OBJECTIVE_COLORS[i % len(_OBJECTIVE_COLORS)]
        ax.plot(
            ks,
            norm,
            color=color,
            marker="none" if by_family else _OBJECTIVE_MARKERS[i % len(_OBJECTIVE_MARKERS)],
            markersize=4,
            linewidth=1.4 if joined else 0.0,
            linestyle="-" if joined else "none",
            label=None if by_family and not joined else label,
            zorder=3,
        )
        if by_family and not joined:  # the legend needs a mark of the colour: the points' shapes are the rankings'
            ax.plot([], [], color=color, linewidth=3.0, label=label)
        if by_family:
            for fam, (marker, _) in families.items():
                sel = np.array([_family(c) == fam for c, _ in pairs]) & ok
                ax.scatter(ks[sel], norm[sel], marker=marker, s=22, color=color, zorder=4)
        plotted = True
    if by_family:
        for fam, (marker, searches) in families.items():
            ax.scatter([], [], marker=marker, s=22, color="#555555", label=_family_label(fam, searches))

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
    """Accuracy loss vs size (MB) of every evaluated candidate, fronts connected (:func:`tradeoff_figure`).

    Returns ``path``.
    """
    return _save(tradeoff_figure(report, model, mode, device), path)


def tradeoff_figure(report: dict[str, Any], model: str, mode: str, device: str) -> Figure:
    """The figure of :func:`tradeoff_scatter` (not saved).

    Colour: the candidate's front; marker: the ranking that proposed it (``paper`` triangles,
    ``measured`` circles, one legend entry each, naming the searches); hollow: infeasible.
    Points are labelled with k (``p18`` / ``m18`` when several rankings share the plot; explicit
    candidates with their label) where the label overlaps nothing; the legend sits outside the
    axes.  The FP32 model (size from ``models[]``, loss 0 by definition) and the fully quantized
    model (k = 0) are marked; so are candidates with precision levels (int4 twins, purple diamonds), with a
    dotted line for the front the in-or-out candidates alone make.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    pts: list[tuple[dict[str, Any], dict[str, Any], float, float]] = []
    group = _group(report, model, mode, device)
    for c, r in group:
        agreement = r.get("agreement")
        size = c.get("size_bytes")
        if r.get("status") != "done" or agreement is None or size is None:
            continue
        if not (np.isfinite(float(agreement)) and np.isfinite(float(size))):
            continue
        x, y = OBJECTIVES["size"].display(size), OBJECTIVES["accuracy_loss"].display(1.0 - float(agreement))
        if x is not None and y is not None:
            pts.append((c, r, x, y))
    families = _families([(c, r) for c, r, _, _ in pts])
    several = len(families) > 1

    for c, r, x, y in pts:
        front = r.get("front")
        color = FRONT_STYLES[front][0] if front in FRONT_STYLES else "#7f7f7f"
        hollow = r.get("feasible") is False
        fam = _family(c)
        ax.scatter(
            [x],
            [y],
            s=28,
            zorder=3,
            marker=families[fam][0] if fam in families else "s",
            facecolors="none" if hollow else color,
            edgecolors=color,
            linewidths=1.2,
        )

    for n in sorted(FRONT_STYLES):
        color, style, width = FRONT_STYLES[n]
        members = sorted(((x, y) for c, r, x, y in pts if r.get("front") == n))
        if members:
            xs, ys = zip(*members, strict=False)
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=width, label=f"front {n}", zorder=2)

    leveled = [(x, y) for c, r, x, y in pts if c.get("levels") and r.get("feasible") is not False]
    if leveled:  # precision levels: mark them, and draw the front the in-or-out candidates alone make
        xs, ys = zip(*leveled, strict=True)
        ax.scatter(xs, ys, s=70, marker="D", facecolors="none", edgecolors="#6a1b9a", linewidths=1.0, zorder=4)
        ax.scatter([], [], s=40, marker="D", facecolors="none", edgecolors="#6a1b9a", label="int4 twin (4-bit weights)")
        plain = [(x, y) for c, r, x, y in pts if not c.get("levels") and r.get("feasible") is not False]
        binary = sorted({plain[i] for i in top_fronts(np.array(plain), 1)[0]}) if plain else []
        if binary:
            bx, by = zip(*binary, strict=True)
            ax.plot(bx, by, color="#9e9e9e", linestyle=":", linewidth=1.2, label="front without int4", zorder=1)
    if any(r.get("front") not in FRONT_STYLES and r.get("feasible") is not False for _, r, _, _ in pts):
        ax.scatter([], [], s=28, color="#7f7f7f", label="other evaluated")
    if any(r.get("feasible") is False for _, r, _, _ in pts):
        ax.scatter([], [], s=28, facecolors="none", edgecolors="#7f7f7f", label="infeasible (bounds)")
    for fam, (marker, searches) in families.items():
        text = _family_label(fam, searches) + (f": labels {fam[0]}k" if several else "")
        ax.scatter([], [], s=28, marker=marker, color="#555555", label=text)
    if any(_family(c) is None for c, _, _, _ in pts):
        ax.scatter([], [], s=28, marker="s", color="#555555", label="fully quantized / explicit")

    selected = _selected_id(report, model, mode, device)
    sel = [(x, y) for c, _, x, y in pts if c["id"] == selected]
    if sel:
        _ring(
            ax,
            sel[0],
            s=150,
            marker="s",
            edgecolors="#2e7d32",
            linewidths=1.8,
            label="selected (compromise on front 1)",
        )
    fq = [(x, y) for c, _, x, y in pts if _is_ranked(c) and is_fully_quantized(c)]
    if fq:
        _ring(ax, fq[0], s=160, edgecolors="black", linewidths=1.5, label="fully quantized (k=0)")
    orig = next((m.get("size_bytes") for m in report.get("models") or [] if m.get("name") == model), None)
    points = [(x, y) for _, _, x, y in pts]
    big = sel[:1] + fq[:1]
    if orig is not None:
        _fp32_star(ax, orig, zorder=5)
        big.append((float(OBJECTIVES["size"].display(orig) or 0.0), 0.0))

    _finish_loss_vs_size(fig, ax, bool(pts), f"{model} · recipe {mode} on {device}: accuracy loss vs size")
    # front members first: when space is short, their labels are the ones kept
    order = sorted(pts, key=lambda p: (p[1].get("front") or 9, p[2]))
    _place_labels(fig, ax, [(x, y, _point_label(c, several)) for c, _, x, y in order], points, big=big)
    return fig


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
        ax.scatter(
            [x for x, _, f1 in mine if not f1],
            [y for _, y, f1 in mine if not f1],
            s=18,
            marker=marker,
            color=color,
            alpha=0.55,
            zorder=3,
            label=recipe,
        )
        front = [(x, y) for x, y, f1 in mine if f1]
        if front:
            xs, ys = zip(*front, strict=True)
            ax.scatter(
                xs,
                ys,
                s=60,
                marker=marker,
                color=color,
                edgecolors="black",
                linewidths=1.0,
                zorder=5,
                label=f"{recipe}: on front 1",
            )
    front = sorted((x, y) for _, x, y, f1 in pts if f1)
    if front:
        color, style, width = FRONT_STYLES[1]
        ax.plot(
            *zip(*front, strict=True),
            color=color,
            linestyle=style,
            linewidth=width,
            zorder=4,
            label="front 1 over all recipes",
        )
    orig = next((m.get("size_bytes") for m in report.get("models") or [] if m.get("name") == model), None)
    if orig is not None:
        _fp32_star(ax, orig, zorder=6)
    _finish_loss_vs_size(fig, ax, bool(pts), f"{model} on {device}: every recipe, accuracy loss vs size")
    return _save(fig, path)


def _finish_loss_vs_size(fig: Any, ax: Any, any_points: bool, title: str) -> None:
    """Labels, grid and legend (outside the axes, so that it covers no point) of an accuracy-loss-vs-size plot."""
    if not any_points:
        ax.text(0.5, 0.5, "no evaluated candidates yet", ha="center", va="center", transform=ax.transAxes)
    loss = OBJECTIVES["accuracy_loss"]
    ax.set_xlabel(f"model size ({OBJECTIVES['size'].display_unit})")
    ax.set_ylabel(f"{loss.name} ({loss.display_unit})\n1 − top-1 agreement with FP32")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, zorder=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, borderaxespad=0.0)
    fig.tight_layout()


def render_plot(kind: str, report: dict[str, Any], model: str, mode: str, device: str, path: Path) -> Path:
    """Render plot ``kind`` (one of :data:`PLOT_KINDS`) to ``path``."""
    if kind == "objectives":
        return objectives_vs_candidate(report, model, mode, device, path)
    if kind == "tradeoff":
        return tradeoff_scatter(report, model, mode, device, path)
    raise ValueError(f"unknown plot kind {kind!r}; known: {PLOT_KINDS}")

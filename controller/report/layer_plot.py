"""The paper's Fig. 2: normalized qdq and xmodel error per layer, in layer order."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tuneqn.controller.common.files import atomic_write_bytes


def layer_errors_plot(layers: list[dict[str, Any]], path: Path) -> Path:
    """One panel per (model, mode): normalized errors against graph order of the layers."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for layer in layers:
        groups.setdefault((layer["model"], layer["mode"]), []).append(layer)
    n = max(1, len(groups))
    fig = Figure(figsize=(10, 3.4 * n), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, ((model, mode), rows) in zip(axes, sorted(groups.items()), strict=False):
        rows = sorted(rows, key=lambda r: r["index"] if "index" in r else r["idx"])
        x = list(range(len(rows)))
        ax.plot(x, [r["norm_xmodel"] for r in rows], marker="o", ms=3, lw=1.2, label="XModel error (normalized)")
        ax.plot(x, [r["norm_qdq"] for r in rows], marker="s", ms=3, lw=1.2, label="QDQ error (normalized)")
        ax.bar(x, [r["score"] for r in rows], color="0.85", width=0.8, label="score", zorder=0)
        top = sorted(rows, key=lambda r: r["rank"])[: min(5, len(rows))]
        for r in top:
            i = rows.index(r)
            ax.annotate(
                f"#{r['rank']}", (i, r["score"]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7
            )
        ax.set_title(f"{model} — {mode} quantization: layer errors ({len(rows)} layers)", fontsize=10)
        ax.set_xlabel("layer (graph order)")
        ax.set_ylabel("normalized error")
        ax.set_ylim(-0.02, 1.12)
        ax.set_xlim(-0.8, max(len(rows) - 0.2, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_layer_plot(layers: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """``layer_errors.png`` in ``out_dir`` from ``layers.json``'s entries (None without any)."""
    return layer_errors_plot(layers, Path(out_dir) / "layer_errors.png") if layers else None

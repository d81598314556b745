"""The self-contained HTML report: structure (parsed) and a real headless-Chromium render."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from browser import SKIP_REASON, chromium, run_chromium
from PIL import Image
from report_study import make_study

from tuneqn.controller.report.finalize import finalize_report
from tuneqn.controller.report.html import render_html
from tuneqn.controller.report.plots import plot_key
from tuneqn.controller.report.write import write_report


class _Page(HTMLParser):
    """Collects images, tables (rows of cell texts), links, scripts and the h1 text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict[str, str | None]] = []
        self.tables: list[dict[str, Any]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.h1 = ""
        self.banner = ""
        self._stack: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._table_stack: list[dict[str, Any]] = []
        self._details_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        self._stack.append(tag)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key] or "")
        if tag == "img":
            self.images.append(a)
        elif tag == "details":
            self._details_depth += 1
        elif tag == "table":
            t = {"class": a.get("class") or "", "rows": [], "in_details": self._details_depth > 0}
            self.tables.append(t)
            self._table_stack.append(t)
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div" and a.get("class") == "banner":
            self._stack[-1] = "banner"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table_stack:
            self._table_stack[-1]["rows"].append(self._row)
            self._row = None
        elif tag == "table" and self._table_stack:
            self._table_stack.pop()
        elif tag == "details":
            self._details_depth -= 1
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if "h1" in self._stack:
            self.h1 += data
        if "banner" in self._stack:
            self.banner += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Path]]:
    report = finalize_report(make_study())
    return report, write_report(report, tmp_path_factory.mktemp("report"))


def test_images_are_embedded_and_nothing_is_external(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    _, paths = written
    text = paths["html"].read_text(encoding="utf-8")
    page = _parse(text)
    assert len(page.images) == 4
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 15_000
    embedded = {base64.b64decode((img["src"] or "").split(",", 1)[1]) for img in page.images}
    on_disk = {
        paths[plot_key(k, "toynet", "static", d)].read_bytes()
        for k in ("objectives", "tradeoff")
        for d in ("cpu", "gpu")
    }
    assert embedded == on_disk
    assert all(u.startswith(("data:", "#")) for u in page.urls)  # embedded images, links within the page
    assert "http://" not in text and "https://" not in text
    assert "script" not in page.tags and "link" not in page.tags


def test_header_banner_and_escaping(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    report, paths = written
    text = paths["html"].read_text(encoding="utf-8")
    page = _parse(text)
    assert page.h1 == "TuneQn report: toy <study>"
    assert "PARTIAL REPORT" in page.banner
    assert "<study>" not in text and "<stem>" not in text  # only escaped forms in the source
    assert "toy &lt;study&gt;" in text and "keep &lt;stem&gt; &amp; head" in text
    done = dict(report, partial=False)
    assert _parse(render_html(done, {})).banner == ""


def test_tables(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    _, paths = written
    page = _parse(paths["html"].read_text(encoding="utf-8"))
    (summary,) = [t for t in page.tables if t["class"] == "summary"]
    body = summary["rows"][2:]
    assert body == [
        [
            "toynet",
            "static",
            "cpu",
            "paper k=3",
            "10.00",
            "40.00",
            "75.00",
            "5.00",
            "2.50",
            "10.00",
            "50.00",
            "7.00",
            "10.00",
            "30.00",
        ],
        [
            "toynet",
            "static",
            "gpu",
            "paper k=2",
            "15.00",
            "20.00",
            "25.00",
            "4.00",
            "2.50",
            "10.00",
            "60.00",
            "–",
            "–",
            "–",
        ],
    ]
    (infeasible,) = [t for t in page.tables if t["class"] == "infeasible"]
    assert infeasible["rows"][1:] == [
        ["toynet", "static", "paper k=0", "cpu", "accuracy_loss 0.4 > max 0.3"],
        ["toynet", "static", "paper k=1", "gpu", "TVM compile error: unsupported op"],
        ["toynet", "static", "keep <stem> & head", "gpu", "not evaluated (pending)"],
    ]
    (top,) = [t for t in page.tables if t["class"] == "layers-top"]
    (all_layers,) = [t for t in page.tables if t["class"] == "layers-all"]
    assert len(top["rows"]) == 1 + 20 and not top["in_details"]
    assert len(all_layers["rows"]) == 1 + 25 and all_layers["in_details"]
    assert top["rows"][1][:2] == ["1", "conv_0"] and all_layers["rows"][-1][:2] == ["25", "conv_24"]
    # per-device front tables: cpu fronts (k1 k3 k4 | k2 k5 E), gpu fronts (k0 k2 k3 | k4 | k5)
    fronts = [t for t in page.tables if t["rows"] and t["rows"][0][:3] == ["front", "candidate", "#excluded"]]
    assert [[r[:2] for r in t["rows"][1:]] for t in fronts] == [
        [
            ["1", "paper k=1"],
            ["1", "paper k=3"],
            ["1", "paper k=4"],
            ["2", "paper k=2"],
            ["2", "paper k=5"],
            ["2", "keep <stem> & head"],
        ],
        [["1", "paper k=0"], ["1", "paper k=2"], ["1", "paper k=3"], ["2", "paper k=4"], ["3", "paper k=5"]],
    ]
    # full candidate table: header rows + 7 candidates, 6 + 6 per device cells each
    (cands,) = [t for t in page.tables if t["class"] == "candidates"]
    assert cands["rows"][0][:6] == ["k", "label", "#excluded", "size (MB)", "searches", "screening"]
    assert len(cands["rows"]) == 2 + 7
    assert cands["rows"][1][:6] == [
        "agreement (%, n = ?)",
        "accuracy (%, labelled samples only)",
        "latency (ms)",
        "p10–p90 (ms)",
        "front",
        "status",
    ]
    assert all(len(r) == 6 + 2 * 6 for r in cands["rows"][2:])
    assert cands["rows"][3] == [
        "1",
        "paper k=1",
        "1",
        "3.00",
        "–",
        "–",
        "75.00",
        "–",
        "6.00",
        "5.75–6.50",
        "1",
        "done",
        "–",
        "–",
        "–",
        "–",
        "–",
        "failed",
    ]
    (baselines,) = [t for t in page.tables if t["class"] == "baselines"]
    assert baselines["rows"][1:] == [
        ["toynet", "cpu", "done", "–", "–", "10.00", "–", "10.00"],
        ["toynet", "gpu", "done", "–", "–", "–", "–", "10.00"],
    ]
    assert not [t for t in page.tables if t["class"] == "skipped"]  # nothing skipped: no section


def test_missing_and_extra_images(tmp_path: Path) -> None:
    report = finalize_report(make_study())
    extra = tmp_path / "fig2.png"
    img = Image.new("RGB", (4, 4), "red")
    img.save(extra)
    page_text = render_html(report, {'["layer_errors", "toynet", "static"]': extra})
    page = _parse(page_text)
    assert len(page.images) == 1  # only the extra figure; the four plots are reported missing
    assert page_text.count("plot not available") == 4
    assert "Other figures" in page_text and "layer_errors · toynet · static" in page_text


@pytest.mark.skipif(chromium() is None, reason=SKIP_REASON)
def test_renders_in_headless_chromium(written: tuple[dict[str, Any], dict[str, Path]], tmp_path: Path) -> None:
    _, paths = written
    shot = tmp_path / "shot.png"
    proc = run_chromium(tmp_path, (1280, 2400), [f"--screenshot={shot}", paths["html"].resolve().as_uri()])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        gray = im.convert("L")
        hist = gray.histogram()
        non_white = sum(hist[:250]) / (im.size[0] * im.size[1])
    assert non_white > 0.02, f"screenshot looks blank ({non_white:.3%} non-white pixels)"

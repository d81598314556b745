"""The typed report: schema version, the published JSON Schema, validation on write, and the page built from
the models (answer box first, table of contents, sample sizes, runtime option, one cross-device section only
with several devices, runtime versions), checked in a real headless Chromium."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import SKIP_REASON, chromium, run_chromium
from PIL import Image
from report_study import cid, make_study

from tuneqn.controller.report.finalize import finalize_report
from tuneqn.controller.report.html import render_html
from tuneqn.controller.report.schema import SCHEMA_VERSION, Report, json_schema_text
from tuneqn.controller.report.write import write_report

ROOT = Path(__file__).parents[2]
SCHEMA_FILE = ROOT / "docs" / "report.schema.json"


cand = cid

FILE = "candidates/toynet/static/x3.onnx"
EXPORT = "tuneqn export /tmp/toy --best --device cpu -o toynet-cpu.onnx"
WBQ_NOTE = 'run with ONNX Runtime session option disabled_optimizers=["WeightBiasQuantization"]'


def _pick(device: str | None, k: int, **kw: Any) -> dict[str, Any]:
    """An answer pick as the answer helper writes it (CONTRACTS.md §2)."""
    pick = {
        "scope": "device" if device else "cross-device",
        "model": "toynet",
        "device": device,
        "devices": [device] if device else ["cpu", "gpu"],
        "met": True,
        "candidate": cand(k),
        "recipe": "static",
        "label": f"paper k={k}",
        "k": k,
        "file": FILE,
        "sha256": "ab" * 32,
        "size_bytes": 5_000_000,
        "fp32_size_bytes": 10_000_000,
        "fq_size_bytes": 2_500_000,
        "agreement": 0.9,
        "accuracy_loss": 0.1,
        "n": 100,
        "loss_ci95": [0.0552, 0.1744],
        "accuracy": 0.857,
        "accuracy_n": 14,
        "fp32_accuracy": 0.857,
        "latency_ms": 7.0,
        "latency_p10_ms": 6.75,
        "latency_p90_ms": 7.5,
        "fp32_latency_ms": 10.0,
        "fp32_latency_p10_ms": 9.5,
        "fp32_latency_p90_ms": 10.5,
        "float_layers": [f"conv_{i}" for i in range(k)],
        "runtime": {"ort_disabled_optimizers": ["WeightBiasQuantization"]},
        "runtime_note": WBQ_NOTE,
        "export_command": EXPORT if device else "tuneqn export /tmp/toy --best -o toynet.onnx",
        "warnings": ["no faster than FP32 on gpu"] if device is None else [],
        "reason": None,
    }
    pick.update(kw)
    return pick


def full_report(*, devices: tuple[str, ...] = ("cpu", "gpu")) -> dict[str, Any]:
    """A finalized report with every section of CONTRACTS.md (dataset, answer, recipe selection, warnings)."""
    base = make_study()
    base["devices"] = [d for d in base["devices"] if d["name"] in devices]
    base["devices"][0]["info"] = {"backend": "ort", "runtime_versions": {"onnxruntime": "1.32.0", "python": "3.11"}}
    if "gpu" in devices:
        base["devices"][1]["info"] = {"backend": "tvm", "tvm_version": "0.20.0", "runtime_versions": {"tvm": "0.20.0"}}
    base["baselines"] = [b for b in base["baselines"] if b["device"] in devices]
    for c in base["candidates"]:
        c["results"] = [r for r in c["results"] if r["device"] in devices]
        c["runtime"] = {"ort_disabled_optimizers": ["WeightBiasQuantization"] if c["k"] else []}
    base["models"][0]["notes"] = [
        "pre-processed",
        "WARNING: the FP32 model looks confused on the sample (mean top-1 probability 0.08): check the preprocessing",
    ]
    base = finalize_report(base)  # the sections below are the contract's examples, not computed ones
    base["dataset"] = {
        "eval_samples": 100,
        "labelled_eval_samples": 14,
        "calibration_samples": 20,
        "analysis_samples": 8,
        "screen_samples": 32,
        "preprocess": {"preset": "lite"},
        "preprocess_description": "lite: RGB, short side → 256 (bicubic), centre crop 224, (x − 127)/128, NCHW",
    }
    picks = [_pick(d, 3) for d in devices] + ([_pick(None, 4)] if len(devices) > 1 else [])
    base["answer"] = {
        "constraint": {"max_loss": 0.1, "max_size_bytes": None, "max_latency_ms": None},
        "rule": "smallest file whose accuracy loss is ≤ 10 % on the device",
        "picks": picks,
    }
    base["recipe_selection"] = [
        {
            "model": "toynet",
            "rule": "every preset's fully quantized model is evaluated; …",
            "recipes": [
                {
                    "recipe": "static",
                    "status": "searched",
                    "reason": "on the front of the fully quantized models",
                    "fq_candidate": cand(0),
                    "devices": [{"device": "cpu", "accuracy_loss": 0.4, "size_bytes": 2_500_000}],
                },
                {
                    "recipe": "per-channel",
                    "status": "stopped",
                    "reason": "dominated by static on cpu",
                    "fq_candidate": "toynet:per-channel:fq",
                    "devices": [{"device": "cpu", "accuracy_loss": 0.5, "size_bytes": 2_600_000}],
                },
            ],
        }
    ]
    return base


# --------------------------------------------------------------------------- schema


def test_checked_in_json_schema_is_the_generated_one() -> None:
    """docs/report.schema.json is what `make schema` writes from the models (CI fails when it is stale)."""
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), "run `make schema` and commit the result"
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["additionalProperties"] is False
    assert {
        "schema_version",
        "candidates",
        "fronts",
        "summary",
        "layers",
        "dataset",
        "answer",
        "recipe_selection",
    } <= set(schema["properties"])
    assert SCHEMA_VERSION in schema["$comment"]


def test_reports_with_and_without_the_new_sections_validate(tmp_path: Path) -> None:
    old = finalize_report(make_study())
    for key in ("dataset", "answer", "recipe_selection"):  # an older report: none of the new sections
        old.pop(key, None)
    typed = Report.model_validate(old)
    assert (typed.dataset, typed.answer, typed.recipe_selection) == (None, None, [])
    assert typed.schema_version == SCHEMA_VERSION
    new = Report.model_validate(full_report())
    assert new.answer is not None and [p.scope for p in new.answer.picks] == ["device", "device", "cross-device"]
    assert new.answer.picks[0].loss_ci95 == (0.0552, 0.1744)
    assert new.dataset is not None and new.dataset.labelled_eval_samples == 14
    assert new.recipe_selection[0].recipes[1].status == "stopped"
    # report.json is written from the model and reads back into the same model
    paths = write_report(full_report(), tmp_path / "out")
    written = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert list(written)[0] == "schema_version" and written["schema_version"] == SCHEMA_VERSION
    assert Report.model_validate(written) == new.model_copy(update={"generated_at": written["generated_at"]})
    assert written["answer"]["picks"][0]["loss_ci95"] == [0.0552, 0.1744]


@pytest.mark.parametrize(
    "breakage", ["unknown top-level key", "unknown status", "pick scope", "pick extra key", "size as text"]
)
def test_a_malformed_report_is_refused_and_nothing_is_written(tmp_path: Path, breakage: str) -> None:
    report = full_report()
    if breakage == "unknown top-level key":
        report["sumary"] = []
    elif breakage == "unknown status":
        report["candidates"][0]["results"][0]["status"] = "finished"
    elif breakage == "pick scope":
        report["answer"]["picks"][0]["scope"] = "everywhere"
    elif breakage == "pick extra key":
        report["answer"]["picks"][0]["exprt_command"] = "tuneqn export"
    else:
        report["candidates"][0]["size_bytes"] = "big"
    with pytest.raises(ValueError, match="report schema"):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="report schema"):
        render_html(report, {})


# --------------------------------------------------------------------------- the page


class _Sections(HTMLParser):
    """Top-level structure: ids of h2/section/nav in order, TOC links, table headers, the answer's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.order: list[str] = []
        self.toc: list[str] = []
        self.headers: list[str] = []
        self.answer_text = ""
        self.code_in_answer: list[str] = []
        self._in_answer = 0
        self._in_th = False
        self._in_code = False
        self._th: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("section", "nav", "h2") and a.get("id"):
            self.order.append(str(a["id"]))
        if tag == "section" and a.get("id") == "answer":
            self._in_answer = 1
        elif self._in_answer and tag == "section":
            self._in_answer += 1
        if tag == "a" and (a.get("href") or "").startswith("#"):
            self.toc.append(str(a["href"])[1:])
        if tag == "th":
            self._in_th, self._th = True, []
        if tag == "code" and self._in_answer:
            self._in_code = True
            self.code_in_answer.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._in_answer:
            self._in_answer -= 1
        if tag == "th" and self._in_th:
            self.headers.append("".join(self._th).strip())
            self._in_th = False
        if tag == "code":
            self._in_code = False

    def handle_data(self, data: str) -> None:
        if self._in_answer:
            self.answer_text += data
        if self._in_th:
            self._th.append(data)
        if self._in_code and self.code_in_answer:
            self.code_in_answer[-1] += data


def _sections(html: str) -> _Sections:
    page = _Sections()
    page.feed(html)
    page.close()
    return page


def test_answer_box_comes_first_with_what_to_ship() -> None:
    html = render_html(full_report(), {})
    page = _sections(html)
    assert page.order[:3] == ["warnings", "answer", "toc"]  # after the title: warnings, then the answer
    assert "the FP32 model looks confused on the sample" in html
    text = " ".join(page.answer_text.split())
    assert text.count("paper k=3") == 2 and "every device (cpu, gpu): worst values" in text
    assert "10.00 % (95 % interval 5.52–17.44 %, n = 100)" in text
    assert "85.70 % (n = 14 labelled; FP32 85.70 %)" in text
    assert "7.00 ms (p10–p90 6.75–7.50 ms) vs FP32 10.00 ms (p10–p90 9.50–10.50 ms)" in text
    assert "5.00 MB (50.0 % of FP32 10.00 MB); fully quantized: 2.50 MB" in text
    assert WBQ_NOTE in text and "no faster than FP32 on gpu" in text
    assert FILE in page.code_in_answer and EXPORT in page.code_in_answer
    assert {"conv_0", "conv_1", "conv_2"} <= set(page.code_in_answer)  # float layers by name


def test_table_of_contents_links_every_section() -> None:
    page = _sections(render_html(full_report(), {}))
    assert page.toc[0] == "answer"
    assert {
        "dataset",
        "recipe-selection",
        "runtime-options",
        "summary",
        "cross-device",
        "per-device",
        "candidates",
        "devices",
    } <= set(page.toc)
    assert set(page.toc) <= set(page.order)  # every link has its target


def test_sample_sizes_stand_next_to_every_agreement_and_accuracy() -> None:
    html = render_html(full_report(), {})
    headers = _sections(html).headers
    assert "agreement (%, n = 100)" in headers and "accuracy (%, n = 14 labelled)" in headers
    assert "accuracy (%, n = 14 labelled)" in headers
    assert "accuracy_loss (%, n = 100)" in headers  # front tables' objective column
    assert "Accuracy loss (%, 1 − top-1 agreement, n = 100)" in headers  # summary
    assert any(h.startswith("accuracy loss (%, n = 100)") for h in headers)  # recipe selection
    bare = [h for h in headers if re.match(r"^(agreement|accuracy|accuracy_loss|top-5 accuracy) \(%\)$", h)]
    assert bare == []
    assert "one image is 1 % of the agreement" in html


def test_runtime_option_is_named_with_the_candidates_that_need_it() -> None:
    html = render_html(full_report(), {})
    assert 'id="runtime-options"' in html
    text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
    assert (
        "toynet · static: 6 of 7 candidates need the ONNX Runtime session option "
        'disabled_optimizers=["WeightBiasQuantization"]'
    ) in text.replace("&#34;", '"')
    assert "InferenceSession(path, disabled_optimizers=" in html


def test_cross_device_section_only_with_several_devices() -> None:
    two = _sections(render_html(full_report(), {}))
    assert "cross-device" in two.order
    one = _sections(render_html(full_report(devices=("cpu",)), {}))
    assert "cross-device" not in one.order and "cross-device" not in one.toc
    assert "every device" not in one.answer_text


def test_runtime_versions_per_device() -> None:
    html = render_html(full_report(), {})
    assert "cpu (cpu): ONNX Runtime 1.32.0" in html and "gpu (mali): TVM 0.20.0" in html
    assert re.search(r"<td class=\"t\">ONNX Runtime 1\.32\.0</td>", html)
    assert re.search(r"<td class=\"t\">TVM 0\.20\.0</td>", html)


def test_recipe_selection_table() -> None:
    html = render_html(full_report(), {})
    assert 'class="recipe-selection"' in html and "dominated by static on cpu" in html
    assert 'class="recipe-selection"' not in render_html(finalize_report(make_study()), {})


# --------------------------------------------------------------------------- a real browser

WINDOW = (1280, 800)

#: Added to a copy of the page only (the report itself has no scripts): where the answer box is drawn.
PROBE = """<script>
addEventListener("load", () => {
  const box = document.getElementById("answer");
  const r = box.getBoundingClientRect();
  const first = [...document.body.children].find(e => !["H1", "SCRIPT"].includes(e.tagName)
      && !e.classList.contains("meta") && !e.classList.contains("banner") && e.id !== "warnings");
  const codes = [...box.querySelectorAll("code")].map(c => c.innerText);
  const file = box.querySelector("code.file").getBoundingClientRect();
  const out = {top: r.top, bottom: r.bottom, height: r.height, inner: innerHeight, first: first && first.id,
               visible: getComputedStyle(box).visibility === "visible" && r.height > 0, file_bottom: file.bottom,
               text: box.innerText, codes: codes};
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.heavy
@pytest.mark.skipif(chromium() is None, reason=SKIP_REASON)
def test_answer_box_is_the_first_thing_a_browser_shows(tmp_path: Path) -> None:
    paths = write_report(full_report(), tmp_path / "out")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(
        paths["html"].read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    proc = run_chromium(tmp_path, WINDOW, ["--dump-dom", probe_page.as_uri()])
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:]
    box = json.loads(
        found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
    assert box["first"] == "answer" and box["visible"]
    assert 0 <= box["top"] < box["inner"] / 2, box  # starts in the top half of the first screen
    assert box["file_bottom"] < box["inner"], box  # the first pick's file is on the first screen
    assert FILE in box["codes"] and EXPORT in box["codes"]
    assert "95 % interval 5.52–17.44 %, n = 100" in box["text"]
    # and it is drawn: a screenshot of the first screen has the answer box's green border
    shot = tmp_path / "top.png"
    proc = run_chromium(tmp_path, WINDOW, [f"--screenshot={shot}", paths["html"].as_uri()])
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == WINDOW
        pixels = np.asarray(im.convert("RGB"))
        green = int(np.all(pixels == (0x2E, 0x7D, 0x32), axis=-1).sum())
    assert green > 500, f"no answer box border on the first screen ({green} pixels)"


# --------------------------------------------------------------------------- plots


def _two_rankings() -> dict[str, Any]:
    """make_study's paper candidates plus measured ones of the same k, each a hair away (crowded labels)."""
    base = make_study()
    base["devices"] = base["devices"][:1]
    measured = []
    for c in base["candidates"]:
        c["results"] = c["results"][:1]
        if c["kind"] != "set":
            continue
        c["proposed_by"] = [{"search": "sweep/paper", "label": c["label"], "level": "full"}]
        m = json.loads(json.dumps(c))
        m.update(
            id=c["id"].replace("static:", "static:m"),
            label=f"measured k={c['k']}",
            size_bytes=c["size_bytes"] + 30_000,
            proposed_by=[{"search": "budget3/measured", "label": f"measured k={c['k']}", "level": "full"}],
        )
        m["results"][0]["agreement"] = (c["results"][0]["agreement"] or 0) + 0.002
        measured.append(m)
    base["candidates"] += measured
    return finalize_report(base)


def test_tradeoff_plot_tells_the_rankings_apart_and_its_labels_do_not_overlap() -> None:
    from tuneqn.controller.report.plots import objectives_figure, tradeoff_figure

    report = Report.model_validate(_two_rankings()).model_dump(mode="json")
    fig = tradeoff_figure(report, "toynet", "static", "cpu")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "measured ranking (budget3/measured): labels mk" in legend
    assert "paper ranking (sweep/paper): labels pk" in legend
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert {t.get_text() for t in labels} & {"p3", "m3", "p1", "m1"}  # labels name the ranking
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        assert all(not a.overlaps(b) for b in boxes[i + 1 :]), labels[i].get_text()
    frame, legend_box = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    assert not frame.overlaps(legend_box)  # the legend covers no point
    objectives_legend = [
        t.get_text() for t in objectives_figure(report, "toynet", "static", "cpu").axes[0].get_legend().get_texts()
    ]
    assert {"paper ranking (sweep/paper)", "measured ranking (budget3/measured)"} <= set(objectives_legend)

"""finalize_report on a small constructed study with a known answer, and write_report."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from report_study import ORIGINAL_SIZE, cid, make_study, result_entry

from tuneqn.controller.report.finalize import finalize_report
from tuneqn.controller.report.plots import plot_key
from tuneqn.controller.report.schema import SCHEMA_VERSION, Report
from tuneqn.controller.report.write import write_report


def _result_of(report: dict[str, Any], cid: str, device: str) -> dict[str, Any]:
    cand = next(c for c in report["candidates"] if c["id"] == cid)
    return next(r for r in cand["results"] if r["device"] == device)


@pytest.fixture()
def report() -> dict[str, Any]:
    return finalize_report(make_study())


def test_base_is_not_modified_and_kept() -> None:
    base = make_study()
    snapshot = copy.deepcopy(base)
    out = finalize_report(base)
    assert base == snapshot
    for key, value in snapshot.items():
        if key != "candidates":
            assert out[key] == value
    # Finalizing twice gives the same report.
    assert finalize_report(out) == out


def test_per_device_fronts(report: dict[str, Any]) -> None:
    assert report["fronts"] == [
        {
            "model": "toynet",
            "mode": "static",
            "recipe": "static",
            "device": "cpu",
            "fronts": [[cid(1), cid(3), cid(4)], [cid(2), cid(5), cid("keep-stem")]],
        },
        {
            "model": "toynet",
            "mode": "static",
            "recipe": "static",
            "device": "gpu",
            "fronts": [[cid(0), cid(2), cid(3)], [cid(4)], [cid(5)]],
        },
    ]
    cpu_fronts = {k: _result_of(report, cid(k), "cpu")["front"] for k in range(6)}
    gpu_fronts = {k: _result_of(report, cid(k), "gpu")["front"] for k in range(6)}
    assert cpu_fronts == {0: None, 1: 1, 2: 2, 3: 1, 4: 1, 5: 2}
    assert gpu_fronts == {0: 1, 1: None, 2: 1, 3: 1, 4: 2, 5: 3}
    assert _result_of(report, cid("keep-stem"), "cpu")["front"] == 2
    assert _result_of(report, cid("keep-stem"), "gpu")["front"] is None


def test_result_objectives_and_feasibility(report: dict[str, Any]) -> None:
    r = _result_of(report, cid(3), "cpu")
    assert r["objectives"] == {"accuracy_loss": pytest.approx(0.10), "size": 5_000_000.0}
    assert (r["feasible"], r["reason"]) == (True, None)
    r = _result_of(report, cid(0), "cpu")
    assert (r["feasible"], r["reason"]) == (False, "accuracy_loss 0.4 > max 0.3")
    r = _result_of(report, cid(1), "gpu")
    assert (r["feasible"], r["reason"]) == (False, "TVM compile error: unsupported op")
    assert r["objectives"] == {"accuracy_loss": None, "size": 3_000_000.0}
    r = _result_of(report, cid("keep-stem"), "gpu")
    assert (r["feasible"], r["reason"]) == (None, "not evaluated (pending)")


def test_infeasible_list(report: dict[str, Any]) -> None:
    assert report["infeasible"] == [
        {"candidate": cid(0), "device": "cpu", "reason": "accuracy_loss 0.4 > max 0.3"},
        {"candidate": cid(1), "device": "gpu", "reason": "TVM compile error: unsupported op"},
        {"candidate": cid("keep-stem"), "device": "gpu", "reason": "not evaluated (pending)"},
    ]


def test_cross_device_worst_case(report: dict[str, Any]) -> None:
    (cross,) = report["cross_device"]
    assert (cross["model"], cross["mode"], cross["devices"]) == ("toynet", "static", ["cpu", "gpu"])
    assert cross["fronts"] == [[cid(2), cid(3), cid(4)], [cid(5)]]
    assert cross["selected"] == cid(3)
    worst = {c["id"]: (c["worst"]["accuracy_loss"], c["worst"]["size"], c["front"]) for c in cross["candidates"]}
    assert worst == {
        cid(2): (pytest.approx(0.26), 4_000_000.0, 1),  # cpu is worse
        cid(3): (pytest.approx(0.10), 5_000_000.0, 1),  # cpu is worse
        cid(4): (pytest.approx(0.08), 6_000_000.0, 1),  # cpu is worse
        cid(5): (pytest.approx(0.08), 7_000_000.0, 2),  # cpu .08 vs gpu .06
    }
    assert cross["excluded"] == [
        {"candidate": cid(0), "reason": "cpu: accuracy_loss 0.4 > max 0.3"},
        {"candidate": cid(1), "reason": "gpu: TVM compile error: unsupported op"},
        {"candidate": cid("keep-stem"), "reason": "gpu: not evaluated (pending)"},
    ]


def test_cross_device_worst_uses_min_for_max_objectives() -> None:
    base = make_study()
    base["objectives"] = [
        {"name": "accuracy", "direction": "max", "max": None, "min": None},
        {"name": "size", "direction": "min", "max": None, "min": None},
    ]
    accuracies = {"cpu": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "gpu": [0.55, 0.0, 0.65, 0.85, 0.8, 0.99]}
    for cand in base["candidates"][:6]:
        for r in cand["results"]:
            r["accuracy"] = accuracies[r["device"]][cand["k"]]
    out = finalize_report(base)
    worst = {c["id"]: c["worst"]["accuracy"] for c in out["cross_device"][0]["candidates"]}
    assert worst == {cid(0): 0.5, cid(2): 0.65, cid(3): 0.8, cid(4): 0.8, cid(5): 0.95}
    # explicit candidate has no accuracy on cpu (no labels) and is pending on gpu
    (excl,) = [e for e in out["cross_device"][0]["excluded"] if e["candidate"] == cid("keep-stem")]
    assert excl["reason"] == "cpu: accuracy not available (no labels); gpu: not evaluated (pending)"


def test_summary_tables_i_ii(report: dict[str, Any]) -> None:
    cpu, gpu = report["summary"]
    assert cpu == {
        "model": "toynet",
        "mode": "static",
        "recipe": "static",
        "device": "cpu",
        "selected": cid(3),
        "selected_k": 3,
        "selected_label": "paper k=3",
        "fq_candidate": cid(0),
        "accuracy_loss": pytest.approx(0.10, abs=1e-12),
        "fq_accuracy_loss": pytest.approx(0.40, abs=1e-12),
        "accuracy_loss_decrease_pct": pytest.approx(75.0, abs=1e-9),  # 100 * (0.40 - 0.10) / 0.40
        "size_bytes": 5_000_000,
        "fq_size_bytes": 2_500_000,
        "original_size_bytes": ORIGINAL_SIZE,
        "size_decrease_pct": 50.0,  # 100 * (10 - 5) / 10
        "latency_ms": 7.0,
        "fq_latency_ms": 5.0,
        "original_latency_ms": 10.0,
        "latency_decrease_pct": pytest.approx(30.0),
        "accuracy": None,
        "fq_accuracy": None,
        "original_accuracy": None,
    }
    assert gpu["selected"] == cid(2)
    assert gpu["accuracy_loss"] == pytest.approx(0.15, abs=1e-12)
    assert gpu["fq_accuracy_loss"] == pytest.approx(0.20, abs=1e-12)
    assert gpu["accuracy_loss_decrease_pct"] == pytest.approx(25.0, abs=1e-9)  # 100 * (0.20 - 0.15) / 0.20
    assert (gpu["size_bytes"], gpu["size_decrease_pct"]) == (4_000_000, 60.0)
    assert gpu["latency_ms"] is None and gpu["latency_decrease_pct"] is None


def test_summary_fq_zero_loss_gives_null_decrease() -> None:
    base = make_study()
    for cand in base["candidates"]:
        for r in cand["results"]:
            if r["device"] == "gpu" and r["status"] == "done":
                r["agreement"] = 1.0
    gpu = finalize_report(base)["summary"][1]
    assert gpu["fq_accuracy_loss"] == 0.0
    assert gpu["selected"] == cid(0)  # everything ties on loss: the smallest model dominates
    assert gpu["accuracy_loss_decrease_pct"] is None


def test_missing_metric_and_min_bound_reasons() -> None:
    base = make_study()
    base["objectives"] = [
        {"name": "accuracy", "direction": "max", "max": None, "min": 0.5},
        {"name": "size", "direction": "min", "max": None, "min": None},
    ]
    for cand in base["candidates"]:
        for r in cand["results"]:
            if r["device"] == "cpu":
                r["accuracy"] = 0.4 if cand["id"] == cid(2) else 0.7
    out = finalize_report(base)
    reasons = {(i["candidate"], i["device"]): i["reason"] for i in out["infeasible"]}
    assert reasons[(cid(2), "cpu")] == "accuracy 0.4 < min 0.5"
    assert reasons[(cid(3), "gpu")] == "accuracy not available (no labels)"
    gpu_entry = out["fronts"][1]
    assert gpu_entry["device"] == "gpu" and gpu_entry["fronts"] == []
    assert out["summary"][1]["selected"] is None
    # cpu: accuracy 0.7 everywhere except k2 (and no loss bound now): the smallest model, k0, dominates.
    assert out["fronts"][0]["fronts"][0] == [cid(0)]
    assert out["summary"][0]["selected"] == cid(0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["objectives"].append({"name": "speed", "direction": "min"}), "unknown objective"),
        (lambda b: b["objectives"][0].update(direction="up"), "direction"),
        (lambda b: b["candidates"].append(copy.deepcopy(b["candidates"][0])), "duplicate candidate id"),
        (lambda b: b["candidates"][0]["results"][0].update(status="lost"), "unknown status"),
        (lambda b: b.update(objectives=[]), "non-empty"),
    ],
)
def test_malformed_base_is_rejected(mutate: Any, message: str) -> None:
    base = make_study()
    mutate(base)
    with pytest.raises(ValueError, match=message):
        finalize_report(base)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _contains(written: Any, given: Any) -> bool:
    """Every key of ``given`` is in ``written`` with the same value (the schema may add keys with defaults)."""
    if isinstance(given, dict):
        return isinstance(written, dict) and all(k in written and _contains(written[k], v) for k, v in given.items())
    if isinstance(given, list):
        return (
            isinstance(written, list)
            and len(written) == len(given)
            and all(_contains(w, g) for w, g in zip(written, given, strict=True))
        )
    return written == given


def _written_as(path: Path, report: dict[str, Any]) -> None:
    """report.json holds the report as the schema writes it: every given key and value, and the schema version."""
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["schema_version"] == SCHEMA_VERSION
    assert _contains(written, report)
    assert written == Report.model_validate(report).model_dump(mode="json")


def test_write_report(tmp_path: Path, report: dict[str, Any]) -> None:
    paths = write_report(report, tmp_path / "out")
    assert paths["json"] == tmp_path / "out" / "report.json"
    _written_as(paths["json"], report)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # temp files were renamed away
    for device in ("cpu", "gpu"):
        for kind in ("objectives", "tradeoff"):
            png = paths[plot_key(kind, "toynet", "static", device)]
            assert png.exists() and png.stat().st_size > 15_000, png
            assert _png_size(png) == (880, 495)  # 8 x 4.5 in at 110 dpi
    html_text = paths["html"].read_text(encoding="utf-8")
    assert html_text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html_text
    assert set(paths) == {"json", "html"} | {
        plot_key(kind, "toynet", "static", d) for kind in ("objectives", "tradeoff") for d in ("cpu", "gpu")
    }


def test_write_report_requires_finalized(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="finalize"):
        write_report(make_study(), tmp_path)


def test_early_partial_report_with_nothing_evaluated(tmp_path: Path) -> None:
    base = make_study()
    for cand in base["candidates"]:
        for r in cand["results"]:
            r.update(status="pending", agreement=None, latency_ms=None)
    out = finalize_report(base)
    assert [e["fronts"] for e in out["fronts"]] == [[], []]
    assert [s["selected"] for s in out["summary"]] == [None, None]
    assert out["cross_device"][0]["fronts"] == [] and out["cross_device"][0]["selected"] is None
    assert len(out["infeasible"]) == 14 and {i["reason"] for i in out["infeasible"]} == {"not evaluated (pending)"}
    paths = write_report(out, tmp_path)
    assert all(p.exists() and p.stat().st_size > 5_000 for k, p in paths.items() if k not in ("json", "html"))
    assert "No done and feasible candidate on this device yet." in paths["html"].read_text(encoding="utf-8")


def test_no_candidates_at_all(tmp_path: Path) -> None:
    base = make_study()
    base["candidates"] = []
    out = finalize_report(base)
    assert (out["fronts"], out["cross_device"], out["infeasible"], out["summary"]) == ([], [], [], [])
    paths = write_report(out, tmp_path)
    assert set(paths) == {"json", "html"}
    _written_as(paths["json"], out)


# --------------------------------------------------------------------------- latency noise, unreachable


def _two_candidates(lat_b: float, p90_a: float = 7.4) -> dict[str, Any]:
    """k1 and k2 on one device, equal but for latency: k1 7.0 ms (p10 6.8, p90 ``p90_a``), k2 ``lat_b``."""
    base = make_study()
    base["objectives"] = [
        {"name": "accuracy_loss", "direction": "min", "max": None, "min": None},
        {"name": "latency", "direction": "min", "max": None, "min": None},
    ]
    base["devices"] = base["devices"][:1]
    base["candidates"] = [c for c in base["candidates"] if c["kind"] == "set" and c["k"] in (1, 2)]
    for c, lat, lo, hi in zip(base["candidates"], (7.0, lat_b), (6.8, lat_b - 0.2), (p90_a, lat_b + 0.3), strict=True):
        c["results"] = [result_entry("cpu", agreement=0.9, latency_ms=lat, latency_p10_ms=lo, latency_p90_ms=hi)]
    return base


def test_latency_difference_inside_the_noise_is_a_tie() -> None:
    out = finalize_report(_two_candidates(7.3))  # k2's [7.1, 7.6] overlaps k1's [6.8, 7.4]
    assert out["fronts"][0]["fronts"] == [[cid(1), cid(2)]]
    assert _result_of(out, cid(2), "cpu")["objectives"]["latency"] == 7.3  # the measured median is still shown
    (cross,) = out["cross_device"]
    assert cross["fronts"] == [[cid(1), cid(2)]]


def test_latency_difference_outside_the_noise_still_counts() -> None:
    out = finalize_report(_two_candidates(7.8))  # k2's p10 7.6 is above k1's p90 7.4
    assert out["fronts"][0]["fronts"] == [[cid(1)], [cid(2)]]
    # k2's own spread counts: a median of 7.5 above k1's p90 with p10 7.3 inside k1's interval is a tie
    assert finalize_report(_two_candidates(7.5))["fronts"][0]["fronts"] == [[cid(1), cid(2)]]
    # without dispersion (old results) only equal medians tie
    base = _two_candidates(7.3)
    for c in base["candidates"]:
        c["results"][0].update(latency_p10_ms=None, latency_p90_ms=None)
    assert finalize_report(base)["fronts"][0]["fronts"] == [[cid(1)], [cid(2)]]


def _sized(rows: list[tuple[int, float, float, float, float, float]]) -> dict[str, Any]:
    """One device, objectives loss, size, latency; rows (k, size, agreement, median, p10, p90)."""
    base = make_study()
    base["objectives"] = [
        {"name": n, "direction": "min", "max": None, "min": None} for n in ("accuracy_loss", "size", "latency")
    ]
    base["devices"] = base["devices"][:1]
    by_k = {c["k"]: c for c in base["candidates"] if c["kind"] == "set"}
    base["candidates"] = []
    for k, size, agreement, med, lo, hi in rows:
        c = by_k[k]
        c["size_bytes"] = size
        c["results"] = [result_entry("cpu", agreement=agreement, latency_ms=med, latency_p10_ms=lo, latency_p90_ms=hi)]
        base["candidates"].append(c)
    return base


#: A stable, slower, smaller candidate (k1); a faster, larger one, faster beyond both noises (k2); and a
#: noisy fast one (k3) whose wide interval covers both medians, with a worse loss.
STABLE_SMALL = (1, 5_000_000, 0.95, 10.0, 9.9, 10.1)
FAST_LARGE = (2, 5_500_000, 0.95, 8.0, 7.9, 8.1)
NOISY_FAST = (3, 6_000_000, 0.90, 6.0, 1.0, 10.5)


def test_a_noisy_fast_candidate_ties_no_other_pair() -> None:
    """k1 and k2 differ in latency beyond the noise: both are on front 1 whatever else was measured. Today's
    main tied them through the noisy k3 (both inside its p10–p90), so the smaller k1 pushed k2 off front 1."""
    for rows in (
        [STABLE_SMALL, FAST_LARGE],
        [STABLE_SMALL, FAST_LARGE, NOISY_FAST],
        [NOISY_FAST, FAST_LARGE, STABLE_SMALL],
    ):
        fronts = finalize_report(_sized(rows))["fronts"][0]["fronts"]
        assert set(fronts[0]) == {cid(1), cid(2)}, rows
    # the noisy one itself ties with both (its interval overlaps theirs) and is behind k1 and k2 in loss
    assert finalize_report(_sized([STABLE_SMALL, FAST_LARGE, NOISY_FAST]))["fronts"][0]["fronts"][1] == [cid(3)]


def test_a_tie_counts_each_sides_spread() -> None:
    """Stable fast k1 [9.9, 10.1] against noisy, slower by median, smaller k2 [8.0, 14.0]: their intervals
    overlap, so the latencies tie and the smaller k2 dominates, whichever is listed first (main compared
    k2's median with k1's interval only and kept both)."""
    stable = (1, 6_000_000, 0.95, 10.0, 9.9, 10.1)
    noisy = (2, 5_000_000, 0.95, 11.0, 8.0, 14.0)
    for rows in ([stable, noisy], [noisy, stable]):
        assert finalize_report(_sized(rows))["fronts"][0]["fronts"] == [[cid(2)], [cid(1)]]


def test_unreachable_is_listed_like_failed_and_never_in_a_front() -> None:
    base = make_study()
    msg = "no live agent of device class mali for 30 s"
    for c in base["candidates"]:
        for r in c["results"]:
            if r["device"] == "gpu" and c["id"] in (cid(2), cid(3)):
                r.update(status="unreachable", agreement=None, error=msg)
    out = finalize_report(base)
    gpu_fronts = out["fronts"][1]["fronts"]
    assert cid(2) not in sum(gpu_fronts, []) and cid(3) not in sum(gpu_fronts, [])
    r = _result_of(out, cid(2), "gpu")
    assert (r["status"], r["feasible"], r["reason"], r["front"]) == ("unreachable", False, msg, None)
    assert {"candidate": cid(3), "device": "gpu", "reason": msg} in out["infeasible"]
    assert {"candidate": cid(2), "reason": f"gpu: {msg}"} in out["cross_device"][0]["excluded"]
    # without an error message the reason still says what happened
    base["candidates"][2]["results"][1]["error"] = None
    assert _result_of(finalize_report(base), cid(2), "gpu")["reason"] == "device unreachable"


def test_missing_baseline_reason_names_the_baseline_error() -> None:
    base = make_study()
    r = base["candidates"][3]["results"][0]  # k3 on cpu
    r.update(agreement=None, error="FP32 baseline on this device failed: out of memory")
    out = finalize_report(base)
    assert _result_of(out, cid(3), "cpu")["reason"] == (
        "accuracy_loss not available (no agreement with FP32 measured); "
        "FP32 baseline on this device failed: out of memory"
    )

"""The report's answer (report/answer.py): the pick rules, its interval, warnings and printed lines (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tuneqn.controller.report.answer import Constraint, build_answer, format_answer, wilson_interval

N = 100


def _res(
    device: str,
    loss: float,
    latency: tuple[float, float, float] | None = (10.0, 9.5, 10.5),
    *,
    accuracy: float | None = None,
    status: str = "done",
    feasible: bool = True,
) -> dict[str, Any]:
    med, p10, p90 = latency if latency else (None, None, None)
    return {
        "device": device,
        "status": status,
        "feasible": feasible,
        "agreement": 1.0 - loss,
        "accuracy": accuracy,
        "latency_ms": med,
        "latency_p10_ms": p10,
        "latency_p90_ms": p90,
        "num_samples": N,
    }


def _cand(
    recipe: str, k: int, size: int, results: list[dict[str, Any]], *, runtime: bool = True, level: str = "full"
) -> dict[str, Any]:
    excluded = [f"conv_{i}" for i in range(k)][::-1]  # stored order is not the model's order
    return {
        "id": f"net:{recipe}:{'fq' if k == 0 else f'x{recipe}{k}'}",
        "model": "net",
        "mode": recipe,
        "recipe": recipe,
        "k": k,
        "label": f"measured k={k}",
        "excluded": excluded,
        "size_bytes": size,
        "sha256": "s" * 64,
        "level": level,
        "results": results,
        "runtime": {"ort_disabled_optimizers": ["WeightBiasQuantization"] if runtime and k else []},
    }


def _report(
    cands: list[dict[str, Any]],
    *,
    devices: tuple[str, ...] = ("cpu",),
    settings: dict[str, Any] | None = None,
    labelled: int = 0,
    fp32_latency: tuple[float, float, float] = (30.0, 29.0, 31.0),
) -> dict[str, Any]:
    med, p10, p90 = fp32_latency
    return {
        "study": {"name": "t", "out_dir": "/studies/my out", "settings": settings or {}},
        "devices": [{"name": d} for d in devices],
        "models": [{"name": "net", "size_bytes": 20_000_000}],
        "dataset": {"eval_samples": N, "labelled_eval_samples": labelled},
        "layers": [
            {"model": "net", "recipe": r, "name": f"conv_{i}", "index": i}
            for r in ("per-tensor", "per-channel")
            for i in range(30)
        ],
        "baselines": [
            {
                "model": "net",
                "device": d,
                "latency_ms": med,
                "latency_p10_ms": p10,
                "latency_p90_ms": p90,
                "accuracy": 0.8,
            }
            for d in devices
        ],
        "candidates": cands,
    }


def _picks(report: dict[str, Any], constraint: Constraint | None = None) -> list[dict[str, Any]]:
    return build_answer(report, constraint)["picks"]


def test_wilson_interval_known_values() -> None:
    # Wilson score interval, z = 1.96 (e.g. Newcombe 1998; R: binom::binom.wilson)
    assert wilson_interval(0, 100) == (0.0, pytest.approx(0.036995, abs=1e-5))
    lo, hi = wilson_interval(1, 100)
    assert (lo, hi) == (pytest.approx(0.001767, abs=1e-5), pytest.approx(0.054488, abs=1e-5))
    lo, hi = wilson_interval(10, 100)
    assert (lo, hi) == (pytest.approx(0.055229, abs=1e-5), pytest.approx(0.174366, abs=1e-5))
    assert wilson_interval(12, 12)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_smallest_file_meeting_the_loss_over_every_recipe() -> None:
    cands = [
        _cand("per-tensor", 0, 5_000_000, [_res("cpu", 0.05)]),
        _cand("per-tensor", 3, 6_000_000, [_res("cpu", 0.01)]),
        _cand("per-tensor", 9, 15_000_000, [_res("cpu", 0.0)]),
        _cand("per-channel", 0, 5_100_000, [_res("cpu", 0.02)]),
        _cand("per-channel", 2, 5_500_000, [_res("cpu", 0.01)]),  # the smallest within 1 %, another recipe
        _cand("per-channel", 1, 5_200_000, [_res("cpu", 0.01)], level="screen"),  # screened only: never a pick
        _cand("per-channel", 4, 5_300_000, [_res("cpu", 0.0, feasible=False)]),  # outside an objective bound
    ]
    (pick,) = _picks(_report(cands))
    assert pick["met"] is True and pick["candidate"] == "net:per-channel:xper-channel2"
    assert pick["recipe"] == "per-channel" and pick["size_bytes"] == 5_500_000 and pick["fq_size_bytes"] == 5_100_000
    assert pick["fp32_size_bytes"] == 20_000_000 and pick["n"] == N
    assert pick["accuracy_loss"] == pytest.approx(0.01)
    assert pick["loss_ci95"] == [pytest.approx(0.001767, abs=1e-5), pytest.approx(0.054488, abs=1e-5)]
    assert pick["float_layers"] == ["conv_0", "conv_1"]  # the model's order
    assert pick["file"] == "candidates/net/per-channel/xper-channel2.onnx"
    assert pick["runtime"] == {"ort_disabled_optimizers": ["WeightBiasQuantization"]}
    assert "disabled_optimizers" in pick["runtime_note"]
    assert pick["export_command"] == "tuneqn export '/studies/my out' --best --device cpu -o net-cpu.onnx"
    # a looser constraint picks the smaller fully quantized per-tensor model, and the command says so
    (loose,) = _picks(_report(cands), Constraint(0.05))
    assert loose["candidate"] == "net:per-tensor:fq" and loose["runtime"] == {} and loose["runtime_note"] is None
    assert "--max-loss 0.05" in loose["export_command"]
    # a size cap below every 1 % candidate: nothing meets it
    (capped,) = _picks(_report(cands), Constraint(0.01, max_size_bytes=5_400_000))
    assert capped["met"] is False and capped["candidate"] == "net:per-tensor:xper-tensor9"


def test_ties_in_size_go_to_lower_loss_then_latency_within_noise() -> None:
    cands = [
        _cand("a", 1, 5_000_000, [_res("cpu", 0.01, (12.0, 11.0, 13.0))]),
        _cand("a", 2, 5_000_000, [_res("cpu", 0.0, (12.5, 12.0, 13.0))]),
        _cand("a", 3, 5_000_000, [_res("cpu", 0.0, (11.8, 11.0, 12.8))]),
        _cand("a", 4, 5_000_000, [_res("cpu", 0.0, (8.0, 7.5, 8.5))]),  # clearly faster
    ]
    assert _picks(_report(cands))[0]["k"] == 4
    cands[3]["results"][0].update(latency_ms=12.1, latency_p10_ms=11.5, latency_p90_ms=12.6)
    # 11.8 (k=3) leads; 12.1 and 12.5 lie inside its p10–p90: a tie, broken by report order (k=2 first)
    assert _picks(_report(cands))[0]["k"] == 2


def test_latency_ties_in_the_pick_are_the_fronts_rule() -> None:
    """Equal size and loss: k1 (12.0, p10–p90 11.9–12.1, first in report order) and k2 (11.0, 10.0–11.95)
    overlap, so they tie and report order picks k1, as the fronts tie them (main took k2: its median is
    faster and k1's median lies outside k2's interval, k1's own spread ignored)."""
    stable, noisy = (12.0, 11.9, 12.1), (11.0, 10.0, 11.95)
    cands = [_cand("a", 1, 5_000_000, [_res("cpu", 0.0, stable)]), _cand("a", 2, 5_000_000, [_res("cpu", 0.0, noisy)])]
    assert _picks(_report(cands))[0]["k"] == 1
    # beyond the tie the faster one wins, whatever the order
    cands[1]["results"][0].update(latency_ms=11.0, latency_p10_ms=10.0, latency_p90_ms=11.8)
    assert _picks(_report(cands))[0]["k"] == 2
    assert _picks(_report(cands[::-1]))[0]["k"] == 2


def test_nothing_meets_the_constraint_gives_the_lowest_loss_with_a_warning() -> None:
    cands = [
        _cand("a", 0, 5_000_000, [_res("cpu", 0.09)]),
        _cand("a", 5, 9_000_000, [_res("cpu", 0.03)]),
        _cand("a", 6, 8_000_000, [_res("cpu", 0.03)]),
    ]
    (pick,) = _picks(_report(cands))
    assert pick["met"] is False and pick["k"] == 6  # equal loss: the smaller file
    assert any(w.startswith("nothing meets the constraint") for w in pick["warnings"])


def test_a_pick_no_smaller_than_fp32_says_so() -> None:
    """On a tiny model every layer left float can be the only candidate within the loss, and its QDQ file is
    larger than the FP32 model's (seen by bench/chaos.py): the answer says to ship FP32 instead."""
    cands = [_cand("a", 0, 5_000_000, [_res("cpu", 0.09)]), _cand("a", 5, 23_000_000, [_res("cpu", 0.0)])]
    (pick,) = _picks(_report(cands))
    assert pick["k"] == 5 and any(w.startswith("no smaller than the FP32 model") for w in pick["warnings"])
    cands[1]["size_bytes"] = 6_000_000
    assert not any("FP32 model" in w for w in _picks(_report(cands))[0]["warnings"])


def test_no_pick_when_nothing_is_done() -> None:
    cands = [_cand("a", 0, 5_000_000, [_res("cpu", 0.0, status="failed", feasible=False)])]
    (pick,) = _picks(_report(cands))
    assert pick["candidate"] is None and pick["export_command"] is None and "no candidate" in pick["reason"]
    assert "no pick" in "\n".join(format_answer(build_answer(_report(cands))))


def test_cross_device_pick_uses_the_worst_device() -> None:
    cands = [
        _cand("a", 0, 5_000_000, [_res("cpu", 0.0), _res("phone", 0.04)]),  # fine on cpu, not on the phone
        _cand("a", 2, 6_000_000, [_res("cpu", 0.01, (10.0, 9.0, 11.0)), _res("phone", 0.01, (40.0, 39.0, 41.0))]),
        _cand("a", 3, 5_500_000, [_res("cpu", 0.0)]),  # no phone result: not a cross-device candidate
    ]
    picks = _picks(_report(cands, devices=("cpu", "phone"), fp32_latency=(60.0, 59.0, 61.0)))
    assert [(p["scope"], p["device"], p["k"]) for p in picks] == [
        ("device", "cpu", 0),
        ("device", "phone", 2),
        ("cross-device", None, 2),
    ]
    cross = picks[2]
    assert cross["devices"] == ["cpu", "phone"] and cross["accuracy_loss"] == pytest.approx(0.01)
    assert cross["latency_ms"] == 40.0 and cross["latency_p90_ms"] == 41.0  # the slower device's
    assert "--cross-device" in cross["export_command"]


def test_warnings_no_faster_within_noise_of_fq_small_sample_few_labels() -> None:
    cands = [
        _cand("a", 0, 5_000_000, [_res("cpu", 0.02, accuracy=0.7)]),
        _cand("a", 2, 6_000_000, [_res("cpu", 0.01, (29.5, 28.0, 31.0), accuracy=0.8)]),
    ]
    (pick,) = _picks(_report(cands, labelled=14))
    text = "\n".join(pick["warnings"])
    assert "no faster than FP32 on cpu" in text
    assert "within noise of its recipe's fully quantized model (2 % loss" in text  # 0.02 lies in [0.18 %, 5.4 %]
    assert "too small to tell a 1 % loss apart: 100 images" in text
    assert "only 14 labelled images" in text and pick["accuracy_n"] == 14
    # many more photos, clearly faster, no labels: no warning
    quiet = copy.deepcopy(cands)
    for c in quiet:
        c["results"][0].update(num_samples=100_000, accuracy=None)
    quiet[0]["results"][0]["agreement"] = 0.9
    quiet[1]["results"][0].update(latency_ms=10.0, latency_p10_ms=9.0, latency_p90_ms=11.0)
    (calm,) = _picks(_report(quiet))
    assert calm["warnings"] == [] and calm["accuracy_n"] == 0


def test_constraint_from_settings_falls_back_to_the_search_then_one_percent() -> None:
    assert Constraint.from_settings({}).max_loss == 0.01
    assert Constraint.from_settings({"search": {"max_loss": 0.02}}).max_loss == 0.02
    c = Constraint.from_settings(
        {"search": {"max_loss": 0.02}, "answer": {"max_loss": 0.005, "max_size_mb": 6, "max_latency_ms": 20}}
    )
    assert c == Constraint(0.005, 6_000_000, 20.0)


def test_printed_answer_names_everything() -> None:
    cands = [_cand("a", 12, 6_000_000, [_res("cpu", 0.01)])]
    lines = format_answer(build_answer(_report(cands, labelled=14)))
    text = "\n".join(lines)
    assert lines[0] == "answer (accuracy loss ≤ 1 %):"
    assert "candidates/net/a/xa12.onnx" in text and "6 MB, 30 % of FP32's 20 MB" in text
    assert "agreement loss 1 % (95 % interval 0.18 %–5.45 %, n = 100)" in text
    assert "latency 10 ms (p10–p90 9.5–10.5); FP32 30 ms" in text
    assert "float layers (12): conv_0, conv_1, conv_2, conv_3, conv_4, conv_5, conv_6, conv_7, … (4 more" in text
    assert "runtime: the evaluated file needs ONNX Runtime session option" in text
    assert lines[-1] == "    export: tuneqn export '/studies/my out' --best --device cpu -o net-cpu.onnx"


def test_cross_device_pick_of_a_recipe_split_across_devices() -> None:
    """Feasibility planning runs `qop` on the cpu and its variant `qop.qdq` on the phone: no candidate has
    results on both, yet the cross-device pick is the split recipe, one file per part (main: no pick)."""
    cands = [
        _cand("qop", 0, 4_000_000, [_res("cpu", 0.03)]),
        _cand("qop", 2, 4_500_000, [_res("cpu", 0.01)]),
        _cand("qop", 4, 6_000_000, [_res("cpu", 0.0)]),
        _cand("qop.qdq", 0, 4_200_000, [_res("phone", 0.0, (40.0, 39.0, 41.0))]),
        _cand("qop.qdq", 3, 4_800_000, [_res("phone", 0.0)]),
    ]
    report = _report(cands, devices=("cpu", "phone"), fp32_latency=(60.0, 59.0, 61.0))
    report["feasibility"] = [
        {"model": "net", "recipe": "qop", "device": "phone", "planned": "qop.qdq", "status": "adapted"},
        {"model": "net", "recipe": "qop", "device": "cpu", "planned": "qop", "status": "feasible"},
    ]
    picks = _picks(report)
    assert [(p["scope"], p["device"], p["k"]) for p in picks] == [
        ("device", "cpu", 2),
        ("device", "phone", 0),
        ("cross-device", None, 2),
    ]
    cross = picks[2]
    assert cross["met"] is True and cross["candidate"] == "net:qop:xqop2"  # the part with the larger file
    assert [(p["recipe"], p["devices"], p["candidate"]) for p in cross["parts"]] == [
        ("qop", ["cpu"], "net:qop:xqop2"),
        ("qop.qdq", ["phone"], "net:qop.qdq:fq"),
    ]
    assert cross["size_bytes"] == 4_500_000 and cross["accuracy_loss"] == pytest.approx(0.01)
    assert cross["latency_ms"] == 40.0  # the slower part's
    assert cross["export_command"] is None and "--candidate net:qop.qdq:fq" in cross["parts"][1]["export_command"]
    text = "\n".join(format_answer(build_answer(report)))
    assert "on phone: candidates/net/qop.qdq/fq.onnx" in text
    # a candidate with results everywhere still competes: a smaller one wins over the split
    cands.append(_cand("other", 1, 4_400_000, [_res("cpu", 0.0), _res("phone", 0.0)]))
    assert _picks(report)[2]["candidate"] == "net:other:xother1" and _picks(report)[2]["parts"] == []


def test_a_level_candidate_slower_than_its_in_or_out_sibling_is_not_the_pick() -> None:
    """An int4 twin (smaller file) is the pick only where it is not slower beyond the tie than the pick among the
    in-or-out candidates: on a device where its 4-bit layers run in float and cost time, the pick is the in-or-out
    one and a warning names the smaller file; within the noise the smaller file wins; and with no in-or-out
    candidate meeting the constraint, the twin."""
    sibling = _cand("a", 2, 5_000_000, [_res("cpu", 0.01, (5.0, 4.8, 5.2))])
    twin = {
        **_cand("a", 2, 4_100_000, [_res("cpu", 0.01, (11.0, 10.5, 11.5))]),
        "id": "net:a:xtwin",
        "label": "measured k=2 +4 int4",
        "levels": {"conv_9": "int4", "conv_8": "int4"},
    }
    (pick,) = _picks(_report([sibling, twin]))
    assert pick["candidate"] == sibling["id"] and pick["levels"] == {}
    (note,) = [w for w in pick["warnings"] if "smaller file meets the constraint" in w]
    assert "4.1 MB" in note and "int4" in note and "--candidate net:a:xtwin" in note
    twin["results"] = [_res("cpu", 0.01, (5.1, 4.9, 5.3))]  # as fast within the noise: the smaller file
    (pick,) = _picks(_report([sibling, twin]))
    assert pick["candidate"] == "net:a:xtwin" and pick["levels"] == {"conv_8": "int4", "conv_9": "int4"}
    assert not any("smaller file meets" in w for w in pick["warnings"])
    assert "    int4 layers (2): conv_8, conv_9" in format_answer(build_answer(_report([sibling, twin])))
    twin["results"] = [_res("cpu", 0.01, (11.0, 10.5, 11.5))]
    sibling["results"] = [_res("cpu", 0.03, (5.0, 4.8, 5.2))]  # the in-or-out candidates miss the 1 %: the twin
    (pick,) = _picks(_report([sibling, twin]))
    assert pick["candidate"] == "net:a:xtwin"

"""The report's answer: which file to ship, per device and across devices, and how sure that is.

Pure: a finalized report (a dict whose results carry ``feasible``) in, the ``answer`` section out;
no store, no files.  :func:`build_answer` gives::

    {"constraint": {"max_loss", "max_size_bytes", "max_latency_ms"}, "rule": str,
     "picks": [{"scope": "device"|"cross-device", "model", "device", "devices", "met", "candidate",
                "recipe", "label", "k", "file", "sha256", "size_bytes", "fp32_size_bytes", "fq_size_bytes",
                "agreement", "accuracy_loss", "n", "loss_ci95", "accuracy", "accuracy_n", "fp32_accuracy",
                "latency_ms", "latency_p10_ms", "latency_p90_ms", "fp32_latency_ms", "fp32_latency_p10_ms",
                "fp32_latency_p90_ms", "float_layers", "levels", "runtime", "runtime_note", "export_command",
                "parts": [{"recipe", "devices", "candidate", "label", "k", "file", "sha256", "size_bytes",
                           "accuracy_loss", "float_layers", "levels", "export_command"}], "warnings", "reason"}]}

``levels``: the pick's layers at a precision other than fp32 (``float_layers``) or the recipe's int8.

The rule: per (model, device) one pick over every recipe of the model, among its full results that are
done and feasible: of the results meeting the constraint (accuracy loss ``1 − agreement`` ≤ ``max_loss``,
size ≤ ``max_size_bytes``, median latency ≤ ``max_latency_ms``), the smallest file; equal sizes go to the
lower loss, then to the lower latency by the fronts' tie rule (:mod:`tuneqn.controller.search.ties`: latencies
whose p10–p90 intervals overlap tie; of the options no other one is faster than, the first in report
order).  A candidate with precision levels (an int4 twin) is the pick only where it pays off on the device: not
when the pick among the in-or-out candidates (no levels) meeting the constraint is faster beyond the tie (on
ONNX Runtime's CPU provider a 4-bit layer runs in float); the pick then says that a smaller file exists and how
to export it.  When nothing
meets it, ``met`` is false and the pick is the lowest-loss result (then smallest, then fastest).  A model
measured on several devices also gets a ``cross-device`` pick over the candidates with such a result on
every one of its devices, each value being the worst over the devices (highest loss and latency, lowest
agreement and accuracy).  When feasibility planning runs a recipe as a variant on some devices (its ``.qdq``
or ``.float-Op`` form), no candidate of it has results everywhere: such a *split* recipe is one cross-device
option made of one pick per part (the devices running the same recipe: each part's pick by the rule above,
over that recipe's candidates on those devices), valued at the worst over the parts; the pick then lists
the ``parts`` (one file each, ``export_command`` per part) and its top-level candidate and file are the
part's with the largest file.  The loss's 95 % interval is Wilson's score interval for ``n`` samples.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from tuneqn.controller.objectives import finite
from tuneqn.controller.search.ties import Latency, faster
from tuneqn.controller.store import is_fully_quantized

#: z of a two-sided 95 % normal interval.
Z95 = 1.959963984540054

#: Tolerance of ``loss <= max_loss`` (1 - 0.99 is 0.010000000000000009 in floating point).
LOSS_TOLERANCE = 1e-9

#: Below this many labelled images an accuracy gets a warning.
FEW_LABELLED = 50

#: The session option of a candidate whose excluded layers ONNX Runtime would otherwise quantize.
_RUNTIME_KEY = "ort_disabled_optimizers"


def wilson_interval(failures: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``failures / n`` (95 % by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= failures <= n:
        raise ValueError(f"wilson_interval: {failures} failures out of {n}")
    p = failures / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (0.0 if failures == 0 else max(0.0, centre - half)), (1.0 if failures == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Constraint:
    """What the answer must meet: an accuracy-loss limit and optional size and latency caps."""

    max_loss: float
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> Constraint:
        """The study's constraint from its settings (``report["study"]["settings"]``): ``[answer]``, with
        ``max_loss`` falling back to ``[search] max_loss`` and then 1 %."""
        from tuneqn.controller.config import DEFAULT_MAX_LOSS  # noqa: PLC0415 - config imports nothing of ours

        settings = settings or {}
        answer = settings.get("answer") or {}
        max_loss = finite(answer.get("max_loss"))
        if max_loss is None:
            max_loss = finite((settings.get("search") or {}).get("max_loss"))
        size_mb = finite(answer.get("max_size_mb"))
        return cls(
            DEFAULT_MAX_LOSS if max_loss is None else max_loss,
            None if size_mb is None else int(round(size_mb * 1e6)),
            finite(answer.get("max_latency_ms")),
        )

    def override(
        self, max_loss: float | None = None, max_size_mb: float | None = None, max_latency_ms: float | None = None
    ) -> Constraint:
        """This constraint with the given values replaced (None keeps the value)."""
        return Constraint(
            self.max_loss if max_loss is None else float(max_loss),
            self.max_size_bytes if max_size_mb is None else int(round(max_size_mb * 1e6)),
            self.max_latency_ms if max_latency_ms is None else float(max_latency_ms),
        )

    def as_dict(self) -> dict[str, Any]:
        """The report's ``answer.constraint``."""
        return {"max_loss": self.max_loss, "max_size_bytes": self.max_size_bytes, "max_latency_ms": self.max_latency_ms}

    def describe(self) -> str:
        """``accuracy loss ≤ 1 %, size ≤ 6 MB, latency ≤ 20 ms``."""
        parts = [f"accuracy loss ≤ {pct(self.max_loss)}"]
        if self.max_size_bytes is not None:
            parts.append(f"size ≤ {mb(self.max_size_bytes)}")
        if self.max_latency_ms is not None:
            parts.append(f"latency ≤ {self.max_latency_ms:g} ms")
        return ", ".join(parts)

    def flags(self, configured: Constraint) -> list[str]:
        """Command-line flags that turn ``configured`` into this constraint (none when they are equal)."""
        out: list[str] = []
        if self.max_loss != configured.max_loss:
            out += ["--max-loss", f"{self.max_loss:g}"]
        if self.max_size_bytes != configured.max_size_bytes and self.max_size_bytes is not None:
            out += ["--max-size-mb", f"{self.max_size_bytes / 1e6:g}"]
        if self.max_latency_ms != configured.max_latency_ms and self.max_latency_ms is not None:
            out += ["--max-latency-ms", f"{self.max_latency_ms:g}"]
        return out


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: ``0.01`` → ``1 %``, ``0.0545`` → ``5.45 %``."""
    if x is None:
        return "?"
    return f"{round(100 * x, digits):g} %"


def mb(n: float | None) -> str:
    """Bytes as MB (10**6): ``5120000`` → ``5.12 MB``."""
    return "?" if n is None else f"{n / 1e6:.3g} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"


def rule_text(constraint: Constraint) -> str:
    """The rule of the answer in one sentence."""
    return (
        f"the smallest file meeting {constraint.describe()} (accuracy loss = 1 − top-1 agreement with FP32 on "
        "the device), over every recipe's fully evaluated candidates; equal sizes go to the "
        "lower loss, then the lower latency (within p10–p90 a tie); when nothing meets it, the lowest-loss "
        "result. Across devices the worst value over the devices counts; a recipe that runs as a variant on some "
        "devices (feasibility planning) counts as one option with one file per part. The loss's 95 % interval is "
        "Wilson's for the evaluation sample's size."
    )


@dataclass
class _Option:
    """A candidate as one row of a pick: its worst values over the pick's devices."""

    cand: dict[str, Any]
    order: int
    results: dict[str, dict[str, Any]]  # device -> result
    agreement: float
    size: int | None
    latency: float | None
    p10: float | None
    p90: float | None
    latency_device: str | None
    accuracy: float | None
    n: int | None
    #: A recipe split across the devices (feasibility planning): per part its devices and its own pick.
    parts: list[tuple[list[str], _Option]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return 1.0 - self.agreement


def _option(cand: dict[str, Any], order: int, devices: list[str]) -> _Option | None:
    """The candidate's worst values over ``devices``; None unless it is done and feasible on each."""
    by_dev = {r.get("device"): r for r in cand.get("results") or []}
    rows = [by_dev.get(d) for d in devices]
    if any(
        r is None or r.get("status") != "done" or not r.get("feasible") or finite(r.get("agreement")) is None
        for r in rows
    ):
        return None
    results = {d: r for d, r in zip(devices, rows, strict=True) if r is not None}
    agreement = min(float(r["agreement"]) for r in results.values())
    lat = [(finite(r.get("latency_ms")), d) for d, r in results.items()]
    latency = p10 = p90 = None
    lat_dev = None
    if all(v is not None for v, _ in lat):
        latency, lat_dev = max(lat, key=lambda t: float(t[0] or 0.0))
        p10, p90 = finite(results[lat_dev].get("latency_p10_ms")), finite(results[lat_dev].get("latency_p90_ms"))
    accs = [finite(r.get("accuracy")) for r in results.values()]
    ns = [r.get("num_samples") for r in results.values() if isinstance(r.get("num_samples"), int)]
    size = finite(cand.get("size_bytes"))
    return _Option(
        cand,
        order,
        results,
        agreement,
        None if size is None else int(size),
        latency,
        p10,
        p90,
        lat_dev,
        None if any(a is None for a in accs) else min(a for a in accs if a is not None),
        min(ns) if ns else None,
    )


def split_parts(report: dict[str, Any], model: str, devices: list[str]) -> list[list[tuple[str, list[str]]]]:
    """The recipe splits of ``model`` over ``devices``: for every recipe that feasibility planning runs as a
    variant on some devices (the report's ``feasibility`` rows, keyed by device class), its parts — (the
    recipe that runs there: the recipe itself or its variant, those devices), in device order; only
    recipes split into two parts or more."""
    cls = {d.get("name"): d.get("device_class") or d.get("name") for d in report.get("devices") or []}
    planned: dict[tuple[str, str], str] = {}
    for row in report.get("feasibility") or []:
        if row.get("model") == model and row.get("planned") and row.get("planned") != row.get("recipe"):
            planned[(str(row.get("recipe")), str(row.get("device")))] = str(row["planned"])
    out: list[list[tuple[str, list[str]]]] = []
    for base in dict.fromkeys(r for r, _ in planned):
        parts: dict[str, list[str]] = {}
        for d in devices:
            recipe = planned.get((base, cls.get(d) or d)) or planned.get((base, d)) or base
            parts.setdefault(recipe, []).append(d)
        if len(parts) >= 2:
            out.append(list(parts.items()))
    return out


def _combined(parts: list[tuple[list[str], _Option]]) -> _Option:
    """One cross-device option from each part's pick: the worst values over the parts (its file and
    candidate: the part's with the largest file)."""
    options = [o for _, o in parts]
    largest = max(options, key=lambda o: o.size if o.size is not None else math.inf)
    slowest = None if any(o.latency is None for o in options) else max(options, key=lambda o: float(o.latency or 0.0))
    sizes = [o.size for o in options]
    accs = [o.accuracy for o in options]
    ns = [o.n for o in options if o.n is not None]
    return _Option(
        largest.cand,
        min(o.order for o in options),
        {d: r for o in options for d, r in o.results.items()},
        min(o.agreement for o in options),
        None if None in sizes else max(s for s in sizes if s is not None),
        *(
            (slowest.latency, slowest.p10, slowest.p90, slowest.latency_device)
            if slowest is not None
            else (None, None, None, None)
        ),
        None if None in accs else min(a for a in accs if a is not None),
        min(ns) if ns else None,
        parts=list(parts),
    )


def split_options(
    report: dict[str, Any], model: str, cands: list[dict[str, Any]], devices: list[str], constraint: Constraint
) -> list[_Option]:
    """Cross-device options of the recipes split across ``devices``: per split, each part's pick (by the
    answer's rule, over the part recipe's candidates on the part's devices) combined into one option."""
    out: list[_Option] = []
    for parts in split_parts(report, model, devices):
        picked: list[tuple[list[str], _Option]] = []
        for recipe, devs in parts:
            options = [
                o
                for i, c in enumerate(cands)
                if (c.get("recipe") or c.get("mode")) == recipe and (o := _option(c, i, devs)) is not None
            ]
            pick, _ = choose(options, constraint)
            if pick is None:
                break
            picked.append((devs, pick))
        else:
            out.append(_combined(picked))
    return out


def _meets(o: _Option, c: Constraint) -> bool:
    if o.loss > c.max_loss + LOSS_TOLERANCE:
        return False
    if c.max_size_bytes is not None and (o.size is None or o.size > c.max_size_bytes):
        return False
    return c.max_latency_ms is None or (o.latency is not None and o.latency <= c.max_latency_ms)


def _fastest(group: list[_Option]) -> _Option:
    """The fastest of equally good options: the first in report order of those no other option is faster
    than beyond the tie (:func:`tuneqn.controller.search.ties.faster`)."""
    lat = [Latency.of(o.latency, o.p10, o.p90) for o in group]
    if len(group) == 1 or any(x is None for x in lat):
        return min(group, key=lambda o: o.order)
    unbeaten = [
        o
        for o, x in zip(group, lat, strict=True)
        if not any(y is not None and x is not None and faster(y, x) for y in lat)
    ]
    return min(unbeaten, key=lambda o: o.order)


def _lat(o: _Option) -> Latency | None:
    return Latency.of(o.latency, o.p10, o.p90)


def _smallest(meeting: list[_Option]) -> _Option:
    """The smallest of options meeting the constraint; equal sizes: the lower loss, then the faster (tie rule)."""
    size = min(o.size if o.size is not None else math.inf for o in meeting)
    same = [o for o in meeting if (o.size if o.size is not None else math.inf) == size]
    loss = min(o.loss for o in same)
    return _fastest([o for o in same if o.loss <= loss + LOSS_TOLERANCE])


def _slower_levels(pick: _Option, options: list[_Option], constraint: Constraint, met: bool) -> list[str]:
    """A warning naming the smallest precision-level candidate left out of the pick for being slower than its
    in-or-out sibling (:func:`_paying`), when it meets the constraint with a smaller file than the pick."""
    if not met or pick.size is None or pick.cand.get("levels"):
        return []
    skipped = [
        o
        for o in options
        if o.cand.get("levels") and _meets(o, constraint) and o.size is not None and o.size < pick.size
    ]
    if not skipped:
        return []
    o = _smallest(skipped)
    lat = "" if o.latency is None else f" ({o.latency:.3g} ms)"
    return [
        f"a smaller file meets the constraint too: {o.cand.get('label')} ({mb(o.size)}, {pct(o.loss)} loss, "
        f"precision levels {', '.join(sorted(set((o.cand.get('levels') or {}).values())))}) but is slower on this "
        f"device{lat} than this pick; ship it where size matters more "
        f"(tuneqn export --candidate {o.cand.get('id')})"
    ]


def choose(options: list[_Option], constraint: Constraint) -> tuple[_Option | None, bool]:
    """(pick, met): the smallest option meeting ``constraint``, else the lowest-loss one (see module doc)."""
    if not options:
        return None, False
    meeting = [o for o in options if _meets(o, constraint)]
    if meeting:
        best = _smallest(meeting)
        plain = [o for o in meeting if not o.cand.get("levels")]
        if best.cand.get("levels") and plain:  # a level pays off only where it costs no time (see module doc)
            alt = _smallest(plain)
            mine, theirs = _lat(best), _lat(alt)
            if mine is not None and theirs is not None and faster(theirs, mine):
                return alt, True
        return best, True
    loss = min(o.loss for o in options)
    same = [o for o in options if o.loss <= loss + LOSS_TOLERANCE]
    size = min(o.size if o.size is not None else math.inf for o in same)
    return _fastest([o for o in same if (o.size if o.size is not None else math.inf) == size]), False


def layer_order(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, int]]:
    """Per (model, recipe), each analyzed layer's position in the graph."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for layer in report.get("layers") or []:
        recipe = layer.get("recipe") or layer.get("mode")
        out.setdefault((layer.get("model"), recipe), {})[layer.get("name")] = int(layer.get("index") or 0)
    return out


def float_layers(cand: dict[str, Any], order: dict[tuple[str, str], dict[str, int]]) -> list[str]:
    """The candidate's excluded layers in the model's order (by the analysis of its recipe, or of any recipe
    of its model for a variant recipe; unknown names last, by name)."""
    # a report's candidate always names its model and recipe
    model, recipe = cast(str, cand.get("model")), cast(str, cand.get("recipe") or cand.get("mode"))
    index = dict(order.get((model, recipe)) or {})
    for (m, _), idx in order.items():
        if m == model:
            for name, i in idx.items():
                index.setdefault(name, i)
    return sorted(cand.get("excluded") or [], key=lambda n: (n not in index, index.get(n, 0), n))


def runtime_of(cand: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(runtime, note): the session options the evaluated candidate file needs, and what they mean."""
    disabled = list((cand.get("runtime") or {}).get(_RUNTIME_KEY) or [])
    if not disabled:
        return {}, None
    return (
        {_RUNTIME_KEY: disabled},
        f"the evaluated file needs ONNX Runtime session option disabled_optimizers={disabled} (without it "
        "ONNX Runtime quantizes the weights of its float layers when loading it and the outputs differ); "
        "'tuneqn export' writes a form that a plain onnxruntime.InferenceSession(path) runs with those "
        "layers in float, and says so",
    )


def part_export_command(
    out_dir: str, model: str, cand: dict[str, Any], devices: list[str], several_models: bool
) -> str:
    """The ``tuneqn export … --candidate ID`` command that writes one part of a split cross-device pick."""
    parts = ["tuneqn", "export", out_dir]
    if several_models:
        parts += ["--model", model]
    parts += ["--candidate", str(cand.get("id")), "-o", f"{_slug(model)}-{'-'.join(_slug(d) for d in devices)}.onnx"]
    return shlex.join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "x"


def export_command(out_dir: str, model: str, device: str | None, several_models: bool, flags: list[str]) -> str:
    """The ``tuneqn export … --best`` command that writes a pick (``device`` None: the cross-device pick)."""
    parts = ["tuneqn", "export", out_dir, "--best"]
    if several_models:
        parts += ["--model", model]
    parts += ["--device", device] if device is not None else ["--cross-device"]
    parts += flags
    parts += ["-o", f"{_slug(model)}-{_slug(device) if device is not None else 'all-devices'}.onnx"]
    return shlex.join(parts)


def _ms(v: float | None) -> str:
    return "?" if v is None else f"{v:.3g} ms"


def _spread(p10: float | None, p90: float | None) -> str:
    return "" if p10 is None or p90 is None else f" (p10–p90 {p10:.3g}–{p90:.3g})"


def _warnings(
    pick: _Option,
    met: bool,
    constraint: Constraint,
    fq: _Option | None,
    baselines: dict[tuple[str, str], dict[str, Any]],
    n: int | None,
    labelled: int | None,
    ci: tuple[float, float] | None,
    fp32_size: int | None = None,
) -> list[str]:
    c = pick.cand
    out: list[str] = []
    if not met:
        out.append(
            f"nothing meets the constraint ({constraint.describe()}); this is the lowest-loss result "
            f"({pct(pick.loss)} loss)"
        )
    if fp32_size and pick.size is not None and pick.size >= fp32_size:
        out.append(
            f"no smaller than the FP32 model ({mb(pick.size)} vs {mb(fp32_size)}): no quantized file "
            f"found here saves space; ship the FP32 model unless this one is faster"
        )
    for dev, r in pick.results.items():
        b = baselines.get((cast(str, c.get("model")), dev)) or {}  # a candidate always names its model
        lat, base = finite(r.get("latency_ms")), finite(b.get("latency_ms"))
        if lat is None or base is None:
            continue
        lo, hi = finite(r.get("latency_p10_ms")), finite(r.get("latency_p90_ms"))
        blo, bhi = finite(b.get("latency_p10_ms")), finite(b.get("latency_p90_ms"))
        mine, fp32 = Latency.of(lat, lo, hi), Latency.of(base, blo, bhi)
        if lat >= base or (mine is not None and fp32 is not None and not faster(mine, fp32)):
            out.append(
                f"no faster than FP32 on {dev}: {_ms(lat)}{_spread(lo, hi)} vs FP32 {_ms(base)}{_spread(blo, bhi)}"
            )
    if ci is not None and fq is not None and fq.cand.get("id") != c.get("id") and ci[0] <= fq.loss <= ci[1]:
        out.append(
            f"within noise of its recipe's fully quantized model ({pct(fq.loss)} loss, {mb(fq.size)}): "
            f"that loss lies inside this pick's 95 % interval {pct(ci[0])}–{pct(ci[1])}; more photos "
            f"would tell whether its {len(c.get('excluded') or [])} float layers are needed"
        )
    if ci is not None and n:
        if 1.0 / n > constraint.max_loss + LOSS_TOLERANCE or ci[1] - ci[0] > constraint.max_loss:
            out.append(
                f"the sample is too small to tell a {pct(constraint.max_loss)} loss apart: {n} images "
                f"(one image is {pct(1.0 / n)}), the loss's 95 % interval is {pct(ci[0])}–{pct(ci[1])}"
            )
    if pick.accuracy is not None and labelled is not None and 0 < labelled < FEW_LABELLED:
        lo, hi = wilson_interval(round(pick.accuracy * labelled), labelled)
        out.append(
            f"accuracy {pct(pick.accuracy, 1)} is measured on only {labelled} labelled images "
            f"(95 % interval {pct(lo, 1)}–{pct(hi, 1)})"
        )
    return out


def _pick_head(scope: str, model: str, devices: list[str], met: bool) -> dict[str, Any]:
    """The keys every pick starts with: for whom it is and whether it meets the constraint."""
    return {
        "scope": scope,
        "model": model,
        "device": devices[0] if scope == "device" else None,
        "devices": devices,
        "met": met,
    }


def _empty_pick(scope: str, model: str, devices: list[str], reason: str, fp32_size: int | None) -> dict[str, Any]:
    keys = (
        "candidate",
        "recipe",
        "label",
        "k",
        "file",
        "sha256",
        "size_bytes",
        "fq_size_bytes",
        "agreement",
        "accuracy_loss",
        "n",
        "loss_ci95",
        "accuracy",
        "accuracy_n",
        "fp32_accuracy",
        "latency_ms",
        "latency_p10_ms",
        "latency_p90_ms",
        "fp32_latency_ms",
        "fp32_latency_p10_ms",
        "fp32_latency_p90_ms",
        "runtime_note",
        "export_command",
    )
    return {
        **_pick_head(scope, model, devices, False),
        **dict.fromkeys(keys),
        "fp32_size_bytes": fp32_size,
        "float_layers": [],
        "levels": {},
        "runtime": {},
        "parts": [],
        "warnings": [],
        "reason": reason,
    }


def candidate_file(cand: dict[str, Any]) -> str:
    """A candidate's file relative to the study folder: ``candidates/<model>/<recipe>/<fq|x…>.onnx``."""
    tag = str(cand.get("id", "")).rsplit(":", 1)[-1]
    return f"candidates/{cand.get('model')}/{cand.get('recipe') or cand.get('mode')}/{tag}.onnx"


def _devices_of(cands: Iterable[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    seen = list(dict.fromkeys(r.get("device") for c in cands for r in c.get("results") or []))
    known = [d.get("name") for d in report.get("devices") or []]
    return [d for d in known if d in seen] + [d for d in seen if d not in known]


def build_answer(report: dict[str, Any], constraint: Constraint | None = None) -> dict[str, Any]:
    """The ``answer`` section of a finalized report (see the module docstring); ``constraint`` None: the study's."""
    settings = (report.get("study") or {}).get("settings")
    configured = Constraint.from_settings(settings)
    constraint = constraint or configured
    flags = constraint.flags(configured)
    out_dir = str((report.get("study") or {}).get("out_dir") or "OUT_DIR")
    dataset = report.get("dataset") or {}
    labelled = dataset.get("labelled_eval_samples")
    order = layer_order(report)
    models = {m.get("name"): m for m in report.get("models") or []}
    baselines = {(b.get("model"), b.get("device")): b for b in report.get("baselines") or []}
    full = [c for c in report.get("candidates") or [] if c.get("level", "full") == "full"]
    model_names = list(dict.fromkeys(c.get("model") for c in full))
    picks: list[dict[str, Any]] = []
    for model in model_names:
        cands = [c for c in full if c.get("model") == model]
        devices = _devices_of(cands, report)
        fp32_size = finite((models.get(model) or {}).get("size_bytes"))
        scopes = [("device", [d]) for d in devices] + ([("cross-device", devices)] if len(devices) >= 2 else [])
        for scope, devs in scopes:
            options = [o for i, c in enumerate(cands) if (o := _option(c, i, devs)) is not None]
            if scope == "cross-device":  # a recipe split across the devices: one file per part
                options += split_options(report, model, cands, devs, constraint)
            pick, met = choose(options, constraint)
            if pick is None:
                reason = (
                    "no candidate is done and feasible on " + ", ".join(devs)
                    if scope == "device"
                    else "no candidate is done and feasible on every device (" + ", ".join(devs) + ")"
                )
                picks.append(_empty_pick(scope, model, devs, reason, None if fp32_size is None else int(fp32_size)))
                continue
            picks.append(
                _pick_entry(
                    pick,
                    met,
                    scope,
                    model,
                    devs,
                    options,
                    constraint,
                    baselines,
                    labelled,
                    dataset.get("eval_samples"),
                    order,
                    None if fp32_size is None else int(fp32_size),
                    out_dir,
                    len(model_names) > 1,
                    flags,
                )
            )
    return {"constraint": constraint.as_dict(), "rule": rule_text(constraint), "picks": picks}


def _pick_entry(
    pick: _Option,
    met: bool,
    scope: str,
    model: str,
    devs: list[str],
    options: list[_Option],
    constraint: Constraint,
    baselines: dict[tuple[str, str], dict[str, Any]],
    labelled: int | None,
    eval_samples: int | None,
    order: dict[tuple[str, str], dict[str, int]],
    fp32_size: int | None,
    out_dir: str,
    several_models: bool,
    flags: list[str],
) -> dict[str, Any]:
    c = pick.cand
    recipe = c.get("recipe") or c.get("mode")
    fq = next(
        (o for o in options if is_fully_quantized(o.cand) and (o.cand.get("recipe") or o.cand.get("mode")) == recipe),
        None,
    )
    n = pick.n or (eval_samples if isinstance(eval_samples, int) else None)
    ci = wilson_interval(round(pick.loss * n), n) if n else None
    # FP32 values: on the device, or across devices on the device where the pick is slowest
    base_dev = devs[0] if scope == "device" else (pick.latency_device or devs[0])
    base = baselines.get((model, base_dev)) or {}
    fp32_acc = [finite((baselines.get((model, d)) or {}).get("accuracy")) for d in devs]
    runtime, note = runtime_of(c)
    has_labels = labelled is not None and labelled > 0 and pick.accuracy is not None
    parts = [
        {
            "recipe": o.cand.get("recipe") or o.cand.get("mode"),
            "devices": pdevs,
            "candidate": o.cand.get("id"),
            "label": o.cand.get("label"),
            "k": o.cand.get("k"),
            "file": candidate_file(o.cand),
            "sha256": o.cand.get("sha256"),
            "size_bytes": o.size,
            "accuracy_loss": o.loss,
            "float_layers": float_layers(o.cand, order),
            "levels": dict(sorted((o.cand.get("levels") or {}).items())),
            "export_command": part_export_command(out_dir, model, o.cand, pdevs, several_models),
        }
        for pdevs, o in pick.parts
    ]
    return {
        **_pick_head(scope, model, devs, met),
        "candidate": c.get("id"),
        "recipe": recipe,
        "label": c.get("label"),
        "k": c.get("k"),
        "file": candidate_file(c),
        "sha256": c.get("sha256"),
        "size_bytes": pick.size,
        "fp32_size_bytes": fp32_size,
        "fq_size_bytes": None if fq is None else fq.size,
        "agreement": pick.agreement,
        "accuracy_loss": pick.loss,
        "n": n,
        "loss_ci95": None if ci is None else [ci[0], ci[1]],
        "accuracy": pick.accuracy,
        "accuracy_n": labelled if has_labels else 0,
        "fp32_accuracy": None if any(a is None for a in fp32_acc) else min(a for a in fp32_acc if a is not None),
        "latency_ms": pick.latency,
        "latency_p10_ms": pick.p10,
        "latency_p90_ms": pick.p90,
        "fp32_latency_ms": finite(base.get("latency_ms")),
        "fp32_latency_p10_ms": finite(base.get("latency_p10_ms")),
        "fp32_latency_p90_ms": finite(base.get("latency_p90_ms")),
        "float_layers": float_layers(c, order),
        "levels": dict(sorted((c.get("levels") or {}).items())),
        "runtime": runtime,
        "runtime_note": note,
        "export_command": None
        if parts
        else export_command(out_dir, model, devs[0] if scope == "device" else None, several_models, flags),
        "parts": parts,
        "warnings": _warnings(pick, met, constraint, fq, baselines, n, labelled if has_labels else None, ci, fp32_size)
        + _slower_levels(pick, options, constraint, met),
        "reason": None,
    }


def _names(names: list[str], limit: int = 8) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … ({len(names) - limit} more, {len(names)} in all)"


def format_answer(answer: dict[str, Any] | None) -> list[str]:
    """The answer as the lines ``tuneqn tune`` and ``tuneqn report`` end with."""
    if not answer or not answer.get("picks"):
        return ["answer: nothing evaluated in full yet"]
    c = answer.get("constraint") or {}
    constraint = Constraint(float(c.get("max_loss") or 0.0), c.get("max_size_bytes"), c.get("max_latency_ms"))
    lines = [f"answer ({constraint.describe()}):"]
    for p in answer["picks"]:
        where = p["device"] if p["scope"] == "device" else "every device (" + ", ".join(p["devices"]) + ")"
        head = f"  {p['model']} on {where}"
        if p.get("candidate") is None:
            lines.append(f"{head}: no pick ({p.get('reason')})")
            continue
        vs = ""
        if p.get("fp32_size_bytes") and p.get("size_bytes") is not None:
            vs = f", {100 * p['size_bytes'] / p['fp32_size_bytes']:.0f} % of FP32's {mb(p['fp32_size_bytes'])}"
        lines.append(f"{head}: {p['file']}" + ("" if p["met"] else "  (constraint NOT met)"))
        lines.append(f"    {p['recipe']}, {p.get('label')}; size {mb(p['size_bytes'])}{vs}")
        ci = p.get("loss_ci95")
        lines.append(
            f"    agreement loss {pct(p['accuracy_loss'])}"
            + (f" (95 % interval {pct(ci[0])}–{pct(ci[1])}, n = {p['n']})" if ci else "")
        )
        if p.get("latency_ms") is not None:
            fp32 = f"; FP32 {_ms(p.get('fp32_latency_ms'))}" if p.get("fp32_latency_ms") is not None else ""
            spread = _spread(p.get("latency_p10_ms"), p.get("latency_p90_ms"))
            lines.append(f"    latency {_ms(p['latency_ms'])}{spread}{fp32}")
        if p.get("accuracy") is not None:
            lines.append(f"    accuracy {pct(p['accuracy'], 1)} on {p.get('accuracy_n')} labelled images")
        layers = p.get("float_layers") or []
        lines.append(f"    float layers ({len(layers)}): {_names(layers) if layers else 'none'}")
        levels = p.get("levels") or {}
        for level in sorted(set(levels.values())):
            named = [layer for layer, lv in levels.items() if lv == level]
            lines.append(f"    {level} layers ({len(named)}): {_names(named)}")
        if p.get("runtime_note"):
            lines.append(f"    runtime: {p['runtime_note']}")
        for part in p.get("parts") or []:
            lines.append(
                f"    on {', '.join(part['devices'])}: {part['file']} ({part['recipe']}, {part.get('label')}; "
                f"size {mb(part['size_bytes'])}, loss {pct(part['accuracy_loss'])})"
            )
        for w in p.get("warnings") or []:
            lines.append(f"    warning: {w}")
        if p.get("export_command"):
            lines.append(f"    export: {p['export_command']}")
        for part in p.get("parts") or []:
            lines.append(f"    export ({', '.join(part['devices'])}): {part['export_command']}")
    return lines

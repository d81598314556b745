"""The ``tuneqn`` command line (also ``python -m tuneqn.controller``)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tuneqn import __version__
from tuneqn.controller.common.errors import StudyFailed, UserError
from tuneqn.controller.config import StudyConfig, load_config, parse_config

if TYPE_CHECKING:
    from tuneqn.controller.farm.certs import LabHosts

log = logging.getLogger(__name__)

#: Piped output repeats a line saying what the run waits for this often (seconds), with the time left.
WAIT_REPEAT_S = 15.0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def setup_logging(verbose: int) -> None:
    """Console logging for the CLI; ONNX Runtime's own logger is quieted unless -vv."""
    import onnxruntime as ort
    from rich.logging import RichHandler

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, markup=False)],
        force=True,
    )
    ort.set_default_logger_severity(0 if verbose >= 3 else 3)


def quick_config(args: argparse.Namespace) -> StudyConfig:
    """A study config from the quick-form flags (no TOML file)."""
    if args.model is None or args.images is None or args.out is None:
        raise UserError("give a STUDY.toml, or --model, --images and --out")
    model_path = Path(args.model)
    layout = "NCHW"
    dims = _input_dims(model_path, "--model") if model_path.is_file() else None
    if dims is not None and len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        layout = "NHWC"
    preprocess = _preprocess_spec({"layout": layout}, args)
    data: dict[str, Any] = {
        "name": model_path.stem,
        "out_dir": str(Path(args.out).resolve()),
        "models": [{"path": str(model_path.resolve())}],
        "dataset": {
            "images": str(Path(args.images).resolve()),
            "preprocess": preprocess.model_dump(mode="json", exclude_defaults=True),
        },
        "quantization": {"format": args.format or "qdq"},
    }
    if args.mode:  # else the recipes are chosen automatically
        data["quantization"]["modes"] = args.mode
    if args.labels:
        data["dataset"]["labels"] = {"csv": str(Path(args.labels).resolve())}
    for key in ("eval", "calibration", "analysis"):
        val = getattr(args, key, None)
        if val is not None:
            data["dataset"][key] = val
    return parse_config(data, Path.cwd())


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The study ``tune``/``analyze`` run: the TOML given, else the quick form's flags (bench/peers.py uses it too)."""
    if args.study is not None:
        if args.model or args.images:
            raise UserError("give either STUDY.toml or --model/--images, not both")
        cfg = load_config(Path(args.study))
        update: dict[str, Any] = {}
        if args.out:
            update["out_dir"] = Path(args.out).resolve()
        if args.mode:  # --mode wins over recipes = "auto" (not over the file's named recipes)
            q = cfg.quantization
            update["quantization"] = q.model_copy(
                update={"modes": args.mode, "recipes": [] if q.recipes == "auto" else q.recipes}
            )
        if args.format:
            q = update.get("quantization", cfg.quantization)
            update["quantization"] = q.model_copy(update={"format": args.format})
        if _preprocess_flags(args):
            pp = _preprocess_spec(cfg.dataset.preprocess.model_dump(exclude_defaults=True), args)
            update["dataset"] = cfg.dataset.model_copy(update={"preprocess": pp})
        cfg = cfg.model_copy(update=update) if update else cfg
    else:
        cfg = quick_config(args)
    _check_model_files(cfg, "--model" if args.study is None else None)
    return _search_overrides(cfg, args)


def _check_model_files(cfg: StudyConfig, label: str | None) -> None:
    """Every model file of the study is a readable ONNX model that passes the checker, before any out dir is
    created or agent started (hub models are fetched and checked later)."""
    from tuneqn.controller.prepare.modelio import load_checked  # noqa: PLC0415 - onnx only where a study is read

    for i, m in enumerate(cfg.models):
        if m.path is not None:
            load_checked(Path(m.path), label or f"models[{i}]")


#: Preprocessing flags → their [dataset.preprocess] keys.
_PREPROCESS_FLAGS = {
    "preprocess": "preset",
    "resize": "resize",
    "crop": "crop",
    "crop_fraction": "crop_fraction",
    "interpolation": "interpolation",
    "scale": "scale",
    "offset": "offset",
    "mean": "mean",
    "std": "std",
    "layout": "layout",
    "color": "color",
}


def _preprocess_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The [dataset.preprocess] keys given as flags."""
    return {
        key: getattr(args, dest) for dest, key in _PREPROCESS_FLAGS.items() if getattr(args, dest, None) is not None
    }


def _preprocess_spec(base: dict[str, Any], args: argparse.Namespace) -> Any:
    """``base`` (the study's [dataset.preprocess] keys) with the preprocessing flags applied, validated;
    a bad value is a one-line error naming its flag."""
    from pydantic import ValidationError

    from tuneqn.controller.config import PreprocessSpec

    flags = _preprocess_flags(args)
    try:
        return PreprocessSpec.model_validate({**base, **flags})
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        quoted = [k for k in re.findall(r"'(\w+)'", msg) if k in flags]  # a rule between keys: the first given
        key = str(err["loc"][0]) if err["loc"] else quoted[0] if quoted else next(iter(flags), "preset")
        flag = next((d for d, k in _PREPROCESS_FLAGS.items() if k == key), key)
        where = "" if key in flags else " (in [dataset.preprocess])"
        raise UserError(f"--{flag.replace('_', '-')}{where}: {msg}") from None


def _floats(value: str) -> list[float]:
    """``--mean``/``--std``: comma-separated numbers."""
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.485,0.456,0.406, got {value!r}"
        ) from None


def _input_dims(path: Path, label: str) -> list[int | str] | None:
    """The first graph input's dims of an ONNX file (names for dynamic dims); None without an input."""
    from tuneqn.controller.prepare.modelio import load_bytes  # noqa: PLC0415 - only for the quick form and the printed line

    m = load_bytes(path, label)
    inits = {i.name for i in m.graph.initializer}
    inp = [i for i in m.graph.input if i.name not in inits]
    if not inp:
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inp[0].type.tensor_type.shape.dim]


def preprocessing_lines(cfg: StudyConfig) -> list[str]:
    """``preprocessing: …`` — what the study's images go through (one line per model when their sizes differ)."""
    from tuneqn.controller.prepare.dataset import describe_preprocess, model_hw

    if cfg.dataset.images is None:
        return [f"preprocessing: none (the arrays of {cfg.dataset.tensors} are fed as they are)"]
    pp = cfg.dataset.preprocess
    lines: dict[str, list[str]] = {}
    for i, m in enumerate(cfg.models):
        dims: Sequence[int | str] | None = m.input_shape
        if dims is None and m.path is not None and m.path.is_file():
            dims = _input_dims(m.path, f"models[{i}]")
        hw = model_hw(dims, pp) if dims is not None else None
        lines.setdefault(describe_preprocess(pp, hw), []).append(m.display_name)
    if len(lines) == 1:
        return [f"preprocessing: {next(iter(lines))}"]
    return [f"preprocessing ({', '.join(names)}): {line}" for line, names in lines.items()]


def _search_overrides(cfg: StudyConfig, args: argparse.Namespace) -> StudyConfig:
    """Apply ``--recipe``, ``--ranking``, ``--strategy``, ``--budget``, ``--max-loss`` (validated like the TOML)."""
    from pydantic import ValidationError

    from tuneqn.controller.config import AnswerSpec, SearchSpec, format_validation_error

    data: dict[str, Any] = {}
    quant = cfg.quantization
    if getattr(args, "recipe", None):
        try:
            quant = quant.with_recipes(args.recipe)
        except ValueError as exc:
            raise UserError(f"--recipe: {exc}") from None
    for flag in ("ranking", "strategy", "budget", "max_loss"):
        value = getattr(args, flag, None)
        if value is not None:
            data[flag] = value
    if data.get("strategy") not in (None, "target") and "max_loss" not in data:
        data["max_loss"] = None  # the TOML's target parameter does not apply to another strategy
    if data.get("strategy") not in (None, "budget") and "budget" not in data:
        data["budget"] = None
    if getattr(args, "no_compare", False):
        data["compare"] = []
    answer = {
        k: getattr(args, k) for k in ("max_loss", "max_size_mb", "max_latency_ms") if getattr(args, k, None) is not None
    }
    if answer:
        try:
            cfg = cfg.model_copy(update={"answer": AnswerSpec.model_validate({**cfg.answer.model_dump(), **answer})})
        except ValidationError as exc:
            line = format_validation_error(exc, AnswerSpec.model_json_schema())
            raise UserError(f"--{line.split(':', 1)[0].replace('_', '-')}: {line.split(': ', 1)[-1]}") from None
    search = cfg.search
    if data:
        try:
            search = SearchSpec.model_validate({**cfg.search.model_dump(), **data})
        except ValidationError as exc:
            line = format_validation_error(exc, SearchSpec.model_json_schema())
            flag = next((f"--{k.replace('_', '-')}" for k in data if line.startswith(k)), "--strategy")
            raise UserError(f"{flag}: {line.split(': ', 1)[-1]}") from None
    return cfg.model_copy(update={"quantization": quant, "search": search})


def _command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it, for the study lock (``tuneqn tune study.toml``)."""
    argv = getattr(args, "argv", None)
    return "tuneqn " + " ".join(argv) if argv is not None else f"tuneqn {args.command}"


def _study_dir(arg: str) -> Path:
    """The STUDY_DIR argument of report/export: an existing folder holding a study store."""
    from tuneqn.controller.store import DB_NAME

    out_dir = Path(arg)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; give the study's output folder")
    if not (out_dir / DB_NAME).is_file():
        raise UserError(f"{out_dir}: no study here (missing {DB_NAME}); run 'tuneqn analyze' first")
    return out_dir


def _number(value: str) -> float:
    """A flag's value as a float (argparse turns the error into one line, exit 2)."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def _loss(value: str) -> float:
    """``--max-loss``: a fraction in [0, 1)."""
    v = _number(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (0.01 = 1%), got {value}")
    return v


def _positive(value: str) -> float:
    """``--max-size-mb``, ``--max-latency-ms``, ``--lease-timeout``, ``--device-wait``: a positive number."""
    v = _number(value)
    if not v > 0.0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return v


def _add_answer_args(p: argparse.ArgumentParser, prefix: str, max_loss: bool = True) -> None:
    """The answer's constraint flags (``--max-loss`` only where the study flags do not define it)."""
    if max_loss:
        p.add_argument(
            "--max-loss",
            type=_loss,
            help=f"{prefix}largest accuracy loss vs FP32 of the answer "
            "(0.01 = 1%%; default: the study's [answer] max_loss)",
        )
    p.add_argument("--max-size-mb", type=_positive, help=f"{prefix}largest file size of the answer in MB")
    p.add_argument("--max-latency-ms", type=_positive, help=f"{prefix}largest median latency of the answer in ms")


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="study TOML file (or use the quick form flags)")
    p.add_argument("--model", help="quick form: ONNX model file")
    p.add_argument("--images", help="quick form: image folder")
    p.add_argument("--labels", help="quick form: labels CSV (file,label)")
    p.add_argument("--out", help="output directory (overrides the config's out_dir)")
    p.add_argument("--mode", action="append", choices=["static", "dynamic"], help="quantization mode (repeatable)")
    p.add_argument("--format", choices=["qdq", "qoperator"], help="static quantization format")
    p.add_argument("--eval", type=int, help="quick form: evaluation sample size")
    p.add_argument("--calibration", type=int, help="quick form: calibration sample size")
    p.add_argument("--analysis", type=int, help="quick form: analysis sample size")
    p.add_argument("--fresh", action="store_true", help="ignore and replace what the study stored")
    _add_preprocess_args(p)
    p.add_argument(
        "--recipe",
        action="append",
        metavar="NAME",
        help="quantization recipe to search (repeatable): one of the study's or a preset "
        "(per-tensor, per-channel, per-channel-percentile, dynamic, …); without --recipe, "
        '--mode or recipes in the study, they are chosen automatically (recipes = "auto")',
    )
    p.add_argument("--ranking", choices=["paper", "qdq", "xmodel", "measured"], help="layer ranking")
    p.add_argument(
        "--strategy", choices=["sweep", "greedy", "budget", "target"], help="search strategy (sweep = the paper's)"
    )
    p.add_argument(
        "--budget",
        type=int,
        help="budget strategy: full evaluations per (model, recipe, device) (default 30%% of the sweep's)",
    )
    p.add_argument("--no-compare", action="store_true", help="run only the main search, not [[search.compare]]")
    p.add_argument(
        "--max-loss",
        type=_loss,
        help="largest accuracy loss vs FP32 (0.01 = 1%%) of the answer "
        "(default [answer] max_loss, else [search] max_loss, else 1%%); also the target strategy's limit",
    )
    _add_answer_args(p, "", max_loss=False)


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    from tuneqn.controller.config import PREPROCESS_PRESETS

    g = p.add_argument_group(
        "image preprocessing (quick form, or over the study's [dataset.preprocess]); "
        "pixels 0-255 → resize/crop → (x·scale + offset − mean)/std"
    )
    g.add_argument(
        "--preprocess",
        choices=list(PREPROCESS_PRESETS),
        metavar="PRESET",
        help="preset: lite (x−127)/128, inception (x−127.5)/127.5, imagenet x/255 then ImageNet "
        "mean/std, raw 0-255 (these four: short side → crop/0.875, centre crop), unit x/255 "
        "stretched to the model's size (the default); the flags below override its values",
    )
    g.add_argument("--resize", type=int, metavar="N", help="resize the short side to N pixels")
    g.add_argument("--crop", type=int, metavar="N", help="centre crop N×N (then resized to the model's size)")
    g.add_argument(
        "--crop-fraction",
        type=float,
        metavar="F",
        help="short side → crop/F, centre crop (the crop, else the model's H×W); presets: 0.875",
    )
    g.add_argument(
        "--interpolation",
        choices=["bilinear", "bicubic", "nearest", "lanczos"],
        help="resampling filter (default: the preset's, else bilinear; lite: bicubic)",
    )
    g.add_argument("--scale", type=float, metavar="S", help="multiply pixels by S (default 1/255; 1 with --mean/--std)")
    g.add_argument("--offset", type=float, metavar="O", help="then add O (default 0)")
    g.add_argument("--mean", type=_floats, metavar="A,B,C", help="then subtract the per-channel mean")
    g.add_argument("--std", type=_floats, metavar="A,B,C", help="then divide by the per-channel std")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="input layout (quick form: detected from the model)")
    g.add_argument("--color", choices=["RGB", "BGR"], help="channel order (default RGB)")


def cmd_analyze(args: argparse.Namespace) -> int:
    """Rank layers; print the table; write layers.json and layer_errors.png."""
    from rich.console import Console
    from rich.table import Table

    from tuneqn.controller.common.progress import Progress
    from tuneqn.controller.report.layer_plot import write_layer_plot
    from tuneqn.controller.study import Study

    cfg = study_config(args)
    print("\n".join(preprocessing_lines(cfg)))
    study = Study(cfg, fresh=args.fresh, command=_command_line(args))
    try:
        with Progress() as progress:
            progress.step("preparing models and data", study.prepare)
            rows = []
            for model in study.models:
                for mode in study.modes():
                    rows.extend(progress.step(f"analyzing {model} ({mode})", study.analyze, model, mode))
            write_layer_plot(study.write_layer_outputs(rows), study.out_dir)
            study.forget_stale_candidates()
            if args.candidates:
                plans = study.all_plans()
                progress.each("building candidates", plans, study.build)
    finally:
        study.close()
    console = Console()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    for (model, mode), layer_rows in groups.items():
        table = Table(
            title=f"{model} — {mode}: {len(layer_rows)} layers ranked (score = "
            f"{cfg.search.xmodel_weight:g}·xmodel + {1 - cfg.search.xmodel_weight:g}·qdq)"
        )
        for col in ("rank", "layer", "op", "qdq_err", "xmodel_err", "score"):
            table.add_column(col, justify="right" if col not in ("layer", "op") else "left")
        shown = layer_rows if args.all else layer_rows[:25]
        for r in shown:
            table.add_row(
                str(r["rank"]),
                r["name"],
                r["op_type"],
                f"{r['qdq_err']:.4f}",
                f"{r['xmodel_err']:.4f}",
                f"{r['score']:.3f}",
            )
        console.print(table)
        if len(shown) < len(layer_rows):
            console.print(f"… {len(layer_rows) - len(shown)} more in layers.json (use --all)")
    out = Path(cfg.out_dir)
    print(f"layers: {out / 'layers.json'}\nplot: {out / 'layer_errors.png'}\nstore: {out / 'tuneqn.db'}")
    return 0


def _answer_constraint(args: argparse.Namespace, settings: dict[str, Any] | None) -> Any:
    """The answer's constraint: the study's (``[answer]``), with ``--max-loss``/``--max-size-mb``/
    ``--max-latency-ms`` replacing its values; None when no flag is given."""
    from tuneqn.controller.report.answer import Constraint

    values = {k: getattr(args, k, None) for k in ("max_loss", "max_size_mb", "max_latency_ms")}
    if all(v is None for v in values.values()):
        return None
    return Constraint.from_settings(settings).override(**values)


def _print_answer(report: dict[str, Any]) -> None:
    from tuneqn.controller.report.answer import format_answer

    print("\n".join(format_answer(report.get("answer"))))


def _best_pick(report: dict[str, Any], model: str | None, device: str | None, cross: bool) -> dict[str, Any]:
    """The answer's pick ``export --best`` exports (one-line UserError when it is not determined)."""
    picks = (report.get("answer") or {}).get("picks") or []
    models = list(dict.fromkeys(p["model"] for p in picks))
    if not picks:
        raise UserError("--best: the study has no answer yet (no candidate was evaluated in full)")
    if model is None:
        if len(models) > 1:
            raise UserError(f"--best: the study has several models ({', '.join(models)}); add --model M")
        model = models[0]
    elif model not in models:
        raise UserError(f"--model: no answer for model '{model}' (models: {', '.join(models)})")
    mine = [p for p in picks if p["model"] == model]
    devices = [p["device"] for p in mine if p["scope"] == "device"]
    if cross and device is not None:
        raise UserError("--cross-device: give either --device D or --cross-device, not both")
    if cross:
        pick = next((p for p in mine if p["scope"] == "cross-device"), None)
        if pick is None:
            raise UserError(
                f"--cross-device: {model} was measured on one device only ({', '.join(devices)}); use --best alone"
            )
    elif device is None:
        if len(devices) > 1:
            raise UserError(
                f"--best: {model} was measured on several devices ({', '.join(devices)}); add --device D "
                "for that device's pick, or --cross-device for the pick that holds on every one"
            )
        pick = mine[0]
    else:
        pick = next((p for p in mine if p["scope"] == "device" and p["device"] == device), None)
        if pick is None:
            raise UserError(f"--device: no device '{device}' in the answer of {model} ({', '.join(devices)})")
    if pick.get("candidate") is None:
        raise UserError(f"--best: no pick for {model} on {', '.join(pick['devices'])}: {pick.get('reason')}")
    if len(pick.get("parts") or []) > 1:
        files = "; ".join(f"{', '.join(p['devices'])}: --candidate {p['candidate']}" for p in pick["parts"])
        raise UserError(
            f"--cross-device: {model}'s pick is one file per device group (a recipe split by feasibility "
            f"planning); export each: {files}"
        )
    return pick


def cmd_export(args: argparse.Namespace) -> int:
    """Write one evaluated candidate (or the answer's pick) with its facts; reads the study folder only."""
    import json

    from tuneqn.controller.report import compute_report
    from tuneqn.controller.report.export import describe, export_candidate
    from tuneqn.controller.store import Store
    from tuneqn.controller.study import find_candidate

    out_dir = _study_dir(args.study_dir)
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"-o/--output: {out} is a folder; give the .onnx file to write")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"-o/--output: {out.parent} is a file, not a folder")
    if args.best == (args.candidate is not None):
        raise UserError(
            "give --candidate WHICH or --best (the report's answer), not both"
            if args.best
            else "give --candidate WHICH, or --best for the report's answer"
        )
    if not args.best and (args.device or args.cross_device):
        raise UserError("--device/--cross-device: only with --best")
    store = Store.open_readonly(out_dir)
    try:
        raw = store.get_meta("config")
        if raw is None:
            raise UserError(f"{out_dir}: the study store holds no config")
        settings = json.loads(raw)
        report = compute_report(store, _answer_constraint(args, settings))
        pick = None
        if args.best:
            pick = _best_pick(report, args.model, args.device, args.cross_device)
            cand = store.candidate(pick["candidate"])
            if cand is None:
                raise StudyFailed(f"{out_dir}: the answer's candidate {pick['candidate']} is not in the store")
        else:
            cand = find_candidate(store, args.candidate, args.model, args.mode)
    finally:
        store.close()
    exported = export_candidate(out_dir, cand, report, out, pick)
    if pick is not None:
        where = pick["device"] or "every device (" + ", ".join(pick["devices"]) + ")"
        print(f"the answer for {pick['model']} on {where}" + ("" if pick["met"] else " (constraint NOT met)"))
    print("\n".join(describe(exported)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Run the whole study on the agents; exit 0 when every job finished."""
    from tuneqn.controller.common.progress import Progress
    from tuneqn.controller.farm.jobs import FarmSettings
    from tuneqn.controller.orchestrator import remeasure_token, tune
    from tuneqn.controller.study import Study

    cfg = study_config(args)
    if args.device_class:
        cfg = cfg.model_copy(
            update={
                "evaluation": cfg.evaluation.model_copy(
                    update={"device_classes": list(dict.fromkeys(args.device_class))}
                )
            }
        )
    endpoints, origin = _agent_source(args, cfg.agents, args.study or "the study")
    _check_device_classes(cfg.evaluation.device_classes, endpoints, origin)
    print("\n".join(preprocessing_lines(cfg)))
    study = Study(cfg, fresh=args.fresh, command=_command_line(args))
    try:
        settings = FarmSettings.from_config(
            cfg.evaluation,
            lease_timeout_s=args.lease_timeout,
            device_wait_s=args.device_wait,
            agent_connect_timeout_s=args.connect_timeout,
            remeasure_token=remeasure_token(study, args.fresh),
        )
        print(f"agents: {len(endpoints)} from {origin}" if endpoints else "agents: none given; starting a local agent")
        with Progress() as progress:
            task: list[int] = []

            def show(counts: dict[str, int], total: int) -> None:
                if not task:
                    task.append(progress.add("evaluating candidates", total))
                bad = counts.get("failed", 0) + counts.get("unreachable", 0)
                infeasible = counts.get("infeasible", 0)
                notes = [f"{bad} failed"] if bad else []
                notes += [f"{infeasible} infeasible on their device"] if infeasible else []
                progress.update(
                    task[0],
                    total=total,
                    completed=counts.get("done", 0) + bad + infeasible,
                    description="evaluating candidates" + (f" ({', '.join(notes)})" if notes else ""),
                )

            shown: dict[str, tuple[str, float]] = {}

            def status(lines: list[Any]) -> None:
                """Agents and waits: live under the bar on a terminal, else one line per change, and a wait
                again every WAIT_REPEAT_S with its time left (stdout, with the log; stderr keeps the one-line
                error)."""
                if progress.is_terminal:
                    progress.status([line.text for line in lines])
                    return
                now = time.monotonic()
                for line in lines:
                    state, at = shown.get(line.key, ("", 0.0))
                    waiting = line.state.startswith(("waiting", "unreachable"))
                    if state != line.state or (waiting and now - at >= WAIT_REPEAT_S):
                        shown[line.key] = (line.state, now)
                        print(line.text, flush=True)

            outcome = tune(
                study,
                endpoints,
                settings,
                on_progress=show,
                local_agent_args=["--simulated-latency-ms", str(args.simulated_latency_ms)]
                if args.simulated_latency_ms
                else None,
                on_status=status,
            )
    finally:
        study.close()
    print(
        f"jobs: {outcome.done} done, {outcome.failed} failed, {outcome.unreachable} unreachable"
        + (f", {outcome.infeasible} infeasible on their device" if outcome.infeasible else "")
        + f" of {outcome.total}"
    )
    print(f"report: {outcome.report.get('html')}\njson: {outcome.report.get('json')}")
    _print_tune_answer(outcome.report.get("json"))
    problems = list(outcome.errors)
    if outcome.failed:
        problems.append(f"{outcome.failed} jobs failed (see report.json; a rerun retries them)")
    if problems:
        raise StudyFailed("; ".join(problems))
    return 0


def _print_tune_answer(json_path: Any) -> None:
    """The answer of the report ``tune`` just wrote, as its last lines."""
    import json

    if json_path is None:
        return
    try:
        report = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s for the answer: %s", json_path, exc)
        return
    _print_answer(report)


def cmd_report(args: argparse.Namespace) -> int:
    """Regenerate report.json, plots and report.html from the checkpoint (``--max-loss`` etc.: the answer for
    another constraint, without a rerun); print the answer."""
    import json

    from tuneqn.controller.report import is_partial, write_full_report
    from tuneqn.controller.store import Store

    # Read-only view of the checkpoint: no study lock, so it also works while a run holds it.
    out_dir = _study_dir(args.study_dir)
    store = Store.open(out_dir)
    try:
        partial = is_partial(store)
        constraint = _answer_constraint(args, json.loads(store.get_meta("config") or "{}"))
        paths = write_full_report(store, out_dir, constraint)
    finally:
        store.close()
    print(f"report: {paths['html']}{' (partial: the study is unfinished)' if partial else ''}\njson: {paths['json']}")
    _print_tune_answer(paths["json"])
    return 0


def _agent_source(
    args: argparse.Namespace, study_agents: list[Any] | None = None, study_label: str = "the study"
) -> tuple[list[Any], str]:
    """Endpoints of the agents a command uses (``--agent``, ``--lab``, the study's, the default lab file)
    and where they came from."""
    from tuneqn.controller.farm.lab import choose_agents, endpoints_from

    source = choose_agents(study_agents or [], args.agent, args.lab, args.no_lab, study_label)
    endpoints = endpoints_from(
        source.agents, [], Path(args.token_file) if args.token_file else None, where=source.where
    )
    return endpoints, source.origin


def _check_device_classes(wanted: list[str], endpoints: list[Any], origin: str) -> None:
    """A study's device classes that no agent can serve are a typo, not a 10-minute wait: when every agent
    declares its class, each wanted class must be among them."""
    if not wanted or not endpoints or any(not ep.device_class for ep in endpoints):
        return
    declared = sorted({ep.device_class for ep in endpoints})
    missing = [c for c in wanted if c not in declared]
    if missing:
        raise UserError(
            f"--device-class/evaluation.device_classes: no agent of {origin} serves "
            f"{', '.join(missing)} (its classes: {', '.join(declared)})"
        )


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else ""


def _agent_row(r: Any) -> list[str]:
    """A row of the ``agents`` table of ``tuneqn agents``."""
    from rich.filesize import decimal

    label = r.address if r.name == r.address else f"{r.name} ({r.address})"
    if not r.reachable:
        state = "UNREACHABLE"
    elif r.problem:
        state = "MISMATCH"
    else:
        state = "serving" if r.serving else "draining"
    version = f"{r.agent_version} {r.contract}".strip() if r.contract else "-"
    classes = sorted({d["device_class"] for d in r.devices}) or (
        [f"{r.declared_class} (lab)"] if r.declared_class else []
    )
    running = len(r.running_job_ids)
    queue = f"{r.queue_length} queued, {running} running" if r.reachable and not r.problem else "-"
    caches = (
        "; ".join(
            f"{c['name']} {decimal(c['used_bytes'])} of {decimal(c['limit_bytes'])} ({c['entries']})" for c in r.caches
        )
        or "-"
    )
    jobs = ", ".join(f"{n} {state.lower()}" for state, n in sorted(r.jobs_by_state.items())) or "-"
    if r.problem:
        last = r.problem
    elif r.last_failure:
        f = r.last_failure
        last = f"{_when(f['at'])} job {f['job_id'][:12]} on {f['device']}: {f['error']}"
    else:
        last = "-"
    if r.notes:
        last += "".join(f"\nnote: {n}" for n in r.notes)
    return [label, state, version, r.hostname or "-", ", ".join(classes) or "-", queue, caches, jobs, last]


def _device_rows(r: Any) -> list[list[str]]:
    """Rows of the ``devices`` table of ``tuneqn agents`` for one agent."""
    rows = []
    for d in r.devices:
        remote = d["remote"] or ("agent host" if d["backend"] == "tvm" else "-")
        health = ("healthy" if d["healthy"] else "UNHEALTHY") + (f": {d['status']}" if d["status"] else "")
        rows.append(
            [
                r.name,
                d["name"],
                d["device_class"],
                d["backend"] + (" (simulated)" if d["simulated"] else ""),
                d["target"] or "-",
                d["rpc_key"] or "-",
                remote,
                str(d["remote_servers"]) if d["remote_servers"] else "-",
                health[:120],
                str(d["queue_length"]),
                d["running_job_id"] or "-",
            ]
        )
    return rows


def cmd_agents(args: argparse.Namespace) -> int:
    """Probe the lab's agents: reachable or not, contract, devices (backend, target, RPC key, remote servers,
    health), queue, cache use, job counts and last error. Exit 1 when an agent is unreachable or unusable."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tuneqn.controller.farm.lab import probe_all

    study_agents = load_config(Path(args.study)).agents if args.study else []
    endpoints, origin = _agent_source(args, study_agents, args.study or "the study")
    if not endpoints:
        raise UserError(
            "no agents: give --lab LAB.toml, STUDY.toml with [[agents]], or --agent HOST:PORT "
            "(or write a default lab file, see docs/lab.md)"
        )
    reports = probe_all(endpoints, timeout=args.timeout)
    bad = sum(1 for r in reports if r.problem)
    if args.json:
        print(json.dumps({"source": origin, "agents": [r.as_dict() for r in reports]}, indent=2))
        return 1 if bad else 0
    console = Console()
    if not console.is_terminal:  # piped or captured: one line per row, nothing folded
        console = Console(width=400)
    agents = Table(title=f"agents ({origin})")
    for col in (
        "agent",
        "state",
        "version",
        "host",
        "device classes",
        "queue",
        "caches (used of limit, entries)",
        "jobs",
        "last error",
    ):
        agents.add_column(col, overflow="fold")
    devices = Table(title="devices")
    for col in (
        "agent",
        "device",
        "class",
        "backend",
        "target",
        "rpc key",
        "remote",
        "servers",
        "device health / status",
        "queue",
        "running",
    ):
        devices.add_column(col, overflow="fold")
    for r in reports:
        agents.add_row(*_agent_row(r))
        for row in _device_rows(r):
            devices.add_row(*row)
    console.print(agents)
    if devices.row_count:
        console.print(devices)
    if bad:
        console.print(
            f"{bad} of {len(reports)} agents unreachable or unusable; see docs/lab.md ('When an agent is unreachable')"
        )
    return 1 if bad else 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Create the lab's mTLS certificates: one key pair per agent host (``--host``), or the older
    layout with one agent certificate for every ``--agent-host``."""
    from tuneqn.controller.farm.certs import DEFAULT_AGENT_HOSTS, write_host_certs, write_lab_certs

    if args.host:
        if args.agent_host or args.ca_from:
            flag = "--agent-host" if args.agent_host else "--ca-from"
            raise UserError(f"{flag}: not with --host (--host adds hosts to OUT_DIR's own CA, one key pair each)")
        return _print_host_certs(
            write_host_certs(Path(args.out_dir), args.host, days=args.days, force=args.force), args.days
        )
    hosts = args.agent_host or list(DEFAULT_AGENT_HOSTS)
    ca_from = Path(args.ca_from) if args.ca_from else None
    c = write_lab_certs(Path(args.out_dir), hosts, days=args.days, force=args.force, ca_from=ca_from)
    if ca_from is not None:
        print(
            f"wrote {c.agent_cert}, {c.controller_cert} and their keys (mode 0600) for agent hosts "
            f"{', '.join(hosts)}, signed by the CA of {ca_from} (copied to {c.ca_cert}); valid {args.days} days "
            "or until the CA expires"
        )
    else:
        print(
            f"wrote {c.ca_cert}, {c.agent_cert}, {c.controller_cert} and their keys (mode 0600) "
            f"for agent hosts {', '.join(hosts)}; valid {args.days} days"
        )
    print(f"agent:      tuneqn-agent --tls-cert {c.agent_cert} --tls-key {c.agent_key} --tls-ca {c.ca_cert} ...")
    print(
        f'controller: [[agents]] tls_ca = "{c.ca_cert.resolve()}"  tls_cert = "{c.controller_cert.resolve()}"  '
        f'tls_key = "{c.controller_key.resolve()}"'
    )
    print(f"keep {c.ca_key} off the agents (it signs certificates); copy only ca.pem, agent.pem, agent.key there")
    print("one key pair per host instead: tuneqn certs OUT_DIR --host NAME [--host NAME]...")
    return 0


def _print_host_certs(lab: LabHosts, days: int) -> int:
    """What ``tuneqn certs --host`` wrote and how each side uses it."""
    made = {p for p in lab.created}
    kept = [p.name for p in (lab.ca_cert, lab.controller_cert) if p not in made]
    if kept:
        print(f"kept {' and '.join(kept)} (and their keys) in {lab.ca_cert.parent}")
    for host in lab.hosts:
        print(
            f"host {host.name}: wrote {host.folder}/ (agent.pem, agent.key mode 0600, ca.pem) for "
            f"{', '.join(host.names)}; valid {days} days or until the CA expires; copy only this folder there"
        )
        print(f"  agent: tuneqn-agent --tls-cert {host.cert} --tls-key {host.key} --tls-ca {host.ca_cert} ...")
    print(
        f'controller: [[agents]] tls_ca = "{lab.ca_cert.resolve()}"  '
        f'tls_cert = "{lab.controller_cert.resolve()}"  '
        f'tls_key = "{lab.controller_key.resolve()}"'
    )
    print(f"keep {lab.ca_key} and {lab.controller_key} off the agents")
    return 0


def _days(value: str) -> int:
    """``--days``: a whole number of days, at least 1."""
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {value!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {days}")
    return days


def _add_lab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lab",
        metavar="LAB.toml",
        help="lab file listing the agents (replaces the study's "
        "[[agents]]; default: $TUNEQN_LAB, else ~/.config/tuneqn/lab.toml when the study lists none)",
    )
    p.add_argument("--no-lab", action="store_true", help="ignore the default lab file")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = _Parser(prog="tuneqn", description="Selective quantization tuning for ONNX models across real devices.")
    parser.add_argument("--version", action="version", version=f"tuneqn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("analyze", help="rank layers by quantization error")
    _add_study_args(p)
    p.add_argument("--all", action="store_true", help="print every layer, not the top 25")
    p.add_argument("--candidates", action="store_true", help="also build every candidate")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "export",
        help="write the answer's pick (--best) or any evaluated candidate to an ONNX file "
        "(read-only; facts in FILE.json)",
    )
    p.add_argument("study_dir", help="the study's output directory")
    p.add_argument("--model", help="model name (default: the study's only model)")
    p.add_argument("--recipe", "--mode", dest="mode", help="recipe (default: the study's only one)")
    p.add_argument(
        "--candidate",
        help="candidate id (or its fq/x… tag), exclusion set name, label from the report, or a number k "
        "(top-k layers of the paper's ranking, or a search's 'k=<k>'; refused when several match)",
    )
    p.add_argument("--best", action="store_true", help="export the report's answer (the pick for --device)")
    p.add_argument("--device", help="--best: the device whose pick to export (needed when there are several)")
    p.add_argument(
        "--cross-device",
        action="store_true",
        help="--best: the pick that meets the constraint on every device (worst value over the devices)",
    )
    _add_answer_args(p, "--best: ")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (its facts go to OUTPUT.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tune", help="run the whole study: analyze, build candidates, evaluate on agents, report")
    _add_study_args(p)
    p.add_argument("--agent", action="append", metavar="HOST:PORT", help="agent address (repeatable; overrides config)")
    _add_lab_args(p)
    p.add_argument("--token-file", help="file holding the agents' bearer token")
    p.add_argument(
        "--lease-timeout",
        type=_positive,
        help="seconds without any word from an agent before its job "
        "runs elsewhere (default: [evaluation] lease_timeout_s)",
    )
    p.add_argument(
        "--device-wait",
        "--agent-wait",
        dest="device_wait",
        type=_positive,
        help="end a device class's jobs as unreachable after no agent of it answered this long "
        "(default: [evaluation] device_wait_s)",
    )
    p.add_argument(
        "--connect-timeout",
        dest="connect_timeout",
        type=_positive,
        help="give up an agent that has not answered once since the study started after this many "
        "seconds (default: [evaluation] agent_connect_timeout_s, 60)",
    )
    p.add_argument(
        "--device-class",
        action="append",
        metavar="CLASS",
        help="measure only on this device class (repeatable; default: [evaluation] device_classes, "
        "else every class the agents serve)",
    )
    p.add_argument(
        "--simulated-latency-ms",
        type=float,
        default=0.0,
        help="local agent only: add this simulated device latency per sample (benchmarks)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="regenerate report.json, plots and report.html from the checkpoint")
    p.add_argument("study_dir", help="the study's output directory")
    _add_answer_args(p, "", max_loss=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "agents", help="probe the lab's agents: reachability, contract, devices, queues, caches, last error"
    )
    p.add_argument("study", nargs="?", help="study TOML file with [[agents]]")
    p.add_argument("--agent", action="append", metavar="HOST:PORT", help="agent address (repeatable)")
    _add_lab_args(p)
    p.add_argument("--token-file", help="file holding the agents' bearer token")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each agent (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_agents)

    p = sub.add_parser(
        "certs",
        help="create a lab CA, a controller certificate and one key pair per agent host (--host) for mutual TLS",
    )
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="the lab's folder: ca.pem/.key, controller.pem/.key and, per "
        "--host, hosts/NAME/ (agent.pem/.key, ca.pem); without --host: agent.pem/.key for every "
        "--agent-host",
    )
    p.add_argument(
        "--host",
        action="append",
        metavar="NAME[,ALIAS...]",
        help="an agent host: its own key pair in OUT_DIR/hosts/NAME/ (subjectAltNames: NAME and the "
        "aliases, host names or IP addresses); repeatable; on an existing OUT_DIR its CA and "
        "controller certificate are kept and only the new hosts' files are written",
    )
    p.add_argument(
        "--agent-host",
        action="append",
        metavar="NAME_OR_IP",
        help="older layout: one agent.pem/agent.key shared by the agents of these names (repeatable; "
        "default: 127.0.0.1 and localhost)",
    )
    p.add_argument("--days", type=_days, default=365, help="validity in days (default 365)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace certificates already in OUT_DIR (with --host: only the named hosts' files)",
    )
    p.add_argument(
        "--ca-from",
        metavar="DIR",
        help="sign with the CA of an earlier 'tuneqn certs' folder (adding a "
        "host to a lab: the other agents and the controller keep their certificates)",
    )
    p.set_defaults(func=cmd_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tuneqn``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"tuneqn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StudyFailed as exc:
        print(f"tuneqn: failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneqn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Plain helpers of the tests (no fixtures): ports, study files, exported candidates."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import tomli_w


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exported_sha256(path: Path) -> str:
    """The sha256 of the evaluated candidate that ``tuneqn export`` wrote to ``path`` (from its facts file,
    whose own sha256 is checked against the written file)."""
    facts = json.loads(path.with_name(path.name + ".json").read_text())
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    return str(facts["evaluated_sha256"])


def write_study(tmp: Path, **overrides: Any) -> Path:
    """A study TOML in ``tmp`` (tables in ``overrides`` replace the defaults)."""
    data: dict[str, Any] = {
        "out_dir": str(tmp / "out"),
        "models": [{"path": str(overrides.pop("model"))}],
        "dataset": {"images": str(overrides.pop("images")), "eval": 12, "calibration": 12, "analysis": 6},
    }
    # The farm/report tests run the paper's sweep (every k): their job counts are known.
    data["search"] = {"strategy": "sweep", "ranking": "paper", **overrides.pop("search", {})}
    data.update(overrides)
    # Recipes chosen automatically (the default) try several: these tests name the one they need.
    quant = data.setdefault("quantization", {})
    if "recipes" not in quant and "modes" not in quant:
        quant["modes"] = ["static"]
    path = tmp / "study.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def one_line_error(rc: int, err: str, *needles: str) -> None:
    """A bad input's answer: exit code 2 and one line naming the problem (``needles``), never a traceback."""
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def analyze_quick(tmp: Path, model: Path, images: Path, *extra: str) -> list[dict[str, Any]]:
    """`tuneqn analyze` in the quick form on small samples (static unless ``extra`` names a mode); its layers.json."""
    out = tmp / "out"
    from tuneqn.controller.cli import main

    rc = main(
        [
            "analyze",
            "--model",
            str(model),
            "--images",
            str(images),
            "--out",
            str(out),
            "--calibration",
            "12",
            "--eval",
            "12",
            "--analysis",
            "6",
            *(() if "--mode" in extra else ("--mode", "static")),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads((out / "layers.json").read_text())

"""Recovery with the DEFAULT settings a user gets: two agents of one class, one SIGKILLed mid-study.

Prints the seconds from the kill to the end of the study (issue target: ≤ 90 s) and checks
that every result exists exactly once. Also times a SIGSTOPped agent (a hung host).

    python bench/recovery.py [--sim-ms 40]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import benchlib  # noqa: E402
from onnx_models import cnn, write_images  # noqa: E402

from tuneqn.controller.config import parse_config  # noqa: E402
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings  # noqa: E402
from tuneqn.controller.orchestrator import tune  # noqa: E402
from tuneqn.controller.study import Study  # noqa: E402


def one(tmp: Path, sig: signal.Signals, sim_ms: float) -> tuple[float, int, int]:
    """Seconds from the fault to the end of tune, jobs done, duplicate results."""
    cnn(tmp / "cnn.onnx")
    write_images(tmp / "images", 40)
    cfg = parse_config(
        {
            "out_dir": str(tmp / "out"),
            "models": [{"path": str(tmp / "cnn.onnx")}],
            "dataset": {"images": str(tmp / "images"), "eval": 24, "calibration": 12, "analysis": 6},
        },
        tmp,
    )
    agents = benchlib.lab_agents(tmp, sim_ms)
    db = tmp / "out" / "tuneqn.db"
    fault: list[float] = []

    def inject(counts: dict[str, int], total: int) -> None:
        if fault or not db.exists() or agents[0].proc is None:
            return
        busy = (
            sqlite3.connect(db)
            .execute("select count(*) from jobs where state='submitted' and agent like ?", [agents[0].address + "#%"])
            .fetchone()[0]
        )
        if busy and counts.get("done", 0) >= 1:
            os.kill(agents[0].proc.pid, sig)
            fault.append(time.monotonic())

    study = Study(cfg)
    try:
        outcome = tune(
            study,
            [Endpoint(address=a.address) for a in agents],
            FarmSettings.from_config(cfg.evaluation),
            on_progress=inject,
        )
        end = time.monotonic()
    finally:
        study.close()
        if sig == signal.SIGSTOP and agents[0].proc is not None:
            os.kill(agents[0].proc.pid, signal.SIGCONT)
        for a in agents:
            a.stop()
    rows = sqlite3.connect(db).execute("select candidate_id, device from results").fetchall()
    return end - fault[0], outcome.done, len(rows) - len(set(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sim-ms", type=float, default=40.0, help="simulated device latency per sample")
    args = ap.parse_args()
    d = FarmSettings()
    print(
        f"defaults: heartbeat {d.heartbeat_s}s, silent after {d.silent_after_s}s, grace {d.unreachable_grace_s}s, "
        f"lease {d.lease_timeout_s}s"
    )
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        with tempfile.TemporaryDirectory() as tmp:
            secs, done, dups = one(Path(tmp), sig, args.sim_ms)
        print(f"{sig.name}: study finished {secs:.1f}s after the fault; {done} jobs done, {dups} duplicate results")


if __name__ == "__main__":
    main()

"""A study SIGKILLed mid-search and rerun with the same command: does the rerun end, and how fast?

Two real agents of one class (``python -m tuneqn.agent``), the default search (auto recipes,
budget, measured ranking) and the DEFAULT farm settings (lease 60 s, ...). For each kill point N
the controller (``tuneqn tune`` in a subprocess) is SIGKILLed once N results are stored and both
agents hold a job in flight; the same command is then rerun with a timeout. Prints, per kill
point, whether the rerun ended, its exit code, the seconds from its last stored result to its
end, and whether the store kept a job ``submitted``.

    python bench/resume.py                                   # a small onnx.helper CNN (fast)
    python bench/resume.py --example examples/lite0/work --kill-after 8 20 40 --timeout 900
    python bench/resume.py --rerun-delay 65     # rerun after the leases of the jobs in flight ran out

Measured on a 2-core machine shared with other work (default settings, every rerun exit 0, every job
done once, none left ``submitted``): the small CNN killed after 2, 3, 4, 6, 9, 10, 13, 17, 21 and 25
results ended 3-25 s after its last result (the full report); the jobs in flight at the kill were
collected 15-20 s after the rerun started (34 s with ``--rerun-delay 65``). EfficientNet-Lite0 killed
after 8 results (rerun still storing results, 190, when the 600 s timeout stopped it: a long study,
not a hang) and after 108 (mid-search, a job on each agent): that rerun ended with 257 results,
4.7 s after its last one (1395 s in all).
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import benchlib  # noqa: E402
from onnx_models import cnn, write_images  # noqa: E402


def _count(db: Path, sql: str, args: tuple[object, ...] = ()) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute(sql, args).fetchone()[0] or 0)
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def _last_stored(db: Path) -> float:
    con = sqlite3.connect(db, timeout=5)
    try:
        return float(con.execute("select max(updated_at) from jobs where state = 'done'").fetchone()[0] or 0.0)
    finally:
        con.close()


def one(tmp: Path, cmd_args: list[str], kill_after: int, timeout: float, sim_ms: float, delay: float = 0.0) -> str:
    """Run, SIGKILL at ``kill_after`` results with both agents busy, rerun; a line describing what happened."""
    agents = benchlib.lab_agents(tmp, sim_ms)
    out = tmp / "out"
    db = out / "tuneqn.db"
    cmd = [sys.executable, "-m", "tuneqn.controller", "tune", *cmd_args, "--out", str(out)]
    for a in agents:
        cmd += ["--agent", a.address]
    try:
        log1 = open(tmp / "run1.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT)
        busy_sql = "select count(distinct substr(agent, 1, instr(agent, '#'))) from jobs where state = 'submitted'"
        while proc.poll() is None:
            done = _count(db, "select count(*) from results")
            if done >= kill_after and _count(db, busy_sql) >= 2:
                break
            time.sleep(0.05)  # polling the checkpoint for a condition
        if proc.poll() is not None:
            return f"kill after {kill_after}: the study ended before the kill point (exit {proc.returncode})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log1.close()
        at_kill = _count(db, "select count(*) from results")
        in_flight = _count(db, "select count(*) from jobs where state = 'submitted'")
        con = sqlite3.connect(db, timeout=5)
        flying = [r[0] for r in con.execute("select id from jobs where state = 'submitted'")]
        con.close()
        time.sleep(delay)  # a user who reruns later (the leases of the jobs in flight may have expired)
        started = time.time()
        with open(tmp / "run2.log", "wb") as log2:
            rerun = subprocess.Popen(cmd, stdout=log2, stderr=subprocess.STDOUT)
            try:
                rc: int | str = rerun.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rerun.send_signal(signal.SIGKILL)
                rerun.wait()
                rc = "HUNG (killed)"
        ended = time.time()
        last = _last_stored(db)
        left = _count(db, "select count(*) from jobs where state = 'submitted'")
        total = _count(db, "select count(*) from results")
        tail = max(0.0, ended - last) if last > started else float("nan")
        con = sqlite3.connect(db, timeout=5)
        collected = []
        for jid in flying:
            state, updated = con.execute("select state, updated_at from jobs where id = ?", [jid]).fetchone()
            collected.append(f"{state} {updated - started:.0f}s" if state == "done" else state)
        con.close()
        return (
            f"kill after {kill_after}: {at_kill} results and {in_flight} jobs in flight at the kill; rerun "
            f"{rc} after {ended - started:.0f}s, {total} results, ended {tail:.1f}s after its last result, "
            f"{left} jobs left submitted; the jobs in flight at the kill: {', '.join(collected)} after the rerun "
            f"started"
        )
    finally:
        for a in agents:
            a.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=Path, help="folder with model.onnx, images/, labels.csv (e.g. the Lite0 example)")
    ap.add_argument(
        "--study", type=Path, help="a study TOML to run instead of the quick form (its out_dir is replaced)"
    )
    ap.add_argument("--kill-after", type=int, nargs="+", default=[4, 8, 14], help="results stored before the kill")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds the rerun may take before it counts as hung")
    ap.add_argument("--sim-ms", type=float, default=20.0, help="simulated device latency per sample")
    ap.add_argument("--rerun-delay", type=float, default=0.0, help="seconds between the kill and the rerun")
    ap.add_argument("--lease-timeout", type=float, help="passed to tune (default: the study's, 60 s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders (logs, stores)")
    args = ap.parse_args()
    for n in args.kill_after:
        tmp = Path(tempfile.mkdtemp(prefix=f"tuneqn-resume-{n}-"))
        if args.study:
            cmd_args = [str(args.study.resolve())]
        elif args.example:
            ex = args.example.resolve()
            cmd_args = [
                "--model",
                str(ex / "model.onnx"),
                "--images",
                str(ex / "images"),
                "--labels",
                str(ex / "labels.csv"),
                "--preprocess",
                "lite",
                "--eval",
                "100",
                "--calibration",
                "20",
                "--analysis",
                "8",
            ]
        else:
            cnn(tmp / "cnn.onnx", wide_layer="conv2")
            write_images(tmp / "images", 40)
            cmd_args = [
                "--model",
                str(tmp / "cnn.onnx"),
                "--images",
                str(tmp / "images"),
                "--eval",
                "24",
                "--calibration",
                "12",
                "--analysis",
                "6",
            ]
        if args.lease_timeout:
            cmd_args += ["--lease-timeout", str(args.lease_timeout)]
        print(one(tmp, cmd_args, n, args.timeout, args.sim_ms, args.rerun_delay), flush=True)
        if args.keep:
            print(f"  logs and store: {tmp}", flush=True)


if __name__ == "__main__":
    main()

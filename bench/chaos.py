"""Chaos bench: a study on a lab of three agents in two device classes under random faults.

The lab, all on 127.0.0.1: device class ``cpu`` = two ONNX Runtime agents (``cpu-a``, ``cpu-b``);
class ``phone`` = one TVM agent (``--backend tvm``) in front of a real TVM RPC tracker with two
RPC servers under one key (``tests/tvm_rpc.py``). The controller is ``python -m tuneqn.controller
tune study.toml`` as a subprocess, so it can be SIGKILLed and rerun with the same command.

First a fault-free reference run, then ``--runs`` runs (default 12), each with ``--faults``
random faults (default 10; then the run ends undisturbed) one every ``--fault-every`` seconds
(default 2, ±50 %; ``--seed``, ``--kinds``): SIGKILL of an agent (restarted 0.5–3 s later on
the same port and state dir), SIGSTOP of an agent (SIGCONT 1–8 s later, either side of the
silence limit), restart of an agent (SIGTERM, started again at once), SIGKILL of an RPC server
(a new one registers 0.5–3 s later), SIGSTOP of an RPC server (SIGCONT 1–8 s later), SIGKILL of
the controller (the same command run again at once). Each run starts with fresh agent state
and a fresh out dir (the TVM agent with the reference's compiled libraries, unless
``--cold-tvm-cache``: a TVM compile takes 3–8 s here, and jobs still upload, load and run).

Per run and in total it prints: faults by kind; results lost (a job done in the reference that
is not done in the run) or duplicated (a (candidate, device class, level, split) stored more
than once; the agents' ``executions`` tables add how often a job was executed again, which
faults legitimately cause); the slowest recovery (seconds from a fault to the next stored
result, or to the end of the run); and whether fronts and answer equal the reference.

"Equal": the default objectives are accuracy loss and file size, both deterministic for a
given candidate and device class (same files, same samples, deterministic runtimes), so the
comparison is of candidate identities: for every ``fronts``, ``cross_device`` and
``recipe_fronts`` entry the members of each front level (as sets), and for every answer pick
(per device and cross-device) its candidate id and whether it met the constraint. Latency is
measured for every full evaluation but is not an objective here; it could only decide the answer
between two candidates of equal size and equal loss (reported as such if it ever happens).

A run that does not end within ``--run-timeout`` seconds (240, at least 4× the reference + 60),
or stores no result for ``--stall`` seconds (90) after its last result and its last fault, is a
hang: the bench prints what the store held (jobs by state, unfinished jobs with holder, lease and
the agents' own state of that job id), kills the controller, keeps the run's folder and goes on.
Exit status 1 when any run lost or duplicated results, hung, failed, or differed.

Settings, in the study file: the default search (``budget``/``measured``) and objectives, on
the recipe ``per-tensor`` (``--recipe``; ``--recipe auto`` = the four automatic recipes, about 4×
the jobs: a TVM compile per job makes that ~140 s per run); shortened timeouts
``lease_timeout_s`` 10, ``heartbeat_s`` 1, ``silent_after_s`` 4, ``unreachable_grace_s`` 2,
``device_wait_s`` 60; the TVM agent ``--tvm-request-timeout 30 --tvm-call-timeout 10
--tvm-session-timeout 300``; every agent ``--drain-seconds 0``, the ORT agents
``--simulated-latency-ms 40`` (``--sim-ms``: a job lasts about a second, long enough to be hit).
The model is the tests' small CNN (``tests/onnx_models.py``, 5 layers), 24 evaluation images.

    python bench/chaos.py                      # 12 runs × ≤ 10 faults (a run may end first), seed 1
    python bench/chaos.py --runs 3 --faults 0 --kinds controller-kill --sim-ms 200   # hunt resume hangs
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_models import cnn, write_images  # noqa: E402

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
EVALUATION = {
    "lease_timeout_s": 10.0,
    "heartbeat_s": 1.0,
    "silent_after_s": 4.0,
    "unreachable_grace_s": 2.0,
    "device_wait_s": 60.0,
}
TVM_FLAGS = ["--tvm-request-timeout", "30", "--tvm-call-timeout", "10", "--tvm-session-timeout", "300"]
KINDS = ("agent-kill", "agent-stop", "agent-restart", "rpc-kill", "rpc-stop", "controller-kill")
FINAL = ("done", "failed", "infeasible", "unreachable")


def _die_with_parent() -> None:
    """Child processes die with the bench (PR_SET_PDEATHSIG), even when it is SIGKILLed."""
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


# ---------------------------------------------------------------------- the lab


@dataclass
class Agent:
    """One agent process on a fixed port (restarted on the same port and state dir)."""

    name: str
    device_class: str
    port: int
    state: Path
    extra: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the agent and wait (bounded) until it listens."""
        cmd = [
            sys.executable,
            "-m",
            "tuneqn.agent",
            "--listen",
            self.address,
            "--state-dir",
            str(self.state),
            "--device-name",
            self.name,
            "--device-class",
            self.device_class,
            "--drain-seconds",
            "0",
            "--log-level",
            "WARNING",
            *self.extra,
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )  # noqa: PLW1509
        self.stopped = False
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent {self.name} does not listen after 60 s; see {self.log_path}")
            time.sleep(0.05)

    def send(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """End the agent (bounded: SIGKILL after 10 s) and reap it."""
        if self.proc is None:
            return
        self.send(sig)
        self.send(signal.SIGCONT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        self.stopped = False


class Lab:
    """The tracker, its two RPC servers and the three agents (fresh agent state per run)."""

    def __init__(self, root: Path, sim_ms: float) -> None:
        from tvm_rpc import TvmLab  # imports TVM (the tuneqn[tvm] extra)

        self.root = root
        self.sim_ms = sim_ms
        self.tvm = TvmLab(root / "tvm-shim")
        self.key = self.tvm.new_key("chaos")
        self.servers = self.tvm.start_servers(self.key, 2)
        self.tvm.wait_servers(self.key, 2)
        self.agents: list[Agent] = []

    def start_agents(self, folder: Path, warm_from: Path | None = None) -> list[Agent]:
        """Fresh agents (new state dirs under ``folder``): two ORT of class cpu, one TVM of class phone
        (with the compile cache of the run in ``warm_from``, when given)."""
        self.stop_agents()
        sim = ["--simulated-latency-ms", str(self.sim_ms)]
        base = dict(os.environ)
        specs = [
            ("cpu-a", "cpu", sim, base),
            ("cpu-b", "cpu", sim, base),
            (
                "phone",
                "phone",
                ["--backend", "tvm", "--tvm-tracker", self.tvm.address, "--tvm-key", self.key, *TVM_FLAGS],
                self.tvm.agent_env(base),
            ),
        ]
        self.agents = [
            Agent(name, cls, free_port(), folder / "agents" / name, extra, env, folder / f"agent-{name}.log")
            for name, cls, extra, env in specs
        ]
        for agent in self.agents:
            agent.state.mkdir(parents=True, exist_ok=True)
        if warm_from is not None:  # the TVM agent's compiled libraries (only: no jobs, no blobs)
            shutil.copytree(
                warm_from / "agents" / "phone" / "tvm" / "cache" / "entries",
                self.agents[2].state / "tvm" / "cache" / "entries",
            )
        for agent in self.agents:
            agent.start()
        return self.agents

    def stop_agents(self) -> None:
        for agent in self.agents:
            agent.stop()

    def live_servers(self) -> list[Any]:
        return [s for s in self.servers if s.alive]

    def heal(self) -> None:
        """Every RPC server resumed, two alive and registered (between runs)."""
        for server in self.live_servers():
            server.send_signal(signal.SIGCONT)
        self.servers = self.live_servers()
        while len(self.servers) < 2:
            self.servers += self.tvm.start_servers(self.key, 1)
        try:
            self.tvm.wait_servers(self.key, 2)
        except AssertionError as exc:  # tvm_rpc.wait_for's timeout: go on, the run shows what follows
            log.warning("RPC servers not ready before the run: %s (registered: %s)", exc, self.tvm.registered(self.key))

    def close(self) -> None:
        self.stop_agents()
        for server in self.servers:
            server.send_signal(signal.SIGCONT)
        self.tvm.close()


# ---------------------------------------------------------------------- the store


def _query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query ([] when the file or table does not exist yet or is busy)."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def result_count(db: Path) -> int:
    rows = _query(db, "select count(*) from results")
    return int(rows[0][0]) if rows else 0


def done_jobs(db: Path) -> set[str]:
    return {r[0] for r in _query(db, "select id from jobs where state = 'done'")}


def duplicates(db: Path) -> list[tuple[Any, ...]]:
    """(candidate, device class, level, split, count) stored more than once."""
    return _query(
        db,
        "select candidate_id, device, coalesce(level, 'full'), coalesce(split, 'eval'), count(*) c "
        "from results group by 1, 2, 3, 4 having c > 1",
    )


def executions(agent_dbs: list[Path]) -> Counter[str]:
    """Executions of each job id over every agent's own state db."""
    out: Counter[str] = Counter()
    for db in agent_dbs:
        for job_id, n in _query(db, "select job_id, count(*) from executions group by job_id"):
            out[job_id] += int(n)
    return out


def store_snapshot(db: Path, agent_dbs: dict[str, Path]) -> list[str]:
    """What the store held (a hang's record): jobs by state and every unfinished job in detail."""
    now = time.time()
    states = dict(_query(db, "select state, count(*) from jobs group by state"))
    lines = [f"jobs by state: {states}; results: {result_count(db)}"]
    for job_id, cand, device, state, agent, attempts, lease, level, error in _query(
        db,
        "select id, candidate_id, device, state, agent, attempts, lease_until, level, error from jobs "
        f"where state not in ({','.join('?' * len(FINAL))}) order by updated_at",
        FINAL,
    ):
        on_agents = {
            name: r[0]
            for name, path in agent_dbs.items()
            for r in _query(path, "select state from jobs where job_id = ?", (job_id,))
        }
        lease_txt = "none" if lease is None else f"{lease - now:+.0f} s"
        lines.append(
            f"  {state} {level or 'full'} {cand} on {device}: holder {agent}, attempts {attempts}, "
            f"lease {lease_txt}, agents: {on_agents or 'unknown'}" + (f", error {error}" if error else "")
        )
    return lines


# ---------------------------------------------------------------------- comparison


def outcome(report: dict[str, Any]) -> dict[str, Any]:
    """The deterministic identity of a report: front members per entry and level, and the picks."""
    fronts: dict[str, list[list[str]]] = {}
    for f in report.get("fronts", []):
        fronts[f"fronts {f['model']}/{f.get('recipe') or f['mode']}@{f['device']}"] = f["fronts"]
    for f in report.get("cross_device", []):
        fronts[f"cross-device {f['model']}/{f.get('recipe') or f['mode']}"] = f["fronts"]
    for f in report.get("recipe_fronts", []):
        fronts[f"recipe fronts {f['model']}@{f['device']}"] = f["fronts"]
    picks = {}
    for p in (report.get("answer") or {}).get("picks", []):
        where = p.get("device") if p["scope"] == "device" else "cross-device"
        picks[f"answer {p['model']}@{where}"] = (p.get("candidate"), bool(p.get("met")))
    return {"fronts": {k: [sorted(level) for level in v] for k, v in fronts.items()}, "picks": picks}


def differences(reference: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """What differs between two :func:`outcome`s (empty: equal), one line each."""
    out = []
    for part in ("fronts", "picks"):
        ref, got = reference[part], run[part]
        for key in sorted(set(ref) | set(got)):
            if key not in got:
                out.append(f"{key}: missing")
            elif key not in ref:
                out.append(f"{key}: not in the reference")
            elif ref[key] != got[key]:
                out.append(f"{key}: {got[key]} (reference {ref[key]})")
    return out


def ties_on_size_and_loss(report: dict[str, Any]) -> list[str]:
    """Answer picks whose size and loss another full result equals (latency alone then decides)."""
    out = []
    by_dev: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c in report.get("candidates", []):
        for r in c.get("results", []):
            if r.get("status") == "done" and r.get("agreement") is not None:
                by_dev.setdefault((c["model"], r["device"]), []).append((c.get("size_bytes"), r["agreement"]))
    for p in (report.get("answer") or {}).get("picks", []):
        if p["scope"] != "device":
            continue
        points = by_dev.get((p["model"], p.get("device") or ""), [])
        same = [pt for pt in points if pt == (p.get("size_bytes"), p.get("agreement"))]
        if len(same) > 1:
            out.append(f"{p['model']}@{p['device']}")
    return out


# ---------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """What one run did and how it compares with the reference."""

    index: int
    wall: float = 0.0
    exit_code: int | None = None
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[str] = field(default_factory=list)
    controller_runs: int = 0
    hang: list[str] = field(default_factory=list)
    results: int = 0
    done: set[str] = field(default_factory=set)
    lost: list[str] = field(default_factory=list)
    unfinished: int = 0  # a hung run: jobs of the reference not done when it was stopped
    dups: list[tuple[Any, ...]] = field(default_factory=list)
    extra: int = 0
    reexecuted: int = 0
    slowest: tuple[float, str] = (0.0, "")
    diffs: list[str] = field(default_factory=list)
    outcome: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def bad(self) -> bool:
        return bool(self.hang or self.lost or self.dups or self.diffs or self.exit_code != 0)


class Run:
    """One study run on the lab, with faults when ``rng`` is given."""

    def __init__(
        self,
        lab: Lab,
        folder: Path,
        study: Path,
        flags: list[str],
        index: int,
        rng: random.Random | None,
        kinds: list[str],
        fault_every: float,
        max_faults: int,
        run_timeout: float,
        stall: float,
    ) -> None:
        self.lab, self.folder, self.study, self.flags, self.rng, self.kinds = lab, folder, study, flags, rng, kinds
        self.fault_every, self.max_faults = fault_every, max_faults
        self.run_timeout, self.stall = run_timeout, stall
        self.db = folder / "out" / "tuneqn.db"
        self.result = RunResult(index, folder=folder)
        self.controller: subprocess.Popen[bytes] | None = None
        self.heals: list[tuple[float, str, Any]] = []  # (when, action, target)
        self.open_faults: list[tuple[float, str]] = []
        self.stopped_servers: set[int] = set()  # pids of SIGSTOPped RPC servers

    # -- the controller
    def _start_controller(self) -> None:
        cmd = [sys.executable, "-m", "tuneqn.controller", "tune", str(self.study), "--no-lab", *self.flags]
        with (self.folder / "controller.log").open("ab") as out:
            out.write(f"\n=== {' '.join(cmd)} (start {self.result.controller_runs + 1})\n".encode())
            out.flush()
            self.controller = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "120"},
                preexec_fn=_die_with_parent,
            )  # noqa: PLW1509
        self.result.controller_runs += 1

    # -- faults
    def _inject(self, now: float) -> None:
        rng = self.rng
        if rng is None:  # the reference run has no faults
            return
        kind = rng.choice(self.kinds)
        agents = [a for a in self.lab.agents if a.up and not a.stopped]
        servers = [s for s in self.lab.live_servers() if s.pid not in self.stopped_servers]
        if kind.startswith("agent") and not agents or kind.startswith("rpc") and not servers:
            return  # nothing of that kind is up right now: the next tick tries again
        target = ""
        if kind == "agent-kill":
            agent = rng.choice(agents)
            agent.send(signal.SIGKILL)
            agent.proc.wait(timeout=10)  # type: ignore[union-attr]
            self.heals.append((now + rng.uniform(0.5, 3.0), "agent-start", agent))
            target = agent.name
        elif kind == "agent-stop":
            agent = rng.choice(agents)
            agent.send(signal.SIGSTOP)
            self.heals.append((now + rng.uniform(1.0, 8.0), "agent-cont", agent))
            target = agent.name
        elif kind == "agent-restart":
            agent = rng.choice(agents)
            agent.stop(signal.SIGTERM)
            agent.start()
            target = agent.name
        elif kind == "rpc-kill":
            server = rng.choice(servers)
            server.kill(signal.SIGKILL)
            self.heals.append((now + rng.uniform(0.5, 3.0), "rpc-start", None))
            target = server.address
        elif kind == "rpc-stop":
            server = rng.choice(servers)
            server.freeze()
            self.stopped_servers.add(server.pid)
            self.heals.append((now + rng.uniform(1.0, 8.0), "rpc-cont", server))
            target = server.address
        elif kind == "controller-kill":
            if self.controller is None or self.controller.poll() is not None:
                return
            self.controller.kill()
            self.controller.wait(timeout=10)
            self._start_controller()
        self.result.faults[kind] += 1
        self.result.fault_log.append(f"{now - self.t0:6.1f} s {kind} {target}".rstrip())
        self.open_faults.append((now, f"{kind} {target}".rstrip()))

    def _heal(self, now: float, everything: bool = False) -> None:
        keep = []
        for when, action, target in self.heals:
            if when > now and not everything:
                keep.append((when, action, target))
                continue
            if action == "agent-start":
                try:
                    target.start()
                except RuntimeError as exc:  # e.g. its port taken meanwhile: try again in a second
                    self.result.fault_log.append(f"{now - self.t0:6.1f} s restart failed: {exc}")
                    keep.append((now + 1.0, action, target))
            elif action == "agent-cont":
                target.send(signal.SIGCONT)
            elif action == "rpc-start":
                self.lab.servers += self.lab.tvm.start_servers(self.lab.key, 1)
            elif action == "rpc-cont":
                target.send_signal(signal.SIGCONT)
                self.stopped_servers.discard(target.pid)
        self.heals = keep

    def _recovered(self, now: float) -> None:
        for i, (when, what) in enumerate(self.open_faults):
            if now - when > self.result.slowest[0]:
                later = len(self.open_faults) - i - 1
                self.result.slowest = (now - when, what + (f", {later} more fault(s) meanwhile" if later else ""))
        self.open_faults = []

    # -- the loop
    def go(self) -> RunResult:
        """Run until the controller ends by itself, hangs or runs out of time; heal everything after."""
        self.t0 = time.monotonic()
        self._start_controller()
        next_fault = self.t0 + self._interval()
        seen, last_progress = 0, self.t0
        try:
            while True:
                now = time.monotonic()
                controller = self.controller
                if controller is None:  # pragma: no cover - started above
                    raise RuntimeError("the controller was not started")
                rc = controller.poll()
                count = result_count(self.db)
                if count > seen:
                    seen, last_progress = count, now
                    self._recovered(now)
                if rc is not None:
                    self.result.exit_code = rc
                    self._recovered(now)
                    break
                if now - self.t0 > self.run_timeout or now - last_progress > self.stall:
                    why = (
                        f"no end after {self.run_timeout:g} s"
                        if now - self.t0 > self.run_timeout
                        else f"no result and no fault for {self.stall:g} s"
                    )
                    dbs = {a.name: a.state / "agent.db" for a in self.lab.agents}
                    self.result.hang = [why, *self.result.fault_log[-3:], *store_snapshot(self.db, dbs)]
                    self.controller.kill()
                    self.controller.wait(timeout=10)
                    self._recovered(now)
                    break
                self._heal(now)
                if (
                    self.rng is not None
                    and now >= next_fault
                    and (not self.max_faults or sum(self.result.faults.values()) < self.max_faults)
                ):
                    self._inject(now)
                    next_fault = now + self._interval()
                    last_progress = max(last_progress, now)  # a stall is counted from the last fault too
                time.sleep(0.1)
        finally:
            self._heal(time.monotonic(), everything=True)
            self.result.wall = time.monotonic() - self.t0
        return self.result

    def _interval(self) -> float:
        return self.fault_every * (self.rng.uniform(0.5, 1.5) if self.rng else 1.0)


# ---------------------------------------------------------------------- the study


def write_study(folder: Path, assets: Path, agents: list[Agent]) -> Path:
    """The study file of a run (default search and recipes; shortened timeouts)."""
    data: dict[str, Any] = {
        "name": "chaos",
        "out_dir": str(folder / "out"),
        "models": [{"name": "cnn", "path": str(assets / "cnn.onnx")}],
        "dataset": {"images": str(assets / "images"), "eval": 24, "calibration": 12, "analysis": 6},
        "evaluation": EVALUATION,
        "agents": [{"address": a.address, "name": a.name, "device_class": a.device_class} for a in agents],
    }
    path = folder / "study.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def one_run(
    lab: Lab,
    root: Path,
    assets: Path,
    index: int,
    rng: random.Random | None,
    args: argparse.Namespace,
    reference: RunResult | None,
) -> RunResult:
    """Start fresh agents, run the study (with faults unless reference), compare."""
    folder = root / ("reference" if reference is None else f"run-{index:02d}")
    folder.mkdir(parents=True)
    lab.heal()
    warm = None if reference is None or args.cold_tvm_cache else reference.folder
    agents = lab.start_agents(folder, warm)
    study = write_study(folder, assets, agents)
    timeout = args.run_timeout if reference is None else max(args.run_timeout, 4 * reference.wall + 60)
    flags = [] if args.recipe == ["auto"] else [f for r in args.recipe for f in ("--recipe", r)]
    res = Run(
        lab, folder, study, flags, index, rng, args.kinds, args.fault_every, args.faults, timeout, args.stall
    ).go()
    agent_dbs = [a.state / "agent.db" for a in lab.agents]
    lab.stop_agents()
    db = folder / "out" / "tuneqn.db"
    res.results = result_count(db)
    res.done = done_jobs(db)
    res.dups = duplicates(db)
    execs = executions(agent_dbs)
    res.reexecuted = sum(1 for n in execs.values() if n > 1)
    report_path = folder / "out" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    res.outcome = outcome(report)
    if reference is not None:
        missing = sorted(reference.done - res.done)
        if res.hang:
            res.unfinished = len(missing)
        else:
            res.lost = missing
        res.extra = len(res.done - reference.done)
        if not res.hang:
            res.diffs = differences(reference.outcome, res.outcome)
        res.diffs += [
            f"answer on {d}: another result has the same size and loss (latency decided)"
            for d in ties_on_size_and_loss(report)
        ]
    return res


def describe(res: RunResult, with_faults: bool = True) -> list[str]:
    """The lines printed for a run."""
    name = "reference" if res.index == 0 else f"run {res.index}"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(res.faults.items())) or "none"
    head = (
        f"{name}: {res.wall:.1f} s, exit {res.exit_code}, controller started {res.controller_runs}x, "
        f"{res.results} results"
    )
    if with_faults:
        head += (
            f"; faults {sum(res.faults.values())} ({kinds}); lost {len(res.lost)}, duplicated {len(res.dups)}, "
            f"extra {res.extra}, jobs executed more than once {res.reexecuted}; slowest recovery "
            f"{res.slowest[0]:.1f} s ({res.slowest[1] or '-'}); fronts and answer "
            f"{'equal' if not res.diffs and not res.hang else 'DIFFER' if res.diffs else 'not compared'}"
        )
    lines = [head]
    if res.hang:
        lines.append(
            f"  HANG: {res.hang[0]}; {res.unfinished} job(s) of the reference not done; last faults and the store:"
        )
        lines += [f"    {line}" for line in res.hang[1:]]
    lines += [f"  lost: {job}" for job in res.lost[:10]]
    lines += [f"  duplicated: {d}" for d in res.dups[:10]]
    lines += [f"  differs: {d}" for d in res.diffs[:10]]
    if res.bad and res.folder is not None:
        lines.append(f"  folder: {res.folder} (controller.log, agent-*.log, out/)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Reference run, then ``--runs`` runs with faults; print the figures; 1 when anything went wrong."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12, help="runs with faults (default 12)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    ap.add_argument("--fault-every", type=float, default=2.0, help="mean seconds between faults (default 2)")
    ap.add_argument(
        "--faults",
        type=int,
        default=10,
        help="faults per run, after which the run ends undisturbed (default 10; 0: faults until it ends)",
    )
    ap.add_argument(
        "--recipe",
        action="append",
        help="recipe to search (repeatable; default per-tensor; 'auto': the four automatic ones, about 4x the jobs)",
    )
    ap.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated fault kinds to draw from (default all: {','.join(KINDS)})",
    )
    ap.add_argument(
        "--sim-ms",
        type=float,
        default=40.0,
        help="ORT agents' simulated latency per sample (default 40: a job lasts about a second)",
    )
    ap.add_argument(
        "--cold-tvm-cache",
        action="store_true",
        help="every run compiles on the TVM agent (default: runs start with the reference's compile "
        "cache; a compile takes 3-8 s here and would make each run ~50 s longer)",
    )
    ap.add_argument(
        "--run-timeout",
        type=float,
        default=240.0,
        help="a run not ended after this many seconds is a hang (at least 4x the reference + 60)",
    )
    ap.add_argument(
        "--stall",
        type=float,
        default=90.0,
        help="a run storing no result this long after its last result and fault is a hang (default 90)",
    )
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir, kept when a run fails)")
    args = ap.parse_args(argv)
    args.recipe = args.recipe or ["per-tensor"]
    if args.runs < 0 or args.fault_every <= 0 or args.faults < 0:
        print("chaos: --runs and --faults must be ≥ 0 and --fault-every > 0", file=sys.stderr)
        return 2
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or not args.kinds:
        print(
            f"chaos: --kinds: unknown fault kind(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(KINDS)}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING)
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="tuneqn-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    assets = root / "assets"
    assets.mkdir(exist_ok=True)
    cnn(assets / "cnn.onnx")
    write_images(assets / "images", 40)
    started = time.monotonic()
    print(
        f"chaos: 3 agents (cpu-a, cpu-b: ORT class cpu; phone: TVM class phone, tracker + 2 RPC servers), "
        f"search budget/measured, recipes {'+'.join(args.recipe)}, faults ({','.join(args.kinds)}) every "
        f"~{args.fault_every:g} s (at most {args.faults or 'unlimited'} per run), seed {args.seed}, folder {root}"
    )
    print(f"shortened timeouts: {EVALUATION}; TVM agent {' '.join(TVM_FLAGS)}; simulated latency {args.sim_ms:g} ms")
    rng = random.Random(args.seed)
    lab = Lab(root, args.sim_ms)
    runs: list[RunResult] = []
    try:
        reference = one_run(lab, root, assets, 0, None, args, None)
        for line in describe(reference, with_faults=False):
            print(line, flush=True)
        if reference.bad or not reference.done:
            print("the reference run failed: nothing to compare with", file=sys.stderr)
            return 1
        for i in range(1, args.runs + 1):
            res = one_run(lab, root, assets, i, rng, args, reference)
            runs.append(res)
            for line in describe(res):
                print(line, flush=True)
    finally:
        lab.close()
    total: Counter[str] = Counter()
    for r in runs:
        total.update(r.faults)
    slowest = max(runs, key=lambda r: r.slowest[0], default=None)
    print(
        f"\ntotal: {len(runs)} runs, {sum(total.values())} faults "
        f"({', '.join(f'{k} {n}' for k, n in sorted(total.items()))}); "
        f"results lost {sum(len(r.lost) for r in runs)}, duplicated {sum(len(r.dups) for r in runs)}; "
        f"hangs {sum(1 for r in runs if r.hang)}, failed runs {sum(1 for r in runs if not r.hang and r.exit_code)}; "
        f"runs whose fronts or answer differ {sum(1 for r in runs if r.diffs)}; slowest recovery "
        + (f"{slowest.slowest[0]:.1f} s (run {slowest.index}, {slowest.slowest[1]})" if slowest else "-")
        + f"; bench wall {time.monotonic() - started:.0f} s"
    )
    summary = [
        {
            "run": r.index,
            "wall_s": round(r.wall, 1),
            "exit": r.exit_code,
            "faults": dict(r.faults),
            "fault_log": r.fault_log,
            "controller_starts": r.controller_runs,
            "results": r.results,
            "lost": r.lost,
            "duplicated": [list(d) for d in r.dups],
            "extra": r.extra,
            "reexecuted_jobs": r.reexecuted,
            "unfinished_at_hang": r.unfinished,
            "slowest_recovery_s": round(r.slowest[0], 1),
            "slowest_recovery_after": r.slowest[1],
            "hang": r.hang,
            "differences": r.diffs,
        }
        for r in runs
    ]
    (root / "chaos.json").write_text(json.dumps(summary, indent=1))
    bad = any(r.bad for r in runs)
    if not bad and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

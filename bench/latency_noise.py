"""Latency you can trust: time one candidate five times inside a running demo-sized study.

Runs the example study (EfficientNet-Lite0, 100 photos, static + dynamic, local agent) and,
spread over the study, submits five latency-only jobs of the same candidate (the FP32 model)
to the study's own local agent. The study keeps building candidates on the same cores
meanwhile; the agent's ``--quiet-lock`` makes candidate builds pause while it times. Prints the
five medians and max/min of them (target ≤ 1.10). ``--no-quiet`` runs the same without the
lock, for comparison.

    python bench/latency_noise.py [--example examples/lite0/work] [--no-quiet]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.client import AgentClient
from tuneqn.controller.farm.jobs import FarmSettings
from tuneqn.controller.orchestrator import StudyRun
from tuneqn.controller.study import Study
from tuneqn.v1 import agent_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def _wait(cond: object, what: str, seconds: float = 900.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling the running study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default=str(ROOT / "examples/lite0/study.toml"))
    ap.add_argument("--no-quiet", action="store_true", help="don't pause builds while the agent times")
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(Path(args.study)).model_copy(update={"out_dir": Path(tmp) / "out"})
        study = Study(cfg)
        run = StudyRun(study, [], FarmSettings.from_config(cfg.evaluation))
        box: list[object] = []
        t = threading.Thread(target=lambda: box.append(run.run()), daemon=True)
        t.start()
        _wait(
            lambda: run.local is not None and run.local.address and run.board.counts().get("done", 0) >= 1,
            "the study's first result",
        )
        if args.no_quiet and run.quiet is not None:
            run.quiet = None  # builds no longer wait for the agent's timing
        assert run.local is not None
        client = AgentClient(run.local.address)
        pm = next(iter(study.models.values()))
        one = np.load(study.eval_split(pm.name).path)[:1]
        buf = io.BytesIO()
        np.save(buf, one)
        model_sha = client.upload_file(pm.path)
        data_sha = client.upload_bytes(buf.getvalue())
        medians: list[float] = []
        for i in range(args.samples):
            done_before = run.board.counts().get("done", 0)
            jid = f"noise-{uuid.uuid4().hex[:8]}-{i}"
            client.submit(_latency_job(jid, model_sha, data_sha, pm.input_name))
            res = client.wait_result(jid, timeout=600)
            medians.append(res.latency.median_ms)
            print(
                f"sample {i + 1}: median {res.latency.median_ms:.2f} ms (p10 {res.latency.p10_ms:.2f}, "
                f"p90 {res.latency.p90_ms:.2f}); study jobs done: {run.board.counts().get('done', 0)}",
                flush=True,
            )
            if i + 1 < args.samples and t.is_alive():
                _wait(
                    lambda d=done_before: run.board.counts().get("done", 0) >= d + 6 or not t.is_alive(),
                    "more study results",
                )
        client.close()
        t.join()
        study.close()
        idle = _idle_medians(Path(tmp), pm.path, buf.getvalue(), pm.input_name, args.samples)
    ratio = max(medians) / min(medians)
    mode = "builds NOT paused (--no-quiet)" if args.no_quiet else "builds pause while the agent times"
    print(f"{mode}: medians {', '.join(f'{m:.2f}' for m in medians)} ms; max/min = {ratio:.3f} (target <= 1.10)")
    print(
        f"same candidate, idle machine, after the study: medians {', '.join(f'{m:.2f}' for m in idle)} ms; "
        f"max/min = {max(idle) / min(idle):.3f} (the host's own noise floor)"
    )


def _latency_job(job_id: str, model_sha: str, data_sha: str, input_name: str) -> pb.JobSpec:
    """The latency job both phases time (5 warm-up runs, 30 timed)."""
    return pb.JobSpec(
        job_id=job_id,
        device="local",
        model_sha256=model_sha,
        dataset_sha256=data_sha,
        input_name=input_name,
        latency_warmup=5,
        latency_repeats=30,
        attempt=1,
    )


def _idle_medians(tmp: Path, model: Path, data: bytes, input_name: str, samples: int) -> list[float]:
    """The same latency job on a fresh agent with nothing else running."""
    from tuneqn.controller.farm.local import LocalAgent

    out: list[float] = []
    with LocalAgent(tmp / "idle-agent") as agent:
        client = AgentClient(agent.address)
        model_sha, data_sha = client.upload_file(model), client.upload_bytes(data)
        for i in range(samples):
            jid = f"idle-{uuid.uuid4().hex[:8]}-{i}"
            client.submit(_latency_job(jid, model_sha, data_sha, input_name))
            out.append(client.wait_result(jid, timeout=600).latency.median_ms)
        client.close()
    return out


if __name__ == "__main__":
    main()

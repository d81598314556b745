"""The agent's metrics endpoint after a real study: the counters match what the study did."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import write_study
from prometheus_client.parser import text_string_to_metric_families

from tuneqn.controller.config import load_config
from tuneqn.controller.farm.jobs import Endpoint, FarmSettings
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.orchestrator import remeasure_token, tune
from tuneqn.controller.study import Study

FAST = {"latency_repeats": 3, "latency_warmup": 1, "heartbeat_s": 0.5}
_METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def metrics_port(log_path: Path, timeout: float = 30.0) -> int:
    """The port the agent logged for its metrics endpoint (waits for the line, with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _METRICS_LINE.search(log_path.read_text() if log_path.exists() else "")
        if m:
            return int(m.group(1))
        if time.monotonic() > deadline:
            raise AssertionError(f"no metrics line in {log_path} within {timeout} s")
        time.sleep(0.05)  # polling a file for a condition, not synchronising by sleeping


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics; samples by name as (labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


@pytest.mark.heavy
def test_metrics_after_a_study_match_the_jobs_it_reports_done(tmp_path: Path, assets: Path) -> None:
    agent = LocalAgent(
        tmp_path / "agent", device_name="cpu-1", extra_args=["--metrics-listen", "127.0.0.1:0", "--device-class", "lab"]
    )
    with agent:
        port = metrics_port(agent.state_dir / "agent.log")
        study_toml = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST)
        cfg = load_config(study_toml)
        study = Study(cfg, fresh=False)
        try:
            settings = FarmSettings.from_config(cfg.evaluation, remeasure_token=remeasure_token(study, False))
            outcome = tune(study, [Endpoint(address=agent.address)], settings)
        finally:
            study.close()
        assert outcome.failed == 0 and outcome.done == outcome.total > 0

        samples = scrape(port)
    succeeded = [v for labels, v in samples["tuneqn_agent_jobs_finished_total"] if labels["state"] == "SUCCEEDED"]
    assert sum(succeeded) == outcome.done
    assert not [v for labels, v in samples["tuneqn_agent_jobs_finished_total"] if labels["state"] != "SUCCEEDED" and v]
    durations = [
        v for labels, v in samples["tuneqn_agent_job_duration_seconds_count"] if labels["state"] == "SUCCEEDED"
    ]
    assert sum(durations) == outcome.done
    assert [v for _, v in samples["tuneqn_agent_queue_length"]] == [0]
    assert samples["tuneqn_agent_blob_cache_bytes"][0][1] > 0

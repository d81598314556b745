"""``python -m tuneqn.agent.probe``: the container health probe against real agents (plain and mTLS)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from tuneqn.agent.probe import default_address
from tuneqn.controller.farm.certs import (  # the test makes certificates; the probe never imports this
    write_host_certs,
    write_lab_certs,
)
from tuneqn.controller.farm.local import LocalAgent


def run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The probe as a HEALTHCHECK runs it: its own process, stdin closed."""
    return subprocess.run(
        [sys.executable, "-m", "tuneqn.agent.probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    write_lab_certs(d, agent_hosts=["127.0.0.1", "localhost"])
    return d


def test_a_plain_agent_is_serving(tmp_path: Path) -> None:
    with LocalAgent(tmp_path / "agent", device_name="cpu-1") as agent:
        proc = run_probe(agent.address)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_nothing_listening_is_one_line_exit_1() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = run_probe(f"127.0.0.1:{port}", "--timeout", "10")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"python -m tuneqn.agent.probe: not serving: 127.0.0.1:{port}: UNAVAILABLE"
    ), proc.stderr


@pytest.mark.heavy
def test_an_mtls_agent_is_serving_to_a_client_certificate_and_refuses_none(tmp_path: Path, pki: Path) -> None:
    agent = LocalAgent(
        tmp_path / "agent",
        device_name="cpu-1",
        extra_args=[
            "--tls-cert",
            str(pki / "agent.pem"),
            "--tls-key",
            str(pki / "agent.key"),
            "--tls-ca",
            str(pki / "ca.pem"),
        ],
    )
    with agent:
        ok = run_probe(
            agent.address,
            "--tls-ca",
            str(pki / "ca.pem"),
            "--tls-cert",
            str(pki / "controller.pem"),
            "--tls-key",
            str(pki / "controller.key"),
        )
        # the same through the environment, as in the compose file's agents
        port = agent.address.rpartition(":")[2]
        via_env = run_probe(
            env={
                **_base_env(),
                "TUNEQN_AGENT_LISTEN": f"0.0.0.0:{port}",
                "TUNEQN_PROBE_TLS_CA": str(pki / "ca.pem"),
                "TUNEQN_PROBE_TLS_CERT": str(pki / "controller.pem"),
                "TUNEQN_PROBE_TLS_KEY": str(pki / "controller.key"),
            }
        )
        no_client_cert = run_probe(agent.address, "--tls-ca", str(pki / "ca.pem"), "--timeout", "10")
        plaintext = run_probe(agent.address, "--timeout", "10")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert via_env.returncode == 0 and via_env.stderr == "", via_env.stderr  # localhost is in the agent's names
    for refused in (no_client_cert, plaintext):
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "not serving: " in refused.stderr, refused.stderr


@pytest.mark.heavy
def test_the_loopback_health_listener_is_probed_without_any_key(tmp_path: Path) -> None:
    """An mTLS agent with its own host key and ``--health-listen``: the probe (as a HEALTHCHECK runs
    it, from the environment) needs no client certificate; the main port still refuses plaintext."""
    lab = write_host_certs(tmp_path / "lab", ["localhost,127.0.0.1"])
    (host,) = lab.hosts
    health = f"127.0.0.1:{free_port()}"
    agent = LocalAgent(
        tmp_path / "agent",
        device_name="cpu-1",
        extra_args=[
            "--tls-cert",
            str(host.cert),
            "--tls-key",
            str(host.key),
            "--tls-ca",
            str(host.ca_cert),
            "--health-listen",
            health,
        ],
    )
    with agent:
        port = agent.address.rpartition(":")[2]
        env = {**_base_env(), "TUNEQN_AGENT_LISTEN": f"0.0.0.0:{port}", "TUNEQN_AGENT_HEALTH_LISTEN": health}
        ok = run_probe(env=env)
        # stale client-key settings are not used for the plaintext listener
        ok_stale = run_probe(env={**env, "TUNEQN_PROBE_TLS_CA": "/nonexistent/ca.pem"})
        main_port = run_probe(
            "--timeout",
            "10",
            env={k: v for k, v in env.items() if k != "TUNEQN_AGENT_HEALTH_LISTEN"}
            | {"TUNEQN_PROBE_TLS_CA": str(host.ca_cert)},
        )
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert ok_stale.returncode == 0 and ok_stale.stderr == "", ok_stale.stderr
    assert main_port.returncode == 1 and "not serving" in main_port.stderr  # no client key: refused
    after = run_probe("--timeout", "10", env=env)
    assert after.returncode == 1 and after.stderr.count("\n") == 1 and f"{health}: UNAVAILABLE" in after.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["127.0.0.1:1", "--tls-cert", "x.pem"], "--tls-cert and --tls-key must be given together"),
        (["127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"], "cannot read TLS CA /nonexistent/ca.pem"),
        (["no-port"], "address must be HOST:PORT"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args: list[str], message: str) -> None:
    proc = run_probe(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_the_probe_never_imports_the_controller() -> None:
    code = "import sys, tuneqn.agent.probe; print(sorted(m for m in sys.modules if m.startswith('tuneqn.controller')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_default_address_follows_the_agents_listen_setting() -> None:
    assert default_address("0.0.0.0:50051") == "localhost:50051"
    assert default_address("[::]:7000") == "localhost:7000"
    assert default_address("10.0.0.5:50052") == "10.0.0.5:50052"
    assert default_address("") == "localhost:50051"


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TUNEQN_AGENT_", "TUNEQN_PROBE_"))}

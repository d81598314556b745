"""Bearer token, health without token, TLS and mTLS on a real agent."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from agent_fixtures import DEVICE, dataset, job_spec, jobs_recorded, npy_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneqn.controller.farm.client import AgentClient
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc

TOKEN = "s3cret-token"


def _calls(client: AgentClient, stub: agent_pb2_grpc.AgentStub, token: str | None, sha: str) -> dict[str, object]:
    """One call of every kind: unary, client-streaming and server-streaming."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return {
        "GetInfo": client.info,
        "HasBlobs": lambda: client.has_blobs([sha]),
        "UploadBlob": lambda: stub.UploadBlob(  # the client would ask HasBlobs first
            iter([pb.BlobChunk(sha256=sha, total_size=1, data=b"x")]), timeout=5, metadata=metadata
        ),
        "SubmitJob": lambda: client.submit(job_spec("intruder", sha, sha)),
        "WatchJob": lambda: list(client.watch("intruder", timeout=5)),
        "CancelJob": lambda: client.cancel("intruder"),
    }


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_wrong_or_missing_token_is_unauthenticated_and_runs_nothing(
    agent_factory, client_factory, cnn_bytes, token
) -> None:
    server = agent_factory(token=TOKEN)
    with client_factory(server, token=TOKEN) as good:  # the blob exists, so only auth can stop the job
        sha = good.upload_bytes(cnn_bytes)
    bad = client_factory(server, token=token)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for name, call in _calls(bad, agent_pb2_grpc.AgentStub(channel), token, sha).items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert jobs_recorded(server.state_dir) == 0
    assert server.jobs.execution_count("intruder") == 0


def test_right_token_works_and_health_needs_none(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory(token=TOKEN)
    client = client_factory(server, token=TOKEN)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(4)))
    client.submit(job_spec("ok", m, d))
    assert client.wait_result("ok", timeout=20).state == pb.SUCCEEDED

    anonymous = client_factory(server)
    assert anonymous.health()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneqn.v1.Agent"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_reports_not_serving_for_a_stopped_agent(agent_factory, client_factory) -> None:
    server = agent_factory()
    client = client_factory(server, timeout=2.0)
    assert client.health()
    server.stop(grace=0.1)
    assert not client.health()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(cwd: Path, name: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA with a server (127.0.0.1) and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=tuneqn-test-ca",
        cwd=d,
    )
    _issue(d, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "extendedKeyUsage=clientAuth\n")
    return d


def test_tls_and_mtls(agent_factory, client_factory, pki: Path, tmp_path: Path) -> None:
    def read(name: str) -> bytes:
        return (pki / name).read_bytes()

    tls = agent_factory(state_dir=tmp_path / "tls", tls_cert=read("server.pem"), tls_key=read("server.key"))
    assert client_factory(tls, tls_ca=pki / "ca.pem").info().agent_id == tls.agent_id
    with pytest.raises(grpc.RpcError):
        client_factory(tls, timeout=2.0).info()  # plaintext client against a TLS agent

    mtls = agent_factory(
        state_dir=tmp_path / "mtls",
        tls_cert=read("server.pem"),
        tls_key=read("server.key"),
        tls_ca=read("ca.pem"),
        token=TOKEN,
    )
    with pytest.raises(grpc.RpcError) as err:
        client_factory(mtls, tls_ca=pki / "ca.pem", token=TOKEN, timeout=2.0).info()  # no client cert
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    client = client_factory(
        mtls, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key", token=TOKEN
    )
    assert client.info().agent_id == mtls.agent_id
    sha = client.upload_bytes(b"over mTLS")
    assert sha == hashlib.sha256(b"over mTLS").hexdigest() and client.has_blobs([sha]) == [True]


# ---------------------------------------------------------------------- the off-loopback rule (CLI)


def _security_args(kind: str, pki: Path, tmp_path: Path) -> list[str]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    return {
        "nothing": [],
        "token": ["--token-file", str(token_file)],
        "tls": tls,
        "token+tls": [*tls, "--token-file", str(token_file)],
        "mtls": [*tls, "--tls-ca", str(pki / "ca.pem")],
        "insecure token": ["--token-file", str(token_file), "--insecure"],
    }[kind]


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("nothing", "without --token-file or TLS"),
        ("token", "with a token but without TLS"),
        ("tls", "with TLS but neither a token nor client certificates"),
    ],
)
def test_off_loopback_bind_without_token_over_tls_or_mtls_is_refused(
    kind: str, needle: str, pki: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneqn.agent",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            str(state_dir),
            *_security_args(kind, pki, tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("TUNEQN_AGENT_")},
    )
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tuneqn-agent: error: refusing to listen on non-loopback 0.0.0.0:0")
    assert needle in line and "--insecure" in line and "Traceback" not in done.stderr
    assert not state_dir.exists()


@pytest.mark.parametrize("kind", ["token+tls", "mtls", "insecure token"])
def test_off_loopback_bind_with_token_over_tls_or_mtls_is_served(
    kind: str, agent_process, client_factory, pki: Path, tmp_path: Path
) -> None:
    agent = agent_process(tmp_path / "state", "--listen", "0.0.0.0:0", *_security_args(kind, pki, tmp_path))
    port = agent.address.rsplit(":", 1)[1]
    assert agent.address.startswith("0.0.0.0:")
    tls = {} if kind == "insecure token" else {"tls_ca": pki / "ca.pem"}
    if kind == "mtls":
        tls.update(tls_cert=pki / "client.pem", tls_key=pki / "client.key")
    token = None if kind == "mtls" else TOKEN
    client = client_factory(f"127.0.0.1:{port}", token=token, **tls)
    assert client.info().devices[0].name == DEVICE
    assert agent.terminate() == 0
    warned = "--insecure: listening on non-loopback" in agent.log_path.read_text()
    assert warned == (kind == "insecure token")


def test_agent_server_applies_the_rule_too(tmp_path: Path) -> None:
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    config = AgentConfig(state_dir=tmp_path / "state", host="0.0.0.0", token=TOKEN)
    with pytest.raises(ValueError, match="token but without TLS"):
        AgentServer(config, [OrtBackend(DEVICE)])
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tls-cert", "{bad}", "--tls-key", "{pki}/server.key"], "--tls-cert: {bad} is not a PEM certificate"),
        (["--tls-cert", "{pki}/server.pem", "--tls-key", "{bad}"], "--tls-key: {bad} is not an unencrypted PEM"),
        (["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/client.key"], "is not the key of the certificate"),
        (
            ["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/server.key", "--tls-ca", "{bad}"],
            "--tls-ca: {bad} is not a PEM certificate",
        ),
        (["--tls-cert", "{pki}/missing.pem", "--tls-key", "{pki}/server.key"], "cannot read --tls-cert"),
    ],
)
def test_bad_tls_files_are_refused_before_binding(flags: list[str], needle: str, pki: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notpem"
    bad.write_text("not a certificate\n")
    argv = [f.format(bad=bad, pki=pki) for f in flags]
    state_dir = tmp_path / "state"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneqn.agent",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state_dir),
            "--tls-ca" if "--tls-ca" not in flags else "--token-file",
            *([str(pki / "ca.pem")] if "--tls-ca" not in flags else [str(_token(tmp_path))]),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("TUNEQN_AGENT_")},
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert needle.format(bad=bad) in line and "Traceback" not in done.stderr
    assert not state_dir.exists()


def _token(tmp_path: Path) -> Path:
    t = tmp_path / "token"
    t.write_text("s3cret-token\n")
    return t


# ---------------------------------------------------------------------- side listeners: health, metrics


def test_loopback_health_listener_needs_no_key_while_the_main_port_demands_mtls(
    agent_factory, client_factory, pki: Path, tmp_path: Path
) -> None:
    def read(name: str) -> bytes:
        return (pki / name).read_bytes()

    server = agent_factory(
        tls_cert=read("server.pem"),
        tls_key=read("server.key"),
        tls_ca=read("ca.pem"),
        health_host="127.0.0.1",
        health_port=0,
    )
    assert server.health_port and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:  # no TLS, no key, no token
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneqn.v1.Agent"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:  # the health service and nothing else
            agent_pb2_grpc.AgentStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # the main port: mTLS only
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError):
        client_factory(server, tls_ca=pki / "ca.pem", timeout=5.0).info()  # TLS without a client certificate
    client = client_factory(server, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key")
    assert client.info().agent_id == server.agent_id
    port = server.health_port
    server.stop(grace=0.1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # gone with the agent
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def _agent_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneqn.agent",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TUNEQN_AGENT_")}, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--metrics-listen", "0.0.0.0:9100"], {}, "--metrics-listen 0.0.0.0:9100: not a loopback address"),
        ([], {"TUNEQN_AGENT_METRICS_LISTEN": "192.0.2.7:9100"}, "--metrics-listen 192.0.2.7:9100: not a loopback"),
        (["--metrics-listen", "[::]:9100"], {}, "--metrics-listen [::]:9100: not a loopback address"),
        (["--health-listen", "0.0.0.0:9101"], {}, "--health-listen 0.0.0.0:9101: not a loopback address"),
        (["--health-listen", "0.0.0.0:9101", "--insecure"], {}, "--health-listen 0.0.0.0:9101: not a loopback"),
    ],
)
def test_side_listeners_off_loopback_are_refused_in_one_line(
    args: list[str], env: dict[str, str], needle: str, tmp_path: Path
) -> None:
    done = _agent_cli(tmp_path, *args, env=env)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tuneqn-agent: error: ") and needle in line, line
    if "metrics" in needle:
        assert "--metrics-public" in line
    assert not (tmp_path / "state").exists()


def test_metrics_off_loopback_with_the_explicit_flag_and_on_loopback_without(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneqn.agent import cli

    for name in [k for k in os.environ if k.startswith("TUNEQN_AGENT_")]:
        monkeypatch.delenv(name)
    for argv, env in (
        (["--metrics-listen", "0.0.0.0:9100", "--metrics-public"], "0"),
        (["--metrics-listen", "0.0.0.0:9100"], "1"),
    ):
        monkeypatch.setenv("TUNEQN_AGENT_METRICS_PUBLIC", env)
        config, _, _ = cli._validate(cli.build_parser().parse_args(argv))
        assert (config.metrics_host, config.metrics_port, config.metrics_public) == ("0.0.0.0", 9100, True)
    monkeypatch.delenv("TUNEQN_AGENT_METRICS_PUBLIC")
    for host in ("127.0.0.1", "localhost", "[::1]"):
        config, _, _ = cli._validate(cli.build_parser().parse_args(["--metrics-listen", f"{host}:0"]))
        assert not config.metrics_public and config.metrics_host == host.strip("[]")


def test_agent_server_refuses_side_listeners_off_loopback_too(tmp_path: Path) -> None:
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    for fields, needle in (
        ({"metrics_host": "0.0.0.0"}, "--metrics-public"),
        ({"health_host": "0.0.0.0"}, "--health-listen"),
    ):
        with pytest.raises(ValueError, match=needle):
            AgentServer(AgentConfig(state_dir=tmp_path / "state", **fields), [OrtBackend(DEVICE)])
    assert not (tmp_path / "state").exists()


def test_a_health_port_in_use_is_one_line_naming_the_flag_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = _agent_cli(tmp_path, "--health-listen", f"127.0.0.1:{port}")
    assert done.returncode == 2 and done.stdout == "", done.stderr  # never announced itself as listening
    (line,) = done.stderr.strip().splitlines()
    assert line == f"tuneqn-agent: error: cannot serve health: --health-listen 127.0.0.1:{port}: Address already in use"

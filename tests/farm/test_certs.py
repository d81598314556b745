"""``tuneqn certs``: the generated CA and certificates carry a real mTLS study; refusals and file modes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from helpers import write_study

from tuneqn.controller.cli import main
from tuneqn.controller.farm.client import AgentClient
from tuneqn.controller.farm.local import LocalAgent

FAST = {
    "latency_repeats": 2,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 3.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}
FILES = ("ca.pem", "ca.key", "agent.pem", "agent.key", "controller.pem", "controller.key")


def _tls_agent(state_dir: Path, pki: Path, server: str = "agent") -> LocalAgent:
    """A real agent process on 127.0.0.1:0 that demands client certificates signed by ``pki``'s CA."""
    return LocalAgent(
        state_dir,
        device_name="lab",
        extra_args=[
            "--tls-cert",
            str(pki / f"{server}.pem"),
            "--tls-key",
            str(pki / f"{server}.key"),
            "--tls-ca",
            str(pki / "ca.pem"),
        ],
    )


def _assert_refused(client: AgentClient) -> None:
    """The agent turns the client away at the TLS handshake (UNAVAILABLE); the client is closed."""
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates made by ``tuneqn certs`` with its defaults (127.0.0.1 and localhost)."""
    d = tmp_path_factory.mktemp("pki") / "certs"
    assert main(["certs", str(d)]) == 0
    return d


@pytest.mark.heavy
def test_generated_certificates_carry_an_mtls_study(tmp_path: Path, assets: Path, pki: Path) -> None:
    with _tls_agent(tmp_path / "agent", pki) as agent:
        agents = [
            {
                "address": agent.address,
                "tls_ca": str(pki / "ca.pem"),
                "tls_cert": str(pki / "controller.pem"),
                "tls_key": str(pki / "controller.key"),
            }
        ]
        study = write_study(
            tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST, agents=agents
        )
        assert main(["tune", str(study)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [d["name"] for d in report["devices"]] == ["lab"]
    assert report["candidates"] and all(r["status"] == "done" for c in report["candidates"] for r in c["results"])


def test_a_client_without_the_labs_certificate_is_refused(tmp_path: Path, pki: Path) -> None:
    other = tmp_path / "other"
    assert main(["certs", str(other)]) == 0  # another lab's CA: its controller certificate must not pass
    with _tls_agent(tmp_path / "agent", pki) as agent:
        refused = [
            AgentClient(agent.address, tls_ca=pki / "ca.pem", timeout=5.0),  # TLS but no client certificate
            AgentClient(
                agent.address,
                tls_ca=pki / "ca.pem",
                tls_cert=other / "controller.pem",
                tls_key=other / "controller.key",
                timeout=5.0,
            ),
            AgentClient(agent.address, timeout=5.0),  # plaintext
        ]
        for client in refused:
            _assert_refused(client)
        good = AgentClient(
            agent.address,
            tls_ca=pki / "ca.pem",
            tls_cert=pki / "controller.pem",
            tls_key=pki / "controller.key",
            timeout=10.0,
        )
        try:
            assert good.info().devices[0].name == "lab"
        finally:
            good.close()


def test_agent_certificate_names_the_given_hosts(tmp_path: Path, pki: Path) -> None:
    san = (
        x509.load_pem_x509_certificate((pki / "agent.pem").read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]

    # A certificate for other hosts only: the controller refuses the agent at 127.0.0.1 (hostname check).
    elsewhere = tmp_path / "elsewhere"
    assert (
        main(["certs", str(elsewhere), "--agent-host", "10.1.2.3", "--agent-host", "lab-a.example", "--days", "2"]) == 0
    )
    cert = x509.load_pem_x509_certificate((elsewhere / "agent.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["lab-a.example"]
    assert 1 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 2
    with _tls_agent(tmp_path / "agent", elsewhere) as agent:
        _assert_refused(
            AgentClient(
                agent.address,
                tls_ca=elsewhere / "ca.pem",
                tls_cert=elsewhere / "controller.pem",
                tls_key=elsewhere / "controller.key",
                timeout=5.0,
            )
        )


def test_keys_are_private_and_certificates_readable(pki: Path) -> None:
    for name in FILES:
        mode = stat.S_IMODE((pki / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    assert sorted(p.name for p in pki.iterdir()) == sorted(FILES)  # no temporary files left


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["certs", str(d)]) == 0
    before = {n: (d / n).read_bytes() for n in FILES}
    (d / "agent.key").chmod(0o644)  # --force must bring the mode back too
    capsys.readouterr()
    assert main(["certs", str(d)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ca.pem exists" in err and "--force" in err
    assert {n: (d / n).read_bytes() for n in FILES} == before

    only_one = tmp_path / "one"
    only_one.mkdir()
    (only_one / "controller.key").write_text("mine")
    assert main(["certs", str(only_one)]) == 2
    assert sorted(p.name for p in only_one.iterdir()) == ["controller.key"]  # nothing half-written
    assert (only_one / "controller.key").read_text() == "mine"

    assert main(["certs", str(d), "--force"]) == 0
    after = {n: (d / n).read_bytes() for n in FILES}
    assert all(after[n] != before[n] for n in FILES)
    assert stat.S_IMODE((d / "agent.key").stat().st_mode) == 0o600


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code, also for argparse's errors (they raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--agent-host", "not a host"], "--agent-host: 'not a host' is neither an IP address nor a DNS name"),
        (["--agent-host", "ok.example", "--agent-host=-bad-.example"], "'-bad-.example' is neither"),
        (["--agent-host", "300.1.2.3"], "'300.1.2.3' is neither"),
        (["--days", "0"], "--days: must be at least 1"),
        (["--days", "soon"], "--days: not a whole number of days"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    d = tmp_path / "certs"
    assert _exit_code(["certs", str(d), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not d.exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["certs", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err


def test_a_host_added_with_ca_from_joins_the_lab_without_new_certificates_elsewhere(
    tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ca-from: the new agent's certificate is signed by the lab's CA, so the controller's existing
    certificate reaches it and the first agent still accepts the controller; no CA key is copied."""
    added = tmp_path / "added"
    assert main(["certs", str(added), "--agent-host", "localhost", "--ca-from", str(pki)]) == 0
    assert "signed by the CA of" in capsys.readouterr().out
    assert sorted(p.name for p in added.iterdir()) == sorted(f for f in FILES if f != "ca.key")
    assert (added / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    with _tls_agent(tmp_path / "old", pki) as old, _tls_agent(tmp_path / "new", added) as new:
        port = new.address.rpartition(":")[2]
        for address, ctl in (
            (old.address, pki),
            (f"localhost:{port}", pki),
            (f"localhost:{port}", added),
            (old.address, added),
        ):
            client = AgentClient(
                address,
                tls_ca=pki / "ca.pem",
                tls_cert=ctl / "controller.pem",
                tls_key=ctl / "controller.key",
                timeout=10.0,
            )
            try:
                assert client.info().devices[0].name == "lab", (address, ctl)
            finally:
                client.close()


@pytest.mark.parametrize("case", ["missing", "itself", "wrong-key", "not-a-ca"])
def test_ca_from_that_cannot_sign_is_one_line_exit_2(
    tmp_path: Path, pki: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "out"
    if case == "missing":
        expected = "ca.pem: file not found"
    elif case == "itself":
        src, out = pki, pki
        expected = "is OUT_DIR itself"
    elif case == "wrong-key":
        other = tmp_path / "other"
        assert main(["certs", str(other)]) == 0
        (src / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
        (src / "ca.key").write_bytes((other / "ca.key").read_bytes())
        expected = "ca.key is not the key of ca.pem"
    else:
        (src / "ca.pem").write_bytes((pki / "agent.pem").read_bytes())
        (src / "ca.key").write_bytes((pki / "agent.key").read_bytes())
        expected = "not a CA certificate"
    capsys.readouterr()
    assert main(["certs", str(out), "--ca-from", str(src)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--ca-from" in err and expected in err, err
    assert case == "itself" or not out.exists()


# ------------------------------------------------------------------------- one key pair per host (--host)


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _public(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return (
        x509.load_pem_x509_certificate(path.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_each_host_gets_its_own_key_pair_and_adding_one_touches_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab"
    assert main(["certs", str(lab), "--host", "localhost", "--host", "lab-b.example,10.1.2.3"]) == 0
    out = capsys.readouterr().out
    assert "hosts/localhost" in out and "hosts/lab-b.example" in out
    assert sorted(_tree(lab)) == sorted(
        [
            "ca.pem",
            "ca.key",
            "controller.pem",
            "controller.key",
            *(f"hosts/{h}/{f}" for h in ("localhost", "lab-b.example") for f in ("agent.pem", "agent.key", "ca.pem")),
        ]
    )
    hosts = lab / "hosts"
    assert (hosts / "localhost" / "agent.key").read_bytes() != (hosts / "lab-b.example" / "agent.key").read_bytes()
    assert _public(hosts / "localhost" / "agent.pem") != _public(hosts / "lab-b.example" / "agent.pem")
    san = (
        x509.load_pem_x509_certificate((hosts / "lab-b.example" / "agent.pem").read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["lab-b.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for name in ("ca.key", "controller.key", "hosts/localhost/agent.key"):
        assert stat.S_IMODE((lab / name).stat().st_mode) == 0o600, name

    before = _tree(lab)
    mtimes = {p: (lab / p).stat().st_mtime_ns for p in before}
    assert main(["certs", str(lab), "--host", "127.0.0.1"]) == 0  # a host added later
    after = _tree(lab)
    assert {p: after[p] for p in before} == before  # CA, controller and the other hosts: byte-identical
    assert {p: (lab / p).stat().st_mtime_ns for p in before} == mtimes  # not even rewritten
    assert sorted(set(after) - set(before)) == [
        "hosts/127.0.0.1/agent.key",
        "hosts/127.0.0.1/agent.pem",
        "hosts/127.0.0.1/ca.pem",
    ]
    assert after["hosts/127.0.0.1/ca.pem"] == before["ca.pem"]
    assert len({after[f"hosts/{h}/agent.key"] for h in ("localhost", "lab-b.example", "127.0.0.1")}) == 3

    # an existing host is never overwritten silently; --force replaces that host's files only
    capsys.readouterr()
    assert main(["certs", str(lab), "--host", "localhost"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hosts/localhost/agent.pem exists" in err and "--force" in err
    assert _tree(lab) == after
    assert main(["certs", str(lab), "--host", "localhost", "--force"]) == 0
    forced = _tree(lab)
    assert forced["hosts/localhost/agent.key"] != after["hosts/localhost/agent.key"]
    assert {p: v for p, v in forced.items() if not p.startswith("hosts/localhost/")} == {
        p: v for p, v in after.items() if not p.startswith("hosts/localhost/")
    }


@pytest.mark.heavy
def test_host_keys_carry_mtls_and_one_hosts_key_cannot_pass_for_another(tmp_path: Path) -> None:
    """Both agents serve their own key; the one controller certificate reaches both; a host's
    certificate names only that host, so it is refused when dialled under another host's name."""
    lab = tmp_path / "lab"
    assert main(["certs", str(lab), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    hosts = lab / "hosts"
    with _tls_agent(tmp_path / "a", hosts / "localhost") as a, _tls_agent(tmp_path / "b", hosts / "127.0.0.1") as b:
        a_port, b_port = a.address.rpartition(":")[2], b.address.rpartition(":")[2]
        for address in (f"localhost:{a_port}", f"127.0.0.1:{b_port}"):
            client = AgentClient(
                address,
                tls_ca=lab / "ca.pem",
                tls_cert=lab / "controller.pem",
                tls_key=lab / "controller.key",
                timeout=10.0,
            )
            try:
                assert client.info().devices[0].name == "lab", address
            finally:
                client.close()
        for address in (f"127.0.0.1:{a_port}", f"localhost:{b_port}"):  # the other host's name
            _assert_refused(
                AgentClient(
                    address,
                    tls_ca=lab / "ca.pem",
                    tls_cert=lab / "controller.pem",
                    tls_key=lab / "controller.key",
                    timeout=5.0,
                )
            )
        # a host's own key is no client key: the agents turn it away
        _assert_refused(
            AgentClient(
                f"localhost:{a_port}",
                tls_ca=lab / "ca.pem",
                tls_cert=hosts / "127.0.0.1" / "agent.pem",
                tls_key=hosts / "127.0.0.1" / "agent.key",
                timeout=5.0,
            )
        )


def test_host_added_to_an_older_lab_folder_keeps_its_ca_and_controller(tmp_path: Path, pki: Path) -> None:
    lab = tmp_path / "lab"
    lab.mkdir()
    for name in FILES:
        (lab / name).write_bytes((pki / name).read_bytes())
    before = _tree(lab)
    assert main(["certs", str(lab), "--host", "localhost"]) == 0
    after = _tree(lab)
    assert {p: after[p] for p in before} == before
    issuer = x509.load_pem_x509_certificate(after["hosts/localhost/agent.pem"]).issuer
    assert issuer == x509.load_pem_x509_certificate(before["ca.pem"]).subject


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--host", "a.example", "--host", "A.example"], "--host: 'a.example' is given twice"),
        (["--host", "bad name"], "--host: 'bad name' is neither an IP address nor a DNS name"),
        (["--host", ",alias.example"], "has no host name before its aliases"),
        (["--host", "a.example", "--agent-host", "b.example"], "--agent-host: not with --host"),
        (["--host", "a.example", "--ca-from", "elsewhere"], "--ca-from: not with --host"),
        (["--host", "a.example", "--days", "0"], "--days: must be at least 1"),
    ],
)
def test_bad_host_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    d = tmp_path / "certs"
    assert _exit_code(["certs", str(d), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not d.exists()


@pytest.mark.parametrize("case", ["controller-without-ca", "controller-key-missing", "ca-key-missing"])
def test_a_broken_lab_folder_is_refused_before_writing(
    tmp_path: Path, pki: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab"
    lab.mkdir()
    keep = {
        "controller-without-ca": ["controller.pem", "controller.key"],
        "controller-key-missing": ["ca.pem", "ca.key", "controller.pem"],
        "ca-key-missing": ["ca.pem", "controller.pem", "controller.key"],
    }[case]
    for name in keep:
        (lab / name).write_bytes((pki / name).read_bytes())
    before = _tree(lab)
    assert main(["certs", str(lab), "--host", "localhost"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert _tree(lab) == before and not (lab / "hosts").exists()

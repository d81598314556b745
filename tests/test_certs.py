"""``tuneqn certs``: the generated CA and certificates carry a real mTLS study; refusals and file modes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from conftest import write_study
from tuneqn.controller.cli import main
from tuneqn.controller.farm.client import AgentClient
from tuneqn.controller.farm.local import LocalAgent

FAST = {"latency_repeats": 2, "latency_warmup": 1, "heartbeat_s": 0.5, "silent_after_s": 3.0,
        "unreachable_grace_s": 1.0, "lease_timeout_s": 10.0, "device_wait_s": 30.0}
FILES = ("ca.pem", "ca.key", "agent.pem", "agent.key", "controller.pem", "controller.key")


def _tls_agent(state_dir: Path, pki: Path, server: str = "agent") -> LocalAgent:
    """A real agent process on 127.0.0.1:0 that demands client certificates signed by ``pki``'s CA."""
    return LocalAgent(state_dir, device_name="lab", extra_args=[
        "--tls-cert", str(pki / f"{server}.pem"), "--tls-key", str(pki / f"{server}.key"),
        "--tls-ca", str(pki / "ca.pem")])


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


def test_generated_certificates_carry_an_mtls_study(tmp_path: Path, assets: Path, pki: Path) -> None:
    with _tls_agent(tmp_path / "agent", pki) as agent:
        agents = [{"address": agent.address, "tls_ca": str(pki / "ca.pem"),
                   "tls_cert": str(pki / "controller.pem"), "tls_key": str(pki / "controller.key")}]
        study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST,
                            agents=agents)
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
            AgentClient(agent.address, tls_ca=pki / "ca.pem", tls_cert=other / "controller.pem",
                        tls_key=other / "controller.key", timeout=5.0),
            AgentClient(agent.address, timeout=5.0),  # plaintext
        ]
        for client in refused:
            _assert_refused(client)
        good = AgentClient(agent.address, tls_ca=pki / "ca.pem", tls_cert=pki / "controller.pem",
                           tls_key=pki / "controller.key", timeout=10.0)
        try:
            assert good.info().devices[0].name == "lab"
        finally:
            good.close()


def test_agent_certificate_names_the_given_hosts(tmp_path: Path, pki: Path) -> None:
    san = x509.load_pem_x509_certificate((pki / "agent.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]

    # A certificate for other hosts only: the controller refuses the agent at 127.0.0.1 (hostname check).
    elsewhere = tmp_path / "elsewhere"
    assert main(["certs", str(elsewhere), "--agent-host", "10.1.2.3", "--agent-host", "lab-a.example",
                 "--days", "2"]) == 0
    cert = x509.load_pem_x509_certificate((elsewhere / "agent.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["lab-a.example"]
    assert 1 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 2
    with _tls_agent(tmp_path / "agent", elsewhere) as agent:
        _assert_refused(AgentClient(agent.address, tls_ca=elsewhere / "ca.pem", tls_cert=elsewhere / "controller.pem",
                                    tls_key=elsewhere / "controller.key", timeout=5.0))


def test_keys_are_private_and_certificates_readable(pki: Path) -> None:
    for name in FILES:
        mode = stat.S_IMODE((pki / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    assert sorted(p.name for p in pki.iterdir()) == sorted(FILES)  # no temporary files left


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
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


@pytest.mark.parametrize("argv, message", [
    (["--agent-host", "not a host"], "--agent-host: 'not a host' is neither an IP address nor a DNS name"),
    (["--agent-host", "ok.example", "--agent-host=-bad-.example"], "'-bad-.example' is neither"),
    (["--agent-host", "300.1.2.3"], "'300.1.2.3' is neither"),
    (["--days", "0"], "--days: must be at least 1"),
    (["--days", "soon"], "--days: not a whole number of days"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                      message: str) -> None:
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
        tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ca-from: the new agent's certificate is signed by the lab's CA, so the controller's existing
    certificate reaches it and the first agent still accepts the controller; no CA key is copied."""
    added = tmp_path / "added"
    assert main(["certs", str(added), "--agent-host", "localhost", "--ca-from", str(pki)]) == 0
    assert "signed by the CA of" in capsys.readouterr().out
    assert sorted(p.name for p in added.iterdir()) == sorted(f for f in FILES if f != "ca.key")
    assert (added / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    with _tls_agent(tmp_path / "old", pki) as old, _tls_agent(tmp_path / "new", added) as new:
        port = new.address.rpartition(":")[2]
        for address, ctl in ((old.address, pki), (f"localhost:{port}", pki), (f"localhost:{port}", added),
                             (old.address, added)):
            client = AgentClient(address, tls_ca=pki / "ca.pem", tls_cert=ctl / "controller.pem",
                                 tls_key=ctl / "controller.key", timeout=10.0)
            try:
                assert client.info().devices[0].name == "lab", (address, ctl)
            finally:
                client.close()


@pytest.mark.parametrize("case", ["missing", "itself", "wrong-key", "not-a-ca"])
def test_ca_from_that_cannot_sign_is_one_line_exit_2(tmp_path: Path, pki: Path, case: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
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

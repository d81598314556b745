"""The lab file (``--lab``, ``$TUNEQN_LAB``, ``~/.config/tuneqn/lab.toml``) and ``tuneqn agents``.

Real agent processes on 127.0.0.1 (one behind mutual TLS with certificates from ``tuneqn certs``),
a real study through a lab file, and a real gRPC proxy that plays an agent of an older contract.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from agent_proxy import DeviceProxy
from helpers import free_port, one_line_error, write_study

from tuneqn.controller.cli import main
from tuneqn.controller.common.errors import UserError
from tuneqn.controller.config import AgentSpec
from tuneqn.controller.farm.lab import choose_agents, load_lab
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1.contract import MIN_AGENT_REVISION

FAST = {
    "latency_repeats": 2,
    "latency_warmup": 1,
    "heartbeat_s": 0.5,
    "silent_after_s": 3.0,
    "unreachable_grace_s": 1.0,
    "lease_timeout_s": 10.0,
    "device_wait_s": 30.0,
}


def _write_lab(path: Path, agents: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps({"agents": agents}).encode())
    return path


# ----------------------------------------------------------------------------- the file


def test_lab_paths_resolve_against_the_lab_files_folder(tmp_path: Path) -> None:
    lab = _write_lab(
        tmp_path / "lab" / "lab.toml",
        [
            {
                "name": "cpu-1",
                "address": "cpu-host:50051",
                "device_class": "x86",
                "token_file": "token",
                "tls_ca": "certs/ca.pem",
                "tls_cert": "certs/controller.pem",
                "tls_key": "/abs/controller.key",
            },
            {"address": "phone-host:50051"},
        ],
    )
    cpu, phone = load_lab(lab)
    assert (cpu.name, cpu.address, cpu.device_class) == ("cpu-1", "cpu-host:50051", "x86")
    assert cpu.token_file == tmp_path / "lab" / "token" and cpu.tls_ca == tmp_path / "lab" / "certs" / "ca.pem"
    assert cpu.tls_key == Path("/abs/controller.key")
    assert (phone.name, phone.token_file, phone.tls_ca) == (None, None, None)


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (None, ("--lab", "lab file not found")),
        ("[[agents]\n", ("not valid TOML",)),
        ("agents = []\n", ("agents", "at least 1")),
        ('[[agents]]\nadress = "h:1"\n', ("agents[0].adress", "unknown key")),
        ('[[agents]]\nname = "x"\n', ("agents[0].address", "missing")),
        (
            '[[agents]]\naddress = "h:1"\n[[agents]]\naddress = "h:1"\n',
            ("agents[1].address: h:1 is listed twice (agents[0])",),
        ),
    ],
)
def test_bad_lab_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, parts: tuple[str, ...]
) -> None:
    lab = tmp_path / "lab.toml"
    if content is not None:
        lab.write_text(content)
    rc = main(["agents", "--lab", str(lab)])
    one_line_error(rc, capsys.readouterr().err, *parts)


def test_missing_tls_file_of_a_lab_agent_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = _write_lab(tmp_path / "lab.toml", [{"address": "127.0.0.1:1", "tls_ca": "nope/ca.pem"}])
    rc = main(["agents", "--lab", str(lab)])
    one_line_error(rc, capsys.readouterr().err, f"{lab}: agents[0].tls_ca", "file not found", "nope/ca.pem")
    lab = _write_lab(tmp_path / "lab.toml", [{"address": "127.0.0.1:1", "tls_cert": str(lab)}])
    rc = main(["agents", "--lab", str(lab)])
    one_line_error(rc, capsys.readouterr().err, "tls_cert and tls_key go together")


def test_which_agents_a_command_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--agent, then --lab, then the study's [[agents]], then $TUNEQN_LAB / the user's lab file (not with --no-lab)."""
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("TUNEQN_LAB", raising=False)
    given = _write_lab(tmp_path / "given.toml", [{"address": "given:1"}])
    study = [AgentSpec(address="study:1")]

    def addresses(*args: Any, **kwargs: Any) -> list[str]:
        return [a.address for a in choose_agents(*args, **kwargs).agents]

    assert addresses([], None, None) == []  # nothing anywhere: `tune` starts a local agent
    user = _write_lab(xdg / "tuneqn" / "lab.toml", [{"address": "user:1"}])
    assert addresses([], None, None) == ["user:1"]
    assert choose_agents([], None, None).origin == f"lab file {user}"
    assert addresses([], None, None, no_lab=True) == []
    assert addresses(study, None, None) == ["study:1"]  # a study's own agents beat the default lab
    assert addresses(study, None, str(given)) == ["given:1"]  # --lab beats the study's
    assert addresses(study, ["flag:1"], str(given)) == ["flag:1"]  # --agent beats everything
    env = _write_lab(tmp_path / "env.toml", [{"address": "env:1"}])
    monkeypatch.setenv("TUNEQN_LAB", str(env))
    assert addresses([], None, None) == ["env:1"]
    monkeypatch.setenv("TUNEQN_LAB", str(tmp_path / "gone.toml"))
    with pytest.raises(UserError, match="TUNEQN_LAB: lab file not found"):
        choose_agents([], None, None)


# ----------------------------------------------------------------------------- tuneqn agents


def test_agents_shows_each_agent_of_the_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reachable or not, contract, devices, queue, blob cache use, job counts, last error (table and JSON)."""
    down = f"127.0.0.1:{free_port()}"
    with LocalAgent(
        tmp_path / "agent", device_name="cpu-1", extra_args=["--device-class", "x86", "--simulated-latency-ms", "0"]
    ) as agent:
        lab = _write_lab(
            tmp_path / "lab.toml",
            [
                {"name": "cpu-host", "address": agent.address, "device_class": "x86"},
                {"name": "pixel", "address": down, "device_class": "pixel7"},
            ],
        )
        rc = main(["agents", "--lab", str(lab), "--json", "--timeout", "3"])
        data = json.loads(capsys.readouterr().out)
        rc_table = main(["agents", "--lab", str(lab), "--timeout", "3"])
        table = capsys.readouterr().out
    assert rc == rc_table == 1  # one agent is unreachable
    assert data["source"] == f"lab file {lab}"
    up, gone = data["agents"]
    assert (up["name"], up["reachable"], up["serving"], up["problem"]) == ("cpu-host", True, True, "")
    assert up["contract_ok"] and up["contract"].startswith("tuneqn.v1 r")
    assert [(d["name"], d["device_class"], d["backend"], d["healthy"]) for d in up["devices"]] == [
        ("cpu-1", "x86", "ort", True)
    ]
    assert up["queue_length"] == 0 and up["caches"][0]["name"] == "blobs" and up["caches"][0]["limit_bytes"] > 0
    assert up["jobs_by_state"] == {} and up["last_failure"] is None
    assert (gone["name"], gone["reachable"], gone["declared_class"]) == ("pixel", False, "pixel7")
    assert gone["problem"].startswith("unreachable")
    for text in (
        "cpu-host",
        "serving",
        "cpu-1",
        "x86",
        "ort",
        "blobs",
        "pixel",
        "UNREACHABLE",
        "pixel7 (lab)",
        "1 of 2 agents unreachable",
        "docs/lab.md",
    ):
        assert text in table, text


def test_agents_tells_an_older_agent_from_an_unusable_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def revision(n: int) -> Any:
        def rewrite(info: pb.AgentInfo) -> pb.AgentInfo:
            info.contract_revision = n
            for name in ("caches", "jobs_by_state"):
                info.ClearField(name)
            return info

        return rewrite

    with LocalAgent(tmp_path / "agent", device_name="old") as agent, DeviceProxy(agent.address) as proxy:
        proxy.rewrite_info = revision(MIN_AGENT_REVISION)
        assert main(["agents", "--agent", proxy.address, "--json"]) == 0  # older but usable: studies run on it
        (older,) = json.loads(capsys.readouterr().out)["agents"]
        assert older["contract_ok"] and not older["problem"] and older["caches"] == []
        assert any("no cache or failure figures" in n for n in older["notes"])
        proxy.rewrite_info = revision(MIN_AGENT_REVISION - 1)
        assert main(["agents", "--agent", proxy.address, "--json"]) == 1
        (old,) = json.loads(capsys.readouterr().out)["agents"]
        assert old["reachable"] and not old["contract_ok"]
        assert "upgrade the agent" in old["problem"] and f"needs {MIN_AGENT_REVISION}" in old["problem"]


@pytest.mark.heavy
def test_a_study_and_agents_share_one_lab_file_over_mtls(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lab file (relative TLS and token paths) carries a whole study; `tuneqn agents` then shows its jobs."""
    labdir = tmp_path / "lab"
    assert main(["certs", str(labdir / "certs")]) == 0
    (labdir / "token").write_text("s3cret-lab-token\n")
    capsys.readouterr()
    pki = labdir / "certs"
    with LocalAgent(
        tmp_path / "agent",
        device_name="cpu-1",
        extra_args=[
            "--device-class",
            "x86",
            "--token-file",
            str(labdir / "token"),
            "--tls-cert",
            str(pki / "agent.pem"),
            "--tls-key",
            str(pki / "agent.key"),
            "--tls-ca",
            str(pki / "ca.pem"),
        ],
    ) as agent:
        lab = _write_lab(
            labdir / "lab.toml",
            [
                {
                    "name": "cpu-host",
                    "address": agent.address,
                    "device_class": "x86",
                    "token_file": "token",
                    "tls_ca": "certs/ca.pem",
                    "tls_cert": "certs/controller.pem",
                    "tls_key": "certs/controller.key",
                }
            ],
        )
        study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST)
        assert main(["tune", str(study), "--lab", str(lab)]) == 0
        assert f"agents: 1 from lab file {lab}" in capsys.readouterr().out
        assert main(["agents", "--lab", str(lab), "--json"]) == 0
        (shown,) = json.loads(capsys.readouterr().out)["agents"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [d["name"] for d in report["devices"]] == ["x86"]  # devices are reported by class
    jobs = sqlite3.connect(tmp_path / "out" / "tuneqn.db").execute("select state, count(*) from jobs group by state")
    done = dict(jobs.fetchall())
    assert set(done) == {"done"} and shown["jobs_by_state"] == {"SUCCEEDED": done["done"]}
    blobs = shown["caches"][0]
    assert blobs["entries"] >= 2 and blobs["used_bytes"] > 0
    assert not (tmp_path / "out" / "agents").exists()  # no local agent was started


@pytest.mark.heavy
def test_a_study_measures_only_on_the_device_classes_it_names(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One lab, many studies: --device-class picks the lab's devices; a class nobody serves is exit 2 at once."""
    with (
        LocalAgent(tmp_path / "a", device_name="cpu-1", extra_args=["--device-class", "x86"]) as x86,
        LocalAgent(tmp_path / "b", device_name="arm-1", extra_args=["--device-class", "arm"]) as arm,
    ):
        lab = _write_lab(
            tmp_path / "lab.toml",
            [{"address": x86.address, "device_class": "x86"}, {"address": arm.address, "device_class": "arm"}],
        )
        study = write_study(tmp_path, model=assets / "cnn.onnx", images=assets / "images", evaluation=FAST)
        rc = main(["tune", str(study), "--lab", str(lab), "--device-class", "amr"])
        one_line_error(rc, capsys.readouterr().err, "--device-class", "amr", "its classes: arm, x86")
        assert not (tmp_path / "out" / "tuneqn.db").exists()  # nothing half-written
        assert main(["tune", str(study), "--lab", str(lab), "--device-class", "arm"]) == 0
        x86_jobs = sqlite3.connect(x86.state_dir / "agent.db").execute("select count(*) from jobs").fetchone()[0]
        arm_jobs = sqlite3.connect(arm.state_dir / "agent.db").execute("select count(*) from jobs").fetchone()[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [d["name"] for d in report["devices"]] == ["arm"]
    assert x86_jobs == 0 and arm_jobs > 0


def test_the_loopback_walkthrough_of_docs_lab_md_matches_examples_lab() -> None:
    """docs/lab.md's "Try it on loopback" starts the agents that examples/lab/lab.toml lists, with its classes."""
    import re

    from tuneqn.controller.config import load_config

    root = Path(__file__).resolve().parents[2]
    agents = load_lab(root / "examples" / "lab" / "lab.toml")
    doc = (root / "docs" / "lab.md").read_text()
    walk = doc[doc.index("## Try it on loopback") :]
    started = dict(re.findall(r"tuneqn-agent --listen (\S+) .*?--device-class (\S+)", walk, flags=re.S))
    assert {a.address: a.device_class for a in agents} == started
    assert {a.tls_cert.name for a in agents} == {"controller.pem"} and "tuneqn certs certs" in walk
    cfg = load_config(root / "examples" / "lab" / "study.toml")
    assert cfg.models[0].path.resolve() == (root / "examples" / "lite0" / "work" / "model.onnx").resolve()


@pytest.mark.heavy
def test_agents_names_the_likely_fix_when_tls_or_the_token_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", str(tmp_path / "pki")]) == 0
    assert main(["certs", str(tmp_path / "other")]) == 0
    (tmp_path / "token").write_text("right\n")
    (tmp_path / "wrong").write_text("wrong\n")
    capsys.readouterr()
    pki, other = tmp_path / "pki", tmp_path / "other"
    mtls_args = [
        "--tls-cert",
        str(pki / "agent.pem"),
        "--tls-key",
        str(pki / "agent.key"),
        "--tls-ca",
        str(pki / "ca.pem"),
    ]
    with (
        LocalAgent(tmp_path / "mtls", device_name="m", extra_args=mtls_args) as mtls,
        LocalAgent(tmp_path / "mtls2", device_name="m2", extra_args=mtls_args) as mtls2,
        LocalAgent(tmp_path / "tok", device_name="t", extra_args=["--token-file", str(tmp_path / "token")]) as tok,
    ):
        port = mtls.address.rpartition(":")[2]
        cases = {
            "no client certificate": (
                {"address": mtls.address, "tls_ca": str(pki / "ca.pem")},
                "wants a client certificate",
            ),
            "another lab's CA": (
                {
                    "address": f"localhost:{port}",
                    "tls_ca": str(other / "ca.pem"),
                    "tls_cert": str(pki / "controller.pem"),
                    "tls_key": str(pki / "controller.key"),
                },
                "TLS handshake failed",
            ),
            "plaintext to TLS": ({"address": mtls2.address}, "if it serves TLS, give tls_ca"),
            "wrong token": ({"address": tok.address, "token_file": str(tmp_path / "wrong")}, "check token_file"),
        }
        lab = _write_lab(tmp_path / "lab.toml", [{"name": name, **agent} for name, (agent, _) in cases.items()])
        assert main(["agents", "--lab", str(lab), "--json"]) == 1
        shown = {a["name"]: a["problem"] for a in json.loads(capsys.readouterr().out)["agents"]}
    for name, (_, fix) in cases.items():
        assert fix in shown[name], (name, shown[name])

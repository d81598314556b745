"""deploy/: the systemd units and container images start an agent that answers gRPC health.

The agent is started exactly as the unit's ExecStart / the image's ENTRYPOINT would (same
arguments, same environment, systemd specifiers expanded to tmp dirs); only the install
location of the program (``/opt/tuneqn/bin`` in the unit, PATH in the image) points at this
checkout's venv, and the listen address is ``127.0.0.1:0`` through ``TUNEQN_AGENT_LISTEN``.
The compose lab's agent runs with mTLS from certificates made as its ``certs`` service makes
them (the ``/certs`` volume moved to a tmp dir), and the image's HEALTHCHECK probe runs with the
container's environment.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
CONTAINER = ROOT / "deploy" / "container"
VENV_BIN = Path(sys.executable).parent
INSTALL_BIN = "/opt/tuneqn/bin/"  # where the units expect the venv (deploy/systemd/*.service)
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's default PATH
READY_TIMEOUT = 60.0
LOOPBACK_ANY = "127.0.0.1:0"


# ------------------------------------------------------------------------------ systemd units


def unit_settings(path: Path, section: str = "Service") -> list[tuple[str, str]]:
    """``(key, value)`` pairs of one section of a unit file, in order."""
    pairs: list[tuple[str, str]] = []
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == section:
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {raw!r}")
            pairs.append((key.strip(), value.strip()))
    return pairs


def expand_specifiers(text: str, specifiers: dict[str, str]) -> str:
    """Replace systemd ``%X`` specifiers (``%%`` is a literal ``%``)."""

    def one(m: re.Match[str]) -> str:
        letter = m.group(1)
        if letter == "%":
            return "%"
        if letter not in specifiers:
            raise ValueError(f"specifier %{letter} not handled by this test")
        return specifiers[letter]

    return re.sub(r"%(.)", one, text)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an EnvironmentFile (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_command(
    unit: Path, specifiers: dict[str, str], env_files: dict[str, Path], base_env: dict[str, str]
) -> tuple[list[str], dict[str, str], str | None]:
    """The ExecStart argv, environment and working directory systemd would use.

    ``env_files`` maps the unit's EnvironmentFile paths to local files; an EnvironmentFile
    with a ``-`` prefix that is not mapped is skipped (as systemd skips a missing one).
    """
    settings = unit_settings(unit)
    env = dict(base_env)
    for key, value in settings:
        if key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = expand_specifiers(val, specifiers)
    for key, value in settings:  # EnvironmentFile= overrides Environment=
        if key == "EnvironmentFile":
            optional = value.startswith("-")
            path = expand_specifiers(value.lstrip("-"), specifiers)
            if path in env_files:
                env.update(read_env_file(env_files[path]))
            elif not optional:
                raise ValueError(f"{unit.name}: EnvironmentFile {path} is not mapped by the test")
    (exec_start,) = [value for key, value in settings if key == "ExecStart"]
    argv = []
    for word in shlex.split(expand_specifiers(exec_start.lstrip("@-:+!"), specifiers)):
        # ${VAR} is one word; $VAR would be split at whitespace (not used by our units)
        argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    workdir = [expand_specifiers(v, specifiers) for k, v in settings if k == "WorkingDirectory"]
    return argv, env, workdir[-1] if workdir else None


def local_program(argv: list[str]) -> list[str]:
    """The unit's argv with its /opt/tuneqn/bin program taken from this checkout's venv."""
    program = argv[0]
    assert program.startswith(INSTALL_BIN), program
    return [str(VENV_BIN / program[len(INSTALL_BIN) :]), *argv[1:]]


@pytest.mark.parametrize("unit", ["tuneqn-agent.service", "tvm-rpc-tracker.service"])
def test_systemd_analyze_verify_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at this venv (the only change)
    text = (SYSTEMD / unit).read_text()
    assert INSTALL_BIN in text
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALL_BIN, f"{VENV_BIN}/"))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (proc.stdout + proc.stderr).splitlines() if unit in line]
    assert proc.returncode == 0 and not about_unit, proc.stdout + proc.stderr


def test_agent_unit_runs_the_agent_from_its_env_file(tmp_path: Path) -> None:
    unit = SYSTEMD / "tuneqn-agent.service"
    keys = [key for key, _ in unit_settings(unit)]
    for needed in (
        "User",
        "StateDirectory",
        "CacheDirectory",
        "EnvironmentFile",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
    ):
        assert needed in keys, needed
    assert ("Restart", "on-failure") in unit_settings(unit)

    env_file = tmp_path / "agent.env"
    example = read_env_file(SYSTEMD / "agent.env.example")
    env_file.write_text(
        (SYSTEMD / "agent.env.example")
        .read_text()
        .replace(f"TUNEQN_AGENT_LISTEN={example['TUNEQN_AGENT_LISTEN']}", f"TUNEQN_AGENT_LISTEN={LOOPBACK_ANY}")
    )
    state, cache = tmp_path / "var-lib", tmp_path / "var-cache"
    (state / "tuneqn-agent").mkdir(parents=True)  # what StateDirectory=/CacheDirectory= create
    (cache / "tuneqn-agent").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    argv, env, workdir = unit_command(
        unit,
        {"S": str(state), "C": str(cache)},
        {"/etc/tuneqn/agent.env": env_file},
        {"PATH": SYSTEMD_PATH, "HOME": str(home), "LANG": "C.UTF-8"},
    )
    assert env["TUNEQN_AGENT_LISTEN"] == LOOPBACK_ANY
    agent = start(local_program(argv), env, workdir, tmp_path / "unit-agent.log")
    assert_serving(agent)
    assert (state / "tuneqn-agent" / "agent.db").is_file()  # the unit's state dir is the agent's
    assert stop(agent) == 0  # KillSignal=SIGTERM: graceful


@pytest.mark.heavy
def test_tracker_unit_starts_a_tvm_tracker(tmp_path: Path) -> None:
    pytest.importorskip("tvm", reason="the TVM tracker needs the tuneqn[tvm] extra")
    from tvm import rpc

    port = free_port()
    tracker_env = tmp_path / "tracker.env"
    tracker_env.write_text(f"TVM_TRACKER_HOST=127.0.0.1\nTVM_TRACKER_PORT={port}\nTVM_TRACKER_PORT_END={port + 1}\n")
    cache = tmp_path / "var-cache"
    argv, env, workdir = unit_command(
        SYSTEMD / "tvm-rpc-tracker.service",
        {"C": str(cache)},
        {"/etc/tuneqn/tracker.env": tracker_env},
        # + the tests' PYTHONPATH (tests/no_torch): TVM without torch, as in /opt/tuneqn (tuneqn[tvm] installs none);
        # here torch is installed for the example only, and tvm_ffi would import it in the tracker and its worker
        {"PATH": SYSTEMD_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": os.environ["PYTHONPATH"]},
    )
    assert argv[1:3] == ["-m", "tvm.exec.rpc_tracker"] and f"{port}" in argv
    log = tmp_path / "tracker.log"
    with open(log, "wb") as out:  # its own process group, as systemd gives the unit its own cgroup
        proc = subprocess.Popen(
            local_program(argv),
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        summary = wait_for(lambda: tracker_summary(rpc, port), f"tracker on port {port}", proc, log)
        assert "queue_info" in summary
    finally:
        # systemd stops every process of the unit (KillMode=control-group): the tracker runs in a TVM
        # popen worker that outlives a SIGTERM to its parent alone.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=READY_TIMEOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for processes to exit (a condition with a deadline)
        assert not group_alive(proc.pid), "a tracker process outlived the stop"


# ------------------------------------------------------------------------------ containers


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    if pending:
        raise ValueError(f"{path}: ends inside a continued instruction")
    return instructions


DOCKERFILE_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "ADD",
    "USER",
    "WORKDIR",
    "ENV",
    "VOLUME",
    "EXPOSE",
    "STOPSIGNAL",
    "ENTRYPOINT",
    "CMD",
    "LABEL",
    "HEALTHCHECK",
    "SHELL",
}


def image_config(path: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """ENTRYPOINT, CMD and ENV of the image's last stage (ARG defaults substituted)."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    for word, rest in dockerfile(path):
        if word not in DOCKERFILE_INSTRUCTIONS:
            raise ValueError(f"{path}: unknown instruction {word}")
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "ENV":
            for assignment in shlex.split(rest):
                name, sep, value = assignment.partition("=")
                if not sep:
                    raise ValueError(f"{path}: ENV without '=': {rest!r}")
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: {**args, **env}[m.group(1)], value)
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)  # exec form: no shell between the engine and the agent
        elif word == "CMD":
            cmd = json.loads(rest)
    return entrypoint, cmd, env


def compose_file() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: compose.yaml not parsed")
    return yaml.safe_load((CONTAINER / "compose.yaml").read_text())


def healthcheck(path: Path) -> list[str]:
    """The exec-form command of the image's HEALTHCHECK (options before CMD skipped)."""
    (rest,) = [rest for word, rest in dockerfile(path) if word == "HEALTHCHECK"]
    options, sep, command = rest.partition("CMD ")
    assert sep and all(o.startswith("--") for o in options.split()), rest
    return json.loads(command)


def test_dockerfiles_parse() -> None:
    entrypoint, cmd, env = image_config(CONTAINER / "Dockerfile.agent")
    assert entrypoint == ["tuneqn-agent"] and cmd == []
    assert healthcheck(CONTAINER / "Dockerfile.agent") == ["python", "-m", "tuneqn.agent.probe"]
    assert env["TUNEQN_AGENT_BACKEND"] == "ort"  # the default build arg
    assert image_config(CONTAINER / "Dockerfile.controller")[0] == ["tuneqn"]
    for name in ("Dockerfile.agent", "Dockerfile.controller"):
        copied = [rest.split()[0] for word, rest in dockerfile(CONTAINER / name) if word == "COPY"]
        for source in copied:
            assert (ROOT / source).exists(), f"{name} copies missing {source}"


def test_compose_file_parses() -> None:
    compose = compose_file()
    services = compose["services"]
    assert {"controller", "agent-cpu", "agent-phone", "tracker", "phone"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (CONTAINER / build["context"] / build["dockerfile"]).is_file(), name
    assert services["agent-phone"]["environment"]["TUNEQN_AGENT_TVM_TRACKER"] == "tracker:9190"


AGENT_SERVICES = ("agent-cpu", "agent-phone")
TLS_ENV = {
    "TUNEQN_AGENT_TLS_CERT": "/tls/agent.pem",
    "TUNEQN_AGENT_TLS_KEY": "/tls/agent.key",
    "TUNEQN_AGENT_TLS_CA": "/tls/ca.pem",
}
HOST_FILES = ["agent.key", "agent.pem", "ca.pem"]


def named_mounts(service: dict) -> dict[str, str]:
    """Container path -> named volume of a compose service (bind mounts such as ./lab.toml left out)."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if not source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def run_certs_service(compose: dict, root: Path) -> dict[str, Path]:
    """Run the certs service's script as compose would, each named volume a folder under ``root``
    (volume name -> folder). Only its last line, the chown to the images' user (root only), is
    checked and left out."""
    certs = compose["services"]["certs"]
    mounts = named_mounts(certs)
    (script,) = certs["command"]
    lines = script.strip().splitlines()
    assert lines[-1] == "chown -R 10001:10001 /tls", lines[-1]
    pattern = re.compile("|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True)) + r"(?=/|\s|$)")
    body = pattern.sub(lambda m: str(root / mounts[m.group(0)]), "\n".join(lines[:-1]))
    volumes = {name: root / name for name in mounts.values()}
    for folder in volumes.values():
        folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["sh", "-c", body],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(root)},
    )
    assert done.returncode == 0, done.stderr
    return volumes


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compose_lab_runs_mtls_from_a_one_shot_certs_service() -> None:
    compose = compose_file()
    services = compose["services"]
    certs = services["certs"]
    assert certs["build"]["dockerfile"] == "deploy/container/Dockerfile.controller"
    assert set(named_mounts(certs).values()) <= set(compose["volumes"])
    (script,) = certs["command"]
    made = [shlex.split(line.partition("||")[2]) for line in script.splitlines() if "tuneqn certs" in line]
    # one key pair per agent, each made only when missing (later runs keep every file)
    assert sorted(words[words.index("--host") + 1] for words in made) == sorted(AGENT_SERVICES)
    assert all("--force" not in words for words in made)
    for name in AGENT_SERVICES:
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items()}
        assert not any(k == "TUNEQN_AGENT_INSECURE" for k in env), name
        assert {k: env.get(k) for k in TLS_ENV} == TLS_ENV, name
        assert f"{name}-tls:/tls:ro" in service["volumes"], name
        assert service["depends_on"]["certs"] == {"condition": "service_completed_successfully"}, name
    assert not any("TUNEQN_AGENT_INSECURE" in (s.get("environment") or {}) for s in services.values())
    for name in ("tracker", "phone"):  # the agent image's HEALTHCHECK does not fit these
        assert services[name]["healthcheck"] == {"disable": True}, name
    controller = services["controller"]
    assert controller["command"] == ["agents", "--lab", "/etc/tuneqn/lab.toml"]
    assert "./lab.toml:/etc/tuneqn/lab.toml:ro" in controller["volumes"]
    assert "controller-tls:/tls:ro" in controller["volumes"]
    assert controller["depends_on"]["certs"] == {"condition": "service_completed_successfully"}


def test_compose_agents_hold_their_own_key_only_never_the_controllers(tmp_path: Path) -> None:
    """The certs service runs for real (volumes as tmp folders); each agent container then sees
    exactly its own agent.pem/agent.key (a certificate for its service name) and ca.pem: no
    controller key, no CA key, no other agent's key, and no probe setting that names a client key."""
    from cryptography import x509

    compose = compose_file()
    services = compose["services"]
    volumes = run_certs_service(compose, tmp_path / "volumes")
    pki = volumes["pki"]
    secret = {"controller.key": (pki / "controller.key").read_bytes(), "ca.key": (pki / "ca.key").read_bytes()}
    controller_mounts = named_mounts(services["controller"])
    assert sorted(tree(volumes[controller_mounts["/tls"]])) == ["ca.pem", "controller.key", "controller.pem"]
    keys: dict[str, bytes] = {}
    for name in AGENT_SERVICES:
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items()}
        assert not [k for k in env if k.startswith("TUNEQN_PROBE_")], name
        assert not [v for v in env.values() if "controller" in v or "ca.key" in v], name
        mounts = named_mounts(service)
        assert "pki" not in mounts.values() and not set(mounts.values()) & set(controller_mounts.values()), name
        seen = {
            f"{target}/{rel}": data
            for target, volume in mounts.items()
            if volume in volumes
            for rel, data in tree(volumes[volume]).items()
        }
        assert sorted(seen) == [f"/tls/{f}" for f in HOST_FILES], name
        assert not set(seen.values()) & set(secret.values()), name
        assert stat.S_IMODE((volumes[mounts["/tls"]] / "agent.key").stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(seen["/tls/agent.pem"])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert seen["/tls/ca.pem"] == (pki / "ca.pem").read_bytes()
        keys[name] = seen["/tls/agent.key"]
    assert len(set(keys.values())) == len(AGENT_SERVICES)  # one key pair per agent

    before = {name: tree(folder) for name, folder in volumes.items()}
    run_certs_service(compose, tmp_path / "volumes")  # a later `docker compose up`: nothing changes
    assert {name: tree(folder) for name, folder in volumes.items()} == before


def test_compose_lab_file_names_the_compose_agents() -> None:
    import tomllib

    from tuneqn.controller.farm.certs import LAB_FILES
    from tuneqn.controller.farm.lab import load_lab

    compose = compose_file()
    lab = tomllib.loads((CONTAINER / "lab.toml").read_text())
    agents = lab["agents"]
    assert [a.address for a in load_lab(CONTAINER / "lab.toml")] == [a["address"] for a in agents]  # the real reader
    _, _, image_env = image_config(CONTAINER / "Dockerfile.agent")
    agent_port = image_env["TUNEQN_AGENT_LISTEN"].rpartition(":")[2]
    assert sorted(a["address"] for a in agents) == sorted(f"{s}:{agent_port}" for s in AGENT_SERVICES)
    assert named_mounts(compose["services"]["controller"])["/tls"] == "controller-tls"
    for agent in agents:
        service = compose["services"][agent["address"].rpartition(":")[0]]
        env = service["environment"]
        assert agent["name"] == env["TUNEQN_AGENT_DEVICE_NAME"]
        assert agent["device_class"] == env["TUNEQN_AGENT_DEVICE_CLASS"]
        assert (agent["tls_ca"], agent["tls_cert"], agent["tls_key"]) == (
            "/tls/ca.pem",
            "/tls/controller.pem",
            "/tls/controller.key",
        )
        assert {Path(agent[k]).name for k in ("tls_ca", "tls_cert", "tls_key")} <= set(LAB_FILES)


@pytest.mark.heavy
@pytest.mark.parametrize("service", [None, "agent-cpu"])
def test_agent_image_entrypoint_answers_health(service: str | None, tmp_path: Path) -> None:
    entrypoint, cmd, image_env = image_config(CONTAINER / "Dockerfile.agent")
    assert is_loopback_listen(image_env["TUNEQN_AGENT_HEALTH_LISTEN"])
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", **image_env}
    if service is not None:  # the compose service's environment on top of the image's
        compose = compose_file()
        env.update({k: str(v) for k, v in compose["services"][service]["environment"].items()})
        # its /tls volume, filled by the certs service as compose runs it, mounted at a tmp dir
        volumes = run_certs_service(compose, tmp_path / "volumes")
        tls = volumes[named_mounts(compose["services"][service])["/tls"]]
        env = {k: v.replace("/tls/", f"{tls}/") if v.startswith("/tls/") else v for k, v in env.items()}
    # the image's state volume, listen and health addresses, moved to tmp and free loopback ports
    env["TUNEQN_AGENT_STATE_DIR"] = str(tmp_path / "state")
    env["TUNEQN_AGENT_LISTEN"] = LOOPBACK_ANY
    env["TUNEQN_AGENT_HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
    agent = start([*entrypoint, *cmd], env, str(tmp_path), tmp_path / "image-agent.log")
    if service is None:
        assert_serving(agent)
    # the image's HEALTHCHECK, with the container's environment: no client key anywhere
    probe = healthcheck(CONTAINER / "Dockerfile.agent")
    assert probe[0] == "python"
    assert not [k for k in env if k.startswith("TUNEQN_PROBE_")]
    port = agent.address.rpartition(":")[2]
    check = subprocess.run(
        [sys.executable, *probe[1:]],
        env={**env, "TUNEQN_AGENT_LISTEN": f"0.0.0.0:{port}"},
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert check.returncode == 0, check.stderr
    if service is not None:  # mTLS on the agent's port: a plaintext probe there is refused
        refused = subprocess.run(
            [sys.executable, *probe[1:], "--timeout", "10", f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert refused.returncode == 1, refused.stderr
    assert (tmp_path / "state" / "agent.db").is_file()
    assert stop(agent) == 0  # STOPSIGNAL SIGTERM


def is_loopback_listen(text: str) -> bool:
    from tuneqn.agent.config import is_loopback

    return is_loopback(text.rpartition(":")[0].strip("[]"))


def test_agent_image_refuses_to_listen_off_loopback_without_tls(tmp_path: Path) -> None:
    entrypoint, cmd, image_env = image_config(CONTAINER / "Dockerfile.agent")
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        **image_env,
        "TUNEQN_AGENT_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run(
        [*entrypoint, *cmd], env=env, capture_output=True, text=True, timeout=READY_TIMEOUT, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    assert "refusing to listen on non-loopback 0.0.0.0:50051" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ helpers


class Started:
    """An agent process and the address of its readiness line."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
        self.proc, self.address, self.log = proc, address, log


def group_alive(pgid: int) -> bool:
    """Whether a process group still has running members (zombies aside), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def start(argv: list[str], env: dict[str, str], cwd: str | None, log: Path) -> Started:
    """Start the agent like the service manager does (stdin /dev/null) and read its ready line."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=READY_TIMEOUT).decode().strip()
    except queue.Empty:
        proc.kill()
        proc.wait()
        pytest.fail(f"agent not ready in {READY_TIMEOUT} s: {log.read_text()}")
    prefix = "tuneqn-agent listening on "
    if not line.startswith(prefix):
        proc.kill()
        proc.wait()
        pytest.fail(f"unexpected agent output {line!r} (exit {proc.returncode}): {log.read_text()}")
    return Started(proc, line[len(prefix) :], log)


def stop(agent: Started) -> int:
    """SIGTERM the agent; its exit code."""
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(timeout=READY_TIMEOUT)
    if agent.proc.stdout is not None:
        agent.proc.stdout.close()
    return code


def assert_serving(agent: Started) -> None:
    """The standard gRPC health service says SERVING for the server and the agent service."""
    try:
        with grpc.insecure_channel(agent.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tuneqn.v1.Agent"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10, wait_for_ready=True)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    except BaseException:
        agent.proc.kill()
        agent.proc.wait()
        raise


def tracker_summary(rpc: object, port: int) -> dict | None:
    """The tracker's summary, or None while it does not answer yet."""
    try:
        return rpc.connect_tracker("127.0.0.1", port).summary()  # type: ignore[attr-defined]
    except (OSError, RuntimeError, ValueError):
        return None


def wait_for(probe, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = READY_TIMEOUT):  # type: ignore[no-untyped-def]
    """Poll ``probe`` until it returns something; fail if the process exits or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        if proc.poll() is not None:
            pytest.fail(f"{what}: exited {proc.returncode}: {log.read_text()}")
        threading.Event().wait(0.1)
    pytest.fail(f"{what}: no answer in {timeout} s: {log.read_text()}")

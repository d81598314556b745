"""The lab file: a lab's agents listed once, for every study and ``tuneqn agents``.

A lab file is TOML with one ``[[agents]]`` table per agent, the same keys as a study's
``[[agents]]`` plus an optional ``name``::

    [[agents]]
    name = "pixel-7"                 # label shown by `tuneqn agents` (default: the address)
    address = "phone-host.lab:50051"
    device_class = "pixel7"          # the class it serves: its jobs are planned even while it is down
    token_file = "token"             # relative paths resolve against the lab file's folder
    tls_ca = "certs/ca.pem"
    tls_cert = "certs/controller.pem"
    tls_key = "certs/controller.key"

Which agents a command uses, first match wins: ``--agent`` flags; ``--lab FILE``; the
study's own ``[[agents]]``; the default lab file (``$TUNEQN_LAB``, else
``$XDG_CONFIG_HOME/tuneqn/lab.toml`` or ``~/.config/tuneqn/lab.toml`` when it exists)
unless ``--no-lab``; else ``tuneqn tune`` starts a local agent.
"""

from __future__ import annotations

import logging
import os
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
from pydantic import Field, ValidationError

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import read_user_file
from tuneqn.controller.config import AgentSpec, _Strict, format_validation_error, resolve_agent_paths
from tuneqn.controller.farm.auth import read_token
from tuneqn.controller.farm.client import ContractMismatch
from tuneqn.controller.farm.jobs import Endpoint
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1.contract import CONTRACT_REVISION, MIN_AGENT_REVISION

log = logging.getLogger(__name__)

ENV_VAR = "TUNEQN_LAB"


class LabFile(_Strict):
    """The contents of a lab file."""

    agents: Annotated[list[AgentSpec], Field(min_length=1)]

    def repeated(self) -> str | None:
        """``agents[j].KEY: VALUE is listed twice (agents[i])`` for a repeated address or name, else None."""
        for key in ("address", "name"):
            seen: dict[str, int] = {}
            for j, agent in enumerate(self.agents):
                value = getattr(agent, key)
                if value is None:
                    continue
                if value in seen:
                    return f"agents[{j}].{key}: {value} is listed twice (agents[{seen[value]}])"
                seen[value] = j
        return None


@dataclass(frozen=True)
class AgentSource:
    """The agents a command uses and where they came from (for messages)."""

    agents: list[AgentSpec]
    origin: str  # "--agent", "lab file PATH", "STUDY's [[agents]]", "" (none)
    where: str = "agents"  # how errors name the list: "--agent", "LAB.toml: agents", "agents"


def user_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/tuneqn`` (default ``~/.config/tuneqn``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "tuneqn"


def default_lab_path() -> Path | None:
    """The default lab file: ``$TUNEQN_LAB`` when set (it must then exist), else the user's
    ``tuneqn/lab.toml`` config file when present, else None."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    path = user_config_dir() / "lab.toml"
    return path if path.is_file() else None


def load_lab(path: Path, what: str = "--lab") -> list[AgentSpec]:
    """The agents of the lab file ``path``; relative paths resolve against its folder.

    Bad input is a :class:`UserError` naming ``what`` (the flag or variable) and the file.
    """
    raw = read_user_file(path, "lab file", "a lab TOML file", what)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    try:
        lab = LabFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {format_validation_error(exc, LabFile.model_json_schema())}") from None
    repeated = lab.repeated()
    if repeated:
        raise UserError(f"{path}: {repeated}")
    return resolve_agent_paths(lab.agents, path.resolve().parent)


def choose_agents(
    study_agents: list[AgentSpec],
    addresses: list[str] | None,
    lab: str | None,
    no_lab: bool = False,
    study_label: str = "the study",
) -> AgentSource:
    """Which agents a command uses (see the module docstring for the order)."""
    if addresses:
        return AgentSource([AgentSpec(address=a) for a in addresses], "--agent", "--agent")
    if lab is not None:
        path = Path(lab).expanduser()
        return AgentSource(load_lab(path, "--lab"), f"lab file {path}", f"{path}: agents")
    if study_agents:
        return AgentSource(study_agents, f"{study_label}'s [[agents]]")
    if not no_lab:
        default = default_lab_path()
        if default is not None:
            what = ENV_VAR if os.environ.get(ENV_VAR) else "default lab file"
            return AgentSource(load_lab(default, what), f"lab file {default}", f"{default}: agents")
    return AgentSource([], "")


# --------------------------------------------------------------------------- probing (tuneqn agents)


@dataclass
class AgentReport:
    """What ``tuneqn agents`` learned about one agent (``as_dict`` is its JSON form)."""

    name: str
    address: str
    declared_class: str | None
    reachable: bool = False
    serving: bool = False
    #: Why the agent cannot be used (unreachable, refused, contract mismatch); empty when usable.
    problem: str = ""
    contract: str = ""
    contract_ok: bool = False
    agent_version: str = ""
    hostname: str = ""
    started_at: float = 0.0
    queue_length: int = 0
    running_job_ids: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    caches: list[dict[str, Any]] = field(default_factory=list)
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    last_failure: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)


def _rpc_problem(exc: grpc.RpcError, timeout: float, tls: bool) -> str:
    """One line saying why an agent did not answer, with the likely fix."""
    code = exc.code()
    details = (exc.details() or "").strip()
    low = details.lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"unreachable: no answer within {timeout:g} s (host down, firewall, or the agent hangs)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"refused: {details or 'bad or missing token'} (check token_file)"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "handshake" in low or "ssl" in low or "certificate" in low:
            return f"unreachable: TLS handshake failed (check tls_ca/tls_cert/tls_key): {details}"
        if "socket closed" in low or "connection reset" in low:
            hint = (
                "the agent closed the connection at the TLS handshake: it wants a client certificate of its "
                "CA (tls_cert/tls_key from the lab's `tuneqn certs`)"
                if tls
                else "the agent closed the connection: if it serves TLS, give tls_ca (and tls_cert/tls_key)"
            )
            return f"unreachable: {hint}"
        return f"unreachable: {details or 'connection failed'}"
    return f"{code.name.lower()}: {details}"


def probe(endpoint: Endpoint, timeout: float = 5.0) -> AgentReport:
    """Ask one agent for its health and info (one round trip each; never raises for the agent's faults)."""
    report = AgentReport(
        name=endpoint.name or endpoint.address, address=endpoint.address, declared_class=endpoint.device_class
    )
    client = endpoint.client(timeout=timeout)
    try:
        try:
            info = client.info(check_revision=False)
        except ContractMismatch as exc:
            report.reachable = True
            report.problem = f"contract mismatch: {exc}"
            return report
        except grpc.RpcError as exc:
            report.problem = _rpc_problem(exc, timeout, endpoint.tls_ca is not None or endpoint.tls_cert is not None)
            return report
        report.reachable = True
        report.serving = client.health(timeout=timeout)
    finally:
        client.close()
    _fill(report, info)
    return report


def _fill(report: AgentReport, info: pb.AgentInfo) -> None:
    report.contract = f"{info.contract_version} r{info.contract_revision}"
    report.contract_ok = info.contract_revision >= MIN_AGENT_REVISION
    if not report.contract_ok:
        report.problem = (
            f"contract mismatch: the agent implements revision {info.contract_revision}, this "
            f"controller needs {MIN_AGENT_REVISION} or newer; upgrade the agent"
        )
    elif info.contract_revision < CONTRACT_REVISION:
        report.notes.append(
            f"agent implements revision {info.contract_revision} (this controller "
            f"{CONTRACT_REVISION}): no cache or failure figures; upgrade it to see them"
        )
    if not report.serving and not report.problem:
        report.notes.append("not serving: the agent is stopping (draining its running jobs)")
    report.agent_version = info.agent_version
    report.hostname = info.hostname
    report.started_at = info.started_at
    report.queue_length = info.queue_length
    report.running_job_ids = list(info.running_job_ids)
    for d in info.devices:
        report.devices.append(
            {
                "name": d.name,
                "device_class": d.device_class,
                "backend": d.backend,
                "simulated": d.simulated,
                "target": d.target,
                "rpc_key": d.rpc_key,
                "remote": d.remote,
                "remote_servers": d.remote_servers,
                "healthy": d.healthy,
                "status": d.status,
                "queue_length": d.queue_length,
                "running_job_id": d.running_job_id,
                "runtime_versions": dict(d.runtime_versions),
            }
        )
    report.caches = [
        {"name": c.name, "used_bytes": c.used_bytes, "limit_bytes": c.limit_bytes, "entries": c.entries}
        for c in info.caches
    ]
    report.jobs_by_state = dict(info.jobs_by_state)
    if info.HasField("last_failure"):
        f = info.last_failure
        report.last_failure = {"job_id": f.job_id, "device": f.device, "error": f.error, "at": f.at}
    served = {d.device_class for d in info.devices}
    if report.declared_class and served and report.declared_class not in served:
        report.notes.append(
            f"lab says device_class {report.declared_class!r}, the agent serves "
            f"{', '.join(sorted(served))}: its jobs wait for an agent of {report.declared_class!r}"
        )


def probe_all(endpoints: list[Endpoint], timeout: float = 5.0) -> list[AgentReport]:
    """:func:`probe` every agent at once (an unreachable agent costs ``timeout``, not the sum)."""
    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(endpoints)), thread_name_prefix="tuneqn-probe") as pool:
        return list(pool.map(lambda ep: probe(ep, timeout), endpoints))


def endpoints_from(
    agents: list[AgentSpec], addresses: list[str], token_file: Path | None, where: str = "agents"
) -> list[Endpoint]:
    """Agents from the command line (they replace the given ones) or ``agents`` (a study's or a lab file's
    ``[[agents]]``, named ``where`` in errors); ``token_file`` serves the agents without their own."""
    tok = read_token(token_file, "--token-file")
    if addresses:
        return [Endpoint(address=a, token=tok) for a in addresses]
    endpoints = []
    for i, a in enumerate(agents):
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(a, key)
            if path is not None and not Path(path).is_file():
                problem = "is a folder, expected a PEM file" if Path(path).is_dir() else "file not found"
                raise UserError(f"{where}[{i}].{key}: {problem}: {path}")
        if (a.tls_cert is None) != (a.tls_key is None):
            raise UserError(f"{where}[{i}]: tls_cert and tls_key go together (mutual TLS needs both)")
        token = read_token(a.token_file, f"{where}[{i}].token_file") if a.token_file else tok
        endpoints.append(Endpoint(**a.model_dump(), token=token))
    return endpoints

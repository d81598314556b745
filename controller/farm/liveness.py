"""Liveness of the agents and device classes of one study run, as decisions.

:class:`Liveness` looks at the agent links and the device classes (when each last had a live
agent) and returns what should happen — :class:`Seen` (a class is served now),
:class:`Release` (a declared class whose devices never said what they run: plan it as
unrestricted so its held jobs can end), :class:`GiveUp` (end a class's jobs as unreachable) —
and, in :meth:`Liveness.awaited`, whether some agent that never answered may still bring a
device class. The orchestrator applies the decisions; this module never calls back into it.

The rules. An agent that has never answered since the run started is given up after
``agent_connect_timeout_s`` (60 s; at most ``device_wait_s``): a wrong address should not cost
ten minutes. A class that only such agents declared then ends its jobs as unreachable at once.
A class that was served and lost every live agent ends its jobs after ``device_wait_s`` (600 s).
:meth:`Liveness.status` says, for the live display, each agent's state and what the run waits
for with the time left.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneqn.controller.common.errors import StudyFailed
from tuneqn.controller.farm.links import AgentState

if TYPE_CHECKING:
    from tuneqn.controller.farm.jobs import FarmSettings
    from tuneqn.controller.farm.links import AgentLink


@dataclass(frozen=True)
class Seen:
    """A live agent serves the class now."""

    device_class: str
    at: float


@dataclass(frozen=True)
class Release:
    """A declared class none of whose devices ever connected: its held jobs are added (to end unreachable)."""

    device_class: str


@dataclass(frozen=True)
class GiveUp:
    """End the class's unfinished jobs as unreachable (``reason`` on each job, ``message`` for the user)."""

    device_class: str
    reason: str
    message: str


Decision = Seen | Release | GiveUp


@dataclass(frozen=True)
class StatusLine:
    """One line of the live display: ``state`` is the line without its countdowns (a change of it is what a
    log, when output is not a terminal, prints), ``text`` the line shown."""

    key: str
    state: str
    text: str


def short_reason(error: str | None) -> str:
    """The gist of a connection error (gRPC's messages run to several lines of addresses)."""
    if not error:
        return "no answer yet"
    low = error.lower()
    for needle, gist in (
        ("connection refused", "connection refused"),
        ("deadline", "no answer in time"),
        ("name resolution", "unknown host"),
        ("dns", "unknown host"),
        ("handshake", "TLS handshake failed"),
        ("certificate", "TLS certificate refused"),
        ("no route", "no route to host"),
        ("timed out", "no answer in time"),
    ):
        if needle in low:
            return gist
    return re.sub(r"\s+", " ", error).strip()[:100]


def _secs(t: float) -> str:
    return f"{max(0, math.ceil(t))} s"


class Liveness:
    """When agents and device classes are given up."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.given_up: set[str] = set()  # agents that never answered in time
        self.errors: list[str] = []  # one line per agent given up
        self.served: set[str] = set()  # classes a live agent served at some point
        self.started = 0.0  # when the run started waiting for agents (time.monotonic())

    @property
    def connect_timeout(self) -> float:
        """How long an agent that never answered is waited for."""
        return min(self.settings.agent_connect_timeout_s, self.settings.device_wait_s)

    def check_usable(self, links: list[AgentLink]) -> None:
        """Raise :class:`StudyFailed` when every agent refused this controller for good."""
        if links and all(link.state == AgentState.INCOMPATIBLE for link in links):
            reasons = "; ".join(f"{link.address}: {link.error}" for link in links)
            raise StudyFailed(f"no usable agent ({reasons})")

    def watch(self, links: list[AgentLink], classes: dict[str, float], now: float) -> list[Decision]:
        """A class without a live agent for ``device_wait_s`` ends its jobs as unreachable.

        ``classes``: each class and when it last had a live agent. A :class:`GiveUp`'s ``message`` has
        ``{n}`` where the number of jobs it ended goes."""
        self.check_usable(links)
        wait = self.settings.device_wait_s
        out: list[Decision] = []
        for cls, last in classes.items():
            if _served(links, cls):
                self.served.add(cls)
                out.append(Seen(cls, now))
                continue
            declaring = [link for link in links if link.endpoint.device_class == cls]
            if (
                cls not in self.served
                and declaring
                and all(link.address in self.given_up or link.state == AgentState.INCOMPATIBLE for link in declaring)
            ):
                who = ", ".join(link.address for link in declaring)
                out.append(Release(cls))
                out.append(
                    GiveUp(
                        cls,
                        f"no agent of device class {cls} ever answered ({who})",
                        f"device class {cls}: its agent ({who}) never answered; {{n}} jobs unreachable",
                    )
                )
            elif now - last > wait:
                out.append(Release(cls))
                out.append(
                    GiveUp(
                        cls,
                        f"no agent of device class {cls} was reachable for {wait:.0f}s",
                        f"device class {cls}: no live agent for {wait:.0f}s; {{n}} jobs unreachable",
                    )
                )
        return out

    def awaited(self, links: Iterable[AgentLink], started: float, now: float) -> bool:
        """Whether some configured agent never answered yet and may still bring a new device class
        (one that did not within ``device_wait_s`` is given up, with a line in :attr:`errors`)."""
        self.started = started
        waiting = False
        for link in links:
            if link.ever_connected or link.state == AgentState.INCOMPATIBLE or link.address in self.given_up:
                continue
            if now - started > self.connect_timeout:
                self.given_up.add(link.address)
                self.errors.append(
                    f"agent {link.address} never answered within {self.connect_timeout:.0f}s"
                    + (f" ({short_reason(link.error)})" if link.error else "")
                )
                continue
            waiting = True
        return waiting

    def status(
        self, links: Iterable[AgentLink], classes: dict[str, float], waiting_classes: Iterable[str], now: float
    ) -> list[StatusLine]:
        """Each agent's state and what the run waits for, with the time left.

        ``classes``: when each class last had a live agent; ``waiting_classes``: those with unfinished jobs."""
        out: list[StatusLine] = []
        for link in links:
            key = f"agent {link.address}"
            state, error = link.state, link.error
            if state in (AgentState.READY, AgentState.BUSY):
                served = ", ".join(sorted(link.device_classes())) or "no device yet"
                out.append(StatusLine(key, "serving", f"{key}: serving {served} ({len(link.slots)} device(s))"))
            elif state == AgentState.INCOMPATIBLE:
                out.append(StatusLine(key, f"unusable: {error}", f"{key}: unusable: {error}"))
            elif link.address in self.given_up:
                what = f"gave up: never answered within {self.connect_timeout:.0f} s ({short_reason(error)})"
                out.append(StatusLine(key, what, f"{key}: {what}"))
            elif state == AgentState.CONNECTING and error is None:
                out.append(StatusLine(key, "connecting", f"{key}: connecting"))
            elif state in (AgentState.CONNECTING, AgentState.UNREACHABLE):
                reason = short_reason(error)
                retry = f", retrying in {_secs(link.retry_at - now)}" if link.retry_at is not None else ", retrying"
                if link.ever_connected:
                    out.append(StatusLine(key, f"unreachable: {reason}", f"{key}: unreachable ({reason}){retry}"))
                else:
                    left = self.connect_timeout - (now - self.started)
                    out.append(
                        StatusLine(
                            key,
                            f"waiting: {reason}",
                            f"waiting for agent {link.address} ({reason}), giving up in {_secs(left)}{retry}",
                        )
                    )
        links = list(links)
        for cls in sorted(set(waiting_classes)):
            if cls not in classes or _served(links, cls):
                continue
            left = self.settings.device_wait_s - (now - classes[cls])
            out.append(
                StatusLine(
                    f"class {cls}",
                    "waiting",
                    f"waiting for device class {cls} (no live agent), giving up in {_secs(left)}",
                )
            )
        return out


def _served(links: Iterable[AgentLink], device_class: str) -> bool:
    return any(link.live.is_set() and device_class in link.device_classes(available=True) for link in links)

"""Liveness of the agents and device classes of one study run, as decisions.

:class:`Liveness` looks at the agent links and the device classes (when each last had a live
agent) and returns what should happen — :class:`Seen` (a class is served now),
:class:`Release` (a declared class whose devices never said what they run: plan it as
unrestricted so its held jobs can end), :class:`GiveUp` (end a class's jobs as unreachable) —
and, in :meth:`Liveness.awaited`, whether some agent that never answered may still bring a
device class. The orchestrator applies the decisions; this module never calls back into it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneqn.controller.errors import StudyFailed
from tuneqn.controller.farm.dispatcher import AgentState

if TYPE_CHECKING:
    from tuneqn.controller.farm.dispatcher import AgentLink, FarmSettings


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


class Liveness:
    """When agents and device classes are given up."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.given_up: set[str] = set()  # agents that never answered in time
        self.errors: list[str] = []  # one line per agent given up

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
                out.append(Seen(cls, now))
                continue
            if now - last > wait:
                out.append(Release(cls))
                out.append(GiveUp(cls, f"no agent of device class {cls} was reachable for {wait:.0f}s",
                                  f"device class {cls}: no live agent for {wait:.0f}s; {{n}} jobs unreachable"))
        return out

    def awaited(self, links: Iterable[AgentLink], started: float, now: float) -> bool:
        """Whether some configured agent never answered yet and may still bring a new device class
        (one that did not within ``device_wait_s`` is given up, with a line in :attr:`errors`)."""
        waiting = False
        for link in links:
            if link.ever_connected or link.state == AgentState.INCOMPATIBLE or link.address in self.given_up:
                continue
            if now - started > self.settings.device_wait_s:
                self.given_up.add(link.address)
                self.errors.append(f"agent {link.address} never answered within {self.settings.device_wait_s:.0f}s"
                                   + (f" ({link.error})" if link.error else ""))
                continue
            waiting = True
        return waiting


def _served(links: Iterable[AgentLink], device_class: str) -> bool:
    return any(link.live.is_set() and device_class in link.device_classes(available=True) for link in links)

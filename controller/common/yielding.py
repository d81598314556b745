"""Long units of CPU-heavy work that give way while a local agent times a model.

A study with a local agent holds the quiet lock (shared) around each unit of its CPU-heavy work
(:class:`tuneqn.controller.farm.local.SharedQuietLock`), and the agent times a model only while no unit
runs. Most units are short (a candidate built by graph edits: milliseconds). A calibration is not:
ORT's percentile calibrator on EfficientNet-Lite1 runs about 25 s in one call, and the agent's
device sat idle all that time with a model loaded and waiting to be timed.

:func:`run` runs such a unit in a child process. While the thread that calls it holds the quiet
lock (:func:`holding`), it watches for an agent waiting to time: then it stops the child
(``SIGSTOP``), gives the lock up until the agent is done, takes it back and continues the child
(``SIGCONT``). The agent waits at most one poll (:data:`POLL_SECONDS`), and the unit's result is
the same as in-process: the child runs the same function on the same arguments. Without a held
quiet lock (no local agent) :func:`run` calls the function in this process.

The child dies with the study: it is in its own process group, so if the controller is killed
while the child is stopped the kernel sends the orphaned group ``SIGHUP`` and ``SIGCONT``; a
running child notices that its parent is gone and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a running unit checks whether an agent waits to time (seconds).
POLL_SECONDS = 0.02

_local = threading.local()


class Hold(Protocol):
    """A held shared quiet lock that can give way to an agent
    (see :class:`~tuneqn.controller.farm.local.SharedQuietLock`)."""

    def agent_waiting(self) -> bool:
        """Whether an agent waits for the lock (or holds it) to time a model."""
        ...

    def give_way(self) -> None:
        """Release the lock, wait until the waiting agent is done, and take it back."""
        ...


@contextlib.contextmanager
def holding(hold: Hold) -> Iterator[None]:
    """Mark ``hold`` as this thread's held quiet lock for :func:`run` calls in the ``with`` body."""
    before = getattr(_local, "hold", None)
    _local.hold = hold
    try:
        yield
    finally:
        _local.hold = before


def run(fn: Callable[..., T], *args: Any, nice: int = 0) -> T:
    """``fn(*args)``; in a child process that pauses while an agent times when this thread holds the quiet lock.

    ``fn`` and ``args`` must be picklable (a module-level function). An exception of ``fn`` is raised here.
    ``nice`` lowers the child's CPU priority (``os.nice``): a unit that is not the one everything waits for
    leaves that one its core.
    """
    hold: Hold | None = getattr(_local, "hold", None)
    if hold is None:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")  # the controller has threads: no fork (and a forked child
    # of a fork server would not be stopped-and-orphaned with the controller: see the module docstring)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(send, fn, args, nice), name=f"tuneqn-{getattr(fn, '__name__', 'work')}", daemon=True
    )
    proc.start()
    send.close()
    paused = 0.0
    try:
        while True:
            ready = multiprocessing.connection.wait([receive, proc.sentinel], timeout=POLL_SECONDS)
            if receive in ready:
                try:
                    ok, value = receive.recv()
                except EOFError:  # it died after the pipe became readable without sending
                    ok, value = False, None
                break
            if proc.sentinel in ready:
                ok, value = False, None
                break
            if hold.agent_waiting():
                t0 = time.monotonic()
                os.kill(proc.pid, signal.SIGSTOP)  # type: ignore[arg-type]
                try:
                    hold.give_way()
                finally:
                    os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
                paused += time.monotonic() - t0
    finally:
        receive.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
    if paused:
        log.info("%s gave way to timing for %.1f s", proc.name, paused)
    if ok:
        return value
    if isinstance(value, BaseException):
        raise value
    raise RuntimeError(f"{proc.name}: the child process ended without a result (exit code {proc.exitcode})")


def _child(
    send: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple[Any, ...], nice: int = 0
) -> None:
    """The child's side of :func:`run`: its own process group, gone with its parent, sends back (ok, value)."""
    os.setpgid(0, 0)  # a stopped child of a killed controller gets SIGHUP (an orphaned group with a stopped member)
    if nice:
        os.nice(nice)
    _keep_freed_memory()
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    try:
        result: tuple[bool, Any] = (True, fn(*args))
    except Exception as exc:  # noqa: BLE001 - every failure of the unit is the parent's to raise
        result = (False, exc)
    try:
        send.send(result)
    except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle: its text does
        send.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]}")))
    send.close()


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _keep_freed_memory() -> None:
    """Let glibc keep the memory this child frees for its next allocations (it exits after one unit).

    ORT's histogram calibrators hold every tensor of the calibration sample (4.9 GB on EfficientNet-Lite1) and
    copy each one three times on the way to its histogram; by default glibc maps every large block afresh and
    unmaps it when freed, and the kernel zeroes each page again on first touch: 9–19 s of system time of a
    20–40 s calibration. Without glibc (``mallopt`` missing) nothing changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except AttributeError:  # not glibc
        return
    mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, which is reused...
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ...and not given back to the kernel while the child runs


def _exit_with(sentinel: int) -> None:
    """Exit this process as soon as its parent is gone (``sentinel`` becomes ready)."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)

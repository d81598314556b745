"""TVM RPC sessions as the TVM backend uses them: the tracker's wire protocol (:class:`TrackerLink`), an open
device (:class:`Runtime`), and the socket-level guards that keep a hung server from stalling the agent
(:func:`limit_socket_waits`, :func:`cut_connections`, :func:`is_connection_error`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneqn.agent.config import hostport

log = logging.getLogger(__name__)

TRACKER_IO_TIMEOUT = 10.0  # connecting to the tracker and reading its answers


class Lost(Exception):
    """The remote session is gone (connection error or a hung call) at ``where``."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


#: Words of TVM's errors when a session's connection fails: socket errors, and the endpoint
#: reading the channel's end as the server's shutdown ("code=kShutdown").
CONNECTION_MARKERS = ("socket", "connection", "broken pipe", "kshutdown", "rpccode")


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the session's connection failed (not an error of the call)."""
    import tvm

    if isinstance(exc, OSError | EOFError | tvm.error.RPCSessionTimeoutError):
        return True
    if isinstance(exc, tvm.error.RPCError):  # raised by the remote function itself
        return False
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in CONNECTION_MARKERS)


def sockets_to(host: str, port: int) -> list[socket.socket]:
    """This process's TCP connections to ``host:port``, as sockets on duplicated fds.

    The RPC client's sockets belong to TVM's C++ side; options set and shutdowns made on a
    duplicate act on the same connection, and closing the duplicate leaves TVM's fd open.
    The caller closes the returned sockets.
    """
    try:
        import psutil
    except ImportError:
        return []
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        ips = {host}
    found = []
    for conn in psutil.Process().net_connections(kind="inet"):
        if conn.fd < 0 or not conn.raddr or conn.raddr.port != port or conn.raddr.ip not in ips:
            continue
        try:
            found.append(socket.socket(fileno=os.dup(conn.fd)))
        except OSError:
            continue
    return found


def limit_socket_waits(address: str, seconds: float) -> None:
    """Bound every blocking send/recv on the connections to ``address`` ("HOST:PORT").

    TVM frees remote objects with a blocking round trip while holding the GIL; on a hung
    server that would stall all of the agent's threads for good. With SO_RCVTIMEO and
    SO_SNDTIMEO such a wait ends after ``seconds`` (the call timeout) with an error.
    """
    host, _, port = address.rpartition(":")
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    for sock in sockets_to(host.strip("[]"), int(port)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except OSError as exc:
            log.debug("cannot set timeouts on the connection to %s: %s", address, exc)
        finally:
            sock.close()


def cut_connections(address: str) -> int:
    """Shut down the connections to ``address`` ("HOST:PORT"); returns how many.

    A thread stuck in a remote call on a hung server gets an error at once, and so does
    every later use of the abandoned session (freeing its remote objects included).
    """
    if not address:
        return 0
    host, _, port = address.rpartition(":")
    count = 0
    for sock in sockets_to(host.strip("[]"), int(port)):
        try:
            sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:
            pass
        finally:
            sock.close()
    return count


class TrackerLink:
    """A connection to a TVM RPC tracker with timeouts (TVM's client blocks without them)."""

    def __init__(self, addr: tuple[str, int], timeout: float = TRACKER_IO_TIMEOUT) -> None:
        from tvm.rpc import base

        self._base = base
        self.addr = addr
        self.sock = socket.create_connection(addr, timeout=timeout)
        try:
            self.sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", self.recv_exact(4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise ConnectionError(f"{hostport(addr)} is not a TVM RPC tracker")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        """Close the connection (a pending request is dropped by the tracker)."""
        self.sock.close()

    def send(self, value: Any) -> None:
        """Send one JSON message."""
        data = json.dumps(value).encode("utf-8")
        self.sock.sendall(struct.pack("<i", len(data)) + data)

    def recv_exact(self, n: int, on_timeout: Callable[[], None] | None = None) -> bytes:
        """Read ``n`` bytes; a socket timeout calls ``on_timeout`` (which may raise) and retries."""
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                if on_timeout is None:
                    raise
                on_timeout()
                continue
            if not chunk:
                raise ConnectionError(f"tracker {hostport(self.addr)} closed the connection")
            buf += chunk
        return buf

    def recv(self, on_timeout: Callable[[], None] | None = None) -> Any:
        """Read one JSON message."""
        size = struct.unpack("<i", self.recv_exact(4, on_timeout))[0]
        return json.loads(self.recv_exact(size).decode("utf-8"))

    def summary(self) -> dict[str, Any]:
        """The tracker's summary: ``queue_info`` per key and ``server_info``."""
        self.send([self._base.TrackerCode.SUMMARY])
        value = self.recv()
        if not isinstance(value, list) or value[0] != self._base.TrackerCode.SUCCESS:
            raise ConnectionError(f"unexpected tracker answer {value!r}")
        return dict(value[1])


@dataclass
class Runtime:
    """An open device: (remote) session, device, loaded library, VM and its entry function."""

    executed_on: str
    session: Any
    device: Any
    library: Any
    vm: Any
    main: Any = None
    inputs: dict[tuple[int, ...], Any] = field(default_factory=dict)  # reused input tensors

    def input(self, x: np.ndarray) -> Any:
        """A device tensor holding ``x`` (one per shape, reused: fewer remote frees)."""
        import tvm

        tensor = self.inputs.get(x.shape)
        if tensor is None or str(tensor.dtype) != str(x.dtype):
            tensor = tvm.runtime.tensor(x, self.device)
            self.inputs[x.shape] = tensor
        else:
            tensor.copyfrom(x)
        return tensor

    def close(self) -> None:
        """Drop every reference (the RPC session closes when the last one goes)."""
        self.inputs = {}
        self.main = self.vm = self.library = self.device = self.session = None

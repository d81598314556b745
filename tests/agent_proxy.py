"""A real gRPC hop in front of a real agent that rewrites what its ``GetInfo`` says about its devices.

ORT agents cannot report what a TVM agent reports (devices joining a tracker, unhealthy devices,
supported op types, the compile-ahead capability). Tests put this proxy (gRPC on 127.0.0.1, port
0) between the controller and a real ORT agent: every RPC is forwarded byte for byte to the agent,
which really runs the jobs; only the device list of ``GetInfo`` is passed through ``rewrite`` (and,
when a test sets ``rewrite_result``, the final result of ``WatchJob``: a device whose arithmetic differs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from tuneqn.v1 import agent_pb2 as pb

_SERVICE = "tuneqn.v1.Agent"
_PASS = {
    "UploadBlob": "stream_unary",
    "HasBlobs": "unary_unary",
    "SubmitJob": "unary_unary",
    "WatchJob": "unary_stream",
    "CancelJob": "unary_unary",
}
_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


def _identity(x: bytes) -> bytes:
    return x


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's remaining time (None when the call has no deadline)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 86_400 else None


class DeviceProxy:
    """Forwards ``tuneqn.v1.Agent`` (and the health check) to ``upstream``; ``GetInfo``'s devices go through
    ``rewrite(list of Device) -> list of Device`` (change it at any time: the next GetInfo uses it)."""

    def __init__(self, upstream: str, rewrite: Callable[[list[pb.Device]], list[pb.Device]] | None = None) -> None:
        self.upstream = upstream
        self.rewrite = rewrite or (lambda devices: devices)
        #: The whole ``AgentInfo`` goes through this last (e.g. to play an agent of an older contract revision).
        self.rewrite_info: Callable[[pb.AgentInfo], pb.AgentInfo] = lambda info: info
        #: ``SubmitJob`` requests go through this first: a (code, details) it returns is the answer instead.
        self.refuse_submit: Callable[[pb.JobSpec], tuple[grpc.StatusCode, str] | None] = lambda spec: None
        #: Final ``JobResult``s of ``WatchJob`` go through this (changed in place), with the job's spec.
        self.rewrite_result: Callable[[pb.JobResult, pb.JobSpec | None], None] | None = None
        self.specs: dict[str, pb.JobSpec] = {}  # job id -> the spec it was last submitted with
        self.info_calls = 0
        self._calls = threading.Condition()
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=_SERVER_OPTIONS)
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self._get_info,
                request_deserializer=pb.GetInfoRequest.FromString,
                response_serializer=pb.AgentInfo.SerializeToString,
            )
        }
        for method, kind in _PASS.items():
            handlers[method] = self._forwarder(method, kind)
        health = {"Check": self._forwarder("Check", "unary_unary", "grpc.health.v1.Health")}
        self._server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(_SERVICE, handlers),
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
            ]
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> DeviceProxy:
        """Start serving."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the upstream channel."""
        self._server.stop(0).wait()
        self._channel.close()

    def __enter__(self) -> DeviceProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_info_calls(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``GetInfo`` was answered ``n`` times in all (a condition with a deadline)."""
        with self._calls:
            if not self._calls.wait_for(lambda: self.info_calls >= n, timeout):
                raise TimeoutError(f"GetInfo answered {self.info_calls} times, waited for {n}")

    @staticmethod
    def _metadata(context: grpc.ServicerContext) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in context.invocation_metadata() if k == "authorization")

    def _get_info(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.AgentInfo:
        call = self._channel.unary_unary(
            f"/{_SERVICE}/GetInfo",
            request_serializer=pb.GetInfoRequest.SerializeToString,
            response_deserializer=pb.AgentInfo.FromString,
        )
        try:
            info = call(request, metadata=self._metadata(context), timeout=10)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        devices = self.rewrite([pb.Device.FromString(d.SerializeToString()) for d in info.devices])
        del info.devices[:]
        info.devices.extend(devices)
        info = self.rewrite_info(info)
        with self._calls:
            self.info_calls += 1
            self._calls.notify_all()
        return info

    def _rewritten(self, method: str, data: bytes) -> bytes:
        if method != "WatchJob" or self.rewrite_result is None:
            return data
        event = pb.JobEvent.FromString(data)
        if not event.final or not event.HasField("result") or event.result.state != pb.SUCCEEDED:
            return data
        self.rewrite_result(event.result, self.specs.get(event.job_id))
        return event.SerializeToString()

    def _forwarder(self, method: str, kind: str, service: str = _SERVICE) -> grpc.RpcMethodHandler:
        path = f"/{service}/{method}"
        upstream = getattr(self._channel, kind)(path, request_serializer=_identity, response_deserializer=_identity)

        def unary_unary(request: bytes, context: grpc.ServicerContext) -> Any:
            if method == "SubmitJob":
                spec = pb.JobSpec.FromString(request)
                self.specs[spec.job_id] = spec
                refusal = self.refuse_submit(spec)
                if refusal is not None:
                    context.abort(*refusal)
            try:
                return upstream(request, metadata=self._metadata(context), timeout=_deadline(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            try:
                return upstream(requests, metadata=self._metadata(context), timeout=_deadline(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            call = upstream(request, metadata=self._metadata(context), timeout=_deadline(context))
            context.add_callback(call.cancel)
            try:
                for event in call:
                    yield self._rewritten(method, event)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    context.abort(exc.code(), exc.details() or "")

        handler = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
        }[kind]
        fn = {"unary_unary": unary_unary, "stream_unary": stream_unary, "unary_stream": unary_stream}[kind]
        return handler(fn, request_deserializer=_identity, response_serializer=_identity)


def swap_top2(result: pb.JobResult, rows: set[int]) -> None:
    """Swap the first two classes of ``result``'s top-k in ``rows`` (a device whose numerics differ there)."""
    import numpy as np

    k = int(result.top_k)
    topk = np.frombuffer(result.topk_indices, dtype="<i4").reshape(int(result.num_samples), k).copy()
    for i in sorted(rows):
        if i < len(topk) and k > 1:
            topk[i, [0, 1]] = topk[i, [1, 0]]
    result.topk_indices = topk.astype("<i4").tobytes()


def with_fields(device: pb.Device, **fields: Any) -> pb.Device:
    """A copy of ``device`` with some fields changed (lists replace the device's)."""
    out = pb.Device()
    out.CopyFrom(device)
    for name, value in fields.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            field = getattr(out, name)
            del field[:]
            field.extend(sorted(value) if isinstance(value, (set, frozenset)) else value)
        else:
            setattr(out, name, value)
    return out

"""Blob uploads over real gRPC and the on-disk LRU cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_fixtures import dataset, job_spec, npy_bytes

from tuneqn.agent.blobs import BlobStore, InvalidBlob
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc


def _stream(sha: str, total: int, *parts: bytes) -> Iterator[pb.BlobChunk]:
    yield pb.BlobChunk(sha256=sha, total_size=total)
    for part in parts:
        yield pb.BlobChunk(data=part)


def _stored(state_dir: Path) -> list[str]:
    blobs = state_dir / "blobs"
    return sorted(p.name for p in blobs.iterdir() if p.is_file()) + sorted(p.name for p in (blobs / ".tmp").iterdir())


@pytest.fixture
def stub(agent_factory) -> Iterator[tuple[agent_pb2_grpc.AgentStub, Path]]:
    server = agent_factory(max_blob_bytes=1000)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield agent_pb2_grpc.AgentStub(channel), server.state_dir


def test_upload_in_chunks_and_already_present(stub) -> None:
    agent, state_dir = stub
    data = os.urandom(700)
    sha = hashlib.sha256(data).hexdigest()
    ref = agent.UploadBlob(_stream(sha, 700, data[:300], data[300:]), timeout=5)
    assert (ref.sha256, ref.size, ref.already_present) == (sha, 700, False)
    assert (state_dir / "blobs" / sha).read_bytes() == data
    again = agent.UploadBlob(_stream(sha, 700, data), timeout=5)
    assert again.already_present
    assert list(agent.HasBlobs(pb.HasBlobsRequest(sha256=[sha, "0" * 64]), timeout=5).present) == [True, False]


@pytest.mark.parametrize(
    "declared_sha, declared_size, parts",
    [
        ("0" * 64, 10, [b"0123456789"]),  # bytes do not hash to the announced sha256
        (hashlib.sha256(b"0123456789").hexdigest(), 12, [b"0123456789"]),  # short
        (hashlib.sha256(b"0123456789").hexdigest(), 5, [b"0123456789"]),  # too long
        ("NOT-A-SHA", 10, [b"0123456789"]),
    ],
)
def test_mismatching_upload_is_rejected_and_not_stored(stub, declared_sha, declared_size, parts) -> None:
    agent, state_dir = stub
    with pytest.raises(grpc.RpcError) as err:
        agent.UploadBlob(_stream(declared_sha, declared_size, *parts), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _stored(state_dir) == []


def test_size_cap(stub) -> None:
    agent, state_dir = stub
    data = b"x" * 1001  # the fixture's agent takes at most 1000 bytes
    with pytest.raises(grpc.RpcError) as err:
        agent.UploadBlob(_stream(hashlib.sha256(data).hexdigest(), len(data), data), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000" in err.value.details()
    assert _stored(state_dir) == []


def test_has_blobs_rejects_malformed_addresses(stub) -> None:
    agent, _ = stub
    with pytest.raises(grpc.RpcError) as err:
        agent.HasBlobs(pb.HasBlobsRequest(sha256=["../etc/passwd"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _put(store: BlobStore, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    upload = store.begin_upload(sha, len(data))
    upload.write(data)
    upload.commit()
    return sha


def test_lru_eviction_skips_pinned_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", cache_bytes=3000, max_blob_bytes=2000)
    a, b, c = (_put(store, bytes([i]) * 1000) for i in range(3))
    assert store.pin_if_present([a]) == []
    store.touch(b)  # b is now the most recently used: c is the oldest unpinned
    d = _put(store, b"d" * 1000)
    assert [store.has(s) for s in (a, b, c, d)] == [True, True, False, True]
    assert not (tmp_path / "blobs" / c).exists()
    store.unpin([a])
    _put(store, b"e" * 1000)
    assert not store.has(a)  # unpinned and now the oldest

    reopened = BlobStore(tmp_path / "blobs", cache_bytes=3000, max_blob_bytes=2000)
    assert reopened.total_bytes == 3000 and reopened.has(d)


def test_failed_upload_leaves_no_temp_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", cache_bytes=10_000, max_blob_bytes=10_000)
    upload = store.begin_upload("1" * 64, 3)
    upload.write(b"abc")
    with pytest.raises(InvalidBlob):
        upload.commit()
    upload.abort()
    assert list((tmp_path / "blobs").iterdir()) == [tmp_path / "blobs" / ".tmp"]
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def test_blobs_of_a_running_job_are_not_evicted(agent_factory, client_factory, cnn_bytes) -> None:
    data = npy_bytes(dataset(400))
    server = agent_factory(simulated_ms=25.0, blob_cache_bytes=len(cnn_bytes) + len(data) + 100)
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(data)
    client.submit(job_spec("pinned", m, d, chunk_size=4))
    for event in client.watch("pinned", timeout=20):
        if event.done > 0:
            break
    other = client.upload_bytes(os.urandom(4000))  # over the cache limit
    assert client.has_blobs([m, d, other]) == [True, True, True]
    client.cancel("pinned")
    assert client.wait_result("pinned", timeout=20).state == pb.CANCELLED
    client.upload_bytes(os.urandom(10))  # now the job's blobs may go, oldest first
    assert client.has_blobs([m]) == [False]
    assert server.blobs.total_bytes <= server.config.blob_cache_bytes

"""Contract revision 2 on a real in-process agent: retries that re-execute, re-measure tokens,
the revision handshake and WatchJob heartbeats."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from agent_fixtures import build_cnn, dataset, direct_topk, executions, job_spec, npy_bytes

from tuneqn.controller.farm.client import ContractMismatch, decode_topk
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc
from tuneqn.v1.contract import CONTRACT_REVISION, MIN_CLIENT_REVISION

RESULT_TIMEOUT = 30.0


def test_client_of_an_older_revision_is_refused(agent_factory) -> None:
    server = agent_factory()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        for revision in (0, MIN_CLIENT_REVISION - 1):
            request = pb.GetInfoRequest(client_version="0.1", contract_version="tuneqn.v1", contract_revision=revision)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetInfo(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = err.value.details()
            assert f"revision {revision}" in details and f"revision {MIN_CLIENT_REVISION}" in details
        newer = pb.GetInfoRequest(contract_version="tuneqn.v1", contract_revision=CONTRACT_REVISION + 1)
        assert stub.GetInfo(newer, timeout=5).contract_revision == CONTRACT_REVISION


def test_contract_mismatch_of_the_client_names_the_revision(agent_factory, client_factory, monkeypatch) -> None:
    import tuneqn.controller.farm.client as client_module

    monkeypatch.setattr(client_module, "CONTRACT_REVISION", MIN_CLIENT_REVISION - 1)
    with pytest.raises(ContractMismatch, match="revision"):
        client_factory(agent_factory()).info()


def test_failed_job_runs_again_on_a_higher_attempt_after_reupload(agent_factory, client_factory, cnn_bytes) -> None:
    """A transient failure (the model blob vanished from the cache) is not permanent."""
    server = agent_factory(simulated_ms=25.0)
    client = client_factory(server)
    data = dataset(8)
    model = build_cnn(seed=1)
    m, d = client.upload_bytes(model), client.upload_bytes(npy_bytes(data))
    long_data = client.upload_bytes(npy_bytes(dataset(400)))
    client.submit(job_spec("blocker", client.upload_bytes(cnn_bytes), long_data, chunk_size=4))
    client.submit(job_spec("victim", m, d, attempt=1))
    (server.state_dir / "blobs" / m).unlink()  # the victim is still queued behind the blocker
    client.cancel("blocker")
    failed = client.wait_result("victim", timeout=RESULT_TIMEOUT)
    assert failed.state == pb.FAILED and m in failed.error
    assert (failed.attempt, failed.executions) == (1, 1)

    same = client.submit(job_spec("victim", m, d, attempt=1))
    assert (same.state, same.already_known) == (pb.FAILED, True)
    assert client.has_blobs([m, d]) == [False, True]  # so the controller uploads it again
    with pytest.raises(grpc.RpcError) as err:
        client.submit(job_spec("victim", m, d, attempt=2))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "missing blobs" in err.value.details() and m in err.value.details()
    assert executions(server.state_dir, "victim") == 1

    assert client.upload_bytes(model) == m
    retry = client.submit(job_spec("victim", m, d, attempt=2))
    assert (retry.state, retry.already_known) == (pb.QUEUED, False)
    result = client.wait_result("victim", timeout=RESULT_TIMEOUT)
    assert result.state == pb.SUCCEEDED, result.error
    assert (result.attempt, result.executions) == (2, 2)
    assert np.array_equal(decode_topk(result), direct_topk(model, data))
    assert executions(server.state_dir, "victim") == 2

    for attempt in (2, 3):  # a success is never re-executed for a retry
        again = client.submit(job_spec("victim", m, d, attempt=attempt))
        assert (again.state, again.already_known) == (pb.SUCCEEDED, True)
    (event,) = list(client.watch("victim", timeout=5))
    assert event.result == result
    assert executions(server.state_dir, "victim") == 2


def test_cancelled_job_runs_again_on_a_higher_attempt(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory(simulated_ms=25.0)
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(4)))
    client.submit(job_spec("blocker", m, client.upload_bytes(npy_bytes(dataset(400))), chunk_size=4))
    client.submit(job_spec("parked", m, d, attempt=1))
    assert client.cancel("parked") == pb.CANCELLED  # still queued behind the blocker
    client.cancel("blocker")
    assert client.submit(job_spec("parked", m, d, attempt=1)).state == pb.CANCELLED
    again = client.submit(job_spec("parked", m, d, attempt=2))
    assert (again.state, again.already_known) == (pb.QUEUED, False)
    result = client.wait_result("parked", timeout=RESULT_TIMEOUT)
    assert (result.state, result.attempt, result.executions) == (pb.SUCCEEDED, 2, 1)
    assert executions(server.state_dir, "parked") == 1


def test_remeasure_token_reruns_a_success_once(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory()
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8)))

    def submit(**kw: object) -> pb.SubmitJobResponse:
        return client.submit(job_spec("measured", m, d, **kw))

    assert not submit(attempt=1).already_known
    first = client.wait_result("measured", timeout=RESULT_TIMEOUT)
    assert (first.state, first.executions) == (pb.SUCCEEDED, 1)
    # attempt, token and max_executions never make the spec "different"
    assert submit(attempt=7, max_executions=9).already_known
    assert executions(server.state_dir, "measured") == 1

    fresh = submit(attempt=1, remeasure_token="fresh-1")
    assert (fresh.state, fresh.already_known) == (pb.QUEUED, False)
    assert submit(attempt=1, remeasure_token="fresh-1").already_known  # idempotent per token
    second = client.wait_result("measured", timeout=RESULT_TIMEOUT)
    assert (second.state, second.executions) == (pb.SUCCEEDED, 2)
    for kw in ({"remeasure_token": "fresh-1"}, {}, {"attempt": 4}):
        answer = submit(**kw)
        assert (answer.state, answer.already_known) == (pb.SUCCEEDED, True), kw
    (event,) = list(client.watch("measured", timeout=5))
    assert event.result == second
    assert executions(server.state_dir, "measured") == 2

    assert not submit(remeasure_token="fresh-2").already_known
    third = client.wait_result("measured", timeout=RESULT_TIMEOUT)
    assert third.executions == 3 and executions(server.state_dir, "measured") == 3

    with pytest.raises(grpc.RpcError) as err:  # a real difference still conflicts
        submit(remeasure_token="fresh-3", top_k=2)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert executions(server.state_dir, "measured") == 3


def test_watch_sends_heartbeats_while_nothing_changes(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory(simulated_ms=25.0)
    client = client_factory(server)
    m = client.upload_bytes(cnn_bytes)
    client.submit(job_spec("busy", m, client.upload_bytes(npy_bytes(dataset(400))), chunk_size=4))
    client.submit(job_spec("waiting", m, client.upload_bytes(npy_bytes(dataset(4)))))

    events = client.watch("waiting", timeout=RESULT_TIMEOUT, heartbeat_ms=50, idle_timeout=10.0)
    first = next(events)
    assert (first.state, first.stage, first.heartbeat) == (pb.QUEUED, "queued", False)
    beats = [next(events) for _ in range(3)]
    for beat in beats:
        assert beat.heartbeat and (beat.state, beat.stage) == (pb.QUEUED, "queued")
        assert beat.timestamp == first.timestamp  # a repeat: nothing changed
    assert client.cancel("waiting") == pb.CANCELLED
    final = next(e for e in events if not e.heartbeat)
    assert final.final and final.result.state == pb.CANCELLED
    client.cancel("busy")

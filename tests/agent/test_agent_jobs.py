"""A real in-process agent on loopback running real ORT jobs over gRPC."""

from __future__ import annotations

import itertools
import os
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest
from agent_fixtures import (
    DEVICE,
    NUM_CLASSES,
    build_cnn,
    build_qdq_cnn,
    dataset,
    direct_topk,
    executions,
    job_spec,
    npy_bytes,
)

from tuneqn.controller.farm.client import decode_topk
from tuneqn.v1 import agent_pb2 as pb
from tuneqn.v1 import agent_pb2_grpc
from tuneqn.v1.contract import CONTRACT_REVISION, CONTRACT_VERSION

RESULT_TIMEOUT = 20.0


def test_info_handshake(agent_factory, client_factory) -> None:
    server = agent_factory()
    with client_factory(server) as client:
        info = client.info()
    assert info.contract_version == CONTRACT_VERSION == "tuneqn.v1"
    assert info.contract_revision == CONTRACT_REVISION == 5
    assert info.agent_id == server.agent_id and info.hostname
    assert info.queue_length == 0 and info.running_job_id == "" and list(info.running_job_ids) == []
    (device,) = info.devices
    assert (device.name, device.device_class, device.backend) == (DEVICE, "test-class", "ort")
    assert device.healthy and device.status == ""
    assert device.queue_length == 0 and device.running_job_id == ""
    assert {"onnxruntime", "onnx", "numpy", "python"} <= set(device.runtime_versions)
    assert {"ort", "qdq", "qoperator", "dynamic", "static"} <= set(device.capabilities)
    assert device.cpu and device.gpu == ""
    assert not device.simulated and device.simulated_latency_ms_per_sample == 0
    assert device.prediction_slots == min(2, len(os.sched_getaffinity(0)))  # screens two at a time on 2+ cores
    (blobs,) = info.caches  # an ORT agent has no compile cache
    assert (blobs.name, blobs.used_bytes, blobs.entries) == ("blobs", 0, 0) and blobs.limit_bytes > 0
    assert dict(info.jobs_by_state) == {} and not info.HasField("last_failure")
    assert info.started_at > 0


def test_other_major_contract_is_refused(agent_factory) -> None:
    server = agent_factory()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pb.GetInfoRequest(client_version="9.0", contract_version="tuneqn.v2"), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tuneqn.v2" in err.value.details() and "tuneqn.v1" in err.value.details()


def test_topk_matches_direct_ort_run(agent_factory, client_factory, cnn_bytes) -> None:
    data = dataset(40)
    server = agent_factory()
    client = client_factory(server)
    model_sha = client.upload_bytes(cnn_bytes)
    data_sha = client.upload_bytes(npy_bytes(data))
    response = client.submit(job_spec("job-1", model_sha, data_sha, chunk_size=16))
    assert (response.state, response.already_known) == (pb.QUEUED, False)

    events = list(client.watch("job-1", timeout=RESULT_TIMEOUT))
    assert events[-1].final and sum(e.final for e in events) == 1
    done = [e.done for e in events]  # progress may be coalesced; it never goes back
    assert done == sorted(done) and events[-1].done == events[-1].total == 40
    result = events[-1].result
    assert result.state == pb.SUCCEEDED, result.error
    assert (result.job_id, result.device, result.device_class) == ("job-1", DEVICE, "test-class")
    assert result.agent_id == server.agent_id
    assert (result.num_samples, result.top_k) == (40, 5)
    assert np.array_equal(decode_topk(result), direct_topk(cnn_bytes, data, k=5))
    assert result.model_size_bytes == len(cnn_bytes)
    assert result.latency.count == 3 and 0 < result.latency.min_ms <= result.latency.median_ms
    assert result.latency.p10_ms <= result.latency.median_ms <= result.latency.p90_ms <= result.latency.max_ms
    assert result.simulated_latency_ms_per_sample == 0
    assert 0 < result.started_at <= result.finished_at and result.inference_seconds > 0
    assert result.runtime_versions["onnxruntime"]
    assert executions(server.state_dir, "job-1") == 1


def test_fixed_batch_model_pads_the_last_chunk(agent_factory, client_factory, cnn_bytes) -> None:
    data = dataset(21, seed=3)  # 8 + 8 + 5 padded rows
    client = client_factory(agent_factory())
    model_sha = client.upload_bytes(build_cnn(batch=8))
    data_sha = client.upload_bytes(npy_bytes(data))
    client.submit(job_spec("fixed", model_sha, data_sha, top_k=NUM_CLASSES + 5, chunk_size=3))
    result = client.wait_result("fixed", timeout=RESULT_TIMEOUT)
    assert result.state == pb.SUCCEEDED, result.error
    assert (result.num_samples, result.top_k) == (21, NUM_CLASSES)  # top_k clipped to classes
    assert np.array_equal(decode_topk(result), direct_topk(cnn_bytes, data, k=NUM_CLASSES))


def test_submit_is_idempotent(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory()
    client = client_factory(server)
    spec = job_spec("same", client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8))))
    first = client.submit(spec)
    second = client.submit(spec)
    assert not first.already_known and second.already_known
    assert client.wait_result("same", timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
    third = client.submit(spec)
    assert third.already_known and third.state == pb.SUCCEEDED
    assert executions(server.state_dir, "same") == 1

    other = job_spec("same", spec.model_sha256, spec.dataset_sha256, top_k=1)
    with pytest.raises(grpc.RpcError) as err:
        client.submit(other)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert executions(server.state_dir, "same") == 1


def test_missing_blobs_are_named(agent_factory, client_factory, cnn_bytes) -> None:
    client = client_factory(agent_factory())
    model_sha = client.upload_bytes(cnn_bytes)
    absent = "ab" * 32
    with pytest.raises(grpc.RpcError) as err:
        client.submit(job_spec("no-data", model_sha, absent))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert absent in err.value.details() and model_sha not in err.value.details()


def test_invalid_spec_is_rejected(agent_factory, client_factory, cnn_bytes) -> None:
    client = client_factory(agent_factory())
    sha = client.upload_bytes(cnn_bytes)
    for spec in (
        job_spec("", sha, sha),
        job_spec("bad-sha", sha, "xyz"),
        job_spec("bad-device", sha, sha, device="elsewhere"),
        job_spec("zero-k", sha, sha, top_k=0),
    ):
        with pytest.raises(grpc.RpcError) as err:
            client.submit(spec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, spec.job_id


def test_unknown_job_is_not_found(agent_factory, client_factory) -> None:
    client = client_factory(agent_factory())
    for call in (lambda: list(client.watch("nope", timeout=5)), lambda: client.cancel("nope")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watching_a_finished_job_returns_the_stored_result(agent_factory, client_factory, cnn_bytes) -> None:
    client = client_factory(agent_factory())
    spec = job_spec("done", client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(4))))
    client.submit(spec)
    result = client.wait_result("done", timeout=RESULT_TIMEOUT)
    (event,) = list(client.watch("done", timeout=5))
    assert event.final and event.result == result


def test_failed_job_reports_its_error_and_worker_goes_on(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory()
    client = client_factory(server)
    model_sha = client.upload_bytes(cnn_bytes)
    wrong = client.upload_bytes(npy_bytes(np.zeros((4, 5), np.float32)))
    good = client.upload_bytes(npy_bytes(dataset(4)))
    client.submit(job_spec("bad", model_sha, wrong))
    client.submit(job_spec("good", model_sha, good))
    bad = client.wait_result("bad", timeout=RESULT_TIMEOUT)
    assert bad.state == pb.FAILED and bad.error and bad.num_samples == 0
    assert client.wait_result("good", timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
    assert client.submit(job_spec("bad", model_sha, wrong)).state == pb.FAILED  # not re-run
    assert executions(server.state_dir, "bad") == 1
    info = client.info()  # what `tuneqn agents` shows: the failure, job counts, blob cache use
    assert (info.last_failure.job_id, info.last_failure.device) == ("bad", DEVICE)
    assert info.last_failure.error == bad.error and info.last_failure.at >= bad.finished_at - 1
    assert dict(info.jobs_by_state) == {"FAILED": 1, "SUCCEEDED": 1}
    (blobs,) = info.caches
    assert blobs.entries == 3 and blobs.used_bytes == server.blobs.total_bytes > len(cnn_bytes)


def test_jobs_run_one_at_a_time_in_fifo_order(agent_factory, client_factory, cnn_bytes) -> None:
    import sqlite3

    server = agent_factory()
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(16)))
    ids = [f"fifo-{i}" for i in range(4)]
    for job_id in ids:
        client.submit(job_spec(job_id, m, d, chunk_size=4))
    for job_id in ids:
        assert client.wait_result(job_id, timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
    with sqlite3.connect(server.state_dir / "agent.db") as conn:
        rows = conn.execute("SELECT job_id, started, finished FROM executions ORDER BY started").fetchall()
    assert [r[0] for r in rows] == ids
    assert all(prev[2] <= nxt[1] for prev, nxt in itertools.pairwise(rows))


def test_cancel_queued_at_once_and_running_at_chunk_boundary(agent_factory, client_factory, cnn_bytes) -> None:
    server = agent_factory(simulated_ms=25.0)  # 4-sample chunks take >= 100 ms each
    client = client_factory(server)
    info = client.info()
    assert info.devices[0].simulated and info.devices[0].simulated_latency_ms_per_sample == 25.0
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400)))
    client.submit(job_spec("long", m, d, chunk_size=4))
    client.submit(job_spec("queued", m, d, chunk_size=4))

    events = client.watch("long", timeout=RESULT_TIMEOUT)
    for event in events:  # wait until the job is demonstrably running
        if event.stage == "predicting" and event.done > 0:
            break
    info = client.info()
    assert info.running_job_id == "long" and list(info.running_job_ids) == ["long"]
    assert info.queue_length == 1
    (device,) = info.devices
    assert (device.running_job_id, device.queue_length, device.healthy) == ("long", 1, True)

    assert client.cancel("queued") == pb.CANCELLED
    queued = client.wait_result("queued", timeout=5)
    assert queued.state == pb.CANCELLED and executions(server.state_dir, "queued") == 0

    assert client.cancel("long") == pb.RUNNING  # pending until the next chunk boundary
    final = next(e for e in events if e.final)
    assert final.result.state == pb.CANCELLED and final.result.num_samples == 0
    assert client.cancel("long") == pb.CANCELLED  # cancelling a finished job changes nothing

    client.submit(job_spec("after", m, client.upload_bytes(npy_bytes(dataset(4)))))
    after = client.wait_result("after", timeout=RESULT_TIMEOUT)
    assert after.state == pb.SUCCEEDED and after.simulated_latency_ms_per_sample == 25.0


def test_graceful_stop_requeues_and_restart_keeps_identity(
    agent_factory, client_factory, cnn_bytes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "restart"
    server = agent_factory(state_dir=state_dir, simulated_ms=25.0)
    client = client_factory(server)
    m, d = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(400)))
    client.submit(job_spec("interrupted", m, d, chunk_size=4))
    client.submit(job_spec("waiting", m, d, chunk_size=4))
    for event in client.watch("interrupted", timeout=RESULT_TIMEOUT):
        if event.done > 0:
            break
    agent_id = server.agent_id
    server.stop(grace=0.5)

    again = agent_factory(state_dir=state_dir)  # no simulated latency: finishes quickly
    client2 = client_factory(again)
    assert client2.info().agent_id == agent_id
    for job_id in ("interrupted", "waiting"):
        assert client2.wait_result(job_id, timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
    assert executions(state_dir, "interrupted") == 2  # the interrupted run plus the re-run
    assert executions(state_dir, "waiting") == 1


def test_qdq_model_with_excluded_conv_and_disabled_optimizer(agent_factory, client_factory, tmp_path: Path) -> None:
    qdq = build_qdq_cnn(tmp_path, exclude=("conv2",))
    data = dataset(24, seed=5)
    client = client_factory(agent_factory())
    spec = job_spec(
        "qdq",
        client.upload_bytes(qdq),
        client.upload_bytes(npy_bytes(data)),
        backend_options=pb.BackendOptions(
            ort=pb.OrtOptions(disabled_optimizers=["WeightBiasQuantization"], intra_op_threads=1)
        ),
    )
    client.submit(spec)
    result = client.wait_result("qdq", timeout=RESULT_TIMEOUT)
    assert result.state == pb.SUCCEEDED, result.error
    expected = direct_topk(qdq, data, k=5, disabled_optimizers=("WeightBiasQuantization",))
    assert np.array_equal(decode_topk(result), expected)


def test_a_job_resubmitted_for_another_device_of_its_class_is_the_same_job(tmp_path, client_factory, cnn_bytes) -> None:
    """A controller re-leases a job to another device of the class (e.g. after the agent restarted and
    re-queued it): the agent takes it as the known job, moving it there while it waits; another class is a conflict."""
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    backends = [
        OrtBackend("a1", "a", simulated_latency_ms_per_sample=25.0),
        OrtBackend("a2", "a"),
        OrtBackend("b1", "b"),
    ]
    server = AgentServer(AgentConfig(state_dir=tmp_path / "agent", host="127.0.0.1", port=0), backends)
    server.start()
    try:
        client = client_factory(server)
        model, data = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8)))
        long_data = client.upload_bytes(npy_bytes(dataset(400)))
        client.submit(job_spec("blocker", model, long_data, device="a1", chunk_size=4))
        assert client.submit(job_spec("x", model, data, device="a1")).state == pb.QUEUED  # behind the blocker
        moved = client.submit(job_spec("x", model, data, device="a2"))
        assert (moved.state, moved.already_known) == (pb.QUEUED, True)
        done = client.wait_result("x", timeout=RESULT_TIMEOUT)
        assert (done.state, done.device) == (pb.SUCCEEDED, "a2")  # it ran on a2 while a1 was busy
        assert executions(server.state_dir, "x") == 1
        again = client.submit(job_spec("blocker", model, long_data, device="a2", chunk_size=4))
        assert again.already_known and again.state in (pb.QUEUED, pb.RUNNING)  # not a conflict, not a second run
        with pytest.raises(grpc.RpcError) as err:
            client.submit(job_spec("x", model, data, device="b1"))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "on device 'a2' (class a)" in err.value.details() and "another class" in err.value.details()
        assert client.submit(job_spec("x", model, data, device="a1")).state == pb.SUCCEEDED  # finished: stored result
        client.cancel("blocker")
        assert client.wait_result("blocker", timeout=RESULT_TIMEOUT).state == pb.CANCELLED
        assert executions(server.state_dir, "blocker") == 1
    finally:
        server.stop(grace=0.5)


def test_a_job_of_a_device_gone_after_a_restart_is_still_its_class(tmp_path, client_factory, cnn_bytes) -> None:
    """A job finished on device a2; the agent restarts with a1 only (a TVM lane whose RPC server left).
    The controller, which lost track, submits the job for a1: the same job of the same class, answered
    with the stored result (found by bench/chaos.py: it was refused as "another class", a lost result)."""
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer

    state = tmp_path / "agent"
    first = AgentServer(
        AgentConfig(state_dir=state, host="127.0.0.1", port=0), [OrtBackend("a1", "a"), OrtBackend("a2", "a")]
    )
    first.start()
    try:
        client = client_factory(first)
        model, data = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8)))
        client.submit(job_spec("x", model, data, device="a2"))
        assert client.wait_result("x", timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
    finally:
        first.stop(grace=0.5)
    second = AgentServer(
        AgentConfig(state_dir=state, host="127.0.0.1", port=0), [OrtBackend("a1", "a"), OrtBackend("b1", "b")]
    )
    second.start()
    try:
        client = client_factory(second)
        again = client.submit(job_spec("x", model, data, device="a1", attempt=2))
        assert (again.state, again.already_known) == (pb.SUCCEEDED, True)
        assert client.wait_result("x", timeout=RESULT_TIMEOUT).state == pb.SUCCEEDED
        # named for a device this agent does not list now (the controller still knew the gone lane)
        gone = client.submit(job_spec("x", model, data, device="a3", attempt=3))
        assert (gone.state, gone.already_known) == (pb.SUCCEEDED, True)
        assert executions(state, "x") == 1
        with pytest.raises(grpc.RpcError) as err:
            client.submit(job_spec("x", model, data, device="b1"))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "(class a)" in err.value.details()
    finally:
        second.stop(grace=0.5)


def test_a_job_for_a_device_the_agent_does_not_list_is_a_gone_device_to_the_controller(
    tmp_path, client_factory, cnn_bytes
) -> None:
    """The controller retries elsewhere (not a final rejection) when the agent answers that it does not list the
    device (a TVM lane gone with its RPC server after a restart: a lost result in bench/chaos.py); the agent's
    wording is what the controller reads."""
    from tuneqn.agent.backends.ort import OrtBackend
    from tuneqn.agent.config import AgentConfig
    from tuneqn.agent.server import AgentServer
    from tuneqn.controller.farm.links import gone_device

    server = AgentServer(AgentConfig(state_dir=tmp_path / "agent", host="127.0.0.1", port=0), [OrtBackend("a1", "a")])
    server.start()
    try:
        client = client_factory(server)
        model, data = client.upload_bytes(cnn_bytes), client.upload_bytes(npy_bytes(dataset(8)))
        with pytest.raises(grpc.RpcError) as err:
            client.submit(job_spec("x", model, data, device="a2"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and gone_device(err.value.details())
        assert not gone_device("job 'x' is already known with a different spec")
    finally:
        server.stop(grace=0.5)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="an ORT device runs two screens at once on 2+ cores")
def test_screens_share_the_device_and_a_timed_job_has_it_alone(agent_factory, client_factory, cnn_bytes, tmp_path):
    """Two jobs that only predict (screens: latency_repeats = 0) run at once, each on half the cores, with the
    predictions of a run alone; a job that times latency never runs beside another one."""
    server = agent_factory()
    client = client_factory(server)
    data = dataset(12000)
    model_sha = client.upload_bytes(cnn_bytes)
    data_sha = client.upload_bytes(npy_bytes(data))
    # The timed job goes first: both screens queue behind it and start together when it ends; the last timed
    # job queues behind both screens.
    specs = [
        job_spec("timed-1", model_sha, data_sha, chunk_size=64),
        job_spec("screen-a", model_sha, data_sha, chunk_size=64, latency_repeats=0),
        job_spec("screen-b", model_sha, data_sha, chunk_size=64, latency_repeats=0),
        job_spec("timed-2", model_sha, data_sha, chunk_size=64),
    ]
    for spec in specs:
        client.submit(spec)
    results = {s.job_id: list(client.watch(s.job_id, timeout=RESULT_TIMEOUT))[-1].result for s in specs}
    assert all(r.state == pb.SUCCEEDED for r in results.values())
    expected = direct_topk(cnn_bytes, data, k=results["screen-a"].top_k)
    for job_id in ("screen-a", "screen-b"):
        got = np.frombuffer(results[job_id].topk_indices, dtype="<i4").reshape(len(data), -1)
        assert np.array_equal(got, expected)  # one thread each: the same predictions
    with sqlite3.connect(server.config.state_dir / "agent.db") as conn:
        rows = conn.execute("SELECT job_id, started, finished FROM executions").fetchall()
    span = {job: (start, end) for job, start, end in rows}
    (a0, a1), (b0, b1) = span["screen-a"], span["screen-b"]
    assert a0 < b1 and b0 < a1  # the screens overlapped
    assert span["timed-1"][1] <= min(a0, b0) and span["timed-2"][0] >= max(a1, b1)  # the timed jobs ran alone

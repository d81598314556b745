"""The TVM backend through a real TVM RPC tracker and servers on 127.0.0.1.

Real ``tvm.rpc`` tracker and servers (``tests/tvm_rpc.py``), real agents (a process started
with the CLI flags, or in-process), real signals. Nothing here waits on a clock: every wait
is a condition with a deadline, and concurrency is proven from the device status and
``executed_on``, not from timings.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from agent_fixtures import job_spec, npy_bytes
from tvm_rpc import HOST, TvmLab, cnn_samples, ort_scores, wait_for

from tuneqn.agent.config import TvmSettings
from tuneqn.controller.farm.client import AgentClient, decode_topk
from tuneqn.v1 import agent_pb2 as pb

LONG = 600  # samples of a job run one per chunk: long enough to act while it runs


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)


def devices(client: AgentClient) -> dict[str, pb.Device]:
    return {d.name: d for d in client.info().devices}


def running_on(client: AgentClient, name: str) -> str:
    """The server a device's job runs on now ("" when none)."""
    status = devices(client)[name].status
    return status.removeprefix("running on ") if status.startswith("running on ") else ""


@pytest.mark.heavy
def test_tracker_runs_candidates_releases_sessions_and_bounds_the_wait(
    tvm_lab: TvmLab, agent_process, client_factory, tvm_models, monkeypatch, tmp_path: Path
) -> None:
    key = tvm_lab.new_key("android")
    (server,) = tvm_lab.start_servers(key, 1)
    tvm_lab.wait_servers(key, 1)
    monkeypatch.setenv("PYTHONPATH", tvm_lab.agent_env()["PYTHONPATH"])  # TVM imported without torch
    agent = agent_process(
        tmp_path / "state",
        "--backend",
        "tvm",
        "--device-class",
        "phone",
        "--tvm-tracker",
        tvm_lab.address,
        "--tvm-key",
        key,
        "--tvm-request-timeout",
        "4",
        "--tvm-session-timeout",
        "600",
    )
    client = client_factory(agent.address)
    (device,) = client.info().devices
    assert device.name == "testdev.0" and device.device_class == "phone" and device.backend == "tvm"
    assert device.rpc_key == key and device.remote == f"tracker {tvm_lab.address}"
    assert device.remote_servers == 1 and device.healthy and "QuantizeLinear" in device.supported_ops

    data = cnn_samples(48)
    data_sha = client.upload_bytes(npy_bytes(data))
    shas = {name: client.upload_bytes(path.read_bytes()) for name, path in tvm_models.items()}
    # one server, a 600 s session timeout and a 4 s request timeout: each job gets the
    # server only because the one before released its session when it ended
    for name in ("fp32", "qdq", "qoperator"):
        client.submit(job_spec(name, shas[name], data_sha, chunk_size=16, top_k=3))
    fp32 = client.wait_result("fp32", timeout=120)
    qdq = client.wait_result("qdq", timeout=120)
    qop = client.wait_result("qoperator", timeout=120)
    assert fp32.state == pb.SUCCEEDED and qdq.state == pb.SUCCEEDED, (fp32.error, qdq.error)
    assert fp32.executed_on == server.address and qdq.executed_on == server.address
    assert np.array_equal(decode_topk(fp32), topk(ort_scores(tvm_models["fp32"], data), 3))
    qdq_top1 = decode_topk(qdq)[:, 0]
    assert np.mean(qdq_top1 == topk(ort_scores(tvm_models["qdq"], data), 1)[:, 0]) >= 0.9
    assert qop.state == pb.FAILED and qop.infeasible
    assert list(qop.unsupported_ops) == ["QGemm", "QLinearConv", "QLinearGlobalAveragePool"]
    wait_for(lambda: tvm_lab.free(key) == 1, "the server to be free again")

    # no free device: the job waits visibly, then fails within the request timeout
    from tvm import rpc

    tracker = rpc.connect_tracker(HOST, tvm_lab.port)
    held = tracker.request(key, session_timeout=120)  # the test takes the only server
    client.submit(job_spec("starved", shas["fp32"], data_sha))
    status = wait_for(
        lambda: (s := devices(client)["testdev.0"].status).startswith("waiting for a free device") and s,
        "the waiting status",
    )
    assert f"key {key!r} on tracker {tvm_lab.address}" in status and "of 4 s" in status
    starved = client.wait_result("starved", timeout=60)
    assert starved.state == pb.FAILED and "no free device of key" in starved.error
    del held  # the test's session ends: the next job gets the server at once
    tracker.close()
    client.submit(job_spec("after", shas["fp32"], data_sha))
    after = client.wait_result("after", timeout=60)
    assert after.state == pb.SUCCEEDED and after.compile_cache_hit, after.error


@pytest.mark.heavy
def test_joining_servers_add_lanes_that_run_at_once_and_a_killed_server_loses_no_job(
    tvm_lab: TvmLab, tvm_agent, client_factory, tvm_models
) -> None:
    key = tvm_lab.new_key("phones")
    first = tvm_lab.start_servers(key, 1)
    tvm_lab.wait_servers(key, 1)
    server = tvm_agent(
        TvmSettings(tracker=(HOST, tvm_lab.port), key=key, request_timeout=60, poll_seconds=0.2), shared_cache=True
    )
    client = client_factory(server)
    assert list(devices(client)) == ["phone.0"]

    second = tvm_lab.start_servers(key, 1)  # a phone joins the tracker: a lane appears
    wait_for(lambda: len(devices(client)) == 2 and devices(client)["phone.1"].remote_servers == 2, "the second lane")
    assert devices(client)["phone.1"].healthy
    by_address = {s.address: s for s in first + second}

    data_sha = client.upload_bytes(npy_bytes(cnn_samples(LONG)))
    model = client.upload_bytes(tvm_models["fp32"].read_bytes())
    for job_id, lane in (("a", "phone.0"), ("b", "phone.1")):
        client.submit(job_spec(job_id, model, data_sha, chunk_size=1, device=lane))
    # both lanes hold a session on different servers at the same time
    on = wait_for(
        lambda: (a := running_on(client, "phone.0")) and (b := running_on(client, "phone.1")) and (a, b),
        "both jobs running",
    )
    assert on[0] != on[1] and set(on) == set(by_address)

    events: list[pb.JobEvent] = []
    watcher = threading.Thread(target=lambda: events.extend(client.watch("a", timeout=120)))
    watcher.start()
    wait_for(lambda: any(e.done > 0 for e in events), "job a to make progress")
    by_address[on[0]].kill(signal.SIGKILL)  # the phone running job a dies mid-job
    watcher.join()
    a, b = client.wait_result("a", timeout=120), client.wait_result("b", timeout=120)
    assert a.state == pb.SUCCEEDED and b.state == pb.SUCCEEDED, (a.error, b.error)
    assert a.executed_on == on[1] and b.executed_on == on[1]  # job a moved to the other phone
    assert a.executions == 1 and a.num_samples == LONG
    done = [e.done for e in events if e.stage == "predicting"]
    assert done == sorted(done)  # progress never went back: it continued from the chunk that failed
    wait_for(lambda: devices(client)["phone.0"].remote_servers == 1, "the tracker to drop the dead server")
    unhealthy = [d for d in devices(client).values() if not d.healthy]
    assert len(unhealthy) == 1 and "no server for this lane: 1 server(s)" in unhealthy[0].status

    # SIGTERM to a server with an open session: all its processes end, none is left
    survivor = by_address[on[1]]
    client.submit(job_spec("c", model, data_sha, chunk_size=1, device="phone.0"))
    wait_for(
        lambda: running_on(client, "phone.0") == survivor.address and len(survivor.processes()) >= 2,
        "job c in a session on the last server",
    )
    survivor.kill(signal.SIGTERM)
    wait_for(lambda: not survivor.processes(), "every process of the SIGTERMed server to exit")
    client.cancel("c")
    assert client.wait_result("c", timeout=60).state == pb.CANCELLED


@pytest.mark.heavy
def test_hung_server_is_abandoned_and_the_job_continues_on_another(
    tvm_lab: TvmLab, tvm_agent, client_factory, tvm_models
) -> None:
    key = tvm_lab.new_key("hang")
    servers = {s.address: s for s in tvm_lab.start_servers(key, 2)}
    tvm_lab.wait_servers(key, 2)
    server = tvm_agent(
        TvmSettings(tracker=(HOST, tvm_lab.port), key=key, request_timeout=60, call_timeout=2.0), shared_cache=True
    )
    client = client_factory(server)
    data_sha = client.upload_bytes(npy_bytes(cnn_samples(LONG)))
    client.submit(
        job_spec("h", client.upload_bytes(tvm_models["fp32"].read_bytes()), data_sha, chunk_size=1, device="phone.0")
    )
    hung = wait_for(lambda: running_on(client, "phone.0"), "job h running")
    servers[hung].freeze()  # SIGSTOP: connections stay open, nothing answers
    status = wait_for(
        lambda: (d := devices(client)["phone.0"]) and not d.healthy and d.status, "the lane to report the hang"
    )
    assert f"on {hung} took longer than 2 s (hung server)" in status
    result = client.wait_result("h", timeout=120)
    assert result.state == pb.SUCCEEDED, result.error
    (other,) = set(servers) - {hung}
    assert result.executed_on == other and result.num_samples == LONG
    assert devices(client)["phone.0"].healthy


@pytest.mark.heavy
def test_direct_rpc_servers_are_one_lane_each(tvm_lab: TvmLab, tvm_agent, client_factory, tvm_models) -> None:
    count = 2
    servers = tvm_lab.start_servers("direct", count, tracker=False)
    rpc = tuple((HOST, s.port) for s in servers)
    server = tvm_agent(TvmSettings(rpc=rpc, key="direct", request_timeout=10), name="board", shared_cache=True)
    client = client_factory(server)
    info = devices(client)
    assert sorted(info) == ["board.0", "board.1"]
    assert [info[f"board.{i}"].remote for i in range(count)] == [f"rpc {s.address}" for s in servers]
    data = cnn_samples(8)
    data_sha = client.upload_bytes(npy_bytes(data))
    model = client.upload_bytes(tvm_models["fp32"].read_bytes())
    for i in range(count):
        client.submit(job_spec(f"d{i}", model, data_sha, device=f"board.{i}", top_k=2))
    for i in range(count):
        result = client.wait_result(f"d{i}", timeout=60)
        assert result.state == pb.SUCCEEDED and result.executed_on == servers[i].address, result.error
        assert np.array_equal(decode_topk(result), topk(ort_scores(tvm_models["fp32"], data), 2))


def test_unreachable_server_fails_the_job_after_bounded_reconnects(tvm_agent, client_factory, tvm_models) -> None:
    from helpers import free_port

    address = f"{HOST}:{free_port()}"  # nothing listens there
    server = tvm_agent(
        TvmSettings(rpc=((HOST, int(address.rsplit(":", 1)[1])),), max_reconnects=2, reconnect_backoff=0.01),
        name="gone",
    )
    client = client_factory(server)
    spec = job_spec(
        "g", client.upload_bytes(tvm_models["fp32"].read_bytes()), client.upload_bytes(npy_bytes(cnn_samples(2)))
    )
    client.submit(spec)
    result = client.wait_result("g", timeout=60)
    assert result.state == pb.FAILED and not result.infeasible
    assert "lost the device 3 times, giving up" in result.error and f"cannot connect to {address}" in result.error
    assert devices(client)["gone.0"].healthy  # the job ended: nothing is being reconnected

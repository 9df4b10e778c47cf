"""The load-test tool (tools/load_test.py) counts what it sends: its core loop (locust in a child
process) against one real server for ~3 s with 2 clients. No timing thresholds."""
import importlib.util
import json
import sys

import numpy as np
import pytest

# Never import locust here: it monkey-patches threading and sockets (gevent) for the whole
# pytest process, and every threaded test after this file would then run on greenlets.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust not installed (pip install -e '.[test]')", allow_module_level=True)
pytest.importorskip("fastapi")

from tools import load_test as lt  # noqa: E402


def test_bodies_are_oip_binary_requests_of_one_row():
    rows = np.random.default_rng(0).standard_normal((3, 1, 14, 14)).astype(np.float32)
    bodies = lt.encode_bodies(rows)
    assert len(bodies) == 3
    for (body, hlen), row in zip(bodies, rows):
        header = json.loads(body[:hlen])
        (inp,) = header["inputs"]
        assert inp["shape"] == [1, 1, 14, 14] and inp["datatype"] == "FP32"
        assert inp["parameters"]["binary_data_size"] == len(body) - hlen == row.nbytes
        np.testing.assert_array_equal(np.frombuffer(body[hlen:], "<f4").reshape(row.shape), row)


def test_summarise_counts_statuses_and_warmup():
    rec = {"t_done": [0.05, 0.5, 1.0, 1.5, 2.0], "lat_ms": [9.0, 1.0, 2.0, 3.0, 4.0],
           "status": [200, 200, 503, 200, 0], "retry_after": [True], "t_stop": 2.0, "sent": 6,
           "client_cpu_s": 0.1, "locust": {}}
    s = lt.summarise(rec, seconds=2.0)   # warm-up 0.2 s: the first request is not measured
    assert s["requests"] == 5 and s["ok"] == 3 and s["measured_ok"] == 2
    assert s["by_status"] == {"0": 1, "200": 3, "503": 1} and s["errors"] == {"0": 1, "503": 1}
    assert s["share_503"] == 0.2 and s["retry_after_on_503"] == 1.0
    assert s["rows_per_s"] == pytest.approx(2 / 1.8, abs=0.1)
    assert s["p50_ms"] == 2.0   # the measured accepted requests: 1.0 and 3.0 ms


def test_core_loop_against_a_server_counts_consistently(teacher_artifact, fashion_small, tmp_path):
    _, _, xte, _ = fashion_small
    server = lt.Server(teacher_artifact, "test", {}, tmp_path)
    try:
        assert server.stats()["learning_paused"] is True
        out = server.check(xte[0].numpy())
        assert out["output"]["shape"] == [1, 10]
        bodies = lt.encode_bodies(xte[:64].numpy())
        r = lt.drive(server.url, server.model, bodies, users=2, seconds=3.0, requests_max=100_000,
                     server_pid=server.pid)
    finally:
        server.stop()
    assert r["users"] == 2 and r["requests"] > 0
    # every request answered is counted once, with its latency and status, as locust counted it
    assert r["requests"] == r["latencies"] == sum(r["by_status"].values())
    assert r["requests"] == r["locust"]["num_requests"]
    assert r["ok"] + sum(r["errors"].values()) == r["requests"]
    assert r["errors"] == {} and r["locust"]["num_failures"] == 0
    assert 0 < r["measured_ok"] <= r["ok"]
    # the users were stopped with at most one request each in flight
    assert r["requests"] <= r["sent"] <= r["requests"] + 2
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["rows_per_s"] > 0
    assert r["server_rss_max_mb"] > 0 and r["server_cpu_cores"] >= 0


def test_requests_max_bounds_a_turn(teacher_artifact, fashion_small, tmp_path):
    _, _, xte, _ = fashion_small
    server = lt.Server(teacher_artifact, "bound", {}, tmp_path, pause_learning=False)
    try:
        r = lt.drive(server.url, server.model, lt.encode_bodies(xte[:8].numpy()), users=2,
                     seconds=30.0, requests_max=40)
        # two locust processes, one user each, started together: the bound is shared
        r2 = lt.drive(server.url, server.model, lt.encode_bodies(xte[:8].numpy()), users=2,
                      seconds=30.0, requests_max=41, procs=2)
    finally:
        server.stop()
    assert r["requests"] == r["sent"] == 40 and r["seconds"] < 30.0
    assert r2["locust_procs"] == 2 and r2["requests"] == r2["sent"] == 41
    assert r2["locust"]["num_requests"] == 41 and r2["errors"] == {}


def test_records_of_several_locust_processes_merge():
    a = {"t_done": [0.1, 0.2], "lat_ms": [1.0, 2.0], "status": [200, 503], "retry_after": [True],
         "t_stop": 2.0, "sent": 2, "client_cpu_s": 0.1,
         "locust": {"num_requests": 2, "num_failures": 1, "p50_ms": 1, "p99_ms": 2}}
    b = {"t_done": [0.3], "lat_ms": [3.0], "status": [200], "retry_after": [], "t_stop": 2.1,
         "sent": 2, "client_cpu_s": 0.2,
         "locust": {"num_requests": 1, "num_failures": 0, "p50_ms": 3, "p99_ms": 3}}
    m = lt.merge_records([a, b])
    assert m["status"] == [200, 503, 200] and m["lat_ms"] == [1.0, 2.0, 3.0]
    assert m["t_stop"] == 2.1 and m["sent"] == 4 and m["client_cpu_s"] == pytest.approx(0.3)
    assert m["locust"] == {"num_requests": 3, "num_failures": 1, "p50_ms": 3, "p99_ms": 3}
    assert lt.merge_records([a]) is a


def test_the_tool_does_not_import_locust_into_its_caller():
    assert "locust" not in sys.modules
    monkey = sys.modules.get("gevent.monkey")   # tritonclient.http imports it, patching nothing
    assert monkey is None or not any(monkey.is_module_patched(m) for m in ("socket", "threading"))

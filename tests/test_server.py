"""The inference server (runtime/server): Open Inference Protocol, batching, errors, metrics, state.

Most tests share one in-process server (uvicorn in a thread on a free loopback port); the
lifecycle tests (SIGKILL, SIGTERM, restart) run ``python -m runtime.server`` as a subprocess.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from runtime.server import ServerConfig, Service, build_app  # noqa: E402
from runtime.server.__main__ import main as server_main  # noqa: E402
from runtime.server.protocol import HEADER_LENGTH, pack_bytes  # noqa: E402
from tools import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "teacher"
BODY_LIMIT = 256 * 1024


class Running:
    """A Service served by uvicorn in a thread; ``url`` is its base address."""

    def __init__(self, service: Service, stop_on_shutdown: bool = True):
        self.service = service
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = self.app = build_app(service, stop_on_shutdown)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def start(artifact, **settings) -> Running:
    cfg = ServerConfig(artifact=str(artifact), model_name=MODEL, **settings)
    return Running(Service(cfg).start())


@pytest.fixture(scope="module")
def rows(fashion_small):
    """Test rows the server has never seen, [N, 1, 14, 14] normalised."""
    return fashion_small[2][:400].contiguous()


@pytest.fixture(scope="module")
def reference(teacher_artifact):
    """The artifact as plain TorchScript, exits inactive: the backbone's answer."""
    with warnings.catch_warnings():   # torch.jit's deprecation notice: not ours to show
        warnings.simplefilter("ignore")
        return torch.jit.load(str(teacher_artifact))


def backbone(reference, x):
    with torch.no_grad():
        return reference(x)


@pytest.fixture(scope="module")
def server(teacher_artifact):
    srv = start(teacher_artifact, preprocess="fashion-mnist", max_batch=16, max_wait_ms=20,
                max_request_rows=16, max_body_bytes=BODY_LIMIT)
    yield srv
    srv.stop()


def infer_json(x: torch.Tensor, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}], **extra}


def post(srv, body, path=f"/v2/models/{MODEL}/infer", **kw):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return httpx.post(srv.url + path, content=body, timeout=30, **kw)


def metric_samples(srv) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics, parsed by prometheus_client."""
    text = httpx.get(srv.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples, name, **labels) -> float:
    return samples.get((name, frozenset({"model": MODEL, **labels}.items())), 0.0)


def png_of(row: torch.Tensor) -> bytes:
    """A grayscale PNG of a normalised 1xHxW row (the inverse of the fashion-mnist preset)."""
    from PIL import Image
    pixels = (row[0] * data.STD + data.MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def dequantised(row: torch.Tensor) -> torch.Tensor:
    """What the preset makes of png_of(row)."""
    pixels = (row * data.STD + data.MEAN).mul(255).round().clamp(0, 255)
    return (pixels / 255 - data.MEAN) / data.STD


# ----- protocol --------------------------------------------------------------------------------

def test_health_ready_and_metadata(server):
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    r = httpx.get(server.url + "/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "layer-cache" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 1, 14, 14]} in model["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in model["inputs"]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]},
                                {"name": "exit", "datatype": "INT64", "shape": [-1]}]
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1").status_code == 200


def test_unknown_model_and_route_are_404_json(server, rows):
    for r in (httpx.get(server.url + "/v2/models/nope"),
              post(server, infer_json(rows[:1]), path="/v2/models/nope/infer"),
              httpx.get(f"{server.url}/v2/models/{MODEL}/versions/7"),
              httpx.get(server.url + "/v3/whatever")):
        assert r.status_code == 404
        assert r.json()["error"]
    assert "this server serves 'teacher'" in httpx.get(server.url + "/v2/models/nope").json()["error"]


def test_json_infer_returns_the_backbone_answer(server, rows, reference):
    x = rows[:5]
    r = post(server, infer_json(x, id="req-1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == MODEL and doc["id"] == "req-1"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["output"]["datatype"] == "FP32" and out["output"]["shape"] == [5, 10]
    got = torch.tensor(out["output"]["data"]).reshape(5, 10)
    torch.testing.assert_close(got, backbone(reference, x), atol=1e-4, rtol=1e-4)
    assert out["exit"]["datatype"] == "INT64"
    assert out["exit"]["data"] == [server.service.rt.num_exits] * 5   # fresh artifact: exits off
    # Nested data is accepted as well as flat; only the requested output comes back.
    body = infer_json(x[:2], outputs=[{"name": "exit"}])
    body["inputs"][0]["data"] = x[:2].tolist()
    doc = post(server, body).json()
    assert [o["name"] for o in doc["outputs"]] == ["exit"]


def test_binary_extension_in_and_out(server, rows, reference):
    """Raw binary tensors as the extension defines them, without any client library."""
    x = rows[5:8]
    head = json.dumps({"inputs": [{"name": "input", "shape": [3, 1, 14, 14], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.numel() * 4}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": True}},
                                   {"name": "exit", "parameters": {"binary_data": False}}]}).encode()
    r = post(server, head + x.numpy().astype("<f4").tobytes(),
             headers={HEADER_LENGTH: str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER_LENGTH])
    doc = json.loads(r.content[:n])
    out, ex = doc["outputs"]
    assert out["parameters"]["binary_data_size"] == 3 * 10 * 4 and "data" not in out
    got = torch.from_numpy(np.frombuffer(r.content[n:], dtype="<f4").copy()).reshape(3, 10)
    torch.testing.assert_close(got, backbone(reference, x), atol=1e-4, rtol=1e-4)
    assert ex["data"] == [server.service.rt.num_exits] * 3


def test_tritonclient_unmodified(server, rows, reference):
    tc = pytest.importorskip("tritonclient.http")
    client = tc.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"][0]["name"] == "input"
    x = rows[10:14]
    want = backbone(reference, x)
    for binary in (True, False):
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy(), binary_data=binary)
        outputs = None if binary else [tc.InferRequestedOutput("output", binary_data=False),
                                       tc.InferRequestedOutput("exit", binary_data=False)]
        res = client.infer(MODEL, [inp], outputs=outputs)
        torch.testing.assert_close(torch.from_numpy(res.as_numpy("output").copy()), want, atol=1e-4,
                                   rtol=1e-4)
        assert res.as_numpy("exit").dtype == np.int64 and res.as_numpy("exit").shape == (4,)
    # An image through the BYTES input, binary, as tritonclient sends it.
    img = tc.InferInput("image", [2], "BYTES")
    img.set_data_from_numpy(np.array([png_of(rows[20]), png_of(rows[21])], dtype=np.object_))
    res = client.infer(MODEL, [img])
    torch.testing.assert_close(torch.from_numpy(res.as_numpy("output").copy()),
                               backbone(reference, dequantised(rows[20:22])), atol=1e-4, rtol=1e-4)
    # Errors come back as the client's exception with the server's message.
    bad = tc.InferInput("input", [1, 1, 7, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 7, 7), np.float32))
    with pytest.raises(tc.InferenceServerException, match=r"send \[N, 1, 14, 14\]"):
        client.infer(MODEL, [bad])
    client.close()


def test_png_input_with_the_fashion_mnist_preset(server, rows, reference):
    x = rows[30:33]
    images = [base64.b64encode(png_of(r)).decode() for r in x]
    r = post(server, {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                  "data": images}]})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"][0]["data"]).reshape(3, 10)
    torch.testing.assert_close(got, backbone(reference, dequantised(x)), atol=1e-4, rtol=1e-4)
    # Dequantising moved the rows by at most half a grey level: the answers barely change.
    assert (got.argmax(1) == backbone(reference, x).argmax(1)).all()


# ----- batching ------------------------------------------------------------------------------------

def test_concurrent_clients_get_their_own_rows_in_order(server, rows, reference):
    before = metric_samples(server)
    jobs = [rows[40 + 3 * i: 40 + 3 * i + 1 + i % 3] for i in range(32)]   # 1-3 distinct rows

    def call(x):
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{server.url}/v2/models/{MODEL}/infer", content=json.dumps(infer_json(x)))
        assert r.status_code == 200, r.text
        return torch.tensor(r.json()["outputs"][0]["data"]).reshape(len(x), 10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    for x, got in zip(jobs, results):
        torch.testing.assert_close(got, backbone(reference, x), atol=1e-4, rtol=1e-4)
    after = metric_samples(server)
    batches = sample(after, "layer_cache_batch_requests_count") - \
        sample(before, "layer_cache_batch_requests_count")
    requests = sample(after, "layer_cache_batch_requests_sum") - \
        sample(before, "layer_cache_batch_requests_sum")
    assert requests == len(jobs)
    assert batches < len(jobs), "no batch held more than one request"
    assert sample(after, "layer_cache_batch_rows_bucket", le="1.0") < \
        sample(after, "layer_cache_batch_rows_count")


def test_queue_full_is_503_and_deadline_is_504(teacher_artifact, rows):
    # A long wait for the batch to fill keeps the first request queued: the queue (1) is full.
    srv = start(teacher_artifact, max_batch=64, max_wait_ms=1500, max_queue=1, wait_when_idle=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, srv, infer_json(rows[:1]))
            deadline = time.time() + 5
            while srv.service.batcher.depth < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            r = post(srv, infer_json(rows[1:2]))
            assert not first.done(), "a full queue must answer at once, not after the batch"
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert "queue full" in r.json()["error"]
            assert first.result().status_code == 200
        # Triton's timeout parameter (microseconds): passes while waiting for the batch to fill.
        t0 = time.perf_counter()
        r = post(srv, infer_json(rows[:1], parameters={"timeout": 200_000}))
        assert r.status_code == 504 and "deadline" in r.json()["error"]
        assert time.perf_counter() - t0 < 1.4, "the deadline must not wait for the batch"
        time.sleep(1.6)   # the worker drops the expired request instead of running it
        # A client that hangs up while queued: its request is dropped, not run.
        body = json.dumps(infer_json(rows[:1])).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as raw:
            raw.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 5
            while srv.service.batcher.depth < 1:
                assert time.time() < deadline
                time.sleep(0.01)
        time.sleep(1.6)
        s = metric_samples(srv)
        assert sample(s, "layer_cache_requests_total", status="503") == 1
        assert sample(s, "layer_cache_requests_total", status="504") == 1
        assert sample(s, "layer_cache_requests_total", status="499") == 1
        assert sample(s, "layer_cache_dropped_requests_total", reason="cancelled") == 2
        assert srv.service.rt.stats()["rows"] == 1, "a dropped request was run"
    finally:
        srv.stop()


def test_past_the_in_flight_limit_is_503_with_retry_after(server, rows):
    """Inference sheds load itself, before reading the body, with JSON and Retry-After (uvicorn's
    own connection limit answers a bare 503)."""
    endpoint = server.app.infer_endpoint
    limit = endpoint.max_in_flight
    endpoint.max_in_flight = 0
    try:
        r = post(server, infer_json(rows[:1]))
    finally:
        endpoint.max_in_flight = limit
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert "in flight" in r.json()["error"]
    assert endpoint.in_flight == 0
    assert post(server, infer_json(rows[:1])).status_code == 200


def test_the_infer_route_answers_other_methods_and_prefixed_paths(server, rows):
    r = httpx.get(f"{server.url}/v2/models/{MODEL}/infer")
    assert r.status_code == 405 and r.json()["error"]
    # The same handler behind FastAPI's router (the app mounted under a prefix).
    from starlette.applications import Starlette
    from starlette.routing import Mount
    outer = Starlette(routes=[Mount("/prefix", app=server.app)])
    import asyncio
    sent = []
    body = json.dumps(infer_json(rows[:2])).encode()

    async def call():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": f"/prefix/v2/models/{MODEL}/infer",
                 "raw_path": b"", "query_string": b"", "root_path": "", "headers": [],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await outer(scope, receive, send)
    asyncio.run(call())
    assert sent[0]["status"] == 200, sent
    doc = json.loads(sent[1]["body"])
    assert doc["outputs"][0]["shape"] == [2, 10]


# ----- bad input ------------------------------------------------------------------------------------

def _bad(server, body, status=400, **kw):
    r = post(server, body, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def test_bad_input_is_4xx_with_a_message_and_reaches_nothing(server, rows):
    rows_before = server.service.rt.stats()["rows"]
    x = rows[:2]
    assert "not valid JSON" in _bad(server, b"{nope")
    assert "no \"inputs\"" in _bad(server, {"inputs": []})
    wrong_type = infer_json(x)
    wrong_type["inputs"][0]["datatype"] = "INT32"
    wrong_type["inputs"][0]["data"] = [0] * x.numel()
    assert "must be FP32" in _bad(server, wrong_type)
    bools = infer_json(x)
    bools["inputs"][0]["data"][0] = True   # a bool is not a number, even among numbers
    assert "FP32 data must be numbers" in _bad(server, bools)
    assert "unknown datatype" in _bad(server, {"inputs": [{"name": "input", "shape": [1],
                                                           "datatype": "FLOAT", "data": [1]}]})
    assert "send [N, 1, 14, 14]" in _bad(server, infer_json(torch.zeros(2, 1, 14, 13)))
    short = infer_json(x)
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    assert "needs 392 elements" in _bad(server, short)
    nan = x.clone()
    nan[1, 0, 3, 3] = float("nan")
    assert "rows [1] contain NaN" in _bad(server, infer_json(nan))
    assert "unknown input 'x'" in _bad(server, {"inputs": [{"name": "x", "shape": [1],
                                                            "datatype": "FP32", "data": [1]}]})
    assert "over the limit of 16" in _bad(server, infer_json(rows[:17]))
    assert "unknown output 'logits'" in _bad(server, infer_json(x, outputs=[{"name": "logits"}]))
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 14, 14], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 784}}]}).encode()
    assert "binary_data_size 784 does not fit" in _bad(server, head + b"\0" * 700,
                                                       headers={HEADER_LENGTH: str(len(head))})
    garbage = base64.b64encode(b"not an image at all").decode()
    good = base64.b64encode(png_of(rows[0])).decode()
    msg = _bad(server, {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                    "data": [good, garbage]}]})
    assert msg.startswith("image row 1: cannot decode")
    assert "not base64" in _bad(server, {"inputs": [{"name": "image", "shape": [1],
                                                     "datatype": "BYTES", "data": ["%%%"]}]})
    assert "over the limit" in _bad(server, b"{" + b" " * (BODY_LIMIT + 10) + b"}", status=413)
    assert server.service.rt.stats()["rows"] == rows_before, "bad input reached the runtime"
    assert post(server, infer_json(x)).status_code == 200, "the server must keep serving"


# ----- metrics, stats, learning -----------------------------------------------------------------------

def test_metrics_parse_and_count_requests(server, rows):
    before = metric_samples(server)
    for i in range(3):
        assert post(server, infer_json(rows[i:i + 2])).status_code == 200
    assert post(server, b"[").status_code == 400
    after = metric_samples(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("layer_cache_requests_total", status="200") == 3
    assert delta("layer_cache_rows_total", status="200") == 6
    assert delta("layer_cache_requests_total", status="400") == 1
    assert delta("layer_cache_request_latency_seconds_count") == 4
    assert delta("layer_cache_queue_wait_seconds_count") == 3
    assert sample(after, "layer_cache_queue_depth") == 0
    rt_rows = server.service.rt.stats()["rows_per_exit"]
    assert sample(after, "layer_cache_exit_rows_total", exit="backbone") == rt_rows[-1]
    for name in ("layer_cache_flops_saved_ratio", "layer_cache_learning_rounds_total",
                 "layer_cache_drift_events_total", "layer_cache_held_out_independent_rows",
                 "layer_cache_independent_rows_needed", "layer_cache_untaught_rows_total",
                 "layer_cache_teaching_share_ratio"):
        assert (name, frozenset({"model": MODEL}.items())) in after
    assert sample(after, "layer_cache_independent_rows_needed") == \
        server.service.rt.stats()["learning"]["independent_rows_needed"]
    assert sample(after, "layer_cache_untaught_rows_total") == \
        server.service.rt.stats()["learning"]["deferred_rows_dropped"]
    assert sample(after, "layer_cache_teaching_share_ratio") == \
        server.service.rt.stats()["learning"]["warmup_share"]


def test_stats_and_pause_resume_learning(server):
    stats = httpx.get(f"{server.url}/v2/models/{MODEL}/stats").json()
    assert stats["rows"] == server.service.rt.stats()["rows"] and "learning" in stats
    assert stats["server"]["queue_depth"] == 0
    if not hasattr(server.service.rt, "pause_learning"):
        pytest.skip("this runtime has no pause_learning")
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/learning/pause")
    assert r.status_code == 200 and r.json()["learning_paused"] is True
    assert server.service.rt.learning_paused
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/stats").json()["learning_paused"] is True
    assert sample(metric_samples(server), "layer_cache_learning_paused") == 1
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/learning/resume")
    assert r.status_code == 200 and not server.service.rt.learning_paused
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/learning/stop").status_code == 404


# ----- CLI and state dir -----------------------------------------------------------------------------

def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, teacher_artifact):
    cases = [([str(tmp_path / "missing.cached.pt"), "--port", "0"], "does not exist"),
             ([str(teacher_artifact), "--port", "x"], "invalid int value"),
             ([str(teacher_artifact), "--max-batch", "0"], "max_batch must be at least 1"),
             ([str(teacher_artifact), "--preprocess", "cifar"], "invalid choice"),
             ([str(teacher_artifact), "--port", "0", "--preprocess", "imagenet"],
              "preset 'imagenet' makes RGB"),
             ([str(teacher_artifact), "--port", "0", "--runtime-option", "budget=3"], "budget")]
    for argv, message in cases:
        assert server_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        err = [line for line in err if " INFO " not in line]   # startup log lines, not errors
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def _spawn(artifact, state_dir, log_path, *extra):
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "runtime.server", str(artifact), "--port",
                             str(port), "--model-name", MODEL, "--state-dir", str(state_dir),
                             "--checkpoint-every", "3600", *extra],
                            cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not become ready"
        time.sleep(0.1)


def _send_binary(url, x, batch=128):
    """Rows through the binary extension (cheap to encode); returns the exit of each row."""
    exits = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch].contiguous()
        head = json.dumps({"inputs": [{"name": "input", "shape": list(part.shape),
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": part.numel() * 4}}],
                           "outputs": [{"name": "exit"}]}).encode()
        r = httpx.post(f"{url}/v2/models/{MODEL}/infer", timeout=30,
                       content=head + part.numpy().tobytes(),
                       headers={HEADER_LENGTH: str(len(head))})
        assert r.status_code == 200, r.text
        exits += r.json()["outputs"][0]["data"]
    return exits


@pytest.mark.slow
def test_state_survives_a_kill_and_sigterm_drains(teacher_artifact, fashion_small, tmp_path):
    from compiler.artifact import read_manifest
    state = tmp_path / "state"
    ckpt = state / f"{MODEL}.learned.pt"
    # 1. Learn online until exits switch on: the round is checkpointed at once (not at shutdown:
    #    the process then dies without one, as under SIGKILL).
    cfg = ServerConfig(artifact=str(teacher_artifact), model_name=MODEL, state_dir=str(state),
                       checkpoint_every_s=3600,
                       # a 30% hold-out switches exits on within the 3,000 rows sent
                       runtime_options={"latency_weight": 0.0, "calib_fraction": 0.3})
    service = Service(cfg).start()
    srv = Running(service, stop_on_shutdown=False)
    try:
        _send_binary(srv.url, fashion_small[0][5000:8000])   # rows the teacher never trained on
        deadline = time.time() + 30
        while not (service.checkpointer.count and any(read_manifest(ckpt)["runtime"]["stats"]
                                                      ["enabled"])):
            assert time.time() < deadline, "no learning round was checkpointed"
            time.sleep(0.2)
    finally:
        srv.stop()
        service.checkpointer.close(final=False)   # killed: no shutdown checkpoint
        service.rt.close()
    learned_exits = read_manifest(ckpt)["runtime"]["stats"]["enabled"]
    # 2. The real CLI, restarted on the state dir with the same pricing, serves the checkpoint
    #    with its exits on (a load that prices time in would serve those that pay here).
    proc, url = _spawn(teacher_artifact, state, tmp_path / "b.log", "--max-wait-ms", "800",
                       "--runtime-option", "latency_weight=0")
    try:
        stats = httpx.get(f"{url}/v2/models/{MODEL}/stats").json()
        assert stats["server"]["source"] == str(ckpt)
        assert stats["enabled"] == learned_exits, "the checkpoint's exits are not on after restart"
        exits = _send_binary(url, fashion_small[2][:256])
        assert min(exits) < 2, "no row left at an exit after restart"
        # 3. SIGTERM while a request waits in the queue: it is answered, then a checkpoint, exit 0.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v2/models/{MODEL}/infer",
                                  content=json.dumps(infer_json(fashion_small[2][300:303])),
                                  timeout=30)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "b.log").read_text()
    assert "(checkpoint)" in log and "(shutdown;" in log, log
    assert read_manifest(ckpt)["runtime"]["stats"]["rows"] == 256 + 3


def _foreign_copy(artifact: Path, dest: Path):
    """The artifact with another source sha256 in its manifest, saved properly (content hash
    and all): a sound checkpoint of another model."""
    from compiler.artifact import load, save
    module, manifest = load(str(artifact))
    save(module, dict(manifest, source_sha256="0" * 64), str(dest))


def test_foreign_or_corrupt_state_file_is_refused_with_a_log_line(teacher_artifact, tmp_path,
                                                                   caplog):
    from compiler.artifact import read_manifest
    state = tmp_path / "state"
    state.mkdir()
    ckpt = state / f"{MODEL}.learned.pt"
    for make, reason in ((lambda: _foreign_copy(teacher_artifact, ckpt), "another model"),
                         (lambda: ckpt.write_bytes(b"garbage"), "unreadable")):
        make()
        assert read_manifest(teacher_artifact)  # the artifact itself is fine
        caplog.clear()
        with caplog.at_level("INFO", logger="runtime.server"):
            svc = Service(ServerConfig(artifact=str(teacher_artifact), model_name=MODEL,
                                       state_dir=str(state))).start()
        try:
            assert svc.source == str(teacher_artifact)
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert len(refused) == 1 and reason in refused[0], refused
            assert not ckpt.exists(), "the refused file must be moved aside, not overwritten"
            assert len(list(state.glob(f"{MODEL}.learned.pt.refused-*"))) >= 1
        finally:
            svc.stop()
        for f in state.glob("*.refused-*"):
            f.unlink()


@pytest.mark.parametrize("wait_when_idle", [False, True])
def test_a_lone_request_on_a_quiet_server_runs_at_once_unless_told_to_wait(wait_when_idle):
    import asyncio

    from runtime.server.batching import DynamicBatcher

    sizes = []

    def predict(x):
        sizes.append(x.shape[0])
        return x.sum(1, keepdim=True), torch.zeros(x.shape[0], dtype=torch.long)

    batcher = DynamicBatcher(predict, max_batch=64, max_wait_s=2.0, max_queue=8,
                             wait_when_idle=wait_when_idle)
    batcher.start()

    async def one():
        t0 = time.perf_counter()
        out, _ = await batcher.submit(torch.ones(1, 3))
        return time.perf_counter() - t0, float(out[0, 0])

    try:
        seconds, value = asyncio.run(one())
    finally:
        batcher.close()
    assert value == 3.0 and sizes == [1]
    if wait_when_idle:
        assert seconds >= 1.9, "told to wait for company, it must wait max_wait"
    else:
        assert seconds < 1.0, "nobody else is queued: the request must not wait for a batch"

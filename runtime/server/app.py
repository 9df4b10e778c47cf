"""Every HTTP route of the server, on a Service: Open Inference Protocol, stats, learning, metrics.

Errors are JSON ``{"error": "..."}``: 400 bad request (says what to send), 404 unknown model or
route, 413 body too large, 415 unknown Content-Encoding, 501 not supported by this runtime,
503 not ready / queue full / shutting down (with Retry-After), 504 deadline passed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

import runtime

from . import protocol
from .batching import DeadlineExceeded, QueueFull, ShuttingDown
from .metrics import CONTENT_TYPE
from .service import MODEL_VERSION, ClientGone, Service

log = logging.getLogger("runtime.server")


def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_INFER_PATH = re.compile(r"(?:^|/)v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON = b"application/json"
INLINE_BODY = 64 * 1024   # bodies up to this size are decoded on the event loop (no thread hop)


def _error_body(message: str) -> bytes:
    return protocol.dumps({"error": message})


async def _send(send, status: int, body: bytes, content_type: bytes = _JSON,
                headers: Optional[dict] = None):
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    for k, v in (headers or {}).items():
        raw.append((k.lower().encode("latin-1"), str(v).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive, length: Optional[str], limit: int) -> bytes:
    if length is not None and length.isdigit() and int(length) > limit:
        raise protocol.ProtocolError(f"body of {length} bytes is over the limit of {limit}; send "
                                     f"fewer rows per request (or the binary data extension)", 413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise protocol.ProtocolError(f"body over the limit of {limit} bytes; send fewer rows "
                                         f"per request", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _wait_disconnect(receive):
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` as a plain ASGI app.

    The per-request path of the server, kept lean: no request object or parameter validation,
    small bodies decoded on the event loop (a thread hop costs more than decoding a binary
    tensor), images and large or compressed bodies decoded on a worker thread, one future per
    request resolved by the batcher, answers encoded with orjson.
    """

    def __init__(self, service: Service):
        self.service = service
        self.in_flight = 0
        cfg = service.config
        # Requests between arrival and answer: what the queue holds, a batch being run and one
        # being decoded. Past it: 503 + Retry-After before the body is read.
        self.max_in_flight = cfg.max_queue + 2 * cfg.max_batch

    async def __call__(self, scope, receive, send):
        service = self.service
        cfg = service.config
        t0 = time.perf_counter()
        rows, status = 0, 500
        if self.in_flight >= self.max_in_flight:
            status = 503
            try:
                await _send(send, 503, _error_body(
                    f"server busy ({self.in_flight} requests in flight); retry later"),
                    headers={"Retry-After": service.batcher.retry_after_s()})
            finally:
                service.metrics.observe_request(status, rows, time.perf_counter() - t0)
            return
        self.in_flight += 1
        try:
            m = _INFER_PATH.search(scope["path"])
            name, version = (m.group(1), m.group(2)) if m else ("", None)
            if name != service.name:
                status = 404
                await _send(send, 404, _error_body(
                    f"unknown model '{name}'; this server serves '{service.name}'"))
                return
            if version is not None and version != MODEL_VERSION:
                status = 404
                await _send(send, 404, _error_body(
                    f"model '{name}' has version {MODEL_VERSION} only, not '{version}'"))
                return
            if not service.ready:
                status = 503
                await _send(send, 503, _error_body(
                    "model is not ready (starting or shutting down); retry"),
                    headers={"Retry-After": 1})
                return
            headers = _headers(scope)
            body = await _read_body(receive, headers.get("content-length"), cfg.max_body_bytes)
            encoding = headers.get("content-encoding")
            hlen = headers.get("inference-header-content-length")
            if len(body) <= INLINE_BODY and not encoding:
                req = protocol.parse_request(body, hlen)
                long = service.runs_long(req)
                x = service.prepare(req) if not long else None
            else:
                req, long, x = None, True, None
            if long:
                req, x = await asyncio.get_running_loop().run_in_executor(
                    None, self._decode, body, encoding, hlen, req)
            rows = int(x.shape[0])
            gone = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                outputs = await service.infer(x, service.deadline(req), gone)
            finally:
                gone.cancel()
            payload, extra = protocol.encode_response(service.name, MODEL_VERSION, req, outputs)
            status = 200
            ctype = extra.pop("Content-Type").encode()
            await _send(send, 200, payload, ctype, extra)
        except protocol.ProtocolError as e:
            status = e.status
            await _send(send, e.status, _error_body(str(e)))
        except runtime.InputError as e:
            status = 400
            await _send(send, 400, _error_body(str(e)))
        except QueueFull as e:
            status = 503
            await _send(send, 503, _error_body(str(e)),
                        headers={"Retry-After": service.batcher.retry_after_s()})
        except ShuttingDown as e:
            status = 503
            await _send(send, 503, _error_body(str(e)), headers={"Retry-After": 1})
        except DeadlineExceeded as e:
            status = 504
            await _send(send, 504, _error_body(str(e)))
        except ClientGone:
            status = 499   # nginx's "client closed request"; nobody reads this answer
            with contextlib.suppress(Exception):
                await _send(send, 499, b"", b"text/plain")
        except Exception as e:  # noqa: BLE001 - answer, log, keep serving
            log.exception("infer failed: %s", e)
            with contextlib.suppress(Exception):   # the answer may have started already
                await _send(send, 500, _error_body(f"internal error: {type(e).__name__}: {e}"))
        finally:
            self.in_flight -= 1
            service.metrics.observe_request(status, rows, time.perf_counter() - t0)

    def _decode(self, body: bytes, encoding, hlen, req):
        """On a worker thread: decompress, parse (unless done already) and prepare the rows."""
        if req is None:
            body = protocol.decompress(body, encoding, self.service.config.max_body_bytes)
            req = protocol.parse_request(body, hlen)
        return req, self.service.prepare(req)


def _headers(scope) -> dict:
    """The request headers this handler reads, lower-case names to latin-1 strings."""
    out = {}
    for k, v in scope["headers"]:
        if k in _WANTED:
            out[k.decode("latin-1")] = v.decode("latin-1")
    return out


_WANTED = {b"content-length", b"content-encoding", b"inference-header-content-length"}


class _App(FastAPI):
    """FastAPI, except that inference requests skip its middleware, routing and parameter
    parsing (about half of a request's CPU time on the event loop) and go straight to the
    plain ASGI ``InferEndpoint``."""

    infer_endpoint: Optional["InferEndpoint"] = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and \
                self.infer_endpoint is not None and _INFER_PATH.search(scope["path"]):
            await self.infer_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build_app(service: Service, stop_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI application serving ``service`` (started by the caller).

    With ``stop_on_shutdown`` the app's shutdown drains, checkpoints and closes the service.
    Inference (``POST .../infer``) is a plain ASGI handler in front of FastAPI (``InferEndpoint``);
    everything else is FastAPI routes.
    """
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if stop_on_shutdown:
            log.info("shutdown: draining the queue, checkpointing, stopping the learner")
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = _App(title="layer-cache inference server", docs_url=None, redoc_url=None,
               openapi_url=None, lifespan=lifespan)
    app.state.service = service
    cfg = service.config

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if exc.status_code != 404 else \
            f"no route {request.method} {request.url.path}; see docs/server.md for the endpoints"
        return error(exc.status_code, str(msg))

    def unknown_model(name: str, version: Optional[str]) -> Optional[JSONResponse]:
        if name != service.name:
            return error(404, f"unknown model '{name}'; this server serves '{service.name}'")
        if version is not None and version != MODEL_VERSION:
            return error(404, f"model '{name}' has version {MODEL_VERSION} only, not '{version}'")
        return None

    # ----- health and metadata --------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return service.server_metadata()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: Optional[str] = None):
        return unknown_model(name, version) or service.model_metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: Optional[str] = None):
        return unknown_model(name, version) or JSONResponse(
            {"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: Optional[str] = None):
        return unknown_model(name, version) or service.model_config()

    # ----- runtime: stats and learning --------------------------------------------------------------
    @app.get("/v2/models/{name}/stats")
    async def runtime_stats(name: str):
        return unknown_model(name, None) or service.runtime_stats()

    @app.post("/v2/models/{name}/learning/{action}")
    async def learning(name: str, action: str):
        bad = unknown_model(name, None)
        if bad:
            return bad
        if action not in ("pause", "resume"):
            return error(404, f"unknown learning action '{action}'; use pause or resume")
        if not service.set_learning(action == "pause"):
            return error(501, "this runtime cannot pause learning (no pause_learning)")
        return {"name": name, "learning_paused": action == "pause"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    # ----- inference: a plain ASGI handler (see InferEndpoint) ------------------------------------
    endpoint = InferEndpoint(service)
    app.infer_endpoint = endpoint
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        # Reached only when __call__'s shortcut is bypassed (e.g. the app mounted under another);
        # other methods on these paths get FastAPI's 405.
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))
    return app

"""Every HTTP route of the server, on a Service: Open Inference Protocol, stats, learning, metrics.

Errors are JSON ``{"error": "..."}``: 400 bad request (says what to send), 404 unknown model or
route, 413 body too large, 415 unknown Content-Encoding, 501 not supported by this runtime,
503 not ready / queue full / shutting down (with Retry-After), 504 deadline passed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import runtime

from . import protocol
from .batching import DeadlineExceeded, QueueFull, ShuttingDown
from .metrics import CONTENT_TYPE
from .service import MODEL_VERSION, ClientGone, Service

log = logging.getLogger("runtime.server")


def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise protocol.ProtocolError(f"body of {length} bytes is over the limit of {limit}; send "
                                     f"fewer rows per request (or the binary data extension)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.ProtocolError(f"body over the limit of {limit} bytes; send fewer rows "
                                         f"per request", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(request: Request):
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(service: Service, stop_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI application serving ``service`` (started by the caller).

    With ``stop_on_shutdown`` the app's shutdown drains, checkpoints and closes the service.
    """
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if stop_on_shutdown:
            log.info("shutdown: draining the queue, checkpointing, stopping the learner")
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="layer-cache inference server", docs_url=None, redoc_url=None,
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

    # ----- inference ----------------------------------------------------------------------------------
    def decode(body: bytes, headers) -> tuple:
        body = protocol.decompress(body, headers.get("content-encoding"), cfg.max_body_bytes)
        req = protocol.parse_request(body, headers.get(protocol.HEADER_LENGTH.lower()))
        return req, service.prepare(req)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: Optional[str] = None):
        t0 = time.perf_counter()
        rows, status = 0, 500
        try:
            bad = unknown_model(name, version)
            if bad:
                status = 404
                return bad
            if not service.ready:
                status = 503
                return error(503, "model is not ready (starting or shutting down); retry",
                             {"Retry-After": "1"})
            body = await _read_body(request, cfg.max_body_bytes)
            loop = asyncio.get_running_loop()
            req, x = await loop.run_in_executor(None, decode, body, request.headers)
            rows = int(x.shape[0])
            gone = asyncio.ensure_future(_wait_disconnect(request))
            try:
                outputs = await service.infer(x, service.deadline(req), gone)
            finally:
                gone.cancel()
            payload, headers = protocol.encode_response(service.name, MODEL_VERSION, req, outputs)
            status = 200
            return Response(payload, headers=headers)
        except protocol.ProtocolError as e:
            status = e.status
            return error(e.status, str(e))
        except runtime.InputError as e:
            status = 400
            return error(400, str(e))
        except QueueFull as e:
            status = 503
            return error(503, str(e), {"Retry-After": str(service.batcher.retry_after_s())})
        except ShuttingDown as e:
            status = 503
            return error(503, str(e), {"Retry-After": "1"})
        except DeadlineExceeded as e:
            status = 504
            return error(504, str(e))
        except ClientGone:
            status = 499   # nginx's "client closed request"; nobody reads this answer
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - answer, log, keep serving
            log.exception("infer failed: %s", e)
            return error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            service.metrics.observe_request(status, rows, time.perf_counter() - t0)

    return app

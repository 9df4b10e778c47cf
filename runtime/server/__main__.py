"""``python -m runtime.server ARTIFACT``: serve an artifact over HTTP (see docs/server.md).

Bad settings get one line on stderr and exit code 2. SIGTERM / SIGINT stop accepting, answer
what was accepted, checkpoint to the state dir, and exit 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from typing import Optional

from .config import PRESETS, ServerConfig

log = logging.getLogger("runtime.server")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not usage + message
        raise _UsageError(f"{message} (see --help)")


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = _Parser(prog="python -m runtime.server",
                description="Serve a layer-cache artifact on the Open Inference Protocol "
                            "(KServe v2 / Triton HTTP), learning its exits online.")
    p.add_argument("artifact", help="compiled artifact (python -m compiler.rewrite) or a learned one")
    p.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port, help="port (0: any free port)")
    p.add_argument("--model-name", help="name in /v2/models/{name} (default: from the file name)")
    p.add_argument("--state-dir", help="checkpoint learned state here; resume from it at start")
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every_s, metavar="S",
                   help="seconds between scheduled checkpoints (rounds checkpoint at once)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per runtime batch")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest wait in the queue for a batch to fill (busy traffic)")
    p.add_argument("--wait-when-idle", action="store_true",
                   help="a lone request on a quiet server waits --max-wait-ms too (Triton's rule)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting before 503")
    p.add_argument("--max-request-rows", type=int, default=d.max_request_rows,
                   help="rows one request may carry")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2 ** 20,
                   help="largest request body (413 past it)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help="default deadline of a request, seconds (0: none)")
    p.add_argument("--preprocess", choices=PRESETS, default=d.preprocess,
                   help="accept encoded PNG/JPEG images (BYTES input 'image') with this preset")
    p.add_argument("--image-mean", type=_floats, help="override the preset's mean, e.g. 0.5,0.5,0.5")
    p.add_argument("--image-std", type=_floats, help="override the preset's std")
    p.add_argument("--device", default=d.device, help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=d.torch_threads,
                   help="torch intra-op threads (0: torch's default)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="S",
                   help="at shutdown, seconds to answer accepted requests")
    p.add_argument("--runtime-option", type=_option, action="append", default=[],
                   metavar="KEY=VALUE", help="a RuntimeConfig field, e.g. agreement_budget=0.995 "
                                             "(repeatable)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn)")
    p.add_argument("--log-level", default=d.log_level,
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from(args) -> ServerConfig:
    return ServerConfig(
        artifact=args.artifact, model_name=args.model_name, host=args.host, port=args.port,
        device=args.device, torch_threads=args.threads, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, wait_when_idle=args.wait_when_idle, max_queue=args.max_queue,
        max_request_rows=args.max_request_rows, max_body_bytes=int(args.max_body_mb * 2 ** 20),
        request_timeout_s=args.request_timeout, preprocess=args.preprocess,
        image_mean=args.image_mean, image_std=args.image_std, state_dir=args.state_dir,
        checkpoint_every_s=args.checkpoint_every, drain_timeout_s=args.drain_timeout,
        access_log=args.access_log, log_level=args.log_level,
        runtime_options=dict(args.runtime_option)).validate()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list] = None) -> int:
    try:
        args = parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e))
    except SystemExit as e:   # --help
        return int(e.code or 0)
    from .config import ServerConfigError
    try:
        cfg = config_from(args)
    except ServerConfigError as e:
        return _fail(str(e))
    from compiler.artifact import read_manifest
    from compiler.errors import CompilerError
    try:   # before logging starts: a bad artifact is one line on stderr
        read_manifest(cfg.artifact)
    except CompilerError as e:
        return _fail(str(e))
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported only now: --help and bad flags answer without loading torch.
    import uvicorn

    from .app import build_app
    from .preprocess import PresetError
    from .service import Service

    try:
        sock = _bind(cfg.host, cfg.port)
    except OSError as e:
        return _fail(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); choose another "
                     f"--port or --host")
    service = Service(cfg)
    try:
        service.start()
    except (CompilerError, PresetError, ValueError, TypeError) as e:
        sock.close()
        service.stop()
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (model '%s')", host, port, service.name)
    server = uvicorn.Server(uvicorn.Config(
        build_app(service), log_level=cfg.log_level, access_log=cfg.access_log,
        timeout_graceful_shutdown=cfg.drain_timeout_s, lifespan="on",
        # Inference sheds load itself (503 + Retry-After past max_queue + 2 * max_batch requests
        # in flight, before reading bodies); uvicorn's limit, which counts open connections and
        # answers a bare 503, is only the backstop against a flood of connections.
        limit_concurrency=max(4 * (cfg.max_queue + 2 * cfg.max_batch), 1024)))
    # uvicorn handles SIGTERM/SIGINT itself, then re-raises the signal into the handler that was
    # there before: a no-op one, so a graceful stop exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

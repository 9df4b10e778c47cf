"""``python -m runtime.scaleout ARTIFACT --replicas 2``: serve on Ray Serve, one learner for all.

Without ``--address`` it starts a local Ray cluster in this process (loopback); with
``--address auto`` or ``ray://HOST:10001`` it deploys onto that cluster. Bad flags or an
unreachable cluster: one line on stderr, exit code 2. Ctrl-C / SIGTERM: the application is
deleted, the learner (checkpointed at every publish) is stopped, exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from runtime.server.__main__ import _option  # KEY=VALUE runtime options, parsed as the server does


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.scaleout",
                description="Serve a layer-cache artifact on Ray Serve: N replicas (Open Inference "
                            "Protocol), one learner, one learned state.")
    p.add_argument("artifact", help="compiled artifact (python -m compiler.rewrite) or a learned one")
    p.add_argument("--replicas", type=int, default=2, help="replicas (fixed; see --autoscale)")
    p.add_argument("--autoscale", metavar="MIN,MAX", help="Serve autoscaling between MIN and MAX "
                   "replicas instead of a fixed number")
    p.add_argument("--target-ongoing", type=float, default=16.0,
                   help="autoscaling: target requests in flight per replica")
    p.add_argument("--address", help="Ray cluster: 'auto' (ray start --head ran here) or "
                                     "ray://HOST:10001; default: a local cluster in this process")
    p.add_argument("--num-cpus", type=float, help="local cluster only: logical CPUs (default: "
                                                  "enough for the replicas and the learner)")
    p.add_argument("--host", default="127.0.0.1", help="Serve's HTTP proxy address")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP proxy port")
    p.add_argument("--state-dir", help="the learner checkpoints here and resumes from it "
                                       "(shared storage on a multi-node cluster)")
    p.add_argument("--model-name", help="name in /v2/models/{name} (default: from the file name)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--learner-cpus", type=float, default=1.0, help="Ray CPUs for the learner")
    p.add_argument("--max-ongoing", type=int, default=64,
                   help="requests Serve hands one replica at once (its batcher gathers them)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per runtime batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait")
    p.add_argument("--preprocess", default="none", help="none, fashion-mnist or imagenet")
    p.add_argument("--flush-ms", type=float, default=100.0, help="replica -> learner report period")
    p.add_argument("--max-rows-per-message", type=int, default=512)
    p.add_argument("--max-pending-rows", type=int, default=8192,
                   help="rows a replica holds while the learner is behind (oldest dropped past it)")
    p.add_argument("--send-rate", type=float, default=1.0, help="share of collected rows sent")
    p.add_argument("--poll-timeout", type=float, default=5.0,
                   help="longest a replica's long poll for a new state waits")
    p.add_argument("--runtime-option", action="append", type=_option, default=[], metavar="K=V",
                   help="any RuntimeConfig field, repeatable (agreement_budget=0.995)")
    p.add_argument("--log-level", default="info")
    return p


def build_config(args):
    from runtime.server import ServerConfig
    from .deploy import ScaleoutConfig
    from .protocol import LinkConfig, ScaleoutError
    autoscaling = None
    if args.autoscale:
        try:
            lo, hi = (int(v) for v in args.autoscale.split(","))
        except ValueError:
            raise ScaleoutError(f"--autoscale takes MIN,MAX (two integers), got "
                                f"{args.autoscale!r}") from None
        autoscaling = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                       "target_ongoing_requests": args.target_ongoing}
    server = ServerConfig(artifact=args.artifact, model_name=args.model_name,
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          preprocess=args.preprocess, log_level=args.log_level,
                          runtime_options=dict(args.runtime_option))
    link = LinkConfig(flush_ms=args.flush_ms, max_rows_per_message=args.max_rows_per_message,
                      max_pending_rows=args.max_pending_rows, send_rate=args.send_rate,
                      poll_timeout_s=args.poll_timeout)
    cfg = ScaleoutConfig(server=server, link=link, replicas=args.replicas,
                         autoscaling=autoscaling, replica_cpus=args.replica_cpus,
                         learner_cpus=args.learner_cpus, max_ongoing_requests=args.max_ongoing,
                         state_dir=args.state_dir)
    if not 0 <= args.port <= 65535:
        raise ScaleoutError(f"port must be in 0..65535, got {args.port}")
    # Runtime settings are checked here, not in a replica that would fail to start.
    from runtime.config import RuntimeConfig
    RuntimeConfig().with_overrides(**dict(args.runtime_option))
    from compiler.artifact import read_manifest
    cfg.validate()
    read_manifest(cfg.server.artifact)
    return cfg


def _unreachable(address: str, timeout_s: float = 5.0):
    """Why HOST:PORT (or ray://HOST:PORT) takes no TCP connection, or None: Ray itself waits
    minutes on a wrong address."""
    import socket
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return f"expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        return f"no connection to {host}:{port} ({e.strerror or e}); is the cluster up (ray status)?"
    return None


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("error: Ray Serve is not installed; pip install -e '.[ray]'", file=sys.stderr)
        return 2
    from compiler.errors import ArtifactError
    from runtime.config import ConfigError
    from runtime.server.config import ServerConfigError
    from .protocol import ScaleoutError
    try:
        cfg = build_config(args)
    except (ScaleoutError, ServerConfigError, ConfigError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    import ray
    import torch
    torch.set_num_threads(1)
    if args.address and args.address != "auto":
        why = _unreachable(args.address)
        if why:
            print(f"error: cannot reach the Ray cluster at {args.address}: {why}", file=sys.stderr)
            return 2
    try:
        if args.address:
            ray.init(address=args.address, logging_level=logging.WARNING)
        else:
            need = (cfg.autoscaling or {}).get("max_replicas", cfg.replicas) * cfg.replica_cpus + \
                cfg.learner_cpus
            ray.init(num_cpus=args.num_cpus or max(need, os.cpu_count() or 1),
                     include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError...
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: cannot reach the Ray cluster at {args.address or 'local'}: {line}",
              file=sys.stderr)
        return 2
    from .deploy import deploy
    try:
        deployed = deploy(cfg, http_host=args.host, http_port=args.port)
    except ScaleoutError as e:
        print(f"error: {e}", file=sys.stderr)
        ray.shutdown()
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"serving '{cfg.server.name}' at {deployed.url}/v2/models/{cfg.server.name} "
          f"({cfg.replicas if cfg.autoscaling is None else cfg.autoscaling} replicas, learner "
          f"'{deployed.learner_name}'); Ctrl-C stops", flush=True)
    done.wait()
    deployed.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start and stop the scale-out on a Ray cluster: the learner actor, then the Serve application.

``deploy(ScaleoutConfig(...))`` needs ``ray.init`` done by the caller (in-process local cluster,
``address="auto"`` or ``ray://...``); it returns a ``Deployed`` with the URL, the learner's handle
and ``shutdown()``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import ray
from ray import serve

from runtime.server import ServerConfig

from .learner import NAMESPACE, LearnerActor, learner_name
from .protocol import LinkConfig, ScaleoutError
from .replica import ReplicaServer

log = logging.getLogger("layer_cache.scaleout")


@dataclass
class ScaleoutConfig:
    """The scale-out's settings (the server's own are in ``server``; the link's in ``link``).

    replicas:          fixed number of replicas (ignored with ``autoscaling``).
    autoscaling:       Serve's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 8,
                       "target_ongoing_requests": 16}; None: fixed ``replicas``.
    replica_cpus, learner_cpus: Ray logical CPUs reserved per replica / for the learner.
    max_ongoing_requests: requests Serve's proxy hands one replica at once (the replica's batcher
                       gathers them; Serve's own default, 5, would starve the batcher).
    health_check_period_s: how often Serve checks a replica (a dead one is replaced after that).
    learner_max_restarts: how often Ray restarts a learner that died (-1: always).
    state_dir:         the learner checkpoints here (shared storage on a multi-node cluster).
    app_name:          the Serve application's name; host/port: Serve's HTTP proxy.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    replicas: int = 2
    autoscaling: Optional[dict] = None
    replica_cpus: float = 1.0
    learner_cpus: float = 1.0
    max_ongoing_requests: int = 64
    health_check_period_s: float = 2.0
    learner_max_restarts: int = -1
    state_dir: Optional[str] = None
    app_name: str = "layer-cache"

    def validate(self) -> "ScaleoutConfig":
        self.server.validate()
        self.link.validate()
        if self.autoscaling is None and self.replicas < 1:
            raise ScaleoutError(f"replicas must be at least 1, got {self.replicas}")
        if self.autoscaling is not None:
            lo, hi = self.autoscaling.get("min_replicas", 1), self.autoscaling.get("max_replicas", 1)
            if not 0 <= lo <= hi or hi < 1:
                raise ScaleoutError(f"autoscaling needs 0 <= min_replicas <= max_replicas, "
                                    f"max_replicas >= 1; got {lo}, {hi}")
        for name in ("replica_cpus", "learner_cpus", "health_check_period_s"):
            if getattr(self, name) <= 0:
                raise ScaleoutError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_ongoing_requests < 1:
            raise ScaleoutError(f"max_ongoing_requests must be at least 1, "
                                f"got {self.max_ongoing_requests}")
        if not os.path.isfile(self.server.artifact):
            raise ScaleoutError(f"artifact '{self.server.artifact}' not found; compile one with "
                                f"python -m compiler.rewrite MODEL")
        return self


@dataclass
class Deployed:
    config: ScaleoutConfig
    learner: "ray.actor.ActorHandle"
    learner_name: str
    url: str

    def learner_stats(self) -> dict:
        return ray.get(ray.get_actor(self.learner_name, namespace=NAMESPACE).stats.remote())

    def shutdown(self):
        """Delete the Serve application, then stop the learner (its state is checkpointed)."""
        try:
            serve.delete(self.config.app_name)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            handle = ray.get_actor(self.learner_name, namespace=NAMESPACE)
            ray.get(handle.close.remote(), timeout=10)
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def deploy(config: ScaleoutConfig, http_host: str = "127.0.0.1", http_port: int = 8000,
           timeout_s: float = 180.0) -> Deployed:
    """Start the learner (or find the running one), then the replicas; wait until they serve."""
    config.validate()
    cfg = config.server
    if not ray.is_initialized():
        raise ScaleoutError("ray is not initialised: call ray.init(...) first")
    serve.start(http_options={"host": http_host, "port": http_port})
    name = learner_name(cfg.name)
    artifact = os.path.abspath(cfg.artifact)
    state_dir = os.path.abspath(config.state_dir) if config.state_dir else None
    learner = ray.remote(LearnerActor).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=config.learner_max_restarts, max_task_retries=-1,
        num_cpus=config.learner_cpus, max_concurrency=1000,
    ).remote(artifact, cfg.name, state_dir, dict(cfg.runtime_options), cfg.torch_threads)
    ray.get(learner.current.remote(), timeout=timeout_s)
    # Replicas keep no state of their own: the learner's is the one state.
    server = ServerConfig(**{**cfg.__dict__, "artifact": artifact, "state_dir": None})
    options = dict(ray_actor_options={"num_cpus": config.replica_cpus},
                   max_ongoing_requests=config.max_ongoing_requests,
                   health_check_period_s=config.health_check_period_s,
                   health_check_timeout_s=max(10.0, 3 * config.health_check_period_s))
    if config.autoscaling is not None:
        options["autoscaling_config"] = dict(config.autoscaling)
    else:
        options["num_replicas"] = config.replicas
    app = serve.deployment(ReplicaServer, name="replica", **options).bind(server, name,
                                                                          config.link)
    serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout_s
    while serve.status().applications[config.app_name].status != "RUNNING":
        if time.monotonic() > deadline:
            raise ScaleoutError(f"the Serve application did not start within {timeout_s:.0f} s: "
                                f"{serve.status().applications[config.app_name].message}")
        time.sleep(0.5)
    return Deployed(config, learner, name, f"http://{http_host}:{http_port}")

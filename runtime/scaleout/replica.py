"""A replica: the single-machine ``Service`` and its HTTP app behind Ray Serve's ingress, with
learning delegated to the one learner.

``Forwarder`` is the runtime's sink (``CachedRuntime.delegate_learning``): it samples and bounds
what the runtime collects and a thread sends it in reports of at most ``max_rows_per_message``
rows, with at most ``max_inflight`` unanswered; while the learner is behind, the oldest rows are
dropped (counted), never a request's answer. ``LearnerLink`` long-polls the learner for a newer
state and swaps it in (between batches: the runtime reads its state once per batch). A replica
installs the learner's current state before Serve routes it a request.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional

import numpy as np
import ray
import torch
from ray import serve

from runtime.server import ServerConfig, Service, build_app

from .learner import NAMESPACE
from .protocol import Decisions, LinkConfig, PublishedState, Report, ServedTotals

log = logging.getLogger("layer_cache.scaleout")


class Forwarder:
    """Collected rows and per-request decisions, held until the sender takes them (never blocks)."""

    def __init__(self, rt, link: LinkConfig, seed: int = 0):
        self.rt = rt
        self.link = link
        self.lock = threading.Lock()
        self.rows = collections.deque()    # (generation, [features fp16], teacher, role)
        self.pending_rows = 0
        self.dropped_rows = 0
        self.decisions = {}                # version -> [exit counts, [shadow ok arrays]]
        self.in_doubt = False
        self._gen = torch.Generator().manual_seed(seed)

    # the sink interface of CachedRuntime.delegate_learning
    def add(self, features, teacher: torch.Tensor, role):
        role = (role.detach().cpu().numpy() if torch.is_tensor(role) else
                np.asarray(role)).astype(np.uint8)
        if self.link.send_rate < 1.0:
            with self.lock:
                keep = torch.rand(teacher.shape[0], generator=self._gen) < self.link.send_rate
            if not bool(keep.any()):
                return
            features, teacher, role = [f[keep] for f in features], teacher[keep], \
                role[keep.numpy()]
        item = (self.rt.state.generation,
                [f.detach().to(torch.float16).cpu().numpy() for f in features],
                teacher.detach().float().cpu().numpy(), role)
        n = item[2].shape[0]
        with self.lock:
            self.rows.append(item)
            self.pending_rows += n
            while self.pending_rows > self.link.max_pending_rows and self.rows:
                old = self.rows.popleft()          # the learner is behind: oldest rows go
                self.pending_rows -= old[2].shape[0]
                self.dropped_rows += old[2].shape[0]

    def observe(self, version: int, exit_counts, shadow_ok):
        ok = np.zeros(0, dtype=bool) if shadow_ok is None else \
            shadow_ok.detach().cpu().numpy().astype(bool)
        with self.lock:
            d = self.decisions.get(version)
            if d is None:
                d = self.decisions[version] = [np.zeros(len(exit_counts), dtype=np.int64), []]
            d[0] += np.asarray(exit_counts, dtype=np.int64)
            if ok.size:
                d[1].append(ok)

    # the sender's side
    def has_work(self) -> bool:
        with self.lock:
            return bool(self.rows) or bool(self.decisions)

    def take(self, replica: str) -> Optional[Report]:
        """At most ``max_rows_per_message`` rows of one generation, and every decision."""
        cap = self.link.max_rows_per_message
        with self.lock:
            parts, n, generation = [], 0, None
            while self.rows and n < cap:
                g, feats, teacher, role = self.rows[0]
                if generation is not None and g != generation:
                    break
                generation = g
                m = teacher.shape[0]
                if n + m > cap:    # split the batch: the rest stays queued
                    k = cap - n
                    parts.append(([f[:k] for f in feats], teacher[:k], role[:k]))
                    self.rows[0] = (g, [f[k:] for f in feats], teacher[k:], role[k:])
                    n += k
                    break
                self.rows.popleft()
                parts.append((feats, teacher, role))
                n += m
            self.pending_rows -= n
            decisions = [Decisions(v, d[0].tolist(), np.concatenate(d[1]) if d[1]
                                   else np.zeros(0, dtype=bool))
                         for v, d in sorted(self.decisions.items())]
            self.decisions = {}
            dropped = self.dropped_rows
        if not parts and not decisions:
            return None
        features = teacher = role = None
        if parts:
            features = [np.concatenate([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
            teacher = np.concatenate([p[1] for p in parts])
            role = np.concatenate([p[2] for p in parts])
        c = self.rt.counters
        with c._lock:
            totals = ServedTotals(c.requests, c.rows, c.flops_spent, c.shadow_rows,
                                  c.shadow_agree, list(c.rows_per_exit))
        return Report(replica, generation if generation is not None else self.rt.state.generation,
                      features, teacher, role, decisions, dropped, totals)


class LearnerLink:
    """A replica's two threads: the sender (reports) and the poller (newer states)."""

    def __init__(self, rt, learner: str, replica: str, link: LinkConfig):
        self.rt = rt
        self.name = learner
        self.replica = replica
        self.link = link.validate()
        self.forwarder = Forwarder(rt, link, seed=hash(replica) & 0xFFFF)
        self.handle = None
        self.stop = threading.Event()
        self.adopted = []          # (version, unix time adopted, seconds to build)
        self.report_failures = 0
        self._threads = []

    def _learner(self):
        if self.handle is None:
            self.handle = ray.get_actor(self.name, namespace=NAMESPACE)
        return self.handle

    def install(self, p: PublishedState):
        t0 = time.perf_counter()
        self.forwarder.in_doubt = p.in_doubt
        # Arrays from Ray's object store are read-only: torch wants its own copies.
        classifiers = [{k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
                       for sd in p.classifiers]
        if self.rt.adopt_state(p.version, p.generation, classifiers, p.thresholds,
                               p.exit_shares, p.fast, p.warmup_share):
            self.adopted.append((p.version, time.time(), time.perf_counter() - t0))
            del self.adopted[:-100]
            log.info("replica %s: serving version %d (generation %d, %d exits on)", self.replica,
                     p.version, p.generation, sum(t is not None for t in p.thresholds))

    def start(self, timeout_s: float = 60.0) -> "LearnerLink":
        """Install the learner's current state (before serving), then start both threads."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.install(ray.get(self._learner().current.remote(self.replica), timeout=10))
                break
            except Exception as e:  # noqa: BLE001 - learner starting or restarting
                self.handle = None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"learner '{self.name}' did not answer within "
                                       f"{timeout_s:.0f} s: {e}") from e
                time.sleep(0.5)
        self.rt.delegate_learning(self.forwarder)
        for target, name in ((self._send_loop, "scaleout-sender"),
                             (self._poll_loop, "scaleout-poller")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def _send_loop(self):
        inflight = []
        while not self.stop.wait(self.link.flush_ms / 1e3):
            if inflight:
                done, inflight = ray.wait(inflight, num_returns=len(inflight), timeout=0)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception:  # noqa: BLE001 - learner died: those rows are lost
                        self.report_failures += 1
                        self.handle = None
            while len(inflight) < self.link.max_inflight and self.forwarder.has_work():
                report = self.forwarder.take(self.replica)
                if report is None:
                    break
                try:
                    inflight.append(self._learner().report.remote(report))
                except Exception:  # noqa: BLE001 - not reachable now; try again next flush
                    self.report_failures += 1
                    self.handle = None
                    break
                if not report.rows:
                    break

    def _poll_loop(self):
        while not self.stop.is_set():
            try:
                p = ray.get(self._learner().wait_newer.remote(
                    self.replica, self.rt.state.version, self.forwarder.in_doubt,
                    self.link.poll_timeout_s), timeout=self.link.poll_timeout_s + 30)
            except Exception:  # noqa: BLE001 - learner restarting: ask again shortly
                self.handle = None
                self.stop.wait(0.2)
                continue
            if p is not None:
                try:
                    self.install(p)
                except Exception:  # noqa: BLE001 - keep serving the state in force
                    log.exception("replica %s: could not install version %d", self.replica,
                                  p.version)
                    self.stop.wait(1.0)

    def close(self):
        self.stop.set()


@serve.ingress()
class ReplicaServer:
    """One Serve replica: ``Service`` (batcher, preprocessing, metrics) and ``build_app``'s routes.

    Serve routes it no request until the constructor returns, by which time it serves the
    learner's current state.
    """

    def __init__(self, server_config: ServerConfig, learner: str, link: LinkConfig):
        torch.set_num_threads(max(server_config.torch_threads, 1))
        logging.basicConfig(level=logging.INFO)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (unit use)
            self.replica = f"local-{id(self):x}"
        self.service = Service(server_config).start()
        self.link = LearnerLink(self.service.rt, learner, self.replica, link).start()

    def __serve_build_asgi_app__(self):
        return build_app(self.service)

    def check_health(self):
        if not self.link.alive:
            raise RuntimeError("the link to the learner stopped")

    def __del__(self):
        link = getattr(self, "link", None)
        if link is not None:
            link.close()

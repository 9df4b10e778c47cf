"""The one learner: pools what every replica collected, learns, watches drift, publishes one state.

``LearnerCore`` (no Ray) owns a ``CachedRuntime`` in synchronous mode, used for its parts only:
the feature buffer, the head learner, the learning loop (rounds: distil, calibrate, propose) and
the drift monitor, now fed the pooled stream of every replica. ``LearnerActor`` is the Ray actor
around it: ``report`` takes a replica's message, ``wait_newer`` is the replicas' long poll (a
publish answers every waiting poll at once), a thread runs the rounds.

A state is checkpointed (atomically: temp file, fsync, ``os.replace``, fsync of the folder)
*before* any replica can see it, so a learner restarted by Ray from its checkpoint never serves
an older version than a replica already has.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict
from typing import Dict, Optional

import numpy as np
import torch

import runtime
from compiler.artifact import fsync_folder
from runtime.backends import resolve
from runtime.costs import default_latency_weight

from .protocol import PublishedState, Report, ServedTotals

log = logging.getLogger("layer_cache.scaleout")

CHECKPOINT_FORMAT = "layer-cache-learner/1"
NAMESPACE = "layer_cache"


def learner_name(model_name: str) -> str:
    return f"layer-cache-learner-{model_name}"


def checkpoint_path(state_dir: str, model_name: str) -> str:
    return os.path.join(state_dir, f"{model_name}.learner.pt")


def _atomic_torch_save(obj, path: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(folder)


class LearnerCore:
    """Everything the learner does, without Ray (thread-safe: ``ingest`` and ``ack`` run on the
    actor's event loop, ``run_round`` in its learning thread)."""

    def __init__(self, artifact: str, model_name: str, state_dir: Optional[str] = None,
                 runtime_options: Optional[dict] = None):
        opts = dict(runtime_options or {})
        # The replicas learn nothing: cost weights as a background-learning server uses them
        # (this runtime is synchronous, so it would weigh FLOPs only).
        opts.setdefault("latency_weight", default_latency_weight(
            True, resolve(opts.get("backend", "auto"), "cpu") == "onnxruntime"))
        self.rt = runtime.load(artifact, background=False, **opts)
        self.model_name = model_name
        self.path = checkpoint_path(state_dir, model_name) if state_dir else None
        self.lock = threading.Lock()
        self.rounds = 0
        self.rows_received = 0
        self.rows_stale = 0
        self.reports = 0
        self.pending = 0
        self.checkpoints = 0
        self.restored_from: Optional[str] = None
        self.replicas: Dict[str, dict] = {}     # id -> version served, last seen, totals, dropped
        self.publishes: list = []               # {"version", "unix", "acks": {replica: delay s}}
        self.published: Optional[PublishedState] = None
        if self.path and os.path.exists(self.path):
            self._restore()
        self._publish_now()

    # ----- state ----------------------------------------------------------------------------------
    def _state_message(self) -> PublishedState:
        s = self.rt.state
        return PublishedState(
            version=s.version, generation=s.generation,
            classifiers=[{k: v.detach().cpu().numpy().copy() for k, v in c.state_dict().items()}
                         for c in s.classifiers],
            thresholds=[None if t == float("inf") else float(t) for t in s.thresholds],
            exit_shares=None if s.exit_shares is None else [float(x) for x in s.exit_shares],
            fast=s.servable_whole, in_doubt=bool(self.rt.drift.in_doubt),
            published_unix=time.time(), warmup_share=self.rt.collector.warmup_share)

    def _publish_now(self) -> bool:
        """Checkpoint the runtime's state, then make it the one replicas get. True if new."""
        msg = self._state_message()
        with self.lock:
            old = self.published
            if old is not None and old.version == msg.version and old.in_doubt == msg.in_doubt:
                return False
        if old is None or old.version != msg.version:
            self._checkpoint(msg)
        with self.lock:
            if self.published is not None and self.published.version > msg.version:
                return False
            new_version = self.published is None or self.published.version != msg.version
            self.published = msg
            if new_version:
                self.publishes.append({"version": msg.version, "unix": msg.published_unix,
                                       "generation": msg.generation,
                                       "enabled": sum(t is not None for t in msg.thresholds),
                                       "acks": {}})
                del self.publishes[:-200]
        return True

    def _checkpoint(self, msg: PublishedState):
        if not self.path:
            return
        lrn = self.rt.learner
        blob = {"format": CHECKPOINT_FORMAT, "model": self.model_name,
                "source_sha256": self.rt.manifest.get("source_sha256"),
                "exit_names": [e["name"] for e in self.rt.exits],
                "state": asdict(msg), "rounds": self.rounds,
                "learner": {"models": [m.state_dict() for m in lrn.models],
                            "mean": lrn.mean, "std": lrn.std, "flops": lrn.flops,
                            "rows": lrn.rows}}
        try:
            _atomic_torch_save(blob, self.path)
            self.checkpoints += 1
        except OSError as e:  # serving goes on; the next publish tries again
            log.error("learner: checkpoint to '%s' failed: %s", self.path, e)

    def _restore(self):
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=False)
            if blob.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {blob.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            names = [e["name"] for e in self.rt.exits]
            if blob.get("source_sha256") != self.rt.manifest.get("source_sha256") or \
                    blob.get("exit_names") != names:
                raise ValueError("it is another model's (source sha256 or exit names differ)")
            st = PublishedState(**blob["state"])
            lrn = blob["learner"]
            for m, sd in zip(self.rt.learner.models, lrn["models"]):
                m.load_state_dict(sd)
            self.rt.learner.mean, self.rt.learner.std = lrn["mean"], lrn["std"]
            self.rt.learner.flops, self.rt.learner.rows = lrn["flops"], lrn["rows"]
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused the same way
            aside = f"{self.path}.refused-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            log.warning("learner: refused checkpoint '%s' (%s); starting from the artifact; "
                        "kept as '%s'", self.path, e, aside)
            return
        if st.version > 0:
            self.rt.adopt_state(st.version, st.generation, st.classifiers, st.thresholds,
                                st.exit_shares, st.fast)
            self.rt.drift.reset(st.exit_shares)
            # The restored heads' normalisation belongs to this generation: keep it.
            self.rt._norm_generation = st.generation
        self.rounds = int(blob.get("rounds", 0))
        self.restored_from = self.path
        log.info("learner: restored version %d (generation %d, %d rounds) from '%s'", st.version,
                 st.generation, self.rounds, self.path)

    # ----- from replicas ----------------------------------------------------------------------------
    def ingest(self, r: Report) -> bool:
        """Take one report; True when it changed the state (a drift alarm: published already)."""
        rt = self.rt
        if r.teacher is not None and r.rows:
            if r.generation < rt.state.generation:
                with self.lock:
                    self.rows_stale += r.rows   # collected before the alarm: old traffic
            else:
                # Arrays from Ray's object store are read-only: copy (the buffer copies anyway).
                rt.buffer.add([torch.from_numpy(np.array(f)) for f in r.features],
                              torch.from_numpy(np.array(r.teacher)),
                              torch.from_numpy(np.array(r.role)))
                with self.lock:
                    self.rows_received += r.rows
        served, alarm = 0, False
        for d in r.decisions:
            served += int(sum(d.exit_counts))
            ok = torch.from_numpy(np.array(d.shadow_ok, dtype=bool)) if len(d.shadow_ok) else None
            alarm |= rt.observe(d.version, list(d.exit_counts), ok)
        with self.lock:
            self.reports += 1
            self.pending += served
            rep = self.replicas.setdefault(r.replica, {"version": None, "seen": 0.0})
            rep["totals"] = r.totals
            rep["dropped_rows"] = r.dropped_rows
            rep["seen"] = time.time()
        doubt_changed = self.published is not None and \
            bool(rt.drift.in_doubt) != self.published.in_doubt
        if alarm or doubt_changed:   # a round's state is published by the learning thread
            return self._publish_now()
        return False

    def ack(self, replica: str, version: int):
        """A replica serves ``version`` (it says so when it polls)."""
        now = time.time()
        with self.lock:
            rep = self.replicas.setdefault(replica, {"version": None, "seen": 0.0})
            rep["version"], rep["seen"] = version, now
            for p in reversed(self.publishes):
                if p["version"] == version:
                    p["acks"].setdefault(replica, now - p["unix"])
                    break

    @property
    def due(self) -> bool:
        return self.pending >= self.rt.config.learning.train_every * self.rt.collector.spacing

    def run_round(self) -> bool:
        """One learning round on the pooled rows; True when it published a new state."""
        with self.lock:
            self.pending = 0
        try:
            changed = self.rt.learn()
        except Exception:  # counted in rt.stats(); the published state stays
            log.exception("learner: round failed; replicas keep the published state")
            return False
        if changed:
            with self.lock:
                self.rounds += 1
            return self._publish_now()
        return False

    # ----- monitoring -------------------------------------------------------------------------------
    def live_replicas(self, within_s: float) -> Dict[str, dict]:
        now = time.time()
        with self.lock:
            return {k: dict(v) for k, v in self.replicas.items() if now - v["seen"] <= within_s}

    def stats(self, live_within_s: float = 15.0) -> dict:
        rt = self.rt
        learning = rt.stats()["learning"]
        now = time.time()
        with self.lock:
            totals = [v.get("totals") or ServedTotals() for v in self.replicas.values()]
            rows = sum(t.rows for t in totals)
            spent = sum(t.flops_spent for t in totals)
            shadow = sum(t.shadow_rows for t in totals)
            agree = sum(t.shadow_agree for t in totals)
            reps = {k: {"version": v["version"], "seen_s_ago": round(now - v["seen"], 3),
                        "live": now - v["seen"] <= live_within_s,
                        "rows": (v.get("totals") or ServedTotals()).rows,
                        "dropped_rows": v.get("dropped_rows", 0)}
                    for k, v in self.replicas.items()}
            p = self.published
            out = {
                "model": self.model_name, "version": p.version, "generation": p.generation,
                "thresholds": list(p.thresholds), "enabled": [t is not None for t in p.thresholds],
                "fast": p.fast, "in_doubt": p.in_doubt,
                "rounds": self.rounds, "reports": self.reports,
                "rows_received": self.rows_received, "rows_stale": self.rows_stale,
                "rows_dropped_at_replicas": sum(v.get("dropped_rows", 0)
                                                for v in self.replicas.values()),
                "pooled": {"rows": rows, "requests": sum(t.requests for t in totals),
                           "flops_spent": spent,
                           "flops_saved": 1 - spent / (rows * rt.costs.total_flops) if rows else 0.0,
                           "shadow_rows": shadow,
                           "live_agreement": agree / shadow if shadow else None},
                "total_flops": rt.costs.total_flops,
                "replicas": reps, "publishes": [dict(x, acks=dict(x["acks"]))
                                                for x in self.publishes[-50:]],
                "drift_events": rt.drift.events, "drift_doubts": rt.drift.doubts,
                "checkpoints": self.checkpoints, "checkpoint_path": self.path,
                "restored_from": self.restored_from, "learning": learning,
            }
        return out


class LearnerActor:
    """The Ray actor (async: many replicas long-poll it at once). Create it with
    ``ray.remote(LearnerActor).options(name=..., max_restarts=-1)``: Ray restarts it with the
    same arguments, and it resumes from its checkpoint."""

    def __init__(self, artifact: str, model_name: str, state_dir: Optional[str] = None,
                 runtime_options: Optional[dict] = None, threads: int = 1):
        if threads > 0:
            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO)
        self.core = LearnerCore(artifact, model_name, state_dir, runtime_options)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._event: Optional[asyncio.Event] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._learn_loop, name="scaleout-learner",
                                        daemon=True)
        self._thread.start()

    def _ensure_loop(self):
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()

    def _fire(self):
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    def _notify_threadsafe(self):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire)

    def _learn_loop(self):
        while not self._stop.is_set():
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.core.run_round():
                self._notify_threadsafe()
            if self.core.due:
                self._wake.set()

    async def report(self, r: Report) -> int:
        """A replica's report; returns the version in force (cheap)."""
        self._ensure_loop()
        if self.core.ingest(r):
            self._fire()
        if self.core.due:
            self._wake.set()
        return self.core.published.version

    async def current(self, replica: Optional[str] = None) -> PublishedState:
        self._ensure_loop()
        return self.core.published

    async def wait_newer(self, replica: str, version: int, in_doubt: bool,
                         timeout_s: float) -> Optional[PublishedState]:
        """The replicas' long poll: returns the published state as soon as it differs from
        (``version``, ``in_doubt``), or None after ``timeout_s``. Also records that
        ``replica`` serves ``version``."""
        self._ensure_loop()
        self.core.ack(replica, version)
        deadline = time.monotonic() + timeout_s
        while True:
            p = self.core.published
            if p.version != version or p.in_doubt != in_doubt:
                return p
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except asyncio.TimeoutError:
                return None

    async def stats(self) -> dict:
        self._ensure_loop()
        return self.core.stats()

    async def learn_now(self) -> bool:
        """Run one round now (tests, operators); True when it published."""
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        changed = await loop.run_in_executor(None, self.core.run_round)
        if changed:
            self._fire()
        return changed

    async def pid(self) -> int:
        return os.getpid()

    async def close(self) -> bool:
        """Stop learning; the published state is checkpointed already."""
        self._stop.set()
        self._wake.set()
        self.core.rt.close()
        return True

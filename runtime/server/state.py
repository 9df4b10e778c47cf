"""Learned state that survives restarts: choose what to load at start, checkpoint while serving.

The state file is ``<state_dir>/<model>.learned.pt``, an artifact written by ``rt.save`` (atomic).
At start it is served instead of the artifact if it is an artifact of the same model (same source
sha256, classes, input shape and exits). A corrupt or foreign file is refused with one log line
and moved aside to ``<name>.refused-<UTC time>`` (never overwritten unseen); the server then starts
from the artifact.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from compiler.artifact import read_manifest
from compiler.errors import ArtifactError

log = logging.getLogger("runtime.server")


def state_path(state_dir: str, model_name: str) -> str:
    return os.path.join(state_dir, f"{model_name}.learned.pt")


def _fingerprint(manifest: dict) -> dict:
    return {"source_sha256": manifest.get("source_sha256"),
            "num_classes": manifest.get("num_classes"),
            "input_shape": list(manifest.get("input_shape") or [])[1:],
            "exits": [e.get("name") for e in manifest.get("exits", [])]}


def mismatch(artifact_manifest: dict, state_manifest: dict) -> Optional[str]:
    """Why the state file is not this artifact's model, or None if it is."""
    a, s = _fingerprint(artifact_manifest), _fingerprint(state_manifest)
    for key in ("source_sha256", "num_classes", "input_shape", "exits"):
        if a[key] != s[key]:
            return f"its {key} is {s[key]!r}, the artifact's is {a[key]!r}"
    return None


def refuse(path: str, reason: str) -> str:
    """Move a state file aside (kept for inspection) and log why; returns where it went."""
    aside = f"{path}.refused-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    try:
        os.replace(path, aside)
    except OSError as e:
        aside = path
        log.error("state: could not move refused state file '%s' aside (%s)", path, e)
    log.warning("state: refused '%s' (%s); starting from the artifact; the file is kept as '%s'",
                path, reason, aside)
    return aside


def choose_source(artifact: str, state_dir: Optional[str], model_name: str) -> tuple:
    """(path to load, artifact manifest, whether it is the state file).

    Raises ArtifactError only for the artifact itself (missing, corrupt, other version).
    """
    manifest = read_manifest(artifact)
    if not state_dir:
        return artifact, manifest, False
    os.makedirs(state_dir, exist_ok=True)
    path = state_path(state_dir, model_name)
    if not os.path.exists(path):
        log.info("state: no checkpoint at '%s'; starting from the artifact '%s'", path, artifact)
        return artifact, manifest, False
    try:
        state_manifest = read_manifest(path)
    except ArtifactError as e:
        refuse(path, f"unreadable: {e}")
        return artifact, manifest, False
    why = mismatch(manifest, state_manifest)
    if why is not None:
        refuse(path, f"another model: {why}")
        return artifact, manifest, False
    return path, manifest, True


class Checkpointer:
    """Saves ``rt`` to the state file on a schedule and after changes to its exits.

    Every ``poll_s`` it reads ``rt.stats()``: a new learning round or drift event writes at once;
    otherwise, rows served since the last write are written once ``every_s`` has passed.
    """

    def __init__(self, rt, path: str, every_s: float = 60.0, poll_s: float = 1.0,
                 loaded_from_state: bool = False):
        self.rt, self.path, self.every_s, self.poll_s = rt, path, every_s, poll_s
        self.count = 0
        self.last_time: Optional[float] = None
        if loaded_from_state:
            try:
                self.last_time = os.path.getmtime(path)
            except OSError:
                pass
        self._since = time.time()   # the schedule counts from here until the first write
        self._seen = self._marks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _marks(self) -> tuple:
        s = self.rt.stats()
        return (s.get("learning", {}).get("rounds"), s.get("drift_events"), s.get("rows"),
                tuple(s.get("enabled") or ()))

    def start(self):
        self._thread = threading.Thread(target=self._run, name="layer-cache-checkpoint",
                                        daemon=True)
        self._thread.start()

    def save(self, reason: str) -> bool:
        """Write the state file now (atomic); False (logged) if it failed."""
        with self._lock:
            marks = self._marks()
            t0 = time.perf_counter()
            try:
                self.rt.save(self.path)
            except Exception as e:  # noqa: BLE001 - a failed checkpoint must not stop serving
                log.error("checkpoint: writing '%s' failed (%s: %s)", self.path,
                          type(e).__name__, e)
                return False
            self._seen = marks
            self.count += 1
            self.last_time = time.time()
            log.info("checkpoint: wrote '%s' (%s; %d rows served, %s rounds, exits on: %s) in "
                     "%.2f s", self.path, reason, marks[2], marks[0], list(marks[3]),
                     time.perf_counter() - t0)
            return True

    def due(self) -> Optional[str]:
        """Why a checkpoint is due now, or None."""
        rounds, drift, rows, enabled = self._marks()
        old_rounds, old_drift, old_rows, old_enabled = self._seen
        if drift != old_drift:
            return "drift"
        if rounds != old_rounds or enabled != old_enabled:
            return "learning round"
        if rows != old_rows and time.time() - (self.last_time or self._since) >= self.every_s:
            return "schedule"
        return None

    def _run(self):
        while not self._stop.wait(self.poll_s):
            reason = self.due()
            if reason:
                self.save(reason)

    def close(self, final: bool = True):
        """Stop the schedule; with ``final`` write once more if anything changed since."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if final and self._marks() != self._seen:
            self.save("shutdown")

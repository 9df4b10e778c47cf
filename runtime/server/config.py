"""Settings of the inference server: one documented dataclass, filled by the CLI or by a caller."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

PRESETS = ("none", "fashion-mnist", "imagenet")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ServerConfigError(ValueError):
    """A setting the server cannot use; the message names it and says what to pass instead."""


@dataclass
class ServerConfig:
    """Everything the server needs besides the runtime's own settings.

    artifact:          the compiled artifact to serve (``python -m compiler.rewrite``), or a learned one.
    model_name:        the name clients use in ``/v2/models/{name}``; default: the artifact's file
                       name without ``.learned.pt`` / ``.cached.pt`` / ``.pt``.
    host, port:        where to listen; loopback unless told otherwise.
    device:            torch device of the runtime ("cpu" or "cuda").
    torch_threads:     torch intra-op threads in the server process (0: leave torch's default). One
                       thread by default: two threads on two shared cores spin against each other.
    max_batch:         most rows the batcher hands the runtime in one ``predict`` call.
    max_wait_ms:       longest a request waits in the queue for others to share its batch, while
                       traffic is busy (the last batch gathered several requests).
    wait_when_idle:    also make a lone request on a quiet server wait ``max_wait_ms`` for company
                       (Triton's rule); off: it runs at once, since nobody is coming to share.
    max_queue:         most requests waiting; past it the server answers 503 + Retry-After at once.
    max_request_rows:  most rows one request may carry (400 past it).
    max_body_bytes:    largest request body accepted (413 past it), after decompression.
    request_timeout_s: default deadline of a request (queue + compute); a request may ask for a
                       shorter one with the parameter ``timeout`` (microseconds, as Triton).
                       504 once it has passed; 0: no default.
    preprocess:        image preset for BYTES inputs (encoded PNG/JPEG): "none" (tensors only),
                       "fashion-mnist" (grayscale, resized to the model's size, Fashion-MNIST
                       mean/std) or "imagenet" (RGB, resize to 256/224 of the crop, centre crop
                       to the model's size, ImageNet mean/std).
    image_mean, image_std: override the preset's per-channel normalisation.
    state_dir:         where learned state is checkpointed (``<model>.learned.pt``) and found at
                       start; None: learned state is lost when the process ends.
    checkpoint_every_s: checkpoint at most this often when traffic was served since the last one;
                       a learning round or drift event that changed the exits checkpoints at once.
    drain_timeout_s:   at shutdown, how long accepted requests may take to be answered.
    access_log:        uvicorn's per-request log lines (off: one line per event that matters).
    log_level:         python logging level name.
    runtime_options:   RuntimeConfig fields by name (e.g. {"agreement_budget": 0.995}).
    """

    artifact: str = ""
    model_name: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    torch_threads: int = 1
    max_batch: int = 32
    max_wait_ms: float = 5.0
    wait_when_idle: bool = False
    max_queue: int = 256
    max_request_rows: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 60.0
    preprocess: str = "none"
    image_mean: Optional[tuple] = None
    image_std: Optional[tuple] = None
    state_dir: Optional[str] = None
    checkpoint_every_s: float = 60.0
    drain_timeout_s: float = 30.0
    access_log: bool = False
    log_level: str = "info"
    runtime_options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model name clients use."""
        if self.model_name:
            return self.model_name
        base = os.path.basename(self.artifact)
        for suffix in (".learned.pt", ".cached.pt", ".pt"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "model"

    def validate(self) -> "ServerConfig":
        """Raise ServerConfigError naming the first setting out of range."""
        if not self.artifact:
            raise ServerConfigError("no artifact given: pass the path of a compiled artifact "
                                    "(python -m compiler.rewrite MODEL writes one)")
        if not _NAME.match(self.name):
            raise ServerConfigError(f"model name {self.name!r} must be 1-128 letters, digits, "
                                    f"'_', '.' or '-'")
        positive = {"max_batch": self.max_batch, "max_queue": self.max_queue,
                    "max_request_rows": self.max_request_rows,
                    "max_body_bytes": self.max_body_bytes}
        for key, value in positive.items():
            if value < 1:
                raise ServerConfigError(f"{key} must be at least 1, got {value}")
        for key in ("max_wait_ms", "request_timeout_s", "checkpoint_every_s", "drain_timeout_s"):
            if getattr(self, key) < 0:
                raise ServerConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be in 0..65535, got {self.port}")
        if self.torch_threads < 0:
            raise ServerConfigError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.preprocess not in PRESETS:
            raise ServerConfigError(f"unknown preprocess preset {self.preprocess!r}; choose one of "
                                    f"{', '.join(PRESETS)}")
        if self.state_dir is not None and os.path.exists(self.state_dir) and \
                not os.path.isdir(self.state_dir):
            raise ServerConfigError(f"state dir '{self.state_dir}' exists and is not a directory")
        return self

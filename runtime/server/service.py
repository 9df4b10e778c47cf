"""The service: one runtime with its batcher, preprocessing, metrics and checkpoints; no HTTP here.

``Service(config).start()`` loads the model (from the state dir's checkpoint when it is this
model's), starts the batcher and the checkpoint schedule; ``stop()`` drains, checkpoints and closes
the runtime. ``build_app(service)`` (app.py) puts the HTTP routes on it; a Ray Serve deployment can
construct a Service the same way, without uvicorn.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import Optional

import numpy as np
import torch

import runtime
from compiler.errors import ArtifactError

from .batching import DeadlineExceeded, DynamicBatcher
from .config import ServerConfig
from .metrics import ServerMetrics
from .protocol import InferRequest, ProtocolError
from .state import Checkpointer, choose_source, refuse, state_path

log = logging.getLogger("runtime.server")

SERVER_NAME = "layer-cache"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
INPUT, IMAGE = "input", "image"          # input names: a float tensor, or encoded images
OUTPUT, EXIT = "output", "exit"          # output names: the model's output, each row's exit


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class Service:
    """Serve one artifact: ``prepare`` checks a request, ``infer`` batches and runs it."""

    def __init__(self, config: ServerConfig):
        self.config = config.validate()
        self.name = config.name
        self.rt = None
        self.manifest: Optional[dict] = None
        self.preprocessor = None
        self.batcher: Optional[DynamicBatcher] = None
        self.checkpointer: Optional[Checkpointer] = None
        self.metrics: Optional[ServerMetrics] = None
        self.source: Optional[str] = None
        self.ready = False
        self._stopped = False

    # ----- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Service":
        """Load the model and start serving; raises ArtifactError / ValueError for bad settings."""
        cfg = self.config
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        path, manifest, from_state = choose_source(cfg.artifact, cfg.state_dir, self.name)
        options = dict(cfg.runtime_options)
        try:
            rt = runtime.load(path, device=cfg.device, background=True, **options)
        except (ArtifactError, RuntimeError) as e:
            if not from_state:
                raise
            refuse(path, f"it does not load: {e}")
            path, from_state = cfg.artifact, False
            rt = runtime.load(path, device=cfg.device, background=True, **options)
        self.rt, self.manifest, self.source = rt, rt.manifest, path
        if cfg.preprocess != "none":
            from .preprocess import ImagePreprocessor
            self.preprocessor = ImagePreprocessor(cfg.preprocess, rt.input_shape, cfg.image_mean,
                                                  cfg.image_std)
        self.batcher = DynamicBatcher(self._predict, cfg.max_batch, cfg.max_wait_ms / 1e3,
                                      cfg.max_queue, wait_when_idle=cfg.wait_when_idle)
        self.metrics = ServerMetrics(self, depth=lambda: self.batcher.depth)
        self.batcher.observer = self.metrics
        self.batcher.start()
        if cfg.state_dir:
            self.checkpointer = Checkpointer(rt, state_path(cfg.state_dir, self.name),
                                             cfg.checkpoint_every_s,
                                             loaded_from_state=from_state)
            self.checkpointer.start()
        enabled = rt.stats().get("enabled", [])
        log.info("model '%s' loaded from '%s'%s: input %s, %d exits (%d on), batch <= %d rows, "
                 "wait <= %.1f ms, queue <= %d requests, preprocess %s", self.name, path,
                 " (checkpoint)" if from_state else "", list(rt.input_shape), rt.num_exits,
                 sum(bool(e) for e in enabled), cfg.max_batch, cfg.max_wait_ms, cfg.max_queue,
                 cfg.preprocess)
        self.ready = True   # the runtime profiles every stage at load: it is warm
        return self

    def stop(self):
        """Stop accepting, answer what is queued, checkpoint, stop the learner. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=self.config.drain_timeout_s)
        if self.checkpointer is not None:
            self.checkpointer.close(final=True)
        if self.rt is not None:
            self.rt.close()
            log.info("model '%s' stopped", self.name)

    def _predict(self, x):
        """On the batcher thread: rows in, numpy out, so the event loop never calls torch."""
        out, exits = self.rt.predict(torch.as_tensor(x), return_exits=True)
        return (out.detach().cpu().float().numpy(),
                exits.detach().cpu().to(torch.int64).numpy())

    # ----- metadata -----------------------------------------------------------------------------
    def input_specs(self) -> list:
        specs = [{"name": INPUT, "datatype": "FP32", "shape": [-1, *self.rt.input_shape]}]
        if self.preprocessor is not None:
            specs.append({"name": IMAGE, "datatype": "BYTES", "shape": [-1]})
        return specs

    def output_specs(self) -> list:
        return [{"name": OUTPUT, "datatype": "FP32",
                 "shape": [-1, int(self.manifest["num_classes"])]},
                {"name": EXIT, "datatype": "INT64", "shape": [-1]}]

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION,
                "extensions": ["binary_tensor_data", "model_configuration", "statistics"]}

    def model_metadata(self) -> dict:
        meta = {"name": self.name, "versions": [MODEL_VERSION], "platform": "pytorch_torchscript",
                "inputs": self.input_specs(), "outputs": self.output_specs()}
        params = {"exit_names": [e["name"] for e in self.manifest["exits"]] + ["backbone"],
                  "inputs": f"send one input: '{INPUT}' (FP32 rows)" +
                            (f" or '{IMAGE}' (BYTES, encoded PNG/JPEG)" if self.preprocessor
                             else "")}
        if self.preprocessor is not None:
            params["preprocess"] = self.preprocessor.describe()
        meta["parameters"] = params
        return meta

    def model_config(self) -> dict:
        """Triton's model configuration form (for Triton clients such as perf_analyzer)."""
        def tensor(spec):
            dims = spec["shape"][1:] or [1]
            return {"name": spec["name"], "data_type": "TYPE_" + ("STRING" if spec["datatype"] ==
                                                                  "BYTES" else spec["datatype"]),
                    "dims": dims}
        cfg = self.config
        return {"name": self.name, "platform": "pytorch_libtorch", "backend": "layer-cache",
                "max_batch_size": cfg.max_request_rows,
                "input": [tensor(s) for s in self.input_specs()],
                "output": [tensor(s) for s in self.output_specs()],
                "dynamic_batching": {"preferred_batch_size": [cfg.max_batch],
                                     "max_queue_delay_microseconds": int(cfg.max_wait_ms * 1e3)}}

    def runtime_stats(self) -> dict:
        s = self.rt.stats()
        server = {"queue_depth": self.batcher.depth, "source": self.source}
        if self.checkpointer is not None:
            server["checkpoints"] = self.checkpointer.count
            server["checkpoint_path"] = self.checkpointer.path
            server["last_checkpoint_unix"] = self.checkpointer.last_time
        if hasattr(self.rt, "learning_paused"):
            s["learning_paused"] = bool(self.rt.learning_paused)
        s["server"] = server
        return s

    def set_learning(self, paused: bool) -> bool:
        """Pause or resume learning; False if this runtime cannot."""
        fn = getattr(self.rt, "pause_learning" if paused else "resume_learning", None)
        if fn is None:
            return False
        fn()
        log.info("learning %s for model '%s'", "paused" if paused else "resumed", self.name)
        return True

    # ----- inference ----------------------------------------------------------------------------
    def runs_long(self, req: InferRequest) -> bool:
        """Whether ``prepare`` decodes images (slow: run it off the event loop)."""
        return any(t.name == IMAGE for t in req.inputs)

    def prepare(self, req: InferRequest):
        """The request's rows as a float batch (numpy FP32 for tensors, torch for decoded images);
        ProtocolError (400) says what to send instead."""
        want = f"'{INPUT}' (FP32, shape [N, {', '.join(map(str, self.rt.input_shape))}])"
        if self.preprocessor is not None:
            want += f" or '{IMAGE}' (BYTES, shape [N], encoded PNG/JPEG)"
        for name, _ in req.outputs or ():
            if name not in (OUTPUT, EXIT):
                raise ProtocolError(f"unknown output '{name}'; this model has '{OUTPUT}' and "
                                    f"'{EXIT}'")
        if len(req.inputs) != 1:
            raise ProtocolError(f"send exactly one input, {want}; got "
                                f"{[t.name for t in req.inputs]}")
        t = req.inputs[0]
        if t.name == INPUT:
            if t.datatype != "FP32":
                raise ProtocolError(f"input '{INPUT}' must be FP32, got {t.datatype}; send "
                                    f"float32 data")
            if len(t.shape) != len(self.rt.input_shape) + 1 or \
                    tuple(t.shape[1:]) != tuple(self.rt.input_shape):
                raise ProtocolError(f"input '{INPUT}' has shape {list(t.shape)}; send "
                                    f"[N, {', '.join(map(str, self.rt.input_shape))}] "
                                    f"(batch dimension first)")
            rows = t.shape[0]
            self._check_rows(rows)
            x = t.data if t.data.dtype == np.float32 and t.data.flags.writeable else \
                np.array(t.data, dtype=np.float32)
            x = x.reshape(t.shape)
            finite = np.isfinite(x.reshape(rows, -1)).all(1)
            if not finite.all():
                bad = np.flatnonzero(~finite).tolist()
                raise ProtocolError(f"rows {bad[:10]} contain NaN or Inf; clean or drop them "
                                    f"and resend (nothing was served or learned)")
            return x
        if t.name == IMAGE and self.preprocessor is not None:
            if t.datatype != "BYTES":
                raise ProtocolError(f"input '{IMAGE}' must be BYTES (encoded PNG/JPEG), got "
                                    f"{t.datatype}")
            if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
                raise ProtocolError(f"input '{IMAGE}' has shape {list(t.shape)}; send [N] "
                                    f"(one encoded image per row)")
            self._check_rows(t.shape[0])
            images = [self._image_bytes(i, v) for i, v in enumerate(t.data)]
            from .preprocess import ImageError
            try:
                return self.preprocessor(images)
            except ImageError as e:
                raise ProtocolError(str(e)) from None
        raise ProtocolError(f"unknown input '{t.name}'; send {want}")

    def _check_rows(self, rows: int):
        if rows < 1:
            raise ProtocolError("empty batch: send at least one row")
        if rows > self.config.max_request_rows:
            raise ProtocolError(f"{rows} rows in one request is over the limit of "
                                f"{self.config.max_request_rows}; split it")

    @staticmethod
    def _image_bytes(i: int, value) -> bytes:
        if isinstance(value, bytes):
            return value
        try:   # JSON cannot carry raw bytes: images in JSON are base64 strings
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"image row {i}: not base64; in JSON send each image as a "
                                f"base64 string (or use the binary data extension)") from None

    def deadline(self, req: InferRequest) -> Optional[float]:
        """The request's deadline on the monotonic clock (its ``timeout`` or the server's)."""
        limits = [s for s in (req.timeout_s, self.config.request_timeout_s or None) if s]
        return time.monotonic() + min(limits) if limits else None

    async def infer(self, x, deadline: Optional[float] = None,
                    gone: Optional[asyncio.Future] = None) -> dict:
        """Batch ``x`` with other requests; {output name: numpy array}.

        Raises QueueFull / ShuttingDown (503), DeadlineExceeded (504), ClientGone when ``gone``
        (a future set when the client disconnects) finishes first; the queued request is then
        dropped before it runs. Callbacks, not ``asyncio.wait``: no task or set per request.
        """
        fut = self.batcher.submit(x, deadline)
        why = []

        def stop(reason):
            if not fut.done():
                why.append(reason)
                fut.cancel()

        timer = None
        if deadline is not None:
            timeout = max(0.0, deadline - time.monotonic())
            timer = asyncio.get_running_loop().call_later(timeout, stop, "deadline")
        if gone is not None:
            gone.add_done_callback(lambda _: stop("gone"))
        try:
            out, exits = await fut
        except asyncio.CancelledError:
            if not why:        # this task itself was cancelled (shutdown)
                raise
            if why[0] == "gone":
                raise ClientGone() from None
            raise DeadlineExceeded(f"deadline of {timeout:.3f} s passed before the answer") \
                from None
        finally:
            if timer is not None:
                timer.cancel()
        return {OUTPUT: out, EXIT: exits}

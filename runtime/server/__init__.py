"""Inference server for layer-cache artifacts: Open Inference Protocol (KServe v2 / Triton HTTP).

``python -m runtime.server ARTIFACT`` runs it; in code, ``Service(ServerConfig(...)).start()``
bundles the runtime, the dynamic batcher, preprocessing, metrics and checkpoints, and
``build_app(service)`` puts the HTTP routes on it (FastAPI). Only this package imports FastAPI.
"""
from .config import ServerConfig, ServerConfigError
from .service import Service


def build_app(service, stop_on_shutdown: bool = True):
    """The FastAPI app for ``service`` (see app.build_app)."""
    from .app import build_app as _build

    return _build(service, stop_on_shutdown)


__all__ = ["ServerConfig", "ServerConfigError", "Service", "build_app"]

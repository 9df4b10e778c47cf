"""Scale-out on Ray Serve: many replicas serve, one learner learns, one learned state.

``python -m runtime.scaleout ARTIFACT --replicas 2`` (see docs/scaleout.md). Needs the ``ray``
extra (``pip install -e '.[ray]'``); ``runtime`` and ``runtime.server`` never import Ray.
"""
from .protocol import LinkConfig, PublishedState, Report, ScaleoutError

__all__ = ["LinkConfig", "PublishedState", "Report", "ScaleoutError"]

"""Layer-cache runtime: serve an artifact and learn its exits online from the traffic it serves."""
from .config import ConfigError, RuntimeConfig
from .core import CachedRuntime, InputError, load

__all__ = ["load", "CachedRuntime", "RuntimeConfig", "ConfigError", "InputError"]

"""Layer-cache compiler: trace a model, find cut points, insert exit heads, emit a TorchScript artifact."""
from .config import RewriteConfig
from .errors import CompilerError

__all__ = ["RewriteConfig", "CompilerError"]

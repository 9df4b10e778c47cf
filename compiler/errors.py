"""Typed errors a user of the compiler can hit; each says what went wrong and what to do."""
import sys


class CompilerError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ModelLoadError(CompilerError):
    """The model file is missing, corrupt, or of a form the compiler does not accept."""


class TraceFailure(CompilerError):
    """torch.fx could not trace the model."""


class ShapeError(CompilerError):
    """The example input does not fit the model, or a node's output is not what a cut needs."""


class NoCutPointError(CompilerError):
    """The graph has no place where a single tensor carries all the state forward."""


class ArtifactError(CompilerError):
    """An artifact file is missing, corrupt, or not one of ours."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by another format version."""


class ExportError(CompilerError):
    """The artifact could not be exported (ONNX)."""


def report(e: Exception) -> int:
    """Print a user-facing error on one line of stderr; returns the CLI exit code (2)."""
    msg = f"{e.strerror or e}: {e.filename or ''}" if isinstance(e, OSError) else str(e)
    print(f"error: {msg}", file=sys.stderr)
    return 2

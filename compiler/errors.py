"""Typed errors a user of the compiler can hit; each says what went wrong and what to do."""
import re
import sys


class CompilerError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class UsageError(CompilerError):
    """A command-line value or library setting is out of range; the message names the flag."""


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


class ArtifactCorruptError(ArtifactError):
    """The file's bytes are not what was saved: a bad zip, a CRC or content-hash mismatch."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by another format version."""


class ManifestError(ArtifactError):
    """The manifest lacks a field, holds a value out of range, or disagrees with the model."""


class ArtifactWriteError(ArtifactError, OSError):
    """An artifact could not be written; the message names the target path. Also an OSError,
    as the failures it wraps are, so callers that catch OSError around a save still do."""


class ExportError(CompilerError):
    """The artifact could not be exported (ONNX)."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def brief(e: BaseException, limit: int = 200) -> str:
    """One line for an error from running TorchScript: its last ``SomeError: ...`` line (the
    interpreter puts the cause after a traceback), else ``first_line``; at most ``limit`` chars."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    line = causes[-1] if causes else first_line(e)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def report(e: Exception) -> int:
    """Print a user-facing error on one line of stderr; returns the CLI exit code (2)."""
    if isinstance(e, OSError):
        what = e.strerror or first_line(e)
        msg = f"{what}: {e.filename}" if e.filename else what
    else:
        msg = str(e)
    msg = " ".join(msg.split()) or type(e).__name__  # one line, whatever the message held
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_cli(main, argv, out_of_memory_hint: str) -> int:
    """Run a CLI's ``main(argv)`` so that nothing reaches the user as a traceback: a user error
    is one ``error:`` line and exit code 2 (``report``), running out of memory says what to
    shrink, and anything else (a bug) is still one line, with exit code 1."""
    try:
        return main(argv)
    except (CompilerError, OSError) as e:
        return report(e)
    except MemoryError:
        print(f"error: out of memory; {out_of_memory_hint}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, and what to report
        print(f"error: unexpected {type(e).__name__}: {first_line(e)}; please report this with "
              f"the command line", file=sys.stderr)
        return 1

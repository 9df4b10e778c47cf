"""The artifact: one TorchScript file holding the staged model, its exit heads and a manifest.

Plain ``torch.jit.load`` opens it with no project code. Calling it returns what the source
model returns; ``forward_with_exits`` also returns each row's exit (``len(blocks)`` = none).
Per-exit state lives in buffers ``blocks[i].threshold`` and ``blocks[i].enabled``.
"""
import json
import os
import tempfile
import warnings
import zipfile
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import exit_rule
from .errors import ArtifactError, ArtifactVersionError

FORMAT_VERSION = 2
# Version 2 added finer head poolings (avgmax3x3, avgmax4x4); version 1 files read the same way.
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "layer_cache/manifest.json"
DISABLED_THRESHOLD = exit_rule.DISABLED_THRESHOLD


class ExitBlock(nn.Module):
    """One stage of the backbone followed by the exit head that reads its output."""

    def __init__(self, stage: nn.Module, head: nn.Module):
        super().__init__()
        self.stage = stage
        self.head = head
        self.register_buffer("threshold", torch.tensor(DISABLED_THRESHOLD))
        self.register_buffer("enabled", torch.tensor(False))


class CachedModel(nn.Module):
    """The backbone cut into stages, an exit head after each but the last."""

    def __init__(self, blocks: List[ExitBlock], final: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.final = final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_exits(x)[0]

    @torch.jit.export
    def forward_with_exits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows leave at the first enabled exit confident enough (``compiler/exit_rule.py``, compiled
        into this file); the rest go on. Rows keep input order."""
        n = x.size(0)
        idx = torch.arange(n, device=x.device)
        exit_of = torch.full([n], len(self.blocks), dtype=torch.long, device=x.device)
        out: Optional[torch.Tensor] = None
        h = x
        i = 0
        for blk in self.blocks:
            if h.size(0) > 0:
                h = blk.stage(h)
                if bool(blk.enabled):
                    logits = blk.head(h)
                    take = exit_rule.leaves(exit_rule.confidence(logits), blk.threshold, True)
                    if bool(take.any()):
                        if out is None:
                            out = torch.empty([n] + list(logits.shape[1:]), dtype=logits.dtype,
                                              device=x.device)
                        rows = idx[take]
                        out.index_copy_(0, rows, logits[take])
                        exit_of.index_fill_(0, rows, i)
                        keep = ~take
                        h = h[keep]
                        idx = idx[keep]
            i += 1
        if out is None:
            return self.final(h), exit_of
        if h.size(0) > 0:
            y = self.final(h)
            out.index_copy_(0, idx, y.to(out.dtype))
        return out, exit_of


def set_exit(block, threshold: float):
    """Write one exit's threshold (``inf``: off) into an artifact block's buffers."""
    on = threshold != float("inf")
    block.enabled.fill_(on)
    block.threshold.fill_(threshold if on else DISABLED_THRESHOLD)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_folder(folder: str):
    """Flush a folder's entries, so a rename into it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(module: torch.jit.ScriptModule, manifest: dict, path: str):
    """Write ``module`` with ``manifest`` to ``path`` atomically (a crash leaves the old file whole).

    The file gets the mode any new file of the user gets (umask), and the folder is fsynced so
    the rename itself survives a power cut.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, tmp, _extra_files={MANIFEST_FILE: json.dumps(manifest)})
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_manifest(path: str) -> dict:
    """The manifest of an artifact file, checked for our format version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact '{path}' does not exist; create one with "
                            f"python -m compiler.rewrite MODEL")
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/extra/" + MANIFEST_FILE)), None)
            if name is None:
                raise ArtifactError(f"'{path}' is not a layer-cache artifact (no manifest inside); "
                                    f"create one with python -m compiler.rewrite MODEL")
            manifest = json.loads(z.read(name))
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as e:
        raise ArtifactError(f"artifact '{path}' is corrupt ({e}); re-create it with "
                            f"python -m compiler.rewrite MODEL") from None
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactVersionError(
            f"artifact '{path}' has format version {version}, this code reads version "
            f"{FORMAT_VERSION} (and {', '.join(map(str, READABLE_VERSIONS[:-1]))}); re-create it "
            f"with this version's python -m compiler.rewrite")
    return manifest


def load(path: str, map_location=None) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load an artifact and its manifest; errors are ArtifactError with a hint."""
    manifest = read_manifest(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(os.fspath(path), map_location=map_location)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"artifact '{path}' cannot be loaded ({msg}); re-create it with "
                            f"python -m compiler.rewrite MODEL") from None
    return module.eval(), manifest

"""The artifact: one TorchScript file holding the staged model, its exit heads and a manifest.

Plain ``torch.jit.load`` opens it with no project code. Calling it returns what the source
model returns; ``forward_with_exits`` also returns each row's exit (``len(blocks)`` = none).
Per-exit state lives in buffers ``blocks[i].threshold`` and ``blocks[i].enabled``.

Integrity (format version 3): after ``torch.jit.save`` the file gets one more zip member,
``<archive>/extra/layer_cache/integrity.json``: the sha256 of every other member's content
(``torch.jit.load`` ignores the member; it can still read it as an extra file). Every
``read_manifest`` and ``load`` reads each member (zip CRCs checked), compares the hashes, checks
the manifest's schema (``compiler.manifest``) and, on ``load``, the model against it, so a
damaged or edited file is a one-line ``ArtifactError``, never a served answer.

Older files (versions 1 and 2) have no hash: they still load, checked by CRCs, schema and model,
with a warning once per file; saving one again (``save``, ``runtime.save``) writes version 3.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
import warnings
import zipfile
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import exit_rule
from . import manifest as schema
from .errors import (ArtifactCorruptError, ArtifactError, ArtifactVersionError,
                     ArtifactWriteError, ManifestError, brief, first_line)

try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then judged by age alone
    fcntl = None

FORMAT_VERSION = 3
# Version 2 added finer head poolings (avgmax3x3, avgmax4x4); version 3 the content hash. Files
# of versions 1 and 2 read the same way, without a hash to check.
READABLE_VERSIONS = (1, 2, 3)
HASHED_SINCE = 3
MANIFEST_FILE = "layer_cache/manifest.json"
INTEGRITY_FILE = "layer_cache/integrity.json"
RECREATE = "re-create it with python -m compiler.rewrite MODEL"
TEMP_PREFIX = ".tmp-layer-cache-"   # our temp files beside a target, locked while written
STALE_AFTER_S = 10.0                # an unlocked temp file this old belongs to a dead writer
# Temp files of older versions of save / export (unlocked): removed once an hour old.
LEGACY_TEMP = re.compile(r"\.tmp-([a-z0-9_]{8}\.pt|\d+-.+\.onnx)")
LEGACY_STALE_AFTER_S = 3600.0
log = logging.getLogger("layer_cache.artifact")
_warned_unhashed = set()
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
        into this file); the rest go on. Rows keep input order.

        An empty batch returns [0, classes] and [0]: its shape comes from one zero row through
        the backbone, since not every stage takes 0 rows (``x.view(x.size(0), -1)`` does not).
        """
        n = x.size(0)
        if n == 0:
            h = torch.zeros([1] + list(x.shape[1:]), dtype=x.dtype, device=x.device)
            for blk in self.blocks:
                h = blk.stage(h)
            return self.final(h)[:0], torch.zeros([0], dtype=torch.long, device=x.device)
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


# ----- temp files beside a target -------------------------------------------------------------
def remove_stale_temps(folder: str) -> List[str]:
    """Delete temp files a killed ``save`` or export left in ``folder``; returns their names.

    Only ours (``TEMP_PREFIX``, or an older version's names), and only when no live writer holds
    them: a writer keeps an exclusive ``flock`` on its temp file until it is renamed or removed
    (the kernel drops the lock when the writer dies), and a file younger than ``STALE_AFTER_S``
    is left alone (its writer may not have locked it yet). Without ``fcntl``, age alone decides.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if name.startswith(TEMP_PREFIX):
            age = STALE_AFTER_S if fcntl is not None else LEGACY_STALE_AFTER_S
        elif LEGACY_TEMP.fullmatch(name):
            age = LEGACY_STALE_AFTER_S
        else:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < age:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # a live writer holds it
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    os.unlink(path)
                    removed.append(name)
            finally:
                os.close(fd)
        except OSError:  # gone meanwhile (another cleaner), or not ours to touch
            continue
    return removed


@contextlib.contextmanager
def temp_beside(path: str, suffix: str, what: str = "the artifact"):
    """A locked, empty temp file in ``path``'s folder; yields its path; removed on the way out
    unless renamed. Stale temp files of killed writers are cleaned first. OSErrors become
    ArtifactWriteErrors naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
    except OSError as e:
        raise ArtifactWriteError(f"cannot save {what} to '{path}': {e.strerror or first_line(e)} "
                                 f"(writing a temp file in '{folder}')") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without locks: the age check still protects it a while
        yield tmp
    finally:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        finally:
            os.close(fd)


def _check_target(path: str, what: str):
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ArtifactWriteError(f"cannot save {what} to '{path}': it is a directory; give a file "
                                 f"path inside it")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ArtifactWriteError(f"cannot save {what} to '{path}': folder '{folder}' does not "
                                 f"exist; create it first")


# ----- the content hash -----------------------------------------------------------------------
def _prefix(names: List[str]) -> str:
    """The archive folder every member lives in (torch names it after the file)."""
    first = names[0].split("/", 1)[0] if names else ""
    return first


def _digests(z: zipfile.ZipFile, skip: Optional[str] = None) -> dict:
    """{member name below the archive folder: sha256 of its content}; reading each member to
    its end also checks its zip CRC and that its local header agrees with the directory."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    prefix = _prefix(names)
    if not prefix or len(set(names)) != len(names):
        raise zipfile.BadZipFile("duplicate or unnamed members")
    out = {}
    for info in infos:
        if not info.filename.startswith(prefix + "/"):
            raise zipfile.BadZipFile(f"member '{info.filename}' outside '{prefix}/'")
        rel = info.filename[len(prefix) + 1:]
        h = hashlib.sha256()
        with z.open(info) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if rel != skip:
            out[rel] = h.hexdigest()
    return out


def _overall(digests: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


def _seal(tmp: str):
    """Append the integrity member to a file ``torch.jit.save`` just wrote."""
    with zipfile.ZipFile(tmp, "a") as z:
        digests = _digests(z)
        record = {"algorithm": "sha256", "sha256": _overall(digests), "members": digests}
        z.writestr(f"{_prefix(z.namelist())}/extra/{INTEGRITY_FILE}",
                   json.dumps(record, sort_keys=True), compress_type=zipfile.ZIP_STORED)


def content_sha256(path: str) -> Optional[str]:
    """The content hash recorded in an artifact (None for an older file without one)."""
    return _read(path)[1]


# ----- saving ---------------------------------------------------------------------------------
def save(module: torch.jit.ScriptModule, manifest: dict, path: str):
    """Write ``module`` with ``manifest`` to ``path`` atomically (a crash leaves the old file whole).

    The manifest is checked first (``compiler.manifest``; a version 1 or 2 manifest is written
    as version 3), the content hash is added, the file gets the mode any new file of the user
    gets (umask), and the folder is fsynced so the rename itself survives a power cut. Errors
    are ArtifactWriteErrors naming ``path``; no temp file is left behind, and those of killed
    saves in the same folder are removed.
    """
    path = os.fspath(path)
    _check_target(path, "the artifact")
    if isinstance(manifest, dict) and manifest.get("format_version") in (1, 2):
        manifest = dict(manifest, format_version=FORMAT_VERSION)
    schema.check(manifest, path)
    schema.check_structure(module, manifest, path)
    folder = os.path.dirname(os.path.abspath(path))
    with temp_beside(path, ".pt") as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(module, tmp, _extra_files={MANIFEST_FILE: json.dumps(manifest)})
            _seal(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_folder(folder)
        except OSError as e:
            raise ArtifactWriteError(f"cannot save the artifact to '{path}': "
                                     f"{e.strerror or first_line(e)}") from None
        except Exception as e:  # torch.jit.save reports a full disk as RuntimeError
            raise ArtifactWriteError(f"cannot save the artifact to '{path}': {brief(e)}") from None


# ----- reading --------------------------------------------------------------------------------
def _corrupt(path: str, why: str) -> ArtifactCorruptError:
    return ArtifactCorruptError(f"artifact '{path}' is corrupt: {why}; {RECREATE} (or restore a "
                                f"good copy)")


@contextlib.contextmanager
def _open(path: str):
    if os.path.isdir(path):
        raise ArtifactError(f"artifact '{path}' is a directory, not an artifact file; give the "
                            f".pt file python -m compiler.rewrite wrote")
    if not os.path.exists(path):
        raise ArtifactError(f"artifact '{path}' does not exist; create one with "
                            f"python -m compiler.rewrite MODEL")
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact '{path}' is not a regular file; give the .pt file "
                            f"python -m compiler.rewrite wrote")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ArtifactError(f"artifact '{path}' cannot be read: {e.strerror or first_line(e)}") \
            from None
    with f:
        yield f


def _version_error(path: str, version) -> ArtifactVersionError:
    if not isinstance(version, int) or isinstance(version, bool):
        return ArtifactVersionError(
            f"artifact '{path}' has format version {version!r}, which is not a version number "
            f"(this code reads format version {FORMAT_VERSION} and the older 1 and 2); {RECREATE}")
    newer = "a newer layer-cache wrote it; upgrade, or " if version > FORMAT_VERSION else ""
    return ArtifactVersionError(
        f"artifact '{path}' has format version {version}, which this code cannot read (it reads "
        f"format version {FORMAT_VERSION} and the older 1 and 2); {newer}re-create it with this "
        f"version's python -m compiler.rewrite")


def _read_open(f, path: str) -> Tuple[dict, Optional[str]]:
    """(checked manifest, content hash or None) of the open artifact ``f``."""
    try:
        z = zipfile.ZipFile(f)
    except zipfile.BadZipFile:
        raise ArtifactCorruptError(f"artifact '{path}' is corrupt or not an artifact (not a zip "
                                   f"archive); {RECREATE}") from None
    except Exception as e:  # zipfile raises several types for damaged directories
        raise _corrupt(path, f"its zip directory cannot be read ({first_line(e)})") from None
    with z:
        try:
            digests = _digests(z, skip=f"extra/{INTEGRITY_FILE}")
            prefix = _prefix(z.namelist())
            names = set(z.namelist())
            man_name = f"{prefix}/extra/{MANIFEST_FILE}"
            int_name = f"{prefix}/extra/{INTEGRITY_FILE}"
            raw_manifest = z.read(man_name) if man_name in names else None
            raw_integrity = z.read(int_name) if int_name in names else None
        except Exception as e:  # BadZipFile (CRC, header), zlib.error, EOFError, ...
            raise _corrupt(path, f"a zip member cannot be read ({first_line(e)})") from None
    if raw_manifest is None:
        raise ArtifactError(f"'{path}' is not a layer-cache artifact (no manifest inside); "
                            f"create one with python -m compiler.rewrite MODEL")
    try:
        manifest = json.loads(raw_manifest)
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"its manifest is not JSON ({first_line(e)})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None

    content = None
    if raw_integrity is not None:
        try:
            record = json.loads(raw_integrity)
            recorded, content = dict(record["members"]), str(record["sha256"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise _corrupt(path, f"its integrity record is unreadable ({first_line(e)})") from None
        changed = sorted(n for n in set(recorded) | set(digests)
                         if recorded.get(n) != digests.get(n))
        if changed or _overall(recorded) != content:
            if f"extra/{MANIFEST_FILE}" in changed:
                try:
                    schema.check(manifest, path)
                    why = "its manifest changed after it was saved (content hash mismatch)"
                except ManifestError as e:
                    why = f"its manifest changed after it was saved: {e.detail}"
            elif changed:
                more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                why = f"'{changed[0]}'{more} changed after it was saved (content hash mismatch)"
            else:
                why = "its integrity record is damaged (content hash mismatch)"
            raise _corrupt(path, why)
    elif isinstance(version, int) and not isinstance(version, bool) and \
            HASHED_SINCE <= version <= FORMAT_VERSION:
        raise _corrupt(path, f"a version {version} artifact must hold a content hash, and this "
                             f"one has none")
    if not isinstance(manifest, dict):
        schema.check(manifest, path)  # raises: not a JSON object
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise _version_error(path, version)
    schema.check(manifest, path)
    if content is None and path not in _warned_unhashed:
        _warned_unhashed.add(path)
        log.warning("artifact '%s' (format version %s) has no content hash: only its zip CRCs, "
                    "manifest and model were checked; save it again to add one", path, version)
    return manifest, content


def _read(path) -> Tuple[dict, Optional[str]]:
    path = os.fspath(path)
    with _open(path) as f:
        return _read_open(f, path)


def read_manifest(path: str) -> dict:
    """The manifest of an artifact file: content hash, format version and schema checked."""
    return _read(path)[0]


def load(path: str, map_location=None) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load an artifact and its manifest, all checked (``read_manifest``, then the model against
    the manifest with one zero row); errors are one-line ArtifactErrors with a hint.

    The bytes checked are the bytes loaded: torch reads the file through the descriptor the
    check read, so a file replaced meanwhile cannot slip in.
    """
    path = os.fspath(path)
    with _open(path) as f:
        manifest, content = _read_open(f, path)
        fd_path = f"/proc/self/fd/{f.fileno()}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(fd_path if os.path.exists(fd_path) else path,
                                        map_location=map_location)
        except Exception as e:
            # The hash covers members' content, not the zip's directory records: torch failing
            # on a file whose hash holds most likely met a damaged directory.
            if content is None or re.search(r"zip|PytorchStreamReader", str(e), re.I):
                raise _corrupt(path, f"torch cannot load it ({brief(e)})") from None
            raise ArtifactError(f"artifact '{path}' cannot be loaded by torch {torch.__version__} "
                                f"({brief(e)}); re-create it with this version's python -m "
                                f"compiler.rewrite") from None
    module.eval()
    schema.check_module(module, manifest, path)
    return module, manifest

"""Integrity of the artifact and the compiler CLIs (issue 15): no file, flag or batch makes the
compiler or an artifact silently serve something else.

Fuzzes a tiny artifact (bit flips, truncations, manifest edits), the ``compiler.rewrite`` and
``compiler.export`` flags (in-process and through real processes), saving (failures, killed
saves, concurrent savers' temp files) and the empty batch through plain ``torch.jit.load``.
Every case ends in a one-line error that says what to do, or in the right answer.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compiler import artifact
from compiler import export as ex
from compiler.config import RewriteConfig
from compiler.errors import (ArtifactCorruptError, ArtifactError, ArtifactVersionError,
                             ArtifactWriteError, ManifestError, UsageError, brief, first_line)
from compiler.rewrite import main as rewrite_main
from compiler.rewrite import rewrite_module

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 1, 8, 8)
K = 5


class Tiny(nn.Module):
    """Three conv blocks on 1x8x8; the classifier flattens with ``view(size(0), -1)``, which
    cannot run on 0 rows (the empty-batch case must not depend on it)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, K)

    def forward(self, x):
        h = self.b3(self.b2(self.b1(x)))
        return self.fc(h.view(h.size(0), -1))


def _rows(n=16, seed=1):
    return torch.randn((n,) + SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """(path, manifest, rows, reference answer): the tiny artifact with both exits on at the
    median confidence, so flips in thresholds and heads would change answers."""
    module, manifest, _ = rewrite_module(tiny, SHAPE, RewriteConfig(num_exits=2))
    x = _rows()
    h = x
    with torch.no_grad():
        for i in range(len(manifest["exits"])):
            blk = getattr(module.blocks, str(i))
            h = blk.stage(h)
            artifact.set_exit(blk, float(torch.softmax(blk.head(h), 1).amax(1).median()))
    path = tmp_path_factory.mktemp("integrity") / "tiny.cached.pt"
    artifact.save(module, manifest, path)
    loaded, manifest = artifact.load(path)
    with torch.no_grad():
        want = loaded.forward_with_exits(x)
    assert 0 < int((want[1] < len(manifest["exits"])).sum()) < len(x)  # some rows leave early
    return path, manifest, x, want


def assert_one_line(e: BaseException, *words):
    msg = str(e)
    assert "\n" not in msg and msg.strip() == msg and "()" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ----- bit flips and truncations --------------------------------------------------------------

def _outcome(path, x, want, manifest):
    """'error' (one line, says how to get a good file) or 'same' (loads, answers as before)."""
    try:
        module, got_manifest = artifact.load(path)
    except ArtifactError as e:
        msg = assert_one_line(e)
        assert "re-create" in msg or "compiler.rewrite" in msg, msg
        return "error"
    with torch.no_grad():
        out, exits = module.forward_with_exits(x)
    assert got_manifest == manifest
    assert torch.equal(out, want[0]) and torch.equal(exits, want[1]), \
        "a damaged artifact loaded and answered differently"
    return "same"


def test_bit_flips_never_change_an_answer(built, tmp_path):
    path, manifest, x, want = built
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        directory = z.start_dir  # the central directory and end record follow
    rng = random.Random(15)
    flips = [(rng.randrange(directory), rng.randrange(8)) for _ in range(500)]
    flips += [(off, rng.randrange(8)) for off in range(directory, len(data), 23)]
    flips += [(len(data) - k, rng.randrange(8)) for k in range(1, 23)]  # the end record
    seen = {"error": 0, "same": 0}
    bad = tmp_path / "flipped.cached.pt"
    for off, bit in flips:
        b = bytearray(data)
        b[off] ^= 1 << bit
        bad.write_bytes(bytes(b))
        seen[_outcome(bad, x, want, manifest)] += 1
    assert seen["error"] > 0.8 * len(flips), seen


def _flip_a_weight(data: bytearray, path) -> bytearray:
    """``data`` (the bytes of ``path``) with a bit of a weight flipped, its CRC left as it was:
    a flip at an arbitrary offset may land in the zip's alignment padding, which is no content."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    local = info.header_offset  # the local header's own name and extra (padding) lengths
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
        int.from_bytes(data[local + 28:local + 30], "little")
    data[start + 3] ^= 0x10
    return data


def test_a_flip_in_content_is_a_corrupt_error_naming_the_fix(built, tmp_path):
    path, _, _, _ = built
    data = _flip_a_weight(bytearray(path.read_bytes()), path)
    bad = tmp_path / "weights.cached.pt"
    bad.write_bytes(bytes(data))
    for fn in (artifact.read_manifest, artifact.load):
        with pytest.raises(ArtifactCorruptError) as info_:
            fn(bad)
        assert_one_line(info_.value, str(bad), "corrupt", "python -m compiler.rewrite")


def test_truncated_files_are_refused(built, tmp_path):
    path, manifest, x, want = built
    data = path.read_bytes()
    bad = tmp_path / "short.cached.pt"
    for cut in list(range(0, len(data), max(len(data) // 60, 1))) + \
            list(range(len(data) - 40, len(data))):
        bad.write_bytes(data[:cut])
        with pytest.raises(ArtifactError) as info:
            artifact.load(bad)
        assert_one_line(info.value, "compiler.rewrite")


def test_content_hash_and_plain_torch_jit_load(built):
    path, manifest, x, want = built
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 3
    digest = artifact.content_sha256(path)
    assert isinstance(digest, str) and len(digest) == 64
    plain = _jit_load(path)  # no project code needed to open or run it
    with torch.no_grad():
        out, exits = plain.forward_with_exits(x)
    assert torch.equal(out, want[0]) and torch.equal(exits, want[1])


# ----- edited manifests -----------------------------------------------------------------------

def _with_manifest(src: Path, dst: Path, edit, reseal: bool):
    """Copy ``src`` to ``dst`` with ``edit`` applied to its manifest; ``reseal`` recomputes the
    content hash (sha256 per member, written independently of compiler.artifact), so the
    manifest checks themselves are what refuses the file."""
    with zipfile.ZipFile(src) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    prefix = items[0][0].filename.split("/", 1)[0]
    man_name = f"{prefix}/extra/{artifact.MANIFEST_FILE}"
    int_name = f"{prefix}/extra/{artifact.INTEGRITY_FILE}"
    out = []
    for info, blob in items:
        if info.filename == man_name:
            manifest = json.loads(blob)
            new = edit(manifest)
            blob = new if isinstance(new, bytes) else json.dumps(manifest if new is None else new)
            blob = blob.encode() if isinstance(blob, str) else blob
        out.append((info, blob))
    if reseal:
        members = {i.filename[len(prefix) + 1:]: hashlib.sha256(b).hexdigest()
                   for i, b in out if i.filename != int_name}
        h = hashlib.sha256()
        for name in sorted(members):
            h.update(f"{name}\0{members[name]}\n".encode())
        record = json.dumps({"algorithm": "sha256", "sha256": h.hexdigest(), "members": members})
        out = [(i, record.encode() if i.filename == int_name else b) for i, b in out]
    with zipfile.ZipFile(dst, "w") as z:
        for info, blob in out:
            z.writestr(info, blob)
    return dst


def _drop_last_exit(m):
    m["exits"].pop()
    last = m["stage_flops"].pop()
    m["stage_flops"][-1] += last


def _set(path, value):
    def edit(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


def _all_classes(k):
    def edit(m):
        m["num_classes"] = k
        m["output_shape"] = [-1, k]
        for e in m["exits"]:
            e["head"]["num_classes"] = k
            e["head"].pop("params")
    return edit


EDITS = [
    ("exit removed", _drop_last_exit, ManifestError, "'exits' lists 1 exits"),
    ("exit removed, stage_flops kept", lambda m: m["exits"].pop() and None, ManifestError,
     "'stage_flops' has 3 entries for 1 exits"),
    ("exits emptied", _set(["exits"], []), ManifestError, "'exits' is empty"),
    ("exits not a list", _set(["exits"], {"a": 1}), ManifestError, "'exits' is {'a': 1}"),
    ("input_shape channels", _set(["input_shape"], [-1, 3, 8, 8]), ManifestError,
     "'input_shape' is [-1, 3, 8, 8], and stage 0 fails"),
    ("input_shape huge", _set(["input_shape"], [-1, 1, 100000, 100000]), ManifestError,
     "'input_shape'"),
    ("input_shape text", _set(["input_shape"], "1,1,8,8"), ManifestError, "'input_shape'"),
    ("num_classes alone", _set(["num_classes"], 11), ManifestError, "num_classes"),
    ("num_classes everywhere", _all_classes(11), ManifestError, "'exits[0].head' describes"),
    ("num_classes missing", _set(["num_classes"], KeyError), ManifestError,
     "'num_classes' is missing"),
    ("num_classes float", _set(["num_classes"], 5.0), ManifestError, "not an integer"),
    ("total_flops", _set(["total_flops"], 1), ManifestError, "'total_flops' is 1"),
    ("head pooling", _set(["exits", 0, "head", "pool"], "avgmax9x9"), ManifestError,
     "'exits[0].head.pool'"),
    ("head feature_dim", _set(["exits", 1, "head", "feature_dim"], 17), ManifestError,
     "'exits[1].head"),
    ("duplicate exit name", lambda m: m["exits"][1].update(name=m["exits"][0]["name"]),
     ManifestError, "a duplicate"),
    ("input_dtype", _set(["input_dtype"], "float99"), ManifestError, "'input_dtype'"),
    ("runtime thresholds", _set(["runtime"], {"thresholds": [0.5]}), ManifestError,
     "'runtime.thresholds'"),
    ("runtime exit shares", _set(["runtime"], {"exit_shares": [0.5, 0.6]}), ManifestError,
     "'runtime.exit_shares'"),
    ("source sha", _set(["source_sha256"], "xyz"), ManifestError, "'source_sha256'"),
    ("not an object", lambda m: [1, 2], ManifestError, "not a JSON object"),
    ("not JSON", lambda m: b"{\"format_version\": 3,", ArtifactCorruptError, "not JSON"),
    ("version text", _set(["format_version"], "3"), ArtifactVersionError,
     "format version '3', which is not a version number"),
    ("version future", _set(["format_version"], 4), ArtifactVersionError,
     "format version 4, which this code cannot read (it reads format version 3 and the older "
     "1 and 2); a newer layer-cache wrote it"),
]


@pytest.mark.parametrize("what,edit,kind,words", EDITS, ids=[e[0] for e in EDITS])
def test_edited_manifest_is_a_one_line_error_naming_the_field(built, tmp_path, what, edit, kind,
                                                              words):
    path = built[0]
    bad = _with_manifest(path, tmp_path / "edited.cached.pt", edit, reseal=True)
    with pytest.raises(kind) as info:
        artifact.load(bad)
    assert_one_line(info.value, words, str(bad))
    # Unsealed (a hand edit): the content hash catches it first, naming the manifest and,
    # where the manifest alone shows it, the field.
    try:
        artifact.read_manifest(bad)
        schema_words = None           # only the model shows the problem
    except ManifestError:
        schema_words = words.split(",")[0]
    except ArtifactError:
        return                        # not JSON or another version: nothing more to say
    unsealed = _with_manifest(path, tmp_path / "hand.cached.pt", edit, reseal=False)
    with pytest.raises(ArtifactCorruptError) as info:
        artifact.read_manifest(unsealed)
    msg = assert_one_line(info.value, "re-create", "manifest changed after it was saved")
    assert schema_words is None or schema_words in msg, msg


def test_edited_manifest_refused_by_export_cli(built, tmp_path, capsys):
    bad = _with_manifest(built[0], tmp_path / "k11.cached.pt", _all_classes(11), reseal=True)
    rc = ex.main([str(bad), "-o", str(tmp_path / "k11.onnx")])
    assert_cli_error(rc, capsys, "exits[0].head")
    assert not (tmp_path / "k11.onnx").exists()


def test_unhashed_v3_and_edited_integrity_record_are_corrupt(built, tmp_path):
    path = built[0]
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "nohash.pt", "w") as out:
        for i in z.infolist():
            if not i.filename.endswith(artifact.INTEGRITY_FILE):
                out.writestr(i, z.read(i))
            else:
                record = json.loads(z.read(i))
    with pytest.raises(ArtifactCorruptError, match="must hold a content hash"):
        artifact.read_manifest(tmp_path / "nohash.pt")
    record["sha256"] = "0" * 64
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "rec.pt", "w") as out:
        for i in z.infolist():
            blob = z.read(i)
            out.writestr(i, json.dumps(record) if i.filename.endswith(artifact.INTEGRITY_FILE)
                         else blob)
    with pytest.raises(ArtifactCorruptError, match="integrity record"):
        artifact.load(tmp_path / "rec.pt")


def test_read_errors_say_what_the_path_is(tmp_path):
    with pytest.raises(ArtifactError) as info:
        artifact.load(tmp_path)
    assert_one_line(info.value, "is a directory", str(tmp_path))
    with pytest.raises(ArtifactError) as info:
        artifact.read_manifest(tmp_path / "none.pt")
    assert_one_line(info.value, "does not exist", "compiler.rewrite")


def test_messages_of_empty_exceptions_name_the_type():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(RuntimeError("\n\n  ")) == "RuntimeError"
    assert brief(RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                              "Traceback...\nRuntimeError: weight of size [4]")) == \
        "RuntimeError: weight of size [4]"


# ----- saving ---------------------------------------------------------------------------------

def _temps(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_save_errors_name_the_target_and_leave_no_temp(built, tmp_path, monkeypatch):
    module, manifest = artifact.load(built[0])
    with pytest.raises(ArtifactWriteError) as info:
        artifact.save(module, manifest, tmp_path)
    assert_one_line(info.value, str(tmp_path), "is a directory")
    missing = tmp_path / "no" / "such" / "a.pt"
    with pytest.raises(ArtifactWriteError) as info:
        artifact.save(module, manifest, missing)
    assert_one_line(info.value, str(missing), "does not exist")

    target = tmp_path / "out.cached.pt"

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(src))

    monkeypatch.setattr(artifact.os, "replace", full_disk)
    with pytest.raises(ArtifactWriteError) as info:
        artifact.save(module, manifest, target)
    msg = assert_one_line(info.value, str(target), "No space left on device")
    assert ".tmp-" not in msg and _temps(tmp_path) == [] and not target.exists()
    monkeypatch.undo()

    def silent(*a, **k):
        raise RuntimeError()

    monkeypatch.setattr(artifact.torch.jit, "save", silent)
    with pytest.raises(ArtifactWriteError) as info:
        artifact.save(module, manifest, target)
    assert_one_line(info.value, str(target), "RuntimeError")
    assert _temps(tmp_path) == []
    monkeypatch.undo()

    with pytest.raises(ManifestError, match="'exits' is empty"):
        artifact.save(module, dict(manifest, exits=[]), target)
    assert _temps(tmp_path) == [] and not target.exists()


def test_stale_temps_are_cleaned_but_a_live_savers_is_kept(built, tmp_path):
    import fcntl

    module, manifest = artifact.load(built[0])
    old = time.time() - 3 * artifact.STALE_AFTER_S
    ancient = time.time() - 2 * artifact.LEGACY_STALE_AFTER_S
    names = {"dead": f"{artifact.TEMP_PREFIX}dead.pt", "live": f"{artifact.TEMP_PREFIX}live.pt",
             "young": f"{artifact.TEMP_PREFIX}young.pt", "legacy": ".tmp-abcd1234.pt",
             "other": ".tmp-notes.txt"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if key != "young":
            os.utime(tmp_path / name, (ancient, ancient) if key == "legacy" else (old, old))
    with open(tmp_path / names["live"], "rb") as live:  # a saver in another process holds it
        fcntl.flock(live.fileno(), fcntl.LOCK_EX)
        artifact.save(module, manifest, tmp_path / "a.cached.pt")
    left = set(_temps(tmp_path))
    assert left == {names["live"], names["young"], names["other"]}, left
    assert artifact.read_manifest(tmp_path / "a.cached.pt")


KILLED_SAVER = """
import sys, time
sys.path.insert(0, {root!r})
from compiler import artifact
module, manifest = artifact.load({src!r})
real = artifact._seal
def slow(tmp):
    real(tmp)
    print("sealed", flush=True)
    time.sleep(60)
artifact._seal = slow
artifact.save(module, manifest, {dst!r})
"""


def test_kill_9_during_save_leaves_a_temp_the_next_save_removes(built, tmp_path):
    dst = tmp_path / "k.cached.pt"
    code = KILLED_SAVER.format(root=str(ROOT), src=str(built[0]), dst=str(dst))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "sealed"
        left = _temps(tmp_path)
        assert len(left) == 1 and not dst.exists()
        module, manifest = artifact.load(built[0])
        artifact.save(module, manifest, tmp_path / "other.cached.pt")
        assert _temps(tmp_path) == left  # still locked by the live saver: kept
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    stamp = time.time() - 2 * artifact.STALE_AFTER_S
    os.utime(tmp_path / left[0], (stamp, stamp))
    artifact.save(module, manifest, dst)
    assert _temps(tmp_path) == [] and artifact.read_manifest(dst)


# ----- the empty batch ------------------------------------------------------------------------

def test_empty_batch_through_plain_torch_jit_load(built, tiny):
    plain = _jit_load(built[0])
    x = _rows(3)
    with torch.no_grad():
        for exits_on in (True, False):
            if not exits_on:
                for i in range(len(built[1]["exits"])):
                    artifact.set_exit(getattr(plain.blocks, str(i)), float("inf"))
            out, exits = plain.forward_with_exits(x[:0])
            assert tuple(out.shape) == (0, K) and out.dtype == torch.float32
            assert tuple(exits.shape) == (0,) and exits.dtype == torch.long
            assert tuple(plain(x[:0]).shape) == (0, K)
        torch.testing.assert_close(plain(x), tiny(x), atol=1e-5, rtol=1e-5)  # still the model


# ----- the CLIs -------------------------------------------------------------------------------

def assert_cli_error(rc, capsys, *words):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """(folder, .pt2 of Tiny exported with a dynamic batch, pickled Tiny)."""
    folder = tmp_path_factory.mktemp("cli")
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(tiny, (torch.zeros(2, *SHAPE[1:]),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(folder / "tiny.pt2"))
    torch.save(tiny, folder / "tiny.pkl")
    return folder, folder / "tiny.pt2", folder / "tiny.pkl"


REWRITE_FLAGS = [
    (["--num-exits", "0"], "--num-exits"), (["--num-exits", "-1"], "--num-exits"),
    (["--num-exits", "1000"], "<= 64"), (["--num-exits", "two"], "--num-exits"),
    (["--num-exits", "1e3"], "--num-exits"),
    (["--head-budget", "-1"], "--head-budget"), (["--head-budget", "0"], "> 0"),
    (["--head-budget", "5"], "<= 1"), (["--head-budget", "nan"], "--head-budget"),
    (["--head-budget", "inf"], "--head-budget"), (["--head-budget", "-inf"], "--head-budget"),
    (["--head-budget", "lots"], "--head-budget"),
    (["--max-feature-dim", "-1"], "--max-feature-dim"), (["--max-feature-dim", "2.5"], "--max-feature-dim"),
    (["--input-shape", "1,1,5,5"], "--input-shape 1,1,5,5 does not fit the program"),
    (["--input-shape", "1,3,8,8"], "exported for 1,1,8,8"),
    (["--input-shape", "1,1,100000,100000"], "values per input row"),
    (["--input-shape", "1,1,99999999999999999999999,8"], "--input-shape"),
    (["--input-shape", "0,1,8,8"], "below 1"), (["--input-shape", "1"], "--input-shape"),
    (["--input-shape", "1,a"], "--input-shape"), (["--input-shape", "1,-8,8"], "--input-shape"),
    (["--input-shape", "1,1,1,1,1,1,1,1,1,1"], "dimensions"),
    (["--leaf-module", "b1"], "torch.export program is not traced"),
    (["--exits", "b1_1,b1_1"], "twice"), (["--exits", "b1_1,,b2_1"], "empty name"),
    (["--exits", "nowhere"], "not cut points: nowhere"),
    (["--num-classes", "0"], "--num-classes"), (["--bogus"], "unrecognized arguments"),
    (["--arch"], "expected one argument"),
]


@pytest.mark.parametrize("flags,words", REWRITE_FLAGS, ids=[" ".join(f) for f, _ in REWRITE_FLAGS])
def test_rewrite_flag_values(models, tmp_path, capsys, flags, words):
    _, pt2, _ = models
    out = tmp_path / "x.cached.pt"
    rc = rewrite_main([str(pt2), "-o", str(out), *flags])
    assert_cli_error(rc, capsys, words)
    assert not out.exists() and _temps(tmp_path) == []


def test_rewrite_flags_on_a_traced_module(models, tmp_path, capsys):
    folder, _, pkl = models
    base = [str(pkl), "--allow-pickle", "-o", str(tmp_path / "p.cached.pt")]
    rc = rewrite_main(base + ["--input-shape", "1,1,8,8", "--leaf-module", "nope"])
    assert_cli_error(rc, capsys, "--leaf-module 'nope' names no submodule", "'b1'")
    rc = rewrite_main(base + ["--input-shape", "1,3,8,8"])
    assert_cli_error(rc, capsys, "failed on the example input", "--input-shape")
    rc = rewrite_main(base + ["--input-shape", "1,1,8,8", "--leaf-module", "Sequential",
                              "--num-exits", "1", "--head-budget", "1"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()


def test_rewrite_paths(models, tmp_path, capsys):
    folder, pt2, _ = models
    assert_cli_error(rewrite_main([str(folder)]), capsys, "is a directory")
    assert_cli_error(rewrite_main([str(pt2), "-o", str(tmp_path)]), capsys, "-o/--output",
                     "is a directory")
    assert_cli_error(rewrite_main([str(pt2), "-o", str(tmp_path / "no" / "a.pt")]), capsys,
                     "does not exist")
    assert_cli_error(rewrite_main([str(pt2), "-o", str(pt2)]), capsys, "overwrite the model")
    assert_cli_error(rewrite_main([str(pt2), "--dry-run", "--json", str(tmp_path)]), capsys,
                     "--json", "is a directory")


def test_library_config_is_range_checked(tiny):
    for bad in (dict(num_exits=0), dict(head_budget=float("nan")), dict(exits=["a", "a"]),
                dict(input_shape=(1, 0, 8)), dict(min_fraction=0.9, max_fraction=0.1),
                dict(atol=-1.0), dict(seed=-1)):
        with pytest.raises(UsageError):
            rewrite_module(tiny, SHAPE, RewriteConfig(**bad))


def test_export_flag_values_and_paths(built, tmp_path, capsys):
    path = str(built[0])
    onnx_out = str(tmp_path / "t.onnx")
    for flags, words in ((["--opset", "9"], "opset 9 is not supported"),
                         (["--opset", "x"], "--opset"), (["--opset", "99999"], "opset"),
                         (["--check", "-1"], "--check"), (["--check", "1000000000"], "--check"),
                         (["--check", "nan"], "--check"), (["--exporter", "x"], "invalid choice"),
                         (["-o", str(tmp_path)], "is a directory"),
                         (["-o", str(tmp_path / "no" / "t.onnx")], "does not exist"),
                         (["-o", path], "is the artifact itself")):
        rc = ex.main([path, "-o", onnx_out, *flags] if flags[0] != "-o" else [path, *flags])
        assert_cli_error(rc, capsys, words)
    assert_cli_error(ex.main([str(tmp_path), "-o", onnx_out]), capsys, "is a directory")
    assert_cli_error(ex.main([str(tmp_path / "none.pt"), "-o", onnx_out]), capsys,
                     "does not exist")
    assert _temps(tmp_path) == [] and not os.path.exists(onnx_out)


def _cli(module, argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_processes_print_one_line_and_exit_2(models, built, tmp_path):
    _, pt2, _ = models
    data = _flip_a_weight(bytearray(built[0].read_bytes()), built[0])
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    for module, argv, word in (
            ("compiler.rewrite", [pt2, "--head-budget", "nan", "-o", tmp_path / "a.pt"],
             "--head-budget"),
            ("compiler.export", ["flipped.pt", "-o", "f.onnx"], "corrupt")):
        r = _cli(module, argv, tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            (argv, r.stderr)
        assert word in lines[0] and "Traceback" not in r.stderr and r.stdout == ""


def test_empty_batch_through_the_eager_model():
    """The same routine unscripted (benchmarks run it eagerly)."""
    from compiler.artifact import CachedModel, ExitBlock
    from compiler.heads import ExitHead, HeadSpec

    torch.manual_seed(0)
    stage = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K))
    block = ExitBlock(stage, ExitHead(HeadSpec("avgmax", 8, 0, K)))
    artifact.set_exit(block, 0.0)
    with torch.no_grad():
        out, exits = CachedModel([block], final).eval().forward_with_exits(_rows(2)[:0])
    assert tuple(out.shape) == (0, K) and tuple(exits.shape) == (0,)

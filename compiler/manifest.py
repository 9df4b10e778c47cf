"""The artifact manifest's schema: its fields, their types and ranges, and how they must agree.

``compiler.rewrite.make_manifest`` writes it; ``compiler.artifact`` checks it on every save and
load (``check``) and against the scripted model on load (``check_module``). One place, so the
runtime, the ONNX export and the server can read fields without guarding each access.

Fields (R: required, O: optional; the rest of a manifest is kept as is, unchecked):

- R ``format_version`` int (``compiler.artifact`` decides which it reads)
- R ``input_shape`` [batch, d1, ...]: 2 to 8 ints, batch -1 (or >= 1), dims >= 1, at most
  ``MAX_ROW_ELEMENTS`` per row
- O ``input_dtype`` a torch dtype name (default float32)
- R ``num_classes`` int >= 1;  O ``output_shape`` [-1, num_classes]
- R ``total_flops`` int >= 0;  R ``stage_flops`` len(exits) + 1 ints >= 0 summing to total_flops
  (up to one FLOP of rounding per stage)
- R ``exits`` a non-empty list; each: R ``name`` (unique str), R ``head`` {R ``pool`` (a
  pooling ``compiler.heads`` knows), R ``feature_dim`` >= 1, R ``hidden`` >= 0, R ``num_classes``
  = num_classes, O ``params`` (= what pool/feature_dim/hidden imply), O ``flops`` >= 0};
  O ``flops_before`` (= the stage FLOPs before it), ``fraction`` in [0, 1], ``shape``, ``bytes``
- O ``backbone_params``, ``head_params`` int >= 0; ``source_sha256`` null or 64 hex digits;
  ``source_kind``, ``created``, ``torch_version``, ``flops_note`` str; ``unsupported_ops``
  {str: int}; ``config`` dict; ``runtime`` dict (its ``thresholds``: one per exit, null or a
  number, as ``runtime.core.CachedRuntime.save`` writes); ``task`` str, "classification" when
  absent (``compiler.detection`` writes "detection": its model is checked for structure only)
"""
import math
import re
from typing import Optional

import torch

from .config import MAX_DIMS, MAX_ROW_ELEMENTS
from .errors import ManifestError, brief as _line
from .heads import HeadSpec, pool_grid
FIX = "re-create it with python -m compiler.rewrite MODEL"


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str):
        err = ManifestError(f"artifact '{self.where}' has a bad manifest: '{field}' {problem}; "
                            f"{FIX}")
        err.detail = f"'{field}' {problem}"
        raise err

    def int(self, value, field: str, lo: int = 0, hi: Optional[int] = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"is {_show(value)}, not an integer")
        if value < lo or (hi is not None and value > hi):
            self.fail(field, f"is {value}, outside {lo}..{'' if hi is None else hi}")
        return value

    def type(self, value, kind, field: str, what: str):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(field, f"is {_show(value)}, not {what}")
        return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dtype(name) -> Optional[torch.dtype]:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return value if isinstance(value, torch.dtype) else None


def check(manifest, where: str) -> dict:
    """``manifest`` if it holds every required field in range and agrees with itself, else a
    one-line ManifestError naming the field and saying how to get a good file."""
    c = _Checker(where)
    if not isinstance(manifest, dict):
        c.fail("manifest", f"is {_show(manifest)}, not a JSON object")
    for key in ("format_version", "input_shape", "num_classes", "total_flops", "stage_flops",
                "exits"):
        if key not in manifest:
            c.fail(key, "is missing")
    c.int(manifest["format_version"], "format_version", 1)

    shape = c.type(manifest["input_shape"], list, "input_shape", "a list [batch, dims...]")
    if not 2 <= len(shape) <= MAX_DIMS:
        c.fail("input_shape", f"has {len(shape)} dimensions, not 2 to {MAX_DIMS}")
    batch = c.int(shape[0], "input_shape[0]", -1)
    if batch == 0:
        c.fail("input_shape[0]", "is 0; the batch is -1 (any) or a size >= 1")
    row = 1
    for i, d in enumerate(shape[1:], 1):
        row *= c.int(d, f"input_shape[{i}]", 1, MAX_ROW_ELEMENTS)
    if row > MAX_ROW_ELEMENTS:
        c.fail("input_shape", f"makes {row} values per row, more than {MAX_ROW_ELEMENTS}")
    dtype = manifest.get("input_dtype", "float32")
    if _dtype(dtype) is None:
        c.fail("input_dtype", f"is {_show(dtype)}, not a torch dtype name such as 'float32'")

    k = c.int(manifest["num_classes"], "num_classes", 1)
    if "output_shape" in manifest:
        out = manifest["output_shape"]
        if not isinstance(out, list) or len(out) != 2 or out[1] != k:
            c.fail("output_shape", f"is {_show(out)}, not [-1, {k}] (num_classes is {k})")

    exits = c.type(manifest["exits"], list, "exits", "a list")
    if not exits:
        c.fail("exits", "is empty; an artifact has at least one exit")
    names = set()
    for i, e in enumerate(exits):
        f = f"exits[{i}]"
        c.type(e, dict, f, "an object")
        if "name" not in e:
            c.fail(f"{f}.name", "is missing")
        name = c.type(e["name"], str, f"{f}.name", "a string")
        if not name or name in names:
            c.fail(f"{f}.name", f"is {_show(name)}: " + ("empty" if not name else "a duplicate"))
        names.add(name)
        if "head" not in e:
            c.fail(f"{f}.head", "is missing")
        head = c.type(e["head"], dict, f"{f}.head", "an object")
        for key in ("pool", "feature_dim", "hidden", "num_classes"):
            if key not in head:
                c.fail(f"{f}.head.{key}", "is missing")
        try:
            pool_grid(head["pool"])
        except (ValueError, TypeError):
            c.fail(f"{f}.head.pool", f"is {_show(head['pool'])}, not a known head pooling")
        dim = c.int(head["feature_dim"], f"{f}.head.feature_dim", 1)
        hidden = c.int(head["hidden"], f"{f}.head.hidden", 0)
        hk = c.int(head["num_classes"], f"{f}.head.num_classes", 1)
        if hk != k:
            c.fail(f"{f}.head.num_classes", f"is {hk}, but num_classes is {k}")
        if "params" in head:
            want = HeadSpec(head["pool"], dim, hidden, hk).params()
            if c.int(head["params"], f"{f}.head.params") != want:
                c.fail(f"{f}.head.params", f"is {head['params']}, but the head holds {want}")
        if "flops" in head:
            c.int(head["flops"], f"{f}.head.flops")
        if "fraction" in e:
            fr = e["fraction"]
            if not isinstance(fr, (int, float)) or isinstance(fr, bool) or \
                    not (math.isfinite(fr) and 0 <= fr <= 1):
                c.fail(f"{f}.fraction", f"is {_show(fr)}, not a number in [0, 1]")
        for key in ("flops_before", "bytes"):
            if key in e:
                c.int(e[key], f"{f}.{key}")

    stages = c.type(manifest["stage_flops"], list, "stage_flops", "a list")
    if len(stages) != len(exits) + 1:
        c.fail("stage_flops", f"has {len(stages)} entries for {len(exits)} exits (want "
                              f"{len(exits) + 1})")
    total = c.int(manifest["total_flops"], "total_flops")
    for i, s in enumerate(stages):
        c.int(s, f"stage_flops[{i}]")
    slack = len(stages)  # each stage's FLOPs may have been rounded to an int on its own
    if abs(sum(stages) - total) > slack:
        c.fail("total_flops", f"is {total}, but stage_flops sum to {sum(stages)}")
    before = 0
    for i, e in enumerate(exits):
        before += stages[i]
        if "flops_before" in e and abs(e["flops_before"] - before) > slack:
            c.fail(f"exits[{i}].flops_before", f"is {e['flops_before']}, but stage_flops put "
                                               f"{before} before it")

    for key in ("backbone_params", "head_params"):
        if key in manifest:
            c.int(manifest[key], key)
    sha = manifest.get("source_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        c.fail("source_sha256", f"is {_show(sha)}, not null or 64 hex digits")
    for key in ("source_kind", "created", "torch_version", "flops_note", "task"):
        if key in manifest:
            c.type(manifest[key], str, key, "a string")
    if "unsupported_ops" in manifest:
        ops = c.type(manifest["unsupported_ops"], dict, "unsupported_ops", "an object")
        for op, n in ops.items():
            c.int(n, f"unsupported_ops[{op!r}]")
    if "config" in manifest:
        c.type(manifest["config"], dict, "config", "an object")
    if "runtime" in manifest:
        rt = c.type(manifest["runtime"], dict, "runtime", "an object")
        if "thresholds" in rt:
            th = c.type(rt["thresholds"], list, "runtime.thresholds", "a list")
            if len(th) != len(exits):
                c.fail("runtime.thresholds", f"has {len(th)} entries for {len(exits)} exits")
            for i, t in enumerate(th):
                if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)
                                      or math.isnan(t)):
                    c.fail(f"runtime.thresholds[{i}]", f"is {_show(t)}, not null or a number")
        if rt.get("exit_shares") is not None:   # the share of rows at each exit, then the backbone
            sh = c.type(rt["exit_shares"], list, "runtime.exit_shares", "a list")
            if len(sh) != len(exits) + 1 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                    for v in sh) or abs(sum(sh) - 1) > 1e-3:
                c.fail("runtime.exit_shares", f"is {_show(sh)}, not {len(exits) + 1} shares "
                       f"(one per exit, then the backbone) between 0 and 1 that sum to 1")
    return manifest


def _children(module) -> list:
    return [name for name, _ in module.named_children()]


def check_structure(module, manifest: dict, where: str):
    """The scripted model holds the blocks and heads the (checked) manifest describes; no run."""
    c = _Checker(where)
    for attr in ("blocks", "final", "forward_with_exits"):
        if not hasattr(module, attr):
            c.fail("exits", f"describe a staged model, but the file holds none (no '{attr}'): it "
                            f"is not a layer-cache artifact")
    n = len(_children(module.blocks))
    exits = manifest["exits"]
    if n != len(exits):
        c.fail("exits", f"lists {len(exits)} exits, but the model has {n} exit blocks")
    for i, e in enumerate(exits):
        blk = getattr(module.blocks, str(i))
        head = e["head"]
        try:
            state = {k: tuple(v.shape) for k, v in blk.head.classifier.state_dict().items()}
            threshold, enabled = blk.threshold, blk.enabled
        except (AttributeError, RuntimeError):
            c.fail(f"exits[{i}]", "has no exit block with a head, threshold and enabled flag in "
                                  "the model")
        width = head["hidden"] or head["num_classes"]
        want = {"0.weight": (width, head["feature_dim"]), "0.bias": (width,)}
        if head["hidden"]:
            want.update({"2.weight": (head["num_classes"], head["hidden"]),
                         "2.bias": (head["num_classes"],)})
        if state != want:
            c.fail(f"exits[{i}].head", f"describes a classifier of {want}, but the model's "
                                       f"holds {state}")
        if threshold.numel() != 1 or enabled.numel() != 1 or bool(torch.isnan(threshold).any()):
            c.fail(f"exits[{i}]", "has an exit block whose threshold or enabled flag is not one "
                                  "number")


def check_module(module, manifest: dict, where: str):
    """``check_structure``, then one zero row of ``input_shape`` through every stage and head:
    each head and the final stage must return [1, num_classes]. Models of another ``task``
    (detection: stages carry more than one tensor) get ``check_structure`` only."""
    check_structure(module, manifest, where)
    if manifest.get("task", "classification") != "classification":
        return
    c = _Checker(where)
    k = manifest["num_classes"]
    exits = manifest["exits"]
    device = next(iter(module.buffers())).device
    x = torch.zeros([1] + list(manifest["input_shape"][1:]),
                    dtype=_dtype(manifest.get("input_dtype", "float32")), device=device)
    parts = [(f"stage {i}", getattr(module.blocks, str(i))) for i in range(len(exits))]
    h = x
    with torch.no_grad():
        for i, (what, blk) in enumerate(parts):
            try:
                h = blk.stage(h)
            except Exception as e:  # TorchScript raises its own error types
                c.fail("input_shape", f"is {manifest['input_shape']}, and {what} fails on a row "
                                      f"of it ({_line(e)})")
            try:
                y = blk.head(h)
            except Exception as e:
                c.fail(f"exits[{i}].head", f"does not fit stage {i}'s output "
                                           f"{list(h.shape)} ({_line(e)})")
            if tuple(y.shape) != (1, k):
                c.fail(f"exits[{i}].head.num_classes", f"says {k}, but the head returns "
                                                       f"{list(y.shape)}")
        try:
            y = module.final(h)
        except Exception as e:
            c.fail("input_shape", f"is {manifest['input_shape']}, and the final stage fails on a "
                                  f"row of it ({_line(e)})")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (1, k):
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        c.fail("num_classes", f"is {k}, but the model returns {got} for one row")


"""One exit rule everywhere: a property test over synthetic artifacts whose heads' logits are known.

The rule (``compiler/exit_rule.py``): a row leaves at the first *enabled* exit whose confidence
(largest softmax probability of that head) reaches the exit's threshold; a row no exit takes runs
the whole backbone. Its cost is the stages it ran plus every enabled head it passed, its own
exit's included. Here it is also written out in plain Python (``_oracle``), and every place that
routes or prices rows must agree with it on random thresholds, on/off flags and confidences:

1. the scripted artifact's ``forward_with_exits``, after a save / ``torch.jit.load`` round trip;
2. the runtime's staged serving path (``runtime.serving.serve_staged``, plain and shadow);
3. the ONNX graph ``compiler/export.py`` builds by hand, run in onnxruntime;
   and the runtime's onnxruntime backend (``runtime/backends.py``): its compiled plan (stages as
   sessions, the decision in numpy, batch and one-row paths) and ``serve_collected``;
4. calibration (``runtime.calibrate.route`` / ``evaluate`` / ``exit_shares``,
   ``exit_rule.first_exit``) and the cost model (``exit_rule.row_cost``,
   ``runtime.costs.CostModel.flops_of``).

The synthetic artifact: input ``x`` [n, (E + 1) * K]; every stage is the identity; head ``e`` is a
"flat" ``ExitHead`` whose Linear copies slice ``e`` of ``x`` (weights 0/1, bias 0, so its logits
are that slice exactly), and the final stage copies slice ``E``. So each row's logits at each
exit, hence its confidences, are chosen by the test: random, uniform (confidence 1/K), saturated
(confidence exactly 1.0) and copies of other rows (equal confidences). Thresholds include exact
ties with a row's confidence, the float32 neighbours of such a tie, 0, 1, 1/K (not a float32),
values above 1 on an enabled exit, and exits off (with the off exit's threshold buffer sometimes
left at 0, so only the flag says it is off).

Float32: every path compares the float32 confidence with the threshold rounded to float32 (the
artifact's buffer, ``torch.tensor(float)`` in the runtime, ``first_exit``'s cast to the
confidence's dtype), so exact ties are compared exactly on the torch side. onnxruntime's Softmax
may round differently from torch's in the last place, so for the ONNX graph ties are compared only
where onnxruntime computes the float it compares: the graph is held to the rule on the confidences
onnxruntime itself computes for the same logits (Softmax then ReduceMax, the nodes export.py
composes, run as a model of their own), ONNX cases also draw tie thresholds from those, and the
ONNX exits must equal the torch paths' on every row where no threshold falls between torch's and
onnxruntime's confidence.
"""
from __future__ import annotations

import io
import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compiler import artifact, exit_rule
from compiler.heads import ExitHead, HeadSpec
from runtime.calibrate import evaluate, exit_shares, route
from runtime.costs import CostModel
from runtime.serving import ServingState, serve_collected, serve_staged

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")
SEED = 20240610
CASES = 150           # random cases through the torch paths and calibration
ONNX_EVERY = 8        # every eighth case is also written to a file, exported to ONNX and run
ROUND_TRIP_EVERY = 5  # of the others, every fifth saves and loads the artifact again in memory
CONFIGS = ((1, 2), (2, 3), (3, 4), (4, 3))   # (exits E, classes K) of the synthetic artifacts


# ----- the synthetic artifact -----------------------------------------------------------------
def _selector(width: int, k: int, j: int) -> nn.Linear:
    """A Linear whose output is slice ``j`` (of width ``k``) of its input, exactly."""
    lin = nn.Linear(width, k)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[torch.arange(k), j * k + torch.arange(k)] = 1.0
    return lin


def _build(E: int, K: int, rng: random.Random):
    """(scripted CachedModel, manifest) with E exits and K classes; FLOPs are random integers."""
    width = (E + 1) * K
    spec = HeadSpec("flat", width, 0, K)
    blocks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in range(E):
            head = ExitHead(spec)
            head.classifier[0].load_state_dict(_selector(width, K, e).state_dict())
            blocks.append(artifact.ExitBlock(torch.jit.script(nn.Identity()),
                                             torch.jit.script(head.eval())))
        final = torch.jit.script(_selector(width, K, E).eval())
        module = torch.jit.script(artifact.CachedModel(blocks, final).eval())
    stage_flops = [rng.randint(1, 1000) for _ in range(E + 1)]
    manifest = {
        "format_version": artifact.FORMAT_VERSION,
        "input_shape": [-1, width],
        "input_dtype": "float32",
        "output_shape": [-1, K],
        "num_classes": K,
        "total_flops": sum(stage_flops),
        "stage_flops": stage_flops,
        "exits": [{"name": f"exit{e}",
                   "head": dict(spec.to_dict(), params=spec.params(), flops=rng.randint(1, 100))}
                  for e in range(E)],
    }
    return module, manifest


@pytest.fixture(scope="module")
def templates():
    rng = random.Random(SEED)
    return {cfg: _build(*cfg, rng) for cfg in CONFIGS}


# ----- random cases ---------------------------------------------------------------------------
def _logits(n: int, E: int, K: int, g: torch.Generator, rng: random.Random) -> torch.Tensor:
    """Logits [E + 1, n, K]: per row and exit random, uniform, saturated or a copy of another."""
    out = torch.empty(E + 1, n, K)
    for e in range(E + 1):
        for r in range(n):
            kind = rng.choice(("random", "random", "random", "uniform", "saturated", "copy"))
            if kind == "uniform":
                out[e, r] = rng.uniform(-3, 3)
            elif kind == "saturated":  # softmax max is exactly 1.0 in float32
                out[e, r] = torch.randn(K, generator=g)
                out[e, r, rng.randrange(K)] = 80.0
            elif kind == "copy" and (r > 0 or e > 0):  # a permutation of a filled row
                e2 = rng.randrange(e + 1) if r > 0 else rng.randrange(e)
                r2 = rng.randrange(r) if e2 == e else rng.randrange(n)
                out[e, r] = out[e2, r2][torch.randperm(K, generator=g)]
            else:
                out[e, r] = torch.randn(K, generator=g) * rng.choice((0.3, 1.0, 3.0, 10.0))
    return out


def _thresholds(confs, K: int, rng: random.Random) -> list:
    """Per exit a Python float (``inf``: off), drawn to hit the edges of the rule; ties are with
    one of ``confs`` (torch's confidences [E, n], and onnxruntime's where the case runs there)."""
    E, n = confs[0].shape
    t = []
    for e in range(E):
        tie = float(rng.choice(confs)[e, rng.randrange(n)])
        kind = rng.choice(("off", "off", "tie", "tie", "above", "below", "zero", "one",
                           "1/K", "uniform", "over1"))
        if kind == "off":
            t.append(INF)
        elif kind == "tie":        # exactly a row's confidence: that row leaves
            t.append(tie)
        elif kind in ("above", "below"):   # the next float32 either side of a row's confidence
            c = torch.tensor([tie], dtype=torch.float32)
            to = torch.tensor([2.0 if kind == "above" else -1.0])
            t.append(float(torch.nextafter(c, to)))
        elif kind == "zero":
            t.append(0.0)
        elif kind == "one":        # only saturated rows leave
            t.append(1.0)
        elif kind == "1/K":        # a double that float32 cannot hold (for K = 3)
            t.append(1.0 / K)
        elif kind == "uniform":
            t.append(rng.uniform(1.0 / K, 1.0))
        else:                      # enabled but never reached: the head is still paid for
            t.append(rng.choice((1.5, exit_rule.DISABLED_THRESHOLD)))
    return t


def _f32(value: float) -> float:
    """``value`` rounded to float32, as every path stores or casts a threshold."""
    return float(torch.tensor(value, dtype=torch.float32))


def _oracle(conf: torch.Tensor, thresholds: list, stage_flops, head_flops):
    """The rule as the docstring states it, in plain Python: (exit per row, FLOPs per row)."""
    E, n = conf.shape
    f32 = [None if t == INF else _f32(t) for t in thresholds]
    exits, costs = [], []
    for r in range(n):
        x = next((e for e in range(E) if f32[e] is not None and float(conf[e, r]) >= f32[e]), E)
        exits.append(x)
        costs.append(sum(stage_flops[:x + 1]) +
                     sum(head_flops[e] for e in range(min(x + 1, E)) if f32[e] is not None))
    return exits, costs


def _cases(ort_confidence):
    rng = random.Random(SEED + 1)
    g = torch.Generator().manual_seed(SEED + 2)
    for i in range(CASES):
        E, K = rng.choice(CONFIGS)
        n = rng.choice((1, 2, 3, rng.randint(4, 40)))
        logits = _logits(n, E, K, g, rng)
        conf = torch.stack([exit_rule.confidence(logits[e]) for e in range(E)])
        oconf = None
        if i % ONNX_EVERY == 0:
            oconf = torch.stack([ort_confidence(logits[e].contiguous()) for e in range(E)])
        t = _thresholds([conf] if oconf is None else [conf, oconf], K, rng)
        zero_off = rng.random() < 0.5
        yield i, E, K, logits, conf, oconf, t, zero_off


def _set_exits(module, thresholds, zero_off):
    """Set the exits as calibration's thresholds say (``artifact.set_exit``)."""
    for e, thr in enumerate(thresholds):
        blk = getattr(module.blocks, str(e))
        artifact.set_exit(blk, thr)
        if thr == INF and zero_off:   # off by its flag alone: a threshold every row would reach
            blk.threshold.fill_(0.0)
    return module


def _round_trip(module, manifest, path=None):
    """Save and load back with plain torch.jit.load. With ``path``: the artifact file
    (``artifact.save``, manifest included: what the ONNX export reads); without: in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path is not None:
            artifact.save(module, manifest, str(path))
            return torch.jit.load(str(path)).eval()
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf).eval()


def _served_state(loaded, manifest):
    """What the runtime builds from an artifact: eager classifiers, ``inf`` for exits off."""
    blocks = [getattr(loaded.blocks, str(e)) for e in range(len(manifest["exits"]))]
    classifiers = []
    for b, ex in zip(blocks, manifest["exits"]):
        clf = nn.Sequential(nn.Linear(ex["head"]["feature_dim"], ex["head"]["num_classes"]))
        state = b.head.classifier.state_dict()
        clf.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        classifiers.append(clf.eval())
    thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in blocks)
    stages = [b.stage for b in blocks] + [loaded.final]
    return stages, [b.head for b in blocks], ServingState(tuple(classifiers), thresholds)


def _assert_answers(out, exit_of, logits, want_exits, what, exact=True):
    n = logits.shape[1]
    assert exit_of.tolist() == want_exits, f"{what}: exits differ from the rule"
    assert tuple(out.shape) == (n, logits.shape[2]), f"{what}: output shape"
    want = logits[torch.tensor(want_exits, dtype=torch.long), torch.arange(n)]
    if exact:  # each row, in input order, holds the logits of the exit it left at
        assert torch.equal(out, want), f"{what}: rows are not their exit's logits in input order"
    else:
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6, msg=f"{what}: row logits")


# ----- onnxruntime helpers --------------------------------------------------------------------
def _ort_session(path_or_bytes):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ort_confidence():
    """onnxruntime's own max softmax probability per row, the ops export.py composes."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from compiler.export import DEFAULT_OPSET
    axes = onnx.numpy_helper.from_array(torch.tensor([1]).numpy(), "axes")
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
         helper.make_node("ReduceMax", ["prob", "axes"], ["conf"], keepdims=0)],
        "confidence", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["n"])], initializer=[axes])
    model = helper.make_model(graph, ir_version=8,
                              opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    sess = _ort_session(model.SerializeToString())

    def conf(logits: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(["conf"], {"logits": logits.numpy()})[0])
    return conf


# ----- the property ---------------------------------------------------------------------------
@torch.no_grad()
def test_every_path_follows_the_one_exit_rule(templates, ort_confidence, tmp_path):
    pytest.importorskip("onnx")
    from compiler import export as ex

    from runtime.backends import OnnxRuntimeBackend

    onnx_rows = onnx_ties = ties = 0
    reloaded, backends = {}, {}
    seen_exits = set()
    for i, E, K, logits, conf, oconf, t, zero_off in _cases(ort_confidence):
        module, manifest = templates[(E, K)]
        n = logits.shape[1]
        x = logits.permute(1, 0, 2).reshape(n, (E + 1) * K).contiguous()
        stage_flops = manifest["stage_flops"]
        head_flops = [e["head"]["flops"] for e in manifest["exits"]]
        want, want_cost = _oracle(conf, t, stage_flops, head_flops)
        seen_exits.update(want)
        ties += sum(1 for r, e in enumerate(want)   # rows that left at exactly the threshold
                    if e < E and float(conf[e, r]) == _f32(t[e]))
        case = f"case {i}: E={E} K={K} n={n} thresholds={t} zero_off={zero_off}"

        # 4. calibration: route / first_exit / exit_shares on the confidences
        threshold, enabled = exit_rule.split_thresholds(t)
        assert route(conf, t).tolist() == want, case
        assert exit_rule.first_exit(conf, threshold, enabled).tolist() == want, case
        counts = torch.bincount(torch.tensor(want, dtype=torch.long), minlength=E + 1)
        assert exit_shares(conf, t) == (counts.double() / n).tolist(), case

        # ... and the row costs: exit_rule, the cost model, calibration's saving
        on = [thr != INF for thr in t]
        assert enabled.tolist() == on, case
        flops = exit_rule.row_cost(torch.tensor(want),
                                   torch.tensor(stage_flops, dtype=torch.float64),
                                   torch.tensor(head_flops, dtype=torch.float64), enabled)
        assert flops.tolist() == [float(c) for c in want_cost], case
        costs = CostModel(manifest)
        assert costs.flops_of(counts.tolist(), enabled) == float(sum(want_cost)), case
        agree = torch.rand(E, n, generator=torch.Generator().manual_seed(i)) < 0.7
        saving, agreeing = evaluate(conf, agree, costs.stage_cost, costs.head_cost, t)
        total = manifest["total_flops"]
        assert saving == pytest.approx(1.0 - sum(want_cost) / (n * total), rel=0, abs=1e-12), case
        assert agreeing == sum(1 for r, e in enumerate(want) if e == E or bool(agree[e, r])), case

        # 1. the scripted artifact after save / torch.jit.load
        with_onnx = oconf is not None
        _set_exits(module, t, zero_off)
        if with_onnx:    # the artifact file, which the ONNX export reads
            path = tmp_path / f"case{i}.cached.pt"
            loaded = _round_trip(module, manifest, path)
        elif i % ROUND_TRIP_EVERY == 0 or (E, K) not in reloaded:
            loaded = reloaded[(E, K)] = _round_trip(module, manifest)
        else:            # the thresholds written into an artifact that was saved and loaded
            loaded = _set_exits(reloaded[(E, K)], t, zero_off)
        out, exit_of = loaded.forward_with_exits(x)
        _assert_answers(out, exit_of, logits, want, f"artifact, {case}")
        assert torch.equal(loaded(x), out), case

        # 2. the runtime's staged serving path (plain, collecting, shadow)
        stages, heads, state = _served_state(loaded, manifest)
        assert [thr != INF for thr in state.thresholds] == on, case
        for collect in (False, True):
            s = serve_staged(stages, heads, state, x, shadow=False, collect=collect)
            _assert_answers(s.out, s.exit_of, logits, want, f"serve_staged, {case}")
        s = serve_staged(stages, heads, state, x, shadow=True, collect=False)
        assert s.shadow_exit.tolist() == want, f"shadow, {case}"
        assert torch.equal(s.out, logits[E]), f"shadow answers with the backbone, {case}"
        assert s.exit_of.tolist() == [E] * n, f"shadow, {case}"

        # 3a. the onnxruntime backend's path for requests that learn or are shadowed: the
        # features come from onnxruntime (exact here), the rule is applied in torch
        if (E, K) not in backends:
            backends[(E, K)] = OnnxRuntimeBackend(stages, manifest["exits"],
                                                  manifest["input_shape"][1:], K)
        backend = backends[(E, K)]
        for collect in (False, True):
            s = serve_collected(backend, state, x, shadow=False, collect=collect)
            _assert_answers(s.out, s.exit_of, logits, want, f"serve_collected, {case}",
                            exact=False)
        s = serve_collected(backend, state, x, shadow=True, collect=False)
        assert s.shadow_exit.tolist() == want, f"serve_collected shadow, {case}"

        # 3. the ONNX graph, run in onnxruntime
        if not with_onnx:
            continue
        onnx_path = tmp_path / f"case{i}.onnx"
        summary = ex.export_onnx(str(path), str(onnx_path))
        assert summary["enabled_exits"] == [e for e in range(E) if on[e]], case
        got, got_exit = _ort_session(str(onnx_path)).run([ex.LOGITS, ex.EXIT_INDEX],
                                                         {ex.INPUT: x.numpy()})
        got, got_exit = torch.from_numpy(got), torch.from_numpy(got_exit)
        # the graph follows the rule on the confidences onnxruntime computes ...
        owant, _ = _oracle(oconf, t, stage_flops, head_flops)
        _assert_answers(got, got_exit, logits, owant, f"onnx, {case}", exact=False)
        onnx_ties += sum(1 for r, e in enumerate(owant)
                         if e < E and float(oconf[e, r]) == _f32(t[e]))
        # ... so it agrees with the torch paths on every row where no threshold falls between
        # torch's and onnxruntime's confidence (both compare the same way at every enabled exit)
        f32 = torch.tensor([_f32(thr) if thr != INF else INF for thr in t]).unsqueeze(1)
        same = ((conf >= f32) == (oconf >= f32)).all(0)
        assert got_exit[same].tolist() == torch.tensor(want)[same].tolist(), case
        onnx_rows += n

        # 3b. the onnxruntime backend's plan: the same confidences (onnxruntime's Softmax and
        # ReduceMax, via compiler.export.confidence_nodes) in its composed graphs, the batch's
        # and the one-row graph's
        plan = backend.compile(state.classifiers, state.thresholds)
        if plan is None:
            assert not any(on), case
            got = torch.from_numpy(backend.run_backbone(x.numpy()))
            got_exit = torch.full((n,), E, dtype=torch.long)
        else:
            got, got_exit = (torch.from_numpy(a) for a in plan.run(x.numpy()))
            rows = [plan.run(x[r:r + 1].numpy()) for r in range(n)]   # the one-row path
            assert torch.equal(torch.from_numpy(np.concatenate([e for _, e in rows])),
                               got_exit), f"plan one row at a time, {case}"
            torch.testing.assert_close(torch.from_numpy(np.concatenate([o for o, _ in rows])),
                                       got, rtol=0, atol=1e-6)
        _assert_answers(got, got_exit, logits, owant, f"backend plan, {case}", exact=False)
        if plan is not None:  # the collecting segments route the same and bring the features
            cout, cexit, cfeats, cy = plan.run_collect(x.numpy())
            assert cexit.tolist() == got_exit.tolist(), f"plan collecting, {case}"
            torch.testing.assert_close(torch.from_numpy(cout), got, rtol=0, atol=1e-6)
            rest = got_exit == E
            assert (cy is None) == (not bool(rest.any())), case
            if cy is not None:   # flat heads: the features are the rows themselves
                torch.testing.assert_close(torch.from_numpy(cy), logits[E][rest], rtol=0, atol=1e-6)
                for f in cfeats:
                    torch.testing.assert_close(torch.from_numpy(f), x[rest], rtol=0, atol=0)
        assert got_exit[same].tolist() == torch.tensor(want)[same].tolist(), case
    assert seen_exits == set(range(max(E for E, _ in CONFIGS) + 1)), "some exit never taken"
    assert ties >= 20, f"only {ties} rows left at a tie: the cases miss the rule's edge"
    assert onnx_rows > 0 and onnx_ties >= 5, f"only {onnx_ties} ONNX rows left at a tie"
    print(f"{CASES} cases, {ties} rows at a tie; ONNX: {onnx_rows} rows, {onnx_ties} at a tie")


# ----- one definition -------------------------------------------------------------------------
# Code that would be a second copy of the rule: the confidence written out, or a comparison of a
# confidence with a threshold. Only compiler/exit_rule.py may hold it; compiler/export.py writes
# it as ONNX nodes and is held to it by the test above.
_CMP = r"(?:>=|<=|(?<![-=])>(?!=)|<(?![=<]))"          # a comparison (not ->, >>, ==, !=)
_THR = r"([\w.]+\.)?(thresholds?|thr)\b(\s*\[[^\]]*\])?"   # threshold, self.thr, thresholds[e]
SECOND_RULE = [
    re.compile(r"softmax\([^\n]*\)\s*\.\s*(amax|max)\("),                 # softmax(z).amax(1)
    re.compile(r"\bmax\(\s*([\w.]+\.)?softmax\("),                    # torch.max(softmax(z), 1)
    re.compile(_CMP + r"\s*" + _THR + r"(?![\w(])"),                         # conf >= threshold
    re.compile(r"(?<![\w.])" + _THR + r"\s*" + _CMP),                       # threshold <= conf
    re.compile(r"\.(ge|gt|le|lt)\(\s*" + _THR),                              # conf.ge(threshold)
]
RULE_HOME = {"compiler/exit_rule.py", "compiler/export.py"}
# Copies known when this test was written, each to be replaced by compiler.exit_rule calls; the
# entry must go when the copy does (the test fails on an entry whose file no longer has one).
KNOWN_COPIES = set()  # files allowed to hold a copy of the rule (none left)
READERS = ("compiler/artifact.py", "runtime/serving.py", "runtime/calibrate.py", "runtime/costs.py",
           "runtime/backends.py")


def _code_lines(path: Path):
    """(line number, code) with comments and string literals' prose left out."""
    in_doc = False
    for no, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        quotes = code.count('"""') + code.count("'''")
        if in_doc or quotes:
            if quotes % 2:
                in_doc = not in_doc
            continue
        yield no, re.sub(r"(\"[^\"]*\"|'[^']*')", '""', code)


def test_exit_rule_is_defined_once():
    found, known = [], set()
    for folder in ("compiler", "runtime", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in RULE_HOME:
                continue
            for no, code in _code_lines(path):
                if any(p.search(code) for p in SECOND_RULE):
                    if rel in KNOWN_COPIES:
                        known.add(rel)
                    else:
                        found.append(f"{rel}:{no}: {code.strip()}")
    assert not found, ("the exit rule written again outside compiler/exit_rule.py (use exit_rule."
                       "confidence / leaves / first_exit / row_cost):\n" + "\n".join(found))
    assert known == KNOWN_COPIES, (f"no copy of the exit rule left in "
                                   f"{sorted(KNOWN_COPIES - known)}: remove it from KNOWN_COPIES "
                                   f"in tests/test_exit_rule.py")
    for rel in READERS:
        assert "exit_rule." in (ROOT / rel).read_text(), \
            f"{rel} no longer reads compiler/exit_rule.py"


def test_the_second_rule_patterns_catch_copies():
    """The patterns above are not vacuous: each copy of the rule below is caught."""
    copies = ["conf = torch.softmax(logits, 1).amax(1)",
              "p = F.softmax(z, dim=1).max(1).values",
              "c, _ = torch.max(torch.softmax(z, 1), dim=1)",
              "take = conf >= blk.threshold",
              "keep = conf < thresholds[e]",
              "hit = thr <= c",
              "hit = c.ge(self.threshold)",
              "rows = (p.amax(1) >= self.thresholds[i]).nonzero()"]
    for line in copies:
        assert any(p.search(line) for p in SECOND_RULE), line
    for line in ["if self._cusum > self.config.cusum_threshold:",
                 "h = torch.cat([h.mean(dim=[2, 3]), h.amax(dim=[2, 3])], 1)",
                 "thresholds = tuple(float(b.threshold) if bool(b.enabled) else INF for b in bs)",
                 "def set_exit(block, threshold: float) -> None:",
                 "on = threshold != float('inf')"]:
        assert not any(p.search(line) for p in SECOND_RULE), line
    assert math.isfinite(exit_rule.DISABLED_THRESHOLD) and exit_rule.DISABLED_THRESHOLD > 1.0

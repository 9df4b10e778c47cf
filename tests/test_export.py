"""Tests for compiler/export.py: the artifact with its exits as one ONNX model."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from compiler import artifact  # noqa: E402
from compiler import export as ex  # noqa: E402
from compiler.config import RewriteConfig  # noqa: E402
from compiler.errors import ArtifactError, ExportError  # noqa: E402
from compiler.heads import ExitHead, HeadSpec  # noqa: E402
from compiler.rewrite import rewrite_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 1, 16, 16)
ROWS = 256
EXIT_FRACTION = 0.3  # of the rows still running, the share each enabled exit takes


def _block(cin, cout, stride, pad=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, pad), nn.BatchNorm2d(cout), nn.ReLU())


class Tiny(nn.Module):
    """Four conv blocks on 1x16x16; the third leaves a 3x3 map (2x2 pooling does not divide it)."""

    def __init__(self, fn=None):
        super().__init__()
        self.body = nn.Sequential(_block(1, 8, 1), _block(8, 16, 2), _block(16, 16, 2, 0),
                                  _block(16, 32, 1))
        self.fc = nn.Linear(32, 10)
        self.fn = fn

    def forward(self, x):
        h = self.body(x)
        if self.fn is not None:
            h = self.fn(h)
        return self.fc(h.mean(dim=(2, 3)))


def _exported(model):
    torch.manual_seed(0)
    for mod in model.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    model.eval()
    return torch.export.export(model, (torch.randn(2, *SHAPE[1:]),),
                               dynamic_shapes=({0: torch.export.Dim("batch")},)).module()


def _rows(n=ROWS, seed=1):
    return torch.randn((n,) + SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _enable(module, manifest, which, x):
    """Enable exits ``which`` with thresholds that let ~EXIT_FRACTION of the remaining rows leave.

    Thresholds lie midway across the widest gap between rows' confidences near that share, so
    no row sits close to a boundary where float rounding could flip its exit.
    """
    h = x
    with torch.no_grad():
        for i in range(len(manifest["exits"])):
            blk = getattr(module.blocks, str(i))
            h = blk.stage(h)
            if i not in which:
                continue
            conf = torch.softmax(blk.head(h), 1).amax(1).sort(descending=True).values
            assert len(conf) >= 8, "too few rows left to place a threshold"
            lo = max(1, int((EXIT_FRACTION - 0.05) * len(conf)))
            hi = min(max(lo + 1, int((EXIT_FRACTION + 0.05) * len(conf))), len(conf) - 1)
            k = lo + int((conf[lo - 1:hi - 1] - conf[lo:hi]).argmax())  # the widest gap near there
            thr = float((conf[k - 1] + conf[k]) / 2)
            blk.enabled.fill_(True)
            blk.threshold.fill_(thr)
            h = h[torch.softmax(blk.head(h), 1).amax(1) < blk.threshold]
    return module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)  # the weights must not depend on which tests ran before
    return _exported(Tiny())


@pytest.fixture(scope="module", params=[0.05, 1.0], ids=["linear-heads", "grid-and-mlp-heads"])
def exported(request, tiny, tmp_path_factory):
    """(artifact path, onnx path, summary, module) with every exit enabled."""
    module, manifest, _ = rewrite_module(tiny, SHAPE, RewriteConfig(head_budget=request.param),
                                         exported=True)
    assert len(manifest["exits"]) >= 3
    _enable(module, manifest, set(range(len(manifest["exits"]))), _rows())
    folder = tmp_path_factory.mktemp("export")
    path, out = folder / "tiny.cached.pt", folder / "tiny.onnx"
    artifact.save(module, manifest, str(path))
    summary = ex.export_onnx(str(path), str(out))
    loaded, _ = artifact.load(str(path))
    return path, out, summary, loaded


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # small graphs; threads only spin on a shared 2-core machine
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(sess, module, x):
    got, got_exit = sess.run([ex.LOGITS, ex.EXIT_INDEX], {ex.INPUT: x.numpy()})
    with torch.no_grad():
        want, want_exit = module.forward_with_exits(x)
    got, got_exit = torch.from_numpy(got), torch.from_numpy(got_exit)
    assert got.shape == want.shape and got_exit.dtype == torch.int64
    assert torch.equal(got_exit, want_exit)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    return want_exit


def test_rows_exit_like_the_artifact(exported):
    path, out, summary, module = exported
    n = summary["num_exits"]
    sess = _session(out)
    x = _rows()
    exits = _compare(sess, module, x)
    counts = torch.bincount(exits, minlength=n + 1)
    assert (counts > 0).all(), f"every exit and the full model should be taken: {counts.tolist()}"
    # batch 7, mixing exits, in an order that is not sorted by exit
    mixed = torch.cat([torch.nonzero(exits == e)[:2, 0] for e in range(n, -1, -1)])[:7]
    _compare(sess, module, x[mixed])
    _compare(sess, module, x[:7])
    for e in range(n + 1):  # batch 1 at each exit: the "no rows left" branches run
        row = int(torch.nonzero(exits == e)[0, 0])
        assert _compare(sess, module, x[row:row + 1]).tolist() == [e]
    got = sess.run(None, {ex.INPUT: x[:0].numpy()})
    assert got[0].shape == (0, 10) and got[1].shape == (0,)


ONE = pytest.mark.parametrize("exported", [1.0], indirect=True, ids=["grid-and-mlp-heads"])


def test_one_row_model_exits_like_the_artifact_at_every_exit(exported, tmp_path):
    """``--one-row``: input [1, ...]; each row answered as ``forward_with_exits`` answers it,
    whichever exit it leaves at; a batch of two is refused by onnxruntime, not misanswered."""
    path, _, _, module = exported
    summary = ex.export_onnx(str(path), str(tmp_path / "one.onnx"), one_row=True)
    assert summary["one_row"] and summary["input_shape"][0] == 1
    sess = _session(tmp_path / "one.onnx")
    assert sess.get_inputs()[0].shape[0] == 1
    x = _rows()
    with torch.no_grad():
        exits = module.forward_with_exits(x)[1]
    seen = set()
    for e in range(summary["num_exits"] + 1):
        for row in torch.nonzero(exits == e)[:3, 0].tolist():
            seen.add(int(_compare(sess, module, x[row:row + 1])[0]))
    assert seen == set(range(summary["num_exits"] + 1))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {ex.INPUT: x[:2].numpy()})
    r = ex.check_onnx(str(path), str(tmp_path / "one.onnx"), rows=32)
    assert r["exit_agreement"] == 1.0 and r["max_logit_diff"] < 1e-3



@ONE
def test_dynamo_exporter_agrees(exported, tmp_path):
    path, _, _, module = exported
    summary = ex.export_onnx(str(path), str(tmp_path / "dynamo.onnx"), exporter="dynamo")
    assert summary["exporter"] == ["dynamo"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "dynamo.onnx")), full_check=True)
    sess = _session(tmp_path / "dynamo.onnx")
    exits = _compare(sess, module, _rows())
    row = int(torch.nonzero(exits == 0)[0, 0])
    _compare(sess, module, _rows()[row:row + 1])


def test_model_is_valid_and_states_its_opset(exported):
    _, out, summary, _ = exported
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert summary["opset"] == ex.DEFAULT_OPSET == 18
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    props = {p.key: p.value for p in model.metadata_props}
    assert props["opset"] == "18"
    assert json.loads(props["layer_cache.enabled_exits"]) == summary["enabled_exits"]
    assert [i.name for i in model.graph.input] == [ex.INPUT]
    assert [o.name for o in model.graph.output] == [ex.LOGITS, ex.EXIT_INDEX]
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == ex.BATCH
    assert summary["bytes"] == out.stat().st_size


def test_only_enabled_exits_are_in_the_graph(tiny, tmp_path):
    module, manifest, _ = rewrite_module(tiny, SHAPE, exported=True)
    n = len(manifest["exits"])
    _enable(module, manifest, {0, n - 1}, _rows())
    path = tmp_path / "some.cached.pt"
    artifact.save(module, manifest, str(path))
    summary = ex.export_onnx(str(path), str(tmp_path / "some.onnx"))
    assert summary["enabled_exits"] == [0, n - 1]
    text = onnx.load(str(tmp_path / "some.onnx")).SerializeToString()
    assert b"head0/" in text and f"head{n - 1}/".encode() in text
    assert all(f"head{i}/".encode() not in text for i in range(1, n - 1))
    exits = _compare(_session(tmp_path / "some.onnx"), module, _rows())
    assert set(exits.tolist()) == {0, n - 1, n}


def test_no_exits_exports_the_plain_backbone(tiny, tmp_path, capsys):
    module, manifest, _ = rewrite_module(tiny, SHAPE, exported=True)
    path, out = tmp_path / "plain.cached.pt", tmp_path / "plain.onnx"
    artifact.save(module, manifest, str(path))
    assert ex.main([str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "notice:" in err and "plain backbone" in err
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "If" for n in model.graph.node)
    x = _rows(7)
    got, exits = _session(out).run(None, {ex.INPUT: x.numpy()})
    with torch.no_grad():
        want = tiny(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=0)
    assert exits.dtype.name == "int64" and exits.tolist() == [len(manifest["exits"])] * 7


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compiler.export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_missing_and_garbage_artifacts_fail_in_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file" * 100)
    r = _cli(str(garbage), "-o", str(tmp_path / "x.onnx"))  # the real command line
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "corrupt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert ex.main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ArtifactError):
        ex.export_onnx(str(garbage), str(tmp_path / "x.onnx"))


def test_unsupported_operator_is_named(tmp_path, capfd):
    model = _exported(Tiny(fn=torch.special.bessel_j0))
    module, manifest, _ = rewrite_module(model, SHAPE, exported=True)
    path = tmp_path / "bessel.cached.pt"
    artifact.save(module, manifest, str(path))
    with pytest.raises(ExportError, match="operator aten::special_bessel_j0 is not supported"):
        ex.export_onnx(str(path), str(tmp_path / "b.onnx"), exporter="torchscript")
    capfd.readouterr()
    # "auto" tries the dynamo exporter too, then reports the first failure; the exporters'
    # own logs (a graph dump on stdout from the C++ side) must not leak out
    assert ex.main([str(path), "-o", str(tmp_path / "b.onnx")]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("error: cannot export the final stage") and "aten::special_bessel_j0" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()


@ONE
def test_bad_opset_is_refused(exported, tmp_path):
    path = exported[0]
    with pytest.raises(ExportError, match="opset 9"):
        ex.export_onnx(str(path), str(tmp_path / "x.onnx"), opset=9)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (2, 4, 7, 5), (2, 3, 2, 2), (2, 2, 1, 1),
                                   (2, 3, 14, 14)])
def test_export_head_pools_like_exit_head(shape, k):
    spec = HeadSpec(f"avgmax{k}x{k}", 2 * k * k * shape[1], 32, 10)
    torch.manual_seed(0)
    head = ExitHead(spec).eval()
    eager = ex.ExportHead(spec, shape, head.classifier.state_dict()).eval()
    h = torch.randn(shape)
    assert torch.allclose(eager.features(h), head.features(h), atol=1e-6)
    assert torch.allclose(eager(h), head(h), atol=1e-6)


@pytest.mark.parametrize("pool", ["avgmax2x2", "avgmax3x3", "avgmax"])
def test_a_channels_last_head_pools_the_map_its_channels_first_twin_pools(pool):
    """``<pool>_hwc`` on [B, H, W, C] (Swin's maps) gives what ``<pool>`` gives on the same
    map as [B, C, H, W], in the artifact's head, scripted, and in the exported form."""
    c, hgt, wid = 6, 7, 5
    k = max(int(pool[-1]) if pool[-1].isdigit() else 1, 1)
    spec = HeadSpec(pool, 2 * k * k * c, 0, 10)
    hwc = HeadSpec(pool + "_hwc", spec.feature_dim, 0, 10)
    torch.manual_seed(0)
    head = ExitHead(spec).eval()
    twin = ExitHead(hwc).eval()
    twin.load_state_dict(head.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit's deprecation notice
        scripted = torch.jit.script(twin)
    h = torch.randn(3, c, hgt, wid)
    nhwc = h.permute(0, 2, 3, 1).contiguous()
    eager = ex.ExportHead(hwc, nhwc.shape, head.classifier.state_dict()).eval()
    want = head(h)
    for got in (twin(nhwc), scripted(nhwc), eager(nhwc)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@ONE
def test_cli_check_reports_agreement(exported, tmp_path, capsys):
    path = exported[0]
    assert ex.main([str(path), "-o", str(tmp_path / "c.onnx"), "--check", "64"]) == 0
    out = capsys.readouterr().out
    assert "opset 18" in out and "exit agreement 100.00%" in out


def test_missing_onnx_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    assert ex.main([str(tmp_path / "any.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX export needs the 'onnx' package") and "pip install" in err


@pytest.mark.filterwarnings("ignore")
def test_a_part_fixed_to_the_example_batch_is_refused(monkeypatch):
    """The dynamo exporter, given a scripted module, can fix the example's batch into a
    reshape: the part loads and then fails at any other batch. export_module runs it once at
    another batch size and refuses it in one line (the runtime then serves in TorchScript)."""
    pytest.importorskip("onnxruntime")
    import io

    import onnx

    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1) * 2

    example = torch.randn(2, 3, 4)

    def baked(module, example, opset):   # what such an export amounts to: no dynamic batch
        f = io.BytesIO()
        torch.onnx.export(Flat(), (example,), f, input_names=["x"], output_names=["y"],
                          opset_version=opset, dynamo=False)
        return onnx.load_from_string(f.getvalue())

    monkeypatch.setattr(ex, "_export_dynamo", baked)
    with pytest.raises(ExportError) as info:
        ex.export_module(Flat(), example, "stage 0", 18, exporter="dynamo")
    msg = str(info.value)
    assert "runs only at the example's batch size" in msg and "\n" not in msg
    # a part that runs at every batch size is kept
    monkeypatch.setattr(ex, "_export_dynamo", _dynamic(Flat()))
    model, how = ex.export_module(Flat(), example, "stage 0", 18, exporter="dynamo")
    assert how == "dynamo"


def _dynamic(module):
    def export(_module, example, opset):
        import io

        import onnx
        f = io.BytesIO()
        torch.onnx.export(module, (example,), f, input_names=["x"], output_names=["y"],
                          opset_version=opset, dynamo=False, dynamic_axes={"x": {0: "N"}})
        return onnx.load_from_string(f.getvalue())
    return export

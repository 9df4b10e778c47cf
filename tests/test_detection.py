"""Detection: the compiler's detector artifacts and the detection runtime, on a tiny random FCOS.

Fast (well under a minute on 2 CPU cores): a detector with a few thousand parameters at 64 px.
"""
import subprocess
import sys
import warnings

import pytest
import torch

from compiler import artifact, exit_rule
from compiler.detection import (DetectionConfig, outputs_equal, rewrite_detector,
                                select_cuts)
from compiler.errors import CompilerError
from runtime.calibrate import INF

torchvision = pytest.importorskip("torchvision")

SIZE = 96


def tiny_detector(score_thresh=0.05, seed=0):
    from tools.train_detector import build_detector
    torch.manual_seed(seed)
    return build_detector("fcos", size=SIZE, widths=(8, 8, 16, 16, 16), fpn_channels=32,
                          head_convs=1, score_thresh=score_thresh).eval()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    warnings.filterwarnings("ignore")
    det = tiny_detector()
    module, manifest, an = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, SIZE, SIZE)))
    path = tmp_path_factory.mktemp("det") / "tiny.cached.pt"
    artifact.save(module, manifest, path)
    return det, path, manifest, an


def frames(n, seed=0):
    return torch.rand((n, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def plain_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


def test_cut_points_carry_the_live_set(compiled):
    _, _, manifest, an = compiled
    by_name = {c.name: c for c in an.cuts}
    assert [c.name for c in an.cuts] == ["stem", "layer1", "layer2", "layer3"]
    assert by_name["stem"].carries[0].startswith("newest")
    assert len(by_name["layer3"].carries) == 2            # taps '0' and '1' (layer3 is a tap)
    assert all(c.carries[0].startswith("tap") for c in an.cuts[2:])
    assert sum(manifest["stage_flops"]) == manifest["total_flops"]
    assert manifest["task"] == "detection" and manifest["num_classes"] == 2
    fr = [e["fraction"] for e in manifest["exits"]]
    assert fr == sorted(fr) and 0 < fr[0] < fr[-1] < 1


def test_plain_jit_load_equals_detector(compiled):
    det, path, _, _ = compiled
    m = plain_load(path)
    x = frames(3)
    with torch.no_grad():
        want = det(list(x))
        got = m(x)
        got_exits = m.forward_with_exits(x)[1]
    assert any(len(d["boxes"]) for d in want), "the tiny detector should find something"
    assert outputs_equal(got, want)
    assert got_exits.tolist() == [len(_blocks(m))] * 3


def _blocks(m):
    return list(m.blocks.children())


def test_forced_exit_returns_empties_in_the_detectors_format(compiled):
    det, path, _, _ = compiled
    m = plain_load(path)
    artifact.set_exit(_blocks(m)[0], 0.0)       # every frame is confident enough
    x = frames(4, seed=1)
    with torch.no_grad():
        got, exits = m.forward_with_exits(x)
        want = det(list(x))
    assert exits.tolist() == [0] * 4
    for g, w in zip(got, want):
        assert list(g) == list(w)                # same keys, same order
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape[1:] == w[k].shape[1:]
            assert g[k].shape[0] == 0


def test_frames_that_go_on_get_exactly_the_detectors_output(compiled):
    det, path, _, _ = compiled
    m = plain_load(path)
    x = frames(8, seed=2)
    blk = _blocks(m)[1]
    with torch.no_grad():
        h, taps = m.prepare(x)[0], []
        for b in _blocks(m)[:2]:
            h, taps = b.stage(h, taps)
        conf = exit_rule.class_confidence(blk.head(h), 0)
    artifact.set_exit(blk, float(conf.median()))   # about half the frames leave at exit 1
    with torch.no_grad():
        got, exits = m.forward_with_exits(x)
        want = det(list(x))
    left = exits == 1
    assert 0 < int(left.sum()) < 8
    for i in range(8):
        if left[i]:
            assert all(v.shape[0] == 0 for v in got[i].values())
        else:
            assert outputs_equal([got[i]], [want[i]])


def test_whole_model_path_answers_as_the_staged_path(compiled):
    """The runtime's scripted whole-model path (``DetectionLoop.fast_module``) for a learned
    state: the same answers and exits as stage by stage, with frames leaving at an exit."""
    from runtime.calibrate import INF
    from runtime.detection import load, serve_staged
    from runtime.serving import ServingState
    _, path, _, _ = compiled
    rt = load(path, background=False, train_every=10 ** 9)
    x = frames(8, seed=3)
    g = torch.Generator().manual_seed(0)
    classifiers = tuple(c.__class__(*[type(l)(l.in_features, l.out_features)
                                      if isinstance(l, torch.nn.Linear) else l for l in c])
                        for c in rt.state.classifiers)
    for c in classifiers:                                 # heads that differ from the file's
        for prm in c.parameters():
            prm.data = torch.randn(prm.shape, generator=g)
    with torch.no_grad():
        staged_off = serve_staged(rt.module, rt.stages, rt.heads, rt.task,
                                  ServingState(classifiers, (INF,) * rt.num_exits), x, False,
                                  False)
        h, taps = rt.module.prepare(x)[0], []
        h, taps = rt.stages[0](h, taps)
        conf = rt.task.confidence(classifiers[0](rt.heads[0].features(h)))
    thresholds = (float(conf.median()),) + (INF,) * (rt.num_exits - 1)
    fast = rt.loop.fast_module(classifiers, thresholds)
    state = ServingState(classifiers, thresholds, fast=fast)
    with torch.no_grad():
        staged = serve_staged(rt.module, rt.stages, rt.heads, rt.task, state, x, False, False)
        served = rt._run(state, x, False, False)
    assert torch.equal(served.exit_of, staged.exit_of)
    assert 0 < int((served.exit_of == 0).sum()) < 8
    for got, want, off in zip(served.out, staged.out, staged_off.out):
        assert list(got) == list(want) and outputs_equal([got], [want])
    for i in torch.nonzero(served.exit_of != 0).flatten().tolist():
        assert outputs_equal([served.out[i]], [staged_off.out[i]])   # frames that go on: the detector's
    rt.close()


def test_runtime_predict_order_shadow_and_bad_input(compiled):
    from runtime.core import InputError
    from runtime.detection import load
    from runtime.serving import ServingState
    det, path, _, _ = compiled
    rt = load(path, background=False, shadow_rate=1.0)
    x = frames(6, seed=3)
    with torch.no_grad():
        want = det(list(x))
    out = rt.predict(x)
    assert outputs_equal(out, want)
    out = rt.predict(list(x))                   # a list of images of one size
    assert outputs_equal(out, want)
    # Every exit on at threshold 0 and every request shadowed: answers are the detector's, and a
    # frame agrees exactly when the detector found nothing at the score threshold.
    st = rt.state
    rt._state = ServingState(st.classifiers, (0.0,) + st.thresholds[1:], st.version + 1)
    out, exits = rt.predict(x, return_exits=True)
    assert outputs_equal(out, want) and exits.tolist() == [rt.num_exits] * 6
    nothing = rt.task.found(want).logical_not()
    s = rt.stats()
    assert s["shadow_rows"] == 6
    assert s["live_agreement"] == pytest.approx(nothing.float().mean().item())
    # Off shadow: every frame leaves at exit 0 with an empty answer.
    rt.config.guarantee.shadow_rate = 0.0
    out, exits = rt.predict(x, return_exits=True)
    assert exits.tolist() == [0] * 6 and all(d["boxes"].shape == (0, 4) for d in out)

    before = (rt.buffer.added, rt.counters.requests)
    bad = [torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 1, 64, 64), [], torch.rand(1, SIZE, SIZE),
           torch.full((2, 1, SIZE, SIZE), float("nan")), [torch.rand(1, SIZE, SIZE),
                                                           torch.rand(1, SIZE, 90)],
           torch.zeros((0, 1, SIZE, SIZE)), torch.zeros((2, 1, SIZE, SIZE), dtype=torch.uint8),
           "frames"]
    for b in bad:
        with pytest.raises(InputError) as e:
            rt.predict(b)
        assert "\n" not in str(e.value) and str(e.value)
    mixed = torch.rand(3, 1, SIZE, SIZE)
    mixed[1, 0, 5, 5] = float("inf")
    with pytest.raises(InputError, match=r"images \[1\] contain NaN or Inf"):
        rt.predict(mixed)
    assert (rt.buffer.added, rt.counters.requests) == before, "bad input was served or learned"


def test_runtime_learns_from_a_scene_stream(compiled):
    from runtime.detection import load
    from tools.scenes import SceneConfig, make_stream
    _, path, _, _ = compiled
    stream = make_stream(SceneConfig(frames=240, size=SIZE, min_side=16, max_side=32,
                                     empty_share=0.7, seed=7))
    rt = load(path, background=False, min_train=64, min_calib=48, train_every=80, epochs=2,
              holdout_block_rows=16, holdout_gap_rows=4,   # hold-out blocks to a 240-frame scale
              calib_fraction=0.3)                          # and enough training rows for 2 rounds
    n_out = 0
    for s in range(0, 240, 16):
        out, exits = rt.predict(stream.frames[s:s + 16], return_exits=True)
        n_out += len(out)
        assert len(out) == exits.shape[0] == min(16, 240 - s)
    st = rt.stats()
    assert n_out == st["rows"] == sum(st["rows_per_exit"]) == 240
    assert st["learning"]["rounds"] >= 2 and st["learning"]["rounds_failed"] == 0
    saved = path.parent / "tiny.learned.pt"
    rt.save(saved)
    m = plain_load(saved)
    assert len(m(stream.frames[:3])) == 3


def test_background_detection_runtime_defers_teaching(compiled):
    """Background mode: frames are answered with exactly the detector's output at once and
    taught by the deferred teacher (runtime/teaching.py): the same rows reach the buffer as
    when each request teaches itself."""
    from runtime.detection import load
    det, path, _, _ = compiled
    x = frames(48, seed=5)
    # TorchScript: the tiny random detector's scores tie, and its ONNX export orders ties
    # otherwise (test_onnxruntime_serves_the_trained_detector checks that backend)
    kw = dict(train_every=10 ** 9, holdout_block_rows=16, holdout_gap_rows=4,
              backend="torchscript")
    deferred = load(path, background=True, **kw)
    inline = load(path, background=True, deferred=False, **kw)
    try:
        with torch.no_grad():
            want = det(list(x))
        for s in range(0, 48, 8):
            got = deferred.predict(x[s:s + 8])
            inline.predict(x[s:s + 8])
            for g, w in zip(got, want[s:s + 8]):
                assert torch.equal(g["labels"], w["labels"])
                assert torch.allclose(g["boxes"], w["boxes"], atol=1e-4)
        assert deferred._teacher.drain(30)
        assert deferred._detector is not None    # answered by the whole detector, one call
        a, b = deferred.stats()["learning"], inline.stats()["learning"]
        assert a["deferred_rows_taught"] == 48 and b["deferred_rows_taught"] == 0
        assert a["buffer_rows"] == b["buffer_rows"] > 0
        assert a["held_out_rows"] == b["held_out_rows"]
    finally:
        deferred.close()
        inline.close()


def test_onnxruntime_serves_the_trained_detector(tmp_path):
    """The default backend on the CPU: the demo detector's stored ONNX parts, composed with the
    live heads. Frames answer as the detector does; with an exit on, each frame leaves where
    the scripted artifact lets it leave and gets the same answer."""
    from runtime.detection import load
    from runtime.serving import ServingState
    from tools.scenes import make_stream
    from tools.train_detector import load_demo_detector
    det, _ = load_demo_detector()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, 96, 96)))
    path = tmp_path / "demo.cached.pt"
    artifact.save(module, manifest, path)
    x = make_stream(frames=400, empty_share=0.5, seed=7).frames[::25]     # 16 frames
    rt = load(path, background=True, train_every=10 ** 9)
    try:
        assert rt.stats()["backend"] == "onnxruntime"
        with torch.no_grad():
            want = det(list(x))
        assert any(len(w["boxes"]) for w in want) and any(not len(w["boxes"]) for w in want)
        assert outputs_equal(rt.predict(x), want, atol=1e-3, rtol=1e-3)
        # a frame that teaches with every exit off runs the onnxruntime collect model: the
        # same answer, pooled features and teacher as stage by stage in TorchScript
        from runtime.detection import serve_staged
        off = ServingState(rt.state.classifiers, (INF,) * 4)
        with torch.no_grad():   # as predict runs them
            got = rt._run(off, x, False, True)
            ref = serve_staged(rt.module, rt.stages, rt.heads, rt.task, off, x, False, True)
        assert outputs_equal(got.out, ref.out, atol=1e-3, rtol=1e-3)
        assert len(got.features) == 4 and all(
            f.shape == g.shape and torch.allclose(f, g, atol=1e-4)
            for f, g in zip(got.features, ref.features))
        assert torch.allclose(got.teacher, ref.teacher, atol=1e-3)
        with torch.no_grad():
            h, taps = module.prepare(x)[0], []
            for b in _blocks(module)[:2]:
                h, taps = b.stage(h, taps)
            conf = exit_rule.class_confidence(_blocks(module)[1].head(h), 0)
        st = rt.state
        mid = conf.sort().values[7:9].mean()      # between two frames: no frame sits on it
        thresholds = (INF, float(mid), INF, INF)
        rt._state = ServingState(st.classifiers, thresholds, st.version + 1,
                                 compiled=rt._compile(st.classifiers, thresholds, True))
        # a shadowed frame runs the collect model too: where each frame would have left, and
        # whether its exit's answer agrees, as stage by stage
        with torch.no_grad():
            got = rt._run(rt._state, x, True, True)
            ref = serve_staged(rt.module, rt.stages, rt.heads, rt.task, rt._state, x, True, True)
        assert outputs_equal(got.out, ref.out, atol=1e-3, rtol=1e-3)
        assert torch.equal(got.exit_of, ref.exit_of) and bool((got.exit_of == 4).all())
        assert torch.equal(got.shadow_exit, ref.shadow_exit)
        assert 0 < int((got.shadow_exit == 1).sum()) < 16
        assert torch.equal(got.shadow_ok, ref.shadow_ok)
        assert all(torch.allclose(f, g, atol=1e-4) for f, g in zip(got.features, ref.features))
        # a request that teaches with the exit on runs the state's teaching model: frames
        # leave as served, and those that ran the detector teach as stage by stage
        with torch.no_grad():
            got = rt._run(rt._state, x, False, True)
            ref = serve_staged(rt.module, rt.stages, rt.heads, rt.task, rt._state, x, False, True)
        assert torch.equal(got.exit_of, ref.exit_of) and 0 < int((got.exit_of == 1).sum()) < 16
        assert outputs_equal(got.out, ref.out, atol=1e-3, rtol=1e-3)
        assert [f.shape for f in got.features] == [f.shape for f in ref.features]
        assert all(torch.allclose(f, g, atol=1e-4) for f, g in zip(got.features, ref.features))
        assert torch.allclose(got.teacher, ref.teacher, atol=1e-3)
        assert rt._teaches_inline(rt._state)
        got, exits = rt.predict(x, return_exits=True)
        artifact.set_exit(_blocks(module)[1], thresholds[1])
        with torch.no_grad():
            ref, ref_exits = module.forward_with_exits(x)
        assert torch.equal(exits, ref_exits) and 0 < int((exits == 1).sum()) < 16
        assert outputs_equal(got, ref, atol=1e-3, rtol=1e-3)
    finally:
        rt.close()


def test_onnxruntime_cost_model_measures_heads_in_their_serving_mode(tmp_path):
    """With a latency weight the detection cost model reads the time measured in onnxruntime
    (where a head costs far more than its FLOPs), and ``max_miss_overhead`` rules exits out by
    it. Synchronous mode stays FLOPs only by default (it must not depend on the clock)."""
    from runtime.detection import load
    from tools.train_detector import load_demo_detector
    det, _ = load_demo_detector()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, 96, 96)))
    path = tmp_path / "demo.cached.pt"
    artifact.save(module, manifest, path)
    flops_only = load(path, background=False)
    timed = load(path, background=False, latency_weight=0.5, max_miss_overhead=0.05)
    try:
        # (what the times are is for benchmarks to say: here, that they are read and used)
        c = timed.costs
        assert flops_only.costs.head_latency_ms is None
        heads = torch.tensor(c.head_latency_ms, dtype=torch.float64)
        stages = torch.tensor(c.stage_latency_ms, dtype=torch.float64)
        assert heads.shape == (4,) and stages.shape == (5,)
        assert bool((stages > 0).all()) and bool((heads >= 0).all())
        flops_share = c.head_flops / c.total_flops
        assert torch.allclose(c.head_cost, 0.5 * flops_share + 0.5 * heads / stages.sum())
        assert c.miss_overhead([True] * 4) == pytest.approx(float(heads.sum() / stages.sum()))
        for e in range(4):
            alone = [j == e for j in range(4)]
            m = c.miss_overhead(alone)
            assert c.within_miss_cap(m + 1e-9)(alone)
            assert not m or not c.within_miss_cap(m / 2)(alone)
    finally:
        flops_only.close()
        timed.close()


def test_select_and_bad_exits(compiled):
    _, _, _, an = compiled
    assert [c.name for c in select_cuts(an, DetectionConfig(exits=["layer2"]))] == ["layer2"]
    with pytest.raises(CompilerError, match="not cut points of the body: nope"):
        select_cuts(an, DetectionConfig(exits=["nope"]))


def test_unsupported_detectors_get_one_line_errors():
    # (SSD with another feature extractor: tests/test_detection_families.py)
    with pytest.raises(CompilerError, match="input shape"):
        rewrite_detector(tiny_detector(), DetectionConfig())


def test_cli_compiles_a_pickled_detector(tmp_path):
    path = tmp_path / "det.pkl"
    torch.save(tiny_detector(), path)
    out = tmp_path / "det.cached.pt"
    cmd = [sys.executable, "-m", "compiler.rewrite", str(path), "--allow-pickle", "--input-shape",
           f"1,1,{SIZE},{SIZE}", "-o", str(out), "--score-threshold", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'nothing here' exits" in r.stdout and out.exists()
    assert artifact.read_manifest(out)["score_threshold"] == pytest.approx(0.2)
    r = subprocess.run(cmd[:-2] + ["--exits", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_classification_task_matches_the_exit_rule():
    """The task interface's classification half reads rows by the exit rule: confidence is the
    largest softmax probability, and a head agrees on the backbone's class."""
    from compiler import exit_rule
    from runtime.tasks import ClassificationTask, DetectionTask, head_confidences
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 6, generator=g) for _ in range(3)]
    teacher = torch.randn(50, 4, generator=g)
    heads = [torch.randn(6, 4, generator=g) for _ in range(3)]
    logits = lambda e, f: f @ heads[e]   # noqa: E731
    conf, agree = head_confidences(ClassificationTask(), logits, feats, teacher)
    for e in range(3):
        z = logits(e, feats[e])
        assert torch.equal(conf[e], exit_rule.confidence(z).double())
        assert torch.equal(agree[e], z.argmax(1) == teacher.argmax(1))
    # Detection: confidence is P(nothing); an exit agrees exactly where the detector found nothing.
    task = DetectionTask(0.5)
    dets = [{"scores": torch.tensor([0.2, 0.7])}, {"scores": torch.tensor([0.49])},
            {"scores": torch.zeros(0)}, {"scores": torch.tensor([0.5])}]
    t = task.teacher(dets)
    assert task.found(dets).tolist() == [True, False, False, True]
    assert (t.argmax(1) == 1).tolist() == [True, False, False, True]
    # how sure: nothing scored at all is the surest "nothing"; a score just under the
    # threshold a faint one; 0.7 is 40% of the way from the threshold to 1
    cap = DetectionTask.MARGIN_CAP
    assert torch.allclose(t[:, 1] - t[:, 0], torch.tensor([0.4 * cap, -0.5, -cap, 0.5]))
    assert float(torch.softmax(t[2], 0)[0]) > 0.99   # above the thresholds a 1% budget needs
    z = torch.tensor([[3.0, 0.0]] * 4)
    assert task.agrees(z, t).tolist() == [False, True, True, False]
    assert torch.allclose(task.confidence(z), torch.softmax(z, 1)[:, 0])


def test_runtime_load_opens_a_detection_artifact(compiled):
    import runtime
    from runtime.detection import DetectionRuntime
    _, path, _, _ = compiled
    rt = runtime.load(path, background=False)
    assert isinstance(rt, DetectionRuntime)
    assert len(rt.predict(frames(2))) == 2


def _mixed_exits(path, out):
    """A copy of the artifact at ``path`` whose exits 1 and 3 let some of 16 frames go (exit 1
    at its median confidence, exit 3 at 0: every frame still there leaves)."""
    m, manifest = artifact.load(path)
    x = frames(16, seed=5)
    with torch.no_grad():
        h, taps = m.prepare(x)[0], []
        for b in _blocks(m)[:2]:
            h, taps = b.stage(h, taps)
        conf = exit_rule.class_confidence(_blocks(m)[1].head(h), 0)
    artifact.set_exit(_blocks(m)[1], float(conf.median()))
    artifact.set_exit(_blocks(m)[3], 0.0)
    artifact.save(m, manifest, out)
    return x


def test_onnx_export_of_a_detection_artifact_matches_it_frame_by_frame(compiled, tmp_path):
    """In a fresh process (torchvision not imported by the caller), as a user runs it: the
    composed model answers every frame as the artifact does, exits included."""
    import onnxruntime as ort
    _, path, manifest, _ = compiled
    assert manifest["onnx"]["parts"] == len(manifest["exits"]) + 1
    learned = tmp_path / "mixed.pt"
    x = _mixed_exits(path, learned)
    r = subprocess.run([sys.executable, "-m", "compiler.export", str(learned), "-o",
                        str(tmp_path / "det.onnx"), "--check", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 of 4 exits enabled" in r.stdout and "same answer 100.00%" in r.stdout
    assert r.stderr == "", r.stderr
    sess = ort.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    m = plain_load(learned)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["boxes", "scores", "labels", "exit_index"]
    seen = set()
    with torch.no_grad():
        for i in range(x.shape[0]):
            want, want_exit = m.forward_with_exits(x[i:i + 1])
            got = dict(zip(names, sess.run(None, {"image": x[i:i + 1].numpy()})))
            assert int(got.pop("exit_index")[0]) == int(want_exit[0])
            seen.add(int(want_exit[0]))
            assert outputs_equal([{k: torch.from_numpy(v) for k, v in got.items()}], want,
                                 atol=1e-3, rtol=1e-3)
    assert seen == {1, 3}, seen      # frames left at both enabled exits


def test_onnx_export_without_parts_is_one_line_that_says_why(tmp_path):
    det = tiny_detector()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, SIZE, SIZE),
                                                                onnx_parts=False))
    path = tmp_path / "old.pt"
    artifact.save(module, manifest, path)
    r = subprocess.run([sys.executable, "-m", "compiler.export", str(path), "-o",
                        str(tmp_path / "det.onnx")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "re-run python -m compiler.rewrite" in r.stderr
    assert not (tmp_path / "det.onnx").exists()
    r = subprocess.run([sys.executable, "-m", "compiler.export", str(path), "-o",
                        str(tmp_path / "det.onnx"), "--opset", "17"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_runtime_backend_for_an_artifact_without_onnx_parts(tmp_path, caplog):
    """``auto`` serves it with TorchScript (one warning); asked for by name, onnxruntime is a
    one-line error that says what to do."""
    from runtime.backends import BackendError
    from runtime.detection import load
    det = tiny_detector()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, SIZE, SIZE),
                                                                onnx_parts=False))
    path = tmp_path / "old.pt"
    artifact.save(module, manifest, path)
    with pytest.raises(BackendError, match="re-run python -m compiler.rewrite.*torchscript") as e:
        load(path, background=False, backend="onnxruntime")
    assert "\n" not in str(e.value)
    with caplog.at_level("WARNING", logger="layer_cache.runtime"):
        rt = load(path, background=False)
    try:
        assert rt.stats()["backend"] == "torchscript"
        assert any("serving with TorchScript" in r.message for r in caplog.records)
        x = frames(2)
        with torch.no_grad():
            assert outputs_equal(rt.predict(x), det(list(x)))
    finally:
        rt.close()


def test_runtime_save_keeps_the_onnx_parts(compiled, tmp_path):
    import runtime
    _, path, _, _ = compiled
    with runtime.load(path, background=False) as rt:
        rt.save(tmp_path / "saved.pt")
    m, manifest = artifact.load(tmp_path / "saved.pt")
    m0, _ = artifact.load(path)
    assert manifest["onnx"]["parts"] == 5
    assert torch.equal(m.onnx_parts, m0.onnx_parts) and m.onnx_parts.numel() > 0


def test_a_detection_runtime_holds_out_blocks_that_outlast_a_scene(compiled, teacher_artifact):
    """Camera frames: a detection runtime starts from 256-row hold-out blocks with 64-row gaps
    (a classifier's runtime from 64 / 16); a setting named by the caller, or a whole config,
    wins."""
    import runtime
    from runtime.detection import load
    _, path, _, _ = compiled
    rt = load(path, background=False)
    assert (rt.config.collect.holdout_block_rows, rt.config.collect.holdout_gap_rows) == (256, 64)
    rt.close()
    rt = runtime.load(str(path), background=False, holdout_block_rows=32, holdout_gap_rows=8)
    assert (rt.config.collect.holdout_block_rows, rt.config.collect.holdout_gap_rows) == (32, 8)
    rt.close()
    rt = load(path, background=False, config=runtime.RuntimeConfig())
    assert rt.config.collect.holdout_block_rows == 64
    rt.close()
    rt = runtime.load(teacher_artifact, background=False)
    assert (rt.config.collect.holdout_block_rows, rt.config.collect.holdout_gap_rows) == (64, 16)
    rt.close()

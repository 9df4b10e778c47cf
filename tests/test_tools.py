"""Tests for tools/: backbones build and trace, dataset loading, and export round-trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.fx

from tools import data
from tools.backbones import ARCHS, build
from tools.train import export


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These inputs are tiny, so intra-op threads buy nothing; on a shared 2-core
    # machine OpenMP spin-waiting makes oversubscribed runs ~4x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_builds_traces_and_runs(arch: str) -> None:
    spec = ARCHS[arch]
    torch.manual_seed(0)
    model = build(arch, num_classes=10, in_channels=spec.channels).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(spec.input_shape(2))
    with torch.no_grad():
        out = gm(x)
        ref = model(x)
    assert out.shape == (2, 10)
    assert torch.allclose(out, ref, atol=1e-5)


def test_build_unknown_arch() -> None:
    with pytest.raises(KeyError):
        build("no_such_arch")


def _dataset_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", str(data.FASHION_MNIST_DIR)))


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_load_fashion_mnist(size: int, channels: int) -> None:
    if not (_dataset_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x, y = data.load_fashion_mnist("test", size=size, channels=channels)
    assert x.shape == (10000, channels, size, size)
    assert x.dtype == torch.float32
    assert y.shape == (10000,)
    assert y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == len(data.CLASSES) - 1
    # The 28x28 centre is the original image: roughly zero mean, unit std.
    centre = x[:, 0, (size - 28) // 2 :, (size - 28) // 2 :][:, :28, :28]
    assert abs(centre.mean().item()) < 0.05
    assert abs(centre.std().item() - 1.0) < 0.05
    if size == 32:
        # Padding is black (raw 0) pixels.
        assert torch.allclose(x[:, :, 0, :], torch.tensor(-data.MEAN / data.STD))
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 2])


def test_load_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("test")


def test_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build("demo_resnet").eval()
    path = tmp_path / "demo.pt2"
    export(model, torch.randn(2, 1, 28, 28), path)  # verifies batch 1 and 5 itself
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, 1, 28, 28)
            out = loaded(x)
            assert out.shape == (n, 10)
            assert torch.allclose(out, model(x), atol=1e-4)


# ----- the demo (the README's first command) ------------------------------------------------

def _demo(argv):
    from tools import demo
    return demo.main(argv + ["--quiet"])


def test_demo_runs_end_to_end_on_the_embedded_backbone(tmp_path: Path, capsys) -> None:
    """3,600 rows (about 40 s): the first round that may switch exits on comes after about 3,000
    (``min_train`` = 1,000 training rows at ``calib_fraction`` 0.5, less the rows next to
    held-out blocks), so exits are on for part of the scored second half, and every promised
    output is written."""
    import json
    assert _demo(["--rows", "3600", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FLOPs saved, heads counted" in out and "agreement with the backbone" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    second = summary["second_half"]
    assert summary["rows"] == 3600 and second["rows"] == 1800
    st = summary["runtime_stats"]
    assert st["learning"]["rounds"] >= 1
    assert any(t is not None for t in st["thresholds"]), "no exit switched on"
    assert second["exit_share"][-1] < 0.95          # exits answered part of the second half
    assert 0.05 < second["flops_saved"] < 1.0
    assert second["agreement"] >= 0.99                # the default budget
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert (tmp_path / "demo_backbone.learned.pt").is_file()


def test_demo_feeds_a_cifar_style_backbone_its_input_shape(tmp_path: Path) -> None:
    """tools.train's other backbones take 3x32x32 Fashion-MNIST; the demo streams that."""
    torch.manual_seed(0)
    path = tmp_path / "mnv2.pt2"
    export(build("mobilenet_v2", in_channels=3).eval(), torch.randn(2, 3, 32, 32), path)
    assert _demo(["--backbone", str(path), "--rows", "64", "--out", str(tmp_path / "o")]) == 0
    import json
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["rows"] == 64


def test_demo_head_budget_reaches_the_compiler(tmp_path: Path) -> None:
    from compiler import artifact
    sizes = {}
    for budget in (0.05, 0.15):
        out = tmp_path / str(budget)
        assert _demo(["--rows", "32", "--head-budget", str(budget), "--out", str(out)]) == 0
        manifest = artifact.read_manifest(out / "demo_backbone.cached.pt")
        assert manifest["config"]["head_budget"] == budget
        sizes[budget] = sum(e["head"]["feature_dim"] * max(e["head"]["hidden"], 1)
                            for e in manifest["exits"])
    assert sizes[0.05] < sizes[0.15]


def test_demo_bad_backbone_is_one_line(tmp_path: Path, capsys) -> None:
    assert _demo(["--backbone", str(tmp_path / "missing.pt2"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_calibration_check_measures_each_rule_and_the_ceilings():
    """tools.calibration_check on a synthetic pool: each rule's draws are judged on rows it did
    not see, and no rule can beat the ceilings."""
    from tools.calibration_check import ceilings_of, run
    g = torch.Generator().manual_seed(0)
    E, n = 3, 6000
    conf = (torch.rand(E, n, generator=g) * 0.5 + torch.linspace(0.3, 0.5, E)[:, None]).double()
    agree = torch.rand(E, n, generator=g).double() < 0.85 + 0.15 * conf
    sc = torch.full((E + 1,), 1.0 / (E + 1), dtype=torch.float64)
    hc = torch.full((E,), 0.005, dtype=torch.float64)
    res = run(conf, agree, sc, hc, [0.99], 0.95, [1500], draws=3, seed=0)
    assert {r["rule"] for r in res} == {"ltt", "ltt-fitted", "wilson+crossfit"}
    ceil = ceilings_of(conf, agree, sc, hc, [0.99])[0.99]
    assert ceil["oracle"] >= ceil["hindsight"] > 0
    for r in res:
        assert r["draws"] == 3 and 0 <= r["violations"] <= 3
        assert r["saving_median"] <= ceil["hindsight"] + 0.02   # chosen on 1,500, judged on the rest


def test_other_scores_rank_rows_and_the_learned_one_finds_a_planted_signal():
    """tools.calibration_check --scores: every alternative confidence has one value per exit
    and row; where agreement hides in a feature max softmax ignores (this exit agrees with the
    previous one), the learned agreement score ranks rows better than max softmax."""
    from tools.calibration_check import other_scores
    g = torch.Generator().manual_seed(0)
    n, K = 4000, 5
    teacher = torch.randn(n, K, generator=g)
    target = teacher.argmax(1)
    prev = torch.where(torch.rand(n, generator=g) < 0.7, target, torch.randint(K, (n,), generator=g))
    lucky = prev == target           # exit 1 agrees exactly where exit 0 did
    cur = torch.where(lucky, target, (target + 1) % K)
    logits = [torch.nn.functional.one_hot(prev, K).float() * 2,
              torch.nn.functional.one_hot(cur, K).float() * 2 + 0.1 * torch.randn(n, K, generator=g)]
    fit = torch.arange(n) < n // 2
    out = other_scores(logits, teacher, fit)
    assert set(out) == {"margin", "ensemble", "learned agreement"}
    for conf, agree in out.values():
        assert conf.shape == (2, n) and bool(torch.isfinite(conf).all())
        assert agree is None or agree.shape == (2, n)
    learned = out["learned agreement"][0][1, ~fit]
    agrees = lucky[~fit]
    assert float(learned[agrees].mean()) > float(learned[~agrees].mean()) + 0.5


def test_tools_read_runtime_settings_from_the_command_line():
    from tools.experiment import runtime_settings
    assert runtime_settings("max_miss_overhead=0.05,train_every=500,latency_weight=None") == \
        {"max_miss_overhead": 0.05, "train_every": 500, "latency_weight": None}
    assert runtime_settings("") == {}


def test_detection_demo_bad_runtime_settings_are_one_line(tmp_path: Path, capsys) -> None:
    """Checked before anything is built or written: one line that names the setting."""
    from tools.detection_demo import main
    for i, (bad, says) in enumerate((
            (["--runtime-settings", "bogus=3"], "unknown runtime setting"),
            (["--runtime-settings", "correlation_block_rows=0"], "correlation_block_rows must be"),
            (["--runtime-settings", "holdout_block_rows=10,holdout_gap_rows=10"],
             "holdout_gap_rows in"))):
        out = tmp_path / str(i)
        assert main(bad + ["--frames", "200", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: runtime settings") and says in err and "\n" not in err
        assert not out.exists()


def test_detection_demo_unknown_exit_is_one_line_naming_the_cut_points(tmp_path: Path,
                                                                      capsys) -> None:
    """``--exits`` names body cut points; a wrong one is refused before anything is written."""
    from tools.detection_demo import main
    out = tmp_path / "out"
    assert main(["--exits", "layer2,nosuch", "--frames", "200", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not cut points of the body: nosuch") and "\n" not in err
    assert "layer1" in err and "layer3" in err    # the valid names, to pick from
    assert not out.exists()


def test_demo_times_the_cache_and_the_backbone_in_their_fastest_cpu_modes(
        teacher_pt2, teacher_artifact, tmp_path: Path) -> None:
    """The demo's "best CPU modes" compute the same models as the TorchScript files it times
    beside them: the cache's ONNX export, the frozen backbone and its plain onnxruntime export
    all answer as the artifact (exits off: the backbone) does."""
    from compiler import artifact
    from tools.demo import BACKBONE_MODES, CACHE_MODES, best_modes
    module = artifact.load(str(teacher_artifact))[0]
    shape = tuple(artifact.read_manifest(str(teacher_artifact))["input_shape"])
    modes = best_modes(str(teacher_pt2), teacher_artifact, shape, tmp_path)
    assert set(modes) | {"cached", "backbone"} == set(CACHE_MODES) | set(BACKBONE_MODES)
    x = torch.randn((5,) + shape[1:], generator=torch.Generator().manual_seed(0))
    want = module(x)
    for name, fn in modes.items():
        got = fn(x)
        got = torch.as_tensor(got[0] if isinstance(got, list) else got)
        assert torch.allclose(got, want, atol=1e-4), name


def test_backbone_modes_of_a_transformer_program_run_at_any_batch(tmp_path: Path) -> None:
    """A torch.export ViT: tracing fixes its batch (its sizes are plain ints) and the
    TorchScript exporter cannot take its attention; the frozen mode scripts the program's graph
    instead and the plain export falls back to the torch.export-based exporter, so both answer
    as the program does at a batch size they were not built with."""
    from tools.backbones import build
    from tools.timing import backbone_modes
    torch.manual_seed(0)
    model = build("vit_tiny", 10, 1).eval()
    torch.nn.init.normal_(model.heads.head.weight)   # torchvision starts it at zero
    program = torch.export.export(model, (torch.randn(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    frozen, session = backbone_modes(program, torch.zeros(1, 1, 28, 28), tmp_path / "vit.onnx")
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = program(x)
        assert float(want.std()) > 0.1
        assert torch.allclose(frozen(x), want, atol=1e-4)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4)


def test_demo_best_modes_that_cannot_be_built_are_a_line_not_a_failure(tmp_path: Path,
                                                                       capsys) -> None:
    from tools.demo import best_modes
    assert best_modes(str(tmp_path / "missing.pt2"), tmp_path / "missing.cached.pt",
                      (1, 1, 28, 28), tmp_path) == {}
    out = capsys.readouterr().out
    assert out.startswith("  (the best CPU modes are not timed: ") and out.count("\n") == 1


def test_miss_probe_times_every_exit_three_ways(teacher_artifact, tmp_path: Path) -> None:
    import json
    from tools.miss_probe import main
    assert main([str(teacher_artifact), "--reps", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "miss_probe.json").read_text())
    E = len(res["exits"])
    ways = {f"exit {k}: {w}" for k in range(E) for w in ("if", "inline", "sessions")}
    assert ways | {"backbone", "all exits: if",
                   "backbone, TorchScript artifact"} <= set(res["p50_ms"])
    assert all(v > 0 for v in res["p50_ms"].values())
    assert res["vs_backbone"]["backbone"] == 0.0 and res["code"] and res["machine"]


def test_miss_probe_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    from tools.miss_probe import main
    assert main([str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: artifact") and "\n" not in err


def test_gil_probe_times_plan_builds_and_the_waits_they_cause(teacher_artifact,
                                                              tmp_path: Path) -> None:
    import json

    from compiler import artifact
    from tools.gil_probe import main
    module, manifest = artifact.load(teacher_artifact)
    for i in range(len(manifest["exits"])):
        artifact.set_exit(getattr(module.blocks, str(i)), 0.9)
    on = tmp_path / "exits_on.cached.pt"
    artifact.save(module, manifest, on)
    assert main([str(on), "--builds", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gil_probe.json").read_text())
    assert len(res["builds"]) == 2 and res["code"] and res["machine"]
    m = res["median"]
    assert m["build_ms"] > 0 and 0 < m["longest_wait_ms"] <= m["build_ms"] + 50


@pytest.mark.parametrize("case", ["missing", "exits_off", "builds"])
def test_gil_probe_bad_input_is_one_line(case, teacher_artifact, tmp_path: Path, capsys) -> None:
    from tools.gil_probe import main
    argv = {"missing": [str(tmp_path / "missing.pt")],
            "exits_off": [str(teacher_artifact), "--out", str(tmp_path)],
            "builds": [str(teacher_artifact), "--builds", "0"]}[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "gil_probe.json").exists()


def test_drift_check_bad_runtime_settings_are_one_line(tmp_path: Path, capsys) -> None:
    from tools.drift_check import main
    out = tmp_path / "drift"
    assert main(["--runtime-settings", "doubt_alarm_p=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: runtime settings") and "doubt_alarm_p" in err
    assert "\n" not in err and not out.exists()


def test_drift_check_loaded_part_saves_loads_and_reports_the_alarm(teacher_artifact, fashion_small,
                                                                  tmp_path: Path) -> None:
    """Part (e): an artifact learned and saved, then loaded: stable rows keep its exits on with
    no alarm, inverted ones raise one from the first requests."""
    from compiler import artifact
    from tools.drift_check import learn_and_save, run_loaded
    x = fashion_small[0][5000:19000]
    saved = tmp_path / "learned.pt"
    learned = learn_and_save(str(teacher_artifact), x, 0, 10000, saved, {"train_every": 2000})
    assert any(learned["enabled"]) and saved.exists()
    reference = artifact.load(str(teacher_artifact))[0]
    stable = run_loaded(saved, reference, x[10000:], 0, "none", 2000)
    assert stable["exits_on_at_load"] and stable["drift_events"] == 0
    assert stable["first_alarm_row"] is None and stable["exits_on_at_end"]
    shifted = run_loaded(saved, reference, x[10000:], 0, "inverted", 2000)
    assert shifted["drift_events"] == 1 and shifted["first_alarm_row"] <= 1000
    assert shifted["agreement"] > 0.9 and stable["agreement"] > 0.98


def test_drift_check_photo_frames_are_seeded_and_the_shift_greys_them() -> None:
    from tools.camera import load_photos, photo_folder
    from tools.drift_check import PhotoFrames
    if photo_folder() is None:
        pytest.skip("foolbox's photos are not installed")
    photos = load_photos()[:4]
    a, b = PhotoFrames(photos, 3), PhotoFrames(photos, 3)
    x = a.next(4, False)
    assert x.shape == (4, 3, 224, 224) and torch.equal(x, b.next(4, False))
    g = a.next(4, True) * a.std + a.mean     # back to pixels: grey frames have equal channels
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(g[:, 1], g[:, 2], atol=1e-5)
    assert not torch.allclose(x[:, 0] * a.std[0] + a.mean[0], x[:, 1] * a.std[1] + a.mean[1])


def test_detection_demo_counts_lost_boxes_and_the_items_among_them() -> None:
    from tools.detection_demo import boxes_lost

    def det(boxes, scores, labels):
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.long)}
    item, clutter = [10., 10., 30., 30.], [60., 60., 70., 70.]
    ref = det([item, clutter, [0., 0., 5., 5.]], [0.8, 0.4, 0.1], [1, 2, 3])   # last: below 0.3
    truth = {"boxes": torch.tensor([[11., 10., 30., 31.]]), "labels": torch.tensor([1])}
    empty = det([], [], [])
    assert boxes_lost([empty], [ref], 0.3, [truth]) == (2, 1)          # both kept boxes, one item
    assert boxes_lost([ref], [ref], 0.3, [truth]) == (0, 0)            # the detector's own answer
    assert boxes_lost([det([clutter], [0.4], [2])], [ref], 0.3, [truth]) == (1, 1)
    assert boxes_lost([det([item], [0.8], [1])], [ref], 0.3, [truth]) == (1, 0)
    assert boxes_lost([det([item], [0.8], [2])], [ref], 0.3, [truth]) == (2, 1)  # wrong label
    assert boxes_lost([empty], [ref], 0.3) == (2, 0)                   # no labels: no items


def test_stream_probe_labels_every_request_and_its_time_adds_up(teacher_artifact,
                                                               tmp_path: Path) -> None:
    """Each request gets one kind, one outcome and one round label; what the labels add to
    a phase's mean sums to the phase's excess."""
    import json

    from tools.stream_probe import main
    assert main([str(teacher_artifact), "--rows", "600", "--batch", "8", "--settings",
                 "train_every=200,shadow_rate=0.2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "stream_probe.json").read_text())
    assert res["code"] and res["machine"] and res["batch"] == 8
    phases = res["phases"]
    assert sum(p["requests"] for p in phases.values()) == 600 // 8
    for p in phases.values():
        labels = p["labels"]
        for group in (("kind: plain", "kind: taught", "kind: shadowed"),
                      ("rows: all exited", "rows: some exited", "rows: none exited"),
                      ("round running", "no round")):
            got = [labels[g] for g in group if g in labels]
            assert sum(v["requests"] for v in got) == p["requests"]
            added = sum(v["adds_to_mean_us"] for v in got) * p["requests"] / 1e3
            assert added == pytest.approx(p["excess_ms"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("case", ["missing", "rows", "settings", "stream"])
def test_stream_probe_bad_input_is_one_line(case, teacher_artifact, tmp_path: Path,
                                            capsys) -> None:
    from tools.stream_probe import main
    argv = {"missing": [str(tmp_path / "missing.pt")],
            "rows": [str(teacher_artifact), "--rows", "4", "--batch", "8"],
            "settings": [str(teacher_artifact), "--settings", "shadow_rate=2"],
            "stream": [str(teacher_artifact), "--inputs", "photos"]}[case]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_drift_check_partial_shifts_grow_from_nothing_to_the_whole_shift(fashion_small) -> None:
    """Part (f)'s traffic: no shift at 0, the abrupt shift of part (b) at 1 (a bilinear quarter
    turn is rot90 up to interpolation at the border), and in between part of the way."""
    from tools.drift_check import partial_shift, shift
    x = fashion_small[0][:8]
    for name in ("inverted", "rotated", "noisy"):
        assert torch.equal(partial_shift(name, x, 0, 0.0), x)
    assert torch.allclose(partial_shift("inverted", x, 0, 1.0), shift("inverted", x, 0), atol=1e-5)
    turned, quarter = partial_shift("rotated", x, 0, 1.0), shift("rotated", x, 0)
    assert (turned - quarter)[..., 2:-2, 2:-2].abs().max() < 1e-4
    for name in ("inverted", "rotated", "noisy"):
        half = partial_shift(name, x, 0, 0.5)
        d_half = (half - x).abs().mean()
        assert 0 < d_half < (partial_shift(name, x, 0, 1.0) - x).abs().mean()

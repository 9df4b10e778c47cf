"""Compiler: FLOP counting, cut points, splitting, head budget, the artifact, and the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compiler import artifact
from compiler.analysis.flops import FlopCounter
from compiler.config import RewriteConfig
from compiler.errors import (ArtifactError, ArtifactVersionError, NoCutPointError, TraceFailure,
                             UsageError)
from compiler.heads import MIN_HIDDEN, ExitHead, HeadSpec, plan_heads, pool_grid
from compiler.rewrite import analyse, main, rewrite_module, select_cuts
from compiler.split import split_stages

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_WORDS = (".pt2", "--arch", "--allow-pickle")


# ----- tiny models ----------------------------------------------------------------------------

class SeqCNN(nn.Module):
    """Four conv blocks in a row, then a classifier: a cut point after every block."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU())
        self.b4 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.b4(self.b3(self.b2(self.b1(x)))))


class WholeSkip(nn.Module):
    """The input skips over the whole network: nothing but x alone carries the state."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))

    def forward(self, x):
        return self.body(x) + self.proj(x)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)


class ResNetLet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.block1 = ResBlock(16)
        self.block2 = ResBlock(16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


class Gate(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


class BatchReshape(nn.Module):
    """Flattens with a computed batch size, which torch.export records (or bakes in)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        h = self.f(x)
        return self.fc(h.reshape(h.shape[0], -1))


class WithCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.cumsum(self.conv(x), 3)
        return self.fc(h.mean((2, 3)))


def seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def export_pt2(model, path, shape, dynamic=True):
    example = torch.randn(shape)
    kw = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=1024)},)} if dynamic else {}
    ep = torch.export.export(model, (example,), **kw)
    torch.export.save(ep, str(path))
    return path


def jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


def block(module, i):
    return getattr(module.blocks, str(i))


def blocks(module):
    return list(module.blocks.children())


def run_cli(argv, capsys):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def cli_subprocess(argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "compiler.rewrite", *map(str, argv)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


# ----- FLOPs ----------------------------------------------------------------------------------

def count(fn, *args):
    c = FlopCounter()
    with torch.no_grad(), c:
        fn(*args)
    return c


def test_flops_conv2d():
    c = count(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.randn(1, 3, 8, 8))
    # out positions (8x8) x out channels (8) x kernel (3x3x3) x 2 per multiply-add
    assert c.flops == 2 * 8 * 8 * 8 * 3 * 3 * 3 == 27648
    assert not c.unsupported


def test_flops_linear():
    # [2,16] @ [16,4]: 2 rows x 16 x 4 multiply-adds, 2 FLOPs each. torch's addmm rule
    # (torch.utils.flop_counter) counts the matmul only, not the bias add, and so do we.
    assert count(nn.Linear(16, 4), torch.randn(2, 16)).flops == 2 * 2 * 16 * 4 == 256
    assert count(nn.Linear(16, 4, bias=False), torch.randn(2, 16)).flops == 256


def test_flops_relu_counts_numel():
    assert count(nn.ReLU(), torch.randn(2, 3, 4, 5)).flops == 2 * 3 * 4 * 5


def test_flops_batchnorm_and_pool():
    bn = nn.BatchNorm2d(4).eval()
    assert count(bn, torch.randn(2, 4, 5, 5)).flops == 2 * (2 * 4 * 5 * 5)
    assert count(nn.AdaptiveAvgPool2d(1), torch.randn(2, 4, 5, 5)).flops == 2 * 4 * 5 * 5


def test_flops_sum_over_ops_in_order():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    assert count(m, torch.randn(1, 3, 8, 8)).flops == 27648 + 8 * 8 * 8


def test_unknown_op_is_reported_not_silently_zero():
    c = count(lambda x: torch.cumsum(x, 0), torch.randn(4, 4))
    assert c.unsupported == {"aten.cumsum": 1}
    c = count(lambda x: torch.cumsum(torch.relu(x), 0), torch.randn(4, 4))
    assert c.flops == 16 and c.unsupported["aten.cumsum"] == 1


def test_unknown_op_reaches_report_and_manifest(capsys):
    model = seeded(WithCumsum)
    module, manifest, an = rewrite_module(model, (1, 3, 8, 8), RewriteConfig(num_exits=1))
    assert an.unsupported.get("aten.cumsum", 0) >= 1
    assert manifest["unsupported_ops"].get("aten.cumsum", 0) >= 1
    from compiler.rewrite import format_report
    assert "aten.cumsum" in format_report(an, [])


def test_analysis_total_flops_is_per_row():
    model = seeded(SeqCNN)
    an = analyse(model, (1, 3, 16, 16), RewriteConfig())
    assert an.total_flops == count(model, torch.randn(1, 3, 16, 16)).flops
    assert an.params == sum(p.numel() for p in model.parameters())


# ----- cut points -----------------------------------------------------------------------------

def test_sequential_cnn_has_a_cut_after_each_block():
    an = analyse(seeded(SeqCNN), (1, 3, 16, 16), RewriteConfig())
    names = [c.name for c in an.cuts]
    for blk in ("b1_1", "b2_1", "b3_1", "b4_1"):  # each block's ReLU output
        assert blk in names
    fractions = [c.fraction for c in an.cuts]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] <= 1
    assert [c.position for c in an.cuts] == sorted(c.position for c in an.cuts)
    # right before a ReLU is listed but not preferred
    by_name = {c.name: c for c in an.cuts}
    assert by_name["b2_0"].preferred is False and by_name["b2_1"].preferred is True


def test_whole_network_skip_has_no_cut_point():
    an = analyse(seeded(WholeSkip), (1, 3, 16, 16), RewriteConfig())
    assert an.cuts == []
    with pytest.raises(NoCutPointError, match="no cut point"):
        select_cuts(an, RewriteConfig())


def test_whole_network_skip_cli_error(tmp_path, capsys):
    path = export_pt2(seeded(WholeSkip), tmp_path / "skip.pt2", (2, 3, 16, 16))
    rc, out, err = run_cli([path], capsys)
    assert_one_line_error(rc, err, "no cut point")
    assert not (tmp_path / "skip.cached.pt").exists()


class ChannelsLast(nn.Module):
    """Swin-like: a conv stem, then blocks that read [B, H, W, C] (LayerNorm and Linear over
    the last dim), then back to [B, C, H, W] for the classifier's pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
                                    for _ in range(4))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            h = h + block(h)
        return self.fc(h.permute(0, 3, 1, 2).mean(dim=(2, 3)))


def _as_routed(model, shape, route):
    """``model`` as the compiler gets it: the module (fx traces it) or a torch.export program."""
    if route == "module":
        return model
    return torch.export.export(model, (torch.randn(2, *shape[1:]),),
                               dynamic_shapes=({0: torch.export.Dim("batch")},)).module()


class Upsampled(nn.Module):
    """Channels-first maps that a bilinear upsampling reads (not a Linear, whatever its op's
    name holds)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="bilinear")
        h = torch.relu(self.b(h))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("route", ["module", "pt2"])
def test_a_bilinear_upsampling_reads_no_channels_last_map(route):
    model = seeded(Upsampled)
    shape = (1, 3, 8, 8)
    source = _as_routed(model, shape, route)
    an = analyse(source, shape, RewriteConfig(), exported=route == "pt2")
    assert an.cuts and not any(c.channels_last for c in an.cuts), \
        [(c.name, c.channels_last) for c in an.cuts]


@pytest.mark.parametrize("route", ["module", "pt2"])
def test_a_channels_last_map_is_found_and_its_head_pools_height_and_width(route, tmp_path):
    """A [B, H, W, C] map is pooled over H and W, not over W and C as if H were channels:
    the layout is read from what uses the map (a LayerNorm or Linear over its last dim, a
    permute to [B, C, H, W], a conv), through a torch.fx trace and a torch.export program."""
    model = seeded(ChannelsLast)
    shape = (1, 3, 12, 10)
    source = _as_routed(model, shape, route)
    module, manifest, an = rewrite_module(source, shape, RewriteConfig(num_exits=3),
                                          exported=route == "pt2")
    layout = {c.name: c.channels_last for c in an.cuts}
    hwc = [c for c in an.cuts if c.channels_last]
    assert hwc and all(c.shape[1:] == (12, 10, 8) for c in hwc)
    assert not any(v for n, v in layout.items() if "stem" in n or "conv" in n)
    pools = {e["name"]: e["head"]["pool"] for e in manifest["exits"]}
    assert any(p.endswith("_hwc") for p in pools.values()), pools
    assert all(p.endswith("_hwc") == layout[n] for n, p in pools.items()), pools
    from compiler.rewrite import format_report
    assert format_report(an, list(pools)).count("(HWC)") == len(hwc) + 1   # rows and legend
    # feature_dim counts the 8 channels (global pooling: 16; a k x k grid: 2 k k 8)
    assert all(e["head"]["feature_dim"] % 16 == 0 for e in manifest["exits"])
    path = tmp_path / "hwc.cached.pt"
    artifact.save(module, manifest, path)
    loaded, _ = artifact.load(path)
    x = torch.randn(4, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_cut_point_inside_a_residual_block():
    model = seeded(ResNetLet)
    an = analyse(model, (1, 3, 16, 16), RewriteConfig())
    nodes = list(an.gm.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    names = [c.name for c in an.cuts]
    assert "stem_1" in names and "block1_relu2" in names and "block2_relu2" in names
    for blk in ("block1", "block2"):
        inside = [n for n in names if n.startswith(blk + "_") and n != blk + "_relu2"]
        assert inside == [], inside
        first = min(pos[n.name] for n in nodes if n.name.startswith(blk + "_"))
        add = next(n for n in nodes if n.name.startswith("add") and
                   any(a.name.startswith(blk + "_") for a in n.all_input_nodes))
        assert not any(first <= c.position < pos[add.name] for c in an.cuts)


# ----- split ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SeqCNN, ResNetLet])
def test_chained_stages_equal_the_original(cls):
    model = seeded(cls)
    an = analyse(model, (1, 3, 16, 16), RewriteConfig())
    cuts = [c.name for c in an.cuts if c.preferred][:3]
    assert len(cuts) >= 2
    stages = split_stages(an.gm, cuts)
    assert len(stages) == len(cuts) + 1
    x = torch.randn(5, 3, 16, 16)
    h = x
    with torch.no_grad():
        for s in stages:
            s.graph.lint()
            h = s(h)
        torch.testing.assert_close(h, model(x), atol=1e-6, rtol=1e-6)


# ----- head budget ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "demo_resnet", "mobilenet_v2", "seq_cnn",
    "imagenet_mobilenet_v2",  # 1000 classes: heads must shrink, not fall back to Linear(2C, 1000)
])
def test_heads_fit_the_budget(name):
    if name == "seq_cnn":
        model, shape = seeded(SeqCNN, 10), (1, 3, 32, 32)
    elif name == "imagenet_mobilenet_v2":
        import torchvision
        torch.manual_seed(0)
        model, shape = torchvision.models.mobilenet_v2(weights=None).eval(), (1, 3, 64, 64)
    else:
        from tools.backbones import ARCHS, build
        torch.manual_seed(0)
        spec = ARCHS[name]
        model, shape = build(name, 10, spec.channels).eval(), spec.input_shape(1)
    cfg = RewriteConfig()  # six exits
    module, manifest, an = rewrite_module(model, shape, cfg)
    heads = sum(e["head"]["params"] for e in manifest["exits"])
    assert manifest["exits"], "no exit placed"
    scripted = sum(p.numel() for b in blocks(module) for p in b.head.parameters())
    assert heads == scripted
    assert heads <= cfg.head_budget * an.params


def test_heads_of_a_model_too_small_for_the_budget_are_smallest_and_flagged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    cfg = RewriteConfig(num_exits=1)  # 898 params: budget 44, the smallest head has 170
    _, manifest, an = rewrite_module(model, (1, 3, 16, 16), cfg)
    assert manifest["head_budget_exceeded"]
    assert [e["head"]["hidden"] for e in manifest["exits"]] == [0]  # a lone Linear
    big = rewrite_module(model, (1, 3, 16, 16), RewriteConfig(num_exits=1, head_budget=1.0))[1]
    assert not big["head_budget_exceeded"]


def test_plan_heads_respects_budget_directly():
    specs = plan_heads([(-1, 512, 7, 7)] * 4, 1000, 80000)  # 20k each: only a bottleneck fits
    assert sum(s.params() for s in specs) <= 80000
    assert all(s.hidden >= 8 for s in specs)


def test_max_feature_dim_pools_wide_layers_coarser_so_the_runtime_buffers_enough_rows():
    wide = [(-1, 256, 28, 28), (-1, 1024, 14, 14), (-1, 2048, 7, 7)]     # ResNet-50-like
    free = plan_heads(wide, 1000, 3 * 10 ** 6)
    capped = plan_heads(wide, 1000, 3 * 10 ** 6, max_feature_dim=4096)
    assert [s.feature_dim for s in free] == [8192, 32768, 36864]       # 4x4, 4x4, 3x3 cells
    assert [s.pool for s in capped] == ["avgmax2x2", "avgmax", "avgmax"]
    assert [s.feature_dim for s in capped] == [2048, 2048, 4096]       # global pooling stays
    assert all(c.hidden >= f.hidden for c, f in zip(capped, free))     # the budget goes to depth
    narrow = [(-1, 16, 28, 28), (-1, 64, 7, 7)]                          # under the cap: as before
    assert plan_heads(narrow, 10, 10 ** 5, 4096) == plan_heads(narrow, 10, 10 ** 5)
    cfg = RewriteConfig()
    assert cfg.max_feature_dim == 1024
    with pytest.raises(UsageError, match="--max-feature-dim"):
        RewriteConfig(max_feature_dim=-5).validate()


def test_plan_heads_prefers_a_finer_grid_where_channels_are_few():
    from tools.backbones import ARCHS, build

    # The demo backbone's share per exit under the configured budget, as the compiler sizes it.
    cfg = RewriteConfig()
    demo = build("demo_resnet", 10, ARCHS["demo_resnet"].channels)
    share = int(cfg.head_budget * sum(p.numel() for p in demo.parameters())) // cfg.num_exits
    early, mid, late = plan_heads([(-1, 16, 28, 28), (-1, 32, 14, 14), (-1, 128, 4, 4)], 10,
                                  3 * share)
    assert early.pool == "avgmax4x4"                             # few channels: finest grid
    assert early.hidden >= MIN_HIDDEN                            # the budget buys a hidden layer
    grids = [pool_grid(s.pool) for s in (early, mid, late)]      # 0: global pooling
    assert grids == sorted(grids, reverse=True)                  # never finer where deeper
    assert grids[2] < 4                                          # a 4x4 map is not pooled to 4x4
    assert all(s.params() <= share for s in (early, mid, late))
    assert all(s.hidden == 0 or s.hidden >= MIN_HIDDEN for s in (early, mid, late))
    # A grid is never wider than the map it pools.
    assert plan_heads([(-1, 4, 2, 2)], 10, 10 ** 6)[0].pool == "avgmax"


def test_token_heads_read_the_first_token_and_old_token_heads_still_pool():
    """A [B, T, C] cut (a transformer's tokens) gets "clstokens": its first token (a ViT's class
    token) beside the tokens' mean and max; artifacts from before keep "tokens" (mean, max)."""
    from compiler.heads import Pool
    spec = plan_heads([(-1, 50, 64)], 10, 10 ** 6)[0]
    assert (spec.pool, spec.feature_dim) == ("clstokens", 3 * 64)
    h = torch.randn(2, 50, 64)
    got = Pool("clstokens")(h)
    assert torch.equal(got[:, :64], h[:, 0])
    assert torch.equal(got[:, 64:], Pool("tokens")(h))
    assert ExitHead(HeadSpec("tokens", 128, 0, 10))(h).shape == (2, 10)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown head pooling"):
        ExitHead(HeadSpec("avgmax5x5", 10, 0, 2))


# ----- the artifact ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seq_artifact(tmp_path_factory):
    """(model, scripted artifact, manifest, saved path) of SeqCNN with three exits."""
    model = seeded(SeqCNN)
    module, manifest, _ = rewrite_module(model, (1, 3, 16, 16), RewriteConfig(num_exits=3))
    path = tmp_path_factory.mktemp("seq") / "seq.cached.pt"
    artifact.save(module, manifest, path)
    return model, module, manifest, path


def test_artifact_equals_original_with_exits_inactive(seq_artifact):
    model, module, manifest, path = seq_artifact
    loaded, manifest2 = artifact.load(path)
    assert manifest2 == manifest
    assert len(manifest["exits"]) == len(blocks(loaded)) >= 2
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (1, 3, 5):
            x = torch.randn(n, 3, 16, 16, generator=g)
            want = model(x)
            for m in (module, loaded):
                out, exits = m.forward_with_exits(x)
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
                assert exits.tolist() == [len(blocks(m))] * n


def test_artifact_loads_in_a_fresh_interpreter_without_the_project(seq_artifact, tmp_path):
    model, _, _, path = seq_artifact
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "ref.pt")
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('compiler', 'runtime', 'tools'):
            raise ImportError('project code must not be needed: ' + name)
sys.meta_path.insert(0, Block())
import torch
m = torch.jit.load({str(path)!r})
ref = torch.load('ref.pt')
with torch.no_grad():
    y = m(ref['x'])
    y2, ex = m.forward_with_exits(ref['x'])
print(float((y - ref['y']).abs().max()), float((y2 - ref['y']).abs().max()), ex.tolist())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d1, d2, exits = r.stdout.strip().splitlines()[-1].split(" ", 2)
    assert float(d1) < 1e-5 and float(d2) < 1e-5
    assert json.loads(exits) == [3, 3, 3, 3]


def _confidences(module, x):
    """Per-exit softmax confidence of every row (each head on its own stage's output)."""
    confs, h = [], x
    with torch.no_grad():
        for b in blocks(module):
            h = b.stage(h)
            confs.append(torch.softmax(b.head(h), 1).amax(1))
    return confs


def test_thresholds_and_enabled_are_state(seq_artifact, tmp_path):
    _, _, _, path = seq_artifact
    m = jit_load(path)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(x)
        b0 = block(m, 0)
        b0.enabled.fill_(True)
        b0.threshold.fill_(0.0)
        out, exits = m.forward_with_exits(x)
        assert exits.tolist() == [0] * 6
        torch.testing.assert_close(out, b0.head(b0.stage(x)))
        b0.threshold.fill_(2.0)
        out, exits = m.forward_with_exits(x)
        assert exits.tolist() == [len(blocks(m))] * 6
        torch.testing.assert_close(out, full)
        # Disabled with threshold 0: the flag wins.
        b0.enabled.fill_(False)
        b0.threshold.fill_(0.0)
        assert m.forward_with_exits(x)[1].tolist() == [len(blocks(m))] * 6
        # The state travels with the file.
        b0.enabled.fill_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.save is deprecated, still the format
            torch.jit.save(m, str(tmp_path / "state.pt"))
        assert jit_load(tmp_path / "state.pt").forward_with_exits(x)[1].tolist() == [0] * 6


def test_mixed_thresholds_keep_input_order(seq_artifact):
    _, _, _, path = seq_artifact
    m = jit_load(path)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    confs = _confidences(m, x)
    for i, c in enumerate(confs[:2]):
        block(m, i).enabled.fill_(True)
        block(m, i).threshold.fill_(float(c.quantile(0.6)))
    with torch.no_grad():
        out, exits = m.forward_with_exits(x)
        rows = [m.forward_with_exits(x[i:i + 1]) for i in range(len(x))]
    assert len(set(exits.tolist())) >= 3, exits  # rows leave at exit 0, exit 1 and the end
    assert exits.tolist() == [int(e) for _, e in rows]
    torch.testing.assert_close(out, torch.cat([o for o, _ in rows]), atol=1e-5, rtol=1e-5)
    # and each row's output is its exit's head output
    e0 = exits == 0
    with torch.no_grad():
        torch.testing.assert_close(out[e0], block(m, 0).head(block(m, 0).stage(x))[e0])


# ----- manifest -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pt2_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt2")
    model = seeded(SeqCNN)
    return model, export_pt2(model, folder / "seq.pt2", (2, 3, 16, 16))


def test_cli_pt2_default_output_and_manifest(pt2_model, capsys):
    model, path = pt2_model
    out_path = path.with_name("seq.cached.pt")
    rc, out, err = run_cli([path], capsys)
    assert rc == 0, err
    assert out_path.is_file() and str(out_path) in out
    manifest = artifact.read_manifest(out_path)
    assert manifest["format_version"] == artifact.FORMAT_VERSION
    assert manifest["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["source_kind"] == "pt2"
    assert manifest["input_shape"] == [-1, 3, 16, 16]
    m = jit_load(out_path)
    assert len(manifest["exits"]) == len(blocks(m)) >= 1
    assert all(0 < e["fraction"] < 1 and e["head"]["params"] > 0 for e in manifest["exits"])
    assert len(manifest["stage_flops"]) == len(blocks(m)) + 1
    assert sum(manifest["stage_flops"]) == manifest["total_flops"]
    x = torch.randn(7, 3, 16, 16)  # dynamic batch: any size works
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-5)


def test_cli_output_option(pt2_model, tmp_path, capsys):
    _, path = pt2_model
    target = tmp_path / "elsewhere" / "x.pt"
    target.parent.mkdir()
    rc, out, err = run_cli([path, "-o", target], capsys)
    assert rc == 0, err
    assert artifact.read_manifest(target)["format_version"] == artifact.FORMAT_VERSION
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.pt"]  # no temp files left


def test_other_format_version_is_refused(seq_artifact, tmp_path):
    _, module, manifest, _ = seq_artifact
    path = tmp_path / "v999.cached.pt"
    artifact.save(module, dict(manifest, format_version=999), path)
    for fn in (artifact.read_manifest, artifact.load):
        with pytest.raises(ArtifactVersionError) as info:
            fn(path)
        msg = str(info.value)
        assert "format version 999" in msg and f"version {artifact.FORMAT_VERSION}" in msg
        assert "compiler.rewrite" in msg  # says how to fix it


@pytest.mark.parametrize("version", [1, 2])
def test_older_artifacts_still_load(seq_artifact, tmp_path, caplog, version):
    """Version 2 only added poolings, version 3 the content hash: a version 1 or 2 file (no
    hash, written as the code of its day wrote it) reads as before, with a warning; saving it
    again writes version 3."""
    model, module, manifest, _ = seq_artifact
    path = tmp_path / f"v{version}.cached.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, str(path), _extra_files={
            artifact.MANIFEST_FILE: json.dumps(dict(manifest, format_version=version))})
    with caplog.at_level("WARNING", logger="layer_cache.artifact"):
        loaded, m = artifact.load(path)
    assert m["format_version"] == version and artifact.content_sha256(path) is None
    assert "no content hash" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)
    again = tmp_path / "again.cached.pt"
    artifact.save(loaded, m, again)
    assert artifact.read_manifest(again)["format_version"] == artifact.FORMAT_VERSION
    assert artifact.content_sha256(again) is not None


def test_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk" * 10)
    with pytest.raises(ArtifactError, match="corrupt"):
        artifact.load(tmp_path / "junk.pt")


# ----- CLI inputs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_state_dict(tmp_path_factory):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("sd") / "r18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_cli_state_dict_with_arch(resnet18_state_dict, tmp_path, capsys):
    model, path = resnet18_state_dict
    out_path = tmp_path / "r18.cached.pt"
    rc, out, err = run_cli([path, "--arch", "resnet18", "--num-classes", "10",
                            "--input-shape", "1,3,64,64", "-o", out_path], capsys)
    assert rc == 0, err
    m = jit_load(out_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), atol=1e-4, rtol=1e-4)
    manifest = artifact.read_manifest(out_path)
    assert manifest["source_kind"] == "state_dict" and manifest["num_classes"] == 10


def test_cli_state_dict_without_arch(resnet18_state_dict, capsys):
    _, path = resnet18_state_dict
    assert_one_line_error(*run_cli([path], capsys)[::2], "--arch")


def test_cli_unknown_arch(resnet18_state_dict, capsys):
    _, path = resnet18_state_dict
    assert_one_line_error(*run_cli([path, "--arch", "resnet9000"], capsys)[::2], "resnet9000",
                          "--arch")


def test_cli_state_dict_wrong_arch(resnet18_state_dict, capsys):
    _, path = resnet18_state_dict
    assert_one_line_error(*run_cli([path, "--arch", "resnet34"], capsys)[::2], "resnet34",
                          "does not fit")


def test_cli_wrong_input_shape_is_one_line(resnet18_state_dict, capsys):
    _, path = resnet18_state_dict
    rc, out, err = run_cli([path, "--arch", "resnet18", "--input-shape", "1,1,64,64"], capsys)
    assert_one_line_error(rc, err, "--input-shape")


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickle")
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 5 * 5, 10)).eval()
    torch.save(seq, folder / "seq.pkl")
    torch.save(seeded(Untraceable), folder / "untraceable.pkl")
    return seq, folder


def test_cli_pickle_refused_without_flag(pickled, capsys):
    _, folder = pickled
    rc, out, err = run_cli([folder / "seq.pkl", "--input-shape", "1,3,16,16"], capsys)
    assert_one_line_error(rc, err, "--allow-pickle")
    assert not (folder / "seq.cached.pt").exists()


def test_cli_pickle_with_flag(pickled, tmp_path, capsys):
    seq, folder = pickled
    out_path = tmp_path / "seq.cached.pt"
    rc, out, err = run_cli([folder / "seq.pkl", "--allow-pickle", "--input-shape", "1,3,16,16",
                            "-o", out_path], capsys)
    assert rc == 0, err
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(jit_load(out_path)(x), seq(x), atol=1e-5, rtol=1e-5)
    assert artifact.read_manifest(out_path)["source_kind"] == "pickle"


def test_cli_pickle_without_input_shape(pickled, capsys):
    _, folder = pickled
    assert_one_line_error(*run_cli([folder / "seq.pkl", "--allow-pickle"], capsys)[::2],
                          "--input-shape")


def test_cli_torchscript_file(tmp_path, capsys):
    path = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(seeded(SeqCNN)), str(path))
    assert_one_line_error(*run_cli([path], capsys)[::2], "TorchScript", *SUPPORTED_WORDS)


GARBAGE = {
    "text": b"hello world\n" * 50,
    "empty": b"",
    "broken_zip": b"PK\x03\x04garbage" * 20,
    "binary": b"\x00not a model\xff" * 100,
}


@pytest.mark.parametrize("kind", ["text", "empty", "broken_zip", "binary"])
def test_cli_garbage_file(tmp_path, capsys, kind):
    path = tmp_path / "model.bin"
    path.write_bytes(GARBAGE[kind])
    line = assert_one_line_error(*run_cli([path], capsys)[::2], str(path), *SUPPORTED_WORDS[:2])
    assert "pickled module" not in line


def test_cli_missing_file(tmp_path, capsys):
    assert_one_line_error(*run_cli([tmp_path / "nope.pt2"], capsys)[::2], "does not exist",
                          *SUPPORTED_WORDS)


def test_cli_untraceable_model_names_leaf_module(pickled, capsys):
    _, folder = pickled
    rc, out, err = run_cli([folder / "untraceable.pkl", "--allow-pickle", "--input-shape",
                            "1,3,16,16"], capsys)
    line = assert_one_line_error(rc, err, "--leaf-module", "gate")
    assert "cannot trace" in line


def test_untraceable_model_raises_trace_failure():
    with pytest.raises(TraceFailure, match="--leaf-module"):
        rewrite_module(seeded(Untraceable), (1, 3, 16, 16))
    module, manifest, an = rewrite_module(seeded(Untraceable), (1, 3, 16, 16),
                                          RewriteConfig(leaf_modules=["gate"]))
    assert any(n.op == "call_module" and n.target == "gate" for n in an.gm.graph.nodes)


@pytest.mark.parametrize("leaf", ["gate", "Gate"])
def test_cli_leaf_module_makes_it_work(pickled, tmp_path, capsys, leaf):
    _, folder = pickled
    out_path = tmp_path / "u.cached.pt"
    rc, out, err = run_cli([folder / "untraceable.pkl", "--allow-pickle", "--input-shape",
                            "1,3,16,16", "--leaf-module", leaf, "-o", out_path], capsys)
    assert rc == 0, err
    model = torch.load(folder / "untraceable.pkl", weights_only=False)
    m = jit_load(out_path)
    with torch.no_grad():
        for sign in (1, -1):  # both branches of the data-dependent `if` survive
            x = sign * torch.rand(3, 3, 16, 16)
            torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-5)
    assert artifact.read_manifest(out_path)["config"]["leaf_modules"] == [leaf]


def test_cli_report_and_json(pt2_model, tmp_path, capsys):
    _, path = pt2_model
    js = tmp_path / "analysis.json"
    out_path = tmp_path / "r.cached.pt"
    rc, out, err = run_cli([path, "--report", "--json", js, "-o", out_path], capsys)
    assert rc == 0, err
    data = json.loads(js.read_text())
    names = [c["name"] for c in data["cut_points"]]
    assert len(names) >= 4 and set(data["chosen"]) <= set(names)
    assert data["chosen"] == [e["name"] for e in data["manifest"]["exits"]]
    for c in data["cut_points"]:
        assert {"name", "fraction", "flops_before", "shape", "bytes", "score"} <= set(c)
    assert "cut point" in out and "MFLOPs" in out
    table = [ln for ln in out.splitlines() if any(ln[2:].startswith(n + " ") for n in names)]
    assert len(table) == len(names)
    assert sorted(ln[2:].split()[0] for ln in table if ln.startswith("*")) == sorted(data["chosen"])


def test_cli_dry_run_and_named_exits(pt2_model, tmp_path, capsys):
    _, path = pt2_model
    out_path = tmp_path / "dry.cached.pt"
    js = tmp_path / "dry.json"
    rc, out, err = run_cli([path, "--dry-run", "-o", out_path, "--json", js], capsys)
    assert rc == 0 and not out_path.exists() and "cut point" in out
    data = json.loads(js.read_text())
    assert data["manifest"] is None
    names = [c["name"] for c in data["cut_points"] if c["preferred"]]
    pick = [names[0], names[2]]
    rc, out, err = run_cli([path, "--exits", f"{pick[1]},{pick[0]}", "-o", out_path], capsys)
    assert rc == 0, err
    assert [e["name"] for e in artifact.read_manifest(out_path)["exits"]] == pick
    assert_one_line_error(*run_cli([path, "--exits", "nowhere", "-o", out_path], capsys)[::2],
                          "nowhere", "--report")


# ----- errors through a real process: exit code, one line, no traceback -------------------------

def test_cli_subprocess_errors(tmp_path):
    export_pt2(seeded(WholeSkip), tmp_path / "skip.pt2", (2, 3, 16, 16))
    (tmp_path / "junk.pt").write_bytes(b"hello world\n" * 50)
    for argv, word in [(["junk.pt"], "not a model file"), (["skip.pt2"], "no cut point")]:
        r = cli_subprocess(argv, tmp_path)
        assert_one_line_error(r.returncode, r.stderr, word)
        assert r.stdout == ""


def test_cli_broken_pt2_archive(tmp_path, capfd):
    with zipfile.ZipFile(tmp_path / "bad.pt2", "w") as z:
        z.writestr("foo.txt", "not an exported program")
    rc = main([str(tmp_path / "bad.pt2")])
    _, err = capfd.readouterr()  # file-descriptor level: logging handlers write there too
    assert_one_line_error(rc, err, "bad.pt2")


# ----- batch size handling of .pt2 programs --------------------------------------------------

def test_pt2_static_batch_1(tmp_path, capsys):
    """Exported at batch 1, the reshape bakes in 1: the compiler's own example input already
    breaks it, and it says to export with a dynamic batch."""
    model = seeded(BatchReshape)
    path = export_pt2(model, tmp_path / "static1.pt2", (1, 3, 8, 8), dynamic=False)
    rc, out, err = run_cli([path, "-o", tmp_path / "static1.cached.pt"], capsys)
    assert_one_line_error(rc, err, "failed on the example input", "dynamic batch dimension")
    assert not (tmp_path / "static1.cached.pt").exists()


def test_pt2_static_batch_2(tmp_path, capsys):
    """Exported at batch 2, it runs on the example input but not at another batch size: the
    compiler's check at batch 3 catches that and says to export with a dynamic batch."""
    model = seeded(BatchReshape)
    path = export_pt2(model, tmp_path / "static2.pt2", (2, 3, 8, 8), dynamic=False)
    rc, out, err = run_cli([path, "-o", tmp_path / "static2.cached.pt"], capsys)
    assert_one_line_error(rc, err, "fails at batch size 3", "dynamic batch dimension")
    assert not (tmp_path / "static2.cached.pt").exists()


def test_pt2_dynamic_batch_with_computed_reshape(tmp_path, capsys):
    model = seeded(BatchReshape)
    path = export_pt2(model, tmp_path / "dyn.pt2", (2, 3, 8, 8), dynamic=True)
    out_path = tmp_path / "dyn.cached.pt"
    rc, out, err = run_cli([path, "-o", out_path], capsys)
    assert rc == 0, err
    m = jit_load(out_path)
    for n in (1, 3, 5):
        x = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-5)


def test_cached_model_runs_unscripted_with_exits_taken():
    """The same routine runs eagerly (benchmarks compare eager with eager): each row gets the
    head's answer where the head is on and confident enough, the backbone's elsewhere, in
    input order."""
    from compiler.artifact import CachedModel, ExitBlock

    torch.manual_seed(0)
    stage = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    block = ExitBlock(stage, ExitHead(HeadSpec("avgmax", 8, 0, 5)))
    model = CachedModel([block], final).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        backbone = final(stage(x))
        head = block.head(stage(x))
        conf = torch.softmax(head, 1).amax(1)
        threshold = conf.median().item()              # about half the rows leave at the head
        expect_exit = torch.where(conf >= threshold, 0, 1)
        assert 0 < int((expect_exit == 0).sum()) < 6
        runs = {}
        for enabled, t in ((True, 0.0), (True, threshold), (False, 0.0)):
            block.enabled.fill_(enabled)
            block.threshold.fill_(t)
            runs[enabled, t] = model.forward_with_exits(x)
    out, exits = runs[True, 0.0]                       # every row leaves at the head
    assert exits.tolist() == [0] * 6
    torch.testing.assert_close(out, head)
    out, exits = runs[True, threshold]                 # confident rows leave, the rest go on
    assert torch.equal(exits, expect_exit)
    torch.testing.assert_close(out, torch.where((expect_exit == 0)[:, None], head, backbone))
    out, exits = runs[False, 0.0]                      # an exit that is off takes nothing
    assert exits.tolist() == [1] * 6
    torch.testing.assert_close(out, backbone)

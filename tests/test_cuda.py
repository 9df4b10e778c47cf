"""CUDA paths: skipped on machines without a GPU (CI never has one)."""
import pytest
import torch
from torch import nn

from runtime.cuda_graphs import GraphedStage

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _stage():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


def test_graphed_stage_runs_eagerly_on_cpu():
    stage = _stage()
    g = GraphedStage(stage)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(g(x), stage(x))
    assert not g.graphs  # nothing captured off the GPU


@cuda
@pytest.mark.parametrize("n", [1, 3, 16, 200])
def test_graphed_stage_matches_eager_on_cuda(n):
    stage = _stage().cuda()
    g = GraphedStage(stage)
    x = torch.randn(n, 3, 8, 8, device="cuda")
    with torch.no_grad():
        want = stage(x)
        got = g(x)
        again = g(x + 1)  # replays reuse the static buffers: the first result must not change
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert again.shape == want.shape
    assert not g.failed


@cuda
def test_runtime_on_cuda_matches_artifact(tmp_path):
    import runtime
    from compiler import artifact
    from compiler.rewrite import rewrite_module

    model = nn.Sequential(_stage(), _stage_8(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    module, manifest, _ = rewrite_module(model, (1, 3, 8, 8))
    path = tmp_path / "m.cached.pt"
    artifact.save(module, manifest, path)
    rt = runtime.load(path, device="cuda", background=False)
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        want = module(x)
    got = rt.predict(x.cuda()).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _stage_8():
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()

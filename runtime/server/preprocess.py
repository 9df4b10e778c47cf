"""Image presets: encoded PNG/JPEG bytes to the model's normalised input, with torchvision transforms.

The target size and channel count come from the model's input shape ``(C, H, W)``; a preset says
how to get there and how to normalise:

- ``fashion-mnist``: grayscale (replicated to 3 channels if the model takes 3), resize to H x W,
  Fashion-MNIST mean/std (``tools/data.py``'s normalisation).
- ``imagenet``: RGB, resize the short side to H * 256 / 224, centre crop H x W, ImageNet mean/std.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import torch

# tools/data.py's statistics, repeated here so the server does not import the tools package.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 64 * 1024 * 1024   # refuse decompression bombs


class ImageError(ValueError):
    """An image row that cannot be decoded; the message names the row."""


class PresetError(ValueError):
    """A preset that does not fit the model's input shape."""


class ImagePreprocessor:
    """Decode and transform a list of encoded images into a float batch ``[N, C, H, W]``."""

    def __init__(self, preset: str, input_shape: Sequence[int], mean: Optional[Sequence] = None,
                 std: Optional[Sequence] = None):
        from torchvision import transforms as T

        if len(input_shape) != 3:
            raise PresetError(f"image preprocessing needs a model input of shape (C, H, W), this "
                              f"model takes {tuple(input_shape)}; start without --preprocess")
        c, h, w = (int(v) for v in input_shape)
        if c not in (1, 3):
            raise PresetError(f"image preprocessing makes 1 or 3 channels, the model takes {c}")
        if preset == "fashion-mnist":
            mode = "L"
            steps = [T.Resize((h, w), antialias=True)]
            mean, std = mean or FASHION_MNIST_MEAN * c, std or FASHION_MNIST_STD * c
        elif preset == "imagenet":
            if c != 3:
                raise PresetError(f"preset 'imagenet' makes RGB images, the model takes {c} "
                                  f"channel(s); use --preprocess fashion-mnist for grayscale")
            mode = "RGB"
            steps = [T.Resize(int(round(h * 256 / 224)), antialias=True), T.CenterCrop((h, w))]
            mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
        else:
            raise PresetError(f"unknown preset {preset!r}; choose fashion-mnist or imagenet")
        if len(mean) != c or len(std) != c:
            raise PresetError(f"mean and std need {c} value(s) each, got {list(mean)} and "
                              f"{list(std)}")
        self.preset, self.mode, self.channels = preset, mode, c
        self.input_shape = (c, h, w)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def describe(self) -> dict:
        return {"preset": self.preset, "size": list(self.input_shape[1:]),
                "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    def _one(self, i: int, data: bytes) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"image row {i}: {img.width}x{img.height} pixels is over the "
                                     f"limit of {MAX_PIXELS}; send a smaller image")
                img.load()
                img = img.convert(self.mode)
                if self.channels == 3 and self.mode == "L":
                    img = img.convert("RGB")
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            raise ImageError(f"image row {i}: cannot decode ({type(e).__name__}: {e}); send PNG "
                             f"or JPEG bytes") from None
        return self.transform(img)

    def __call__(self, images: Sequence[bytes]) -> torch.Tensor:
        return torch.stack([self._one(i, b) for i, b in enumerate(images)])

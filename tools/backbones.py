"""Small-image classification backbones (demo ResNet + CIFAR-style torchvision models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=True)
        # Always a module (Identity when unused) so the fx graph has no
        # data-dependent branching on attributes.
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DemoResNet(nn.Module):
    """CIFAR-style ResNet for 1x28x28 input: 3x3 stem, 4 stages x 2 blocks, GAP, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        strides: tuple[int, ...] = (1, 2, 2, 2),
        blocks_per_stage: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = widths[0]
        for width, stride in zip(widths, strides):
            blocks = [BasicBlock(in_ch, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as
        # identity, which makes short CPU training runs converge faster.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _small_stem_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    # 3x3 stride-1 stem: 32x32 inputs are too small for ImageNet's aggressive
    # early downsampling (it would leave 1x1 feature maps at the end).
    return nn.Conv2d(
        in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None
    )


def _resnet(fn: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build_resnet(num_classes: int, in_channels: int) -> nn.Module:
        m = fn(weights=None, num_classes=num_classes)
        m.conv1 = _small_stem_conv(m.conv1, in_channels)
        m.maxpool = nn.Identity()
        return m

    return build_resnet


def _vgg16_bn(num_classes: int, in_channels: int) -> nn.Module:
    m = torchvision.models.vgg16_bn(weights=None, num_classes=num_classes)
    first = m.features[0]
    m.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    # After 5 max-pools a 32x32 input is 1x1x512; the ImageNet 7x7 pool and the
    # 4096-wide classifier (~120M params) would be pure waste here.
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Sequential(
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )
    return m


def _first_conv_stride1(fn: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    # mobilenet_v2 / efficientnet_b0 both start with features[0] = Conv2dNormActivation
    # whose [0] is a 3x3 stride-2 conv.
    def build_net(num_classes: int, in_channels: int) -> nn.Module:
        m = fn(weights=None, num_classes=num_classes)
        m.features[0][0] = _small_stem_conv(m.features[0][0], in_channels)
        return m

    return build_net


def _vit_tiny(num_classes: int, in_channels: int) -> nn.Module:
    # A small transformer for 28x28 inputs: 4x4 patches (49 tokens and a class token), six
    # encoder blocks of width 64; torchvision's own ViT, so nn.MultiheadAttention inside.
    from torchvision.models.vision_transformer import VisionTransformer
    m = VisionTransformer(image_size=28, patch_size=4, num_layers=6, num_heads=4, hidden_dim=64,
                          mlp_dim=128, num_classes=num_classes)
    m.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=4, stride=4)
    return m


def _swin_tiny(num_classes: int, in_channels: int) -> nn.Module:
    # A small Swin for 28x28 inputs: 2x2 patches (14 x 14, windows of 7 shifted by 3), three
    # stages of width 32 / 64 / 128 (7 x 7 and 4 x 4 maps after patch merging, each within one
    # window, the 4 x 4 padded to it, so neither is shifted). torchvision's own Swin, so its
    # maps are channels-last [B, H, W, C] at every cut point.
    from torchvision.models.swin_transformer import SwinTransformer
    m = SwinTransformer(patch_size=[2, 2], embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
                        window_size=[7, 7], num_classes=num_classes)
    m.features[0][0] = nn.Conv2d(in_channels, 32, kernel_size=2, stride=2)
    return m


@dataclass(frozen=True)
class Arch:
    """How to build an architecture and the input it expects by default."""

    builder: Callable[[int, int], nn.Module]
    size: int  # default spatial size (square)
    channels: int  # default input channels

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.size, self.size)


ARCHS: dict[str, Arch] = {
    "demo_resnet": Arch(lambda nc, ic: DemoResNet(nc, ic), size=28, channels=1),
    "resnet18": Arch(_resnet(torchvision.models.resnet18), size=32, channels=3),
    "resnet50": Arch(_resnet(torchvision.models.resnet50), size=32, channels=3),
    "vgg16_bn": Arch(_vgg16_bn, size=32, channels=3),
    "mobilenet_v2": Arch(_first_conv_stride1(torchvision.models.mobilenet_v2), size=32, channels=3),
    "efficientnet_b0": Arch(
        _first_conv_stride1(torchvision.models.efficientnet_b0), size=32, channels=3
    ),
    "vit_tiny": Arch(_vit_tiny, size=28, channels=1),
    "swin_tiny": Arch(_swin_tiny, size=28, channels=1),
}


def build(arch: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Build ``arch`` (a key of ARCHS) with randomly initialised weights."""
    if arch not in ARCHS:
        raise KeyError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch].builder(num_classes, in_channels)

"""cPreResNet20: the CIFAR pre-activation bottleneck ResNet of network slimming (SPEC 3.12)."""

import torch.nn as nn
import torch.nn.functional as F

from models.init import kaiming_init, redraw_endpoint1
from models.layers import NoOp


class Bottleneck(nn.Module):
    """norm -> selection -> ReLU -> 1x1 conv -> norm -> ReLU -> 3x3 conv -> norm -> ReLU -> 1x1 conv,
    plus the identity or a 1x1 down-sampling conv (no norm)."""

    def __init__(self, factory, in_channels, c1, c2, out_channels, stride, downsample, selected):
        super().__init__()
        self.bn1 = factory.norm(in_channels)
        self.select = factory.selection(in_channels)
        self.select.active = selected < in_channels
        self.conv1 = factory.conv(selected, c1, 1)
        self.bn2 = factory.norm(c1)
        self.conv2 = factory.conv(c1, c2, 3, stride=stride, padding=1)
        self.bn3 = factory.norm(c2)
        self.conv3 = factory.conv(c2, out_channels, 1)
        self.downsample = factory.conv(in_channels, out_channels, 1, stride=stride) if downsample else None
        # In the quantized network the first norm is a no-op (each quantized conv carries its
        # own), and the original's in-place ReLU then rectifies the block input itself: its
        # shortcut and down-sampling conv see relu(x). Every quantized cPreResNet20 result of
        # the original comes from that network, so it is reproduced here (SPEC 3.6).
        self.shortcut_sees_relu = isinstance(self.bn1, NoOp)

    def forward(self, x):
        out = F.relu(self.select(self.bn1(x)))
        if self.shortcut_sees_relu:
            x = out
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class CPreResNet(nn.Module):
    """`widths` maps conv names to output channels and `selected` maps selection names to the
    number of channels they keep; both default to the full network. They describe the
    narrower networks of LEC slimming and of export."""

    expansion = 4

    def __init__(self, factory, num_classes=10, depth=20, widths=None, selected=None):
        super().__init__()
        assert (depth - 2) % 9 == 0, "cPreResNet depth must be 9n + 2"
        blocks_per_stage = (depth - 2) // 9
        widths, selected = widths or {}, selected or {}
        stem = widths.get("conv1", 16)
        self.conv1 = factory.conv(3, stem, 3, padding=1, role="stem")
        stages, in_channels = [], stem
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for index in range(blocks_per_stage):
                name = f"layer{stage}.{index}"
                out = widths.get(f"{name}.conv3", planes * self.expansion)
                blocks.append(Bottleneck(
                    factory, in_channels,
                    widths.get(f"{name}.conv1", planes), widths.get(f"{name}.conv2", planes), out,
                    stride if index == 0 else 1, downsample=index == 0,
                    selected=selected.get(f"{name}.select", in_channels)))
                in_channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = factory.norm(in_channels, role="stem")
        self.select = factory.selection(in_channels)
        final_selected = selected.get("select", in_channels)
        self.select.active = final_selected < in_channels
        self.fc = factory.conv(final_selected, num_classes, 1, role="classifier")
        kaiming_init(self)
        redraw_endpoint1(self, skip=(self.fc,))

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.select(self.bn(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x).flatten(1)

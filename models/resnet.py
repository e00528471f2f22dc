"""ResNet18 (BasicBlock [2, 2, 2, 2]) with a 1x1-conv classifier (SPEC 3.12)."""

import torch.nn as nn
import torch.nn.functional as F

from models.init import kaiming_init


class BasicBlock(nn.Module):
    def __init__(self, factory, in_channels, mid_channels, out_channels, stride, shortcut):
        super().__init__()
        self.conv1 = factory.conv(in_channels, mid_channels, 3, stride=stride, padding=1)
        self.bn1 = factory.norm(mid_channels)
        self.conv2 = factory.conv(mid_channels, out_channels, 3, padding=1)
        self.bn2 = factory.norm(out_channels)
        self.shortcut = None
        if shortcut:
            self.shortcut = nn.Sequential(factory.conv(in_channels, out_channels, 1, stride=stride),
                                          factory.norm(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class ResNet18(nn.Module):
    """`widths` maps conv names to output channels (default: the full network)."""

    def __init__(self, factory, num_classes=1000, widths=None):
        super().__init__()
        widths = widths or {}
        stem = widths.get("conv1", 64)
        self.conv1 = factory.conv(3, stem, 7, stride=2, padding=3, role="stem")
        self.bn1 = factory.norm(stem, role="stem")
        in_channels, stages = stem, []
        for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            blocks = []
            for index in range(2):
                name = f"layer{stage}.{index}"
                block_stride = stride if index == 0 else 1
                out = widths.get(f"{name}.conv2", planes)
                # The structure (which blocks down-sample) is that of the full network.
                shortcut = index == 0 and (block_stride != 1 or stage != 1)
                blocks.append(BasicBlock(factory, in_channels, widths.get(f"{name}.conv1", planes),
                                         out, block_stride, shortcut))
                in_channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = factory.conv(in_channels, num_classes, 1, role="classifier")
        kaiming_init(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x).flatten(1)

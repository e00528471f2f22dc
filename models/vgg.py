"""VGG19 with norm layers (network-slimming variant, SPEC 3.12).

Unlike the original, the classifier sees a globally average-pooled map (SPEC 5), so the
network gives `num_classes` logits on any input size (ImageNet and CIFAR-10).
"""

import torch.nn as nn
import torch.nn.functional as F

from models.init import kaiming_init, redraw_endpoint1

# Output channels of the 16 convs; "M" is a 2x2 max-pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG19(nn.Module):
    """`widths` maps conv names (`convs.<i>`) to output channels (default: the full network)."""

    def __init__(self, factory, num_classes=1000, widths=None):
        super().__init__()
        widths = widths or {}
        convs, norms, self.pool_after = [], [], []
        in_channels = 3
        for item in VGG19_CFG:
            if item == "M":
                self.pool_after[-1] = True
                continue
            index = len(convs)
            out = widths.get(f"convs.{index}", item)
            # The first conv and its norm come from the stem builder, the rest from the body.
            role = "stem" if index == 0 else "body"
            convs.append(factory.conv(in_channels, out, 3, padding=1, role=role))
            norms.append(factory.norm(out, role=role))
            self.pool_after.append(False)
            in_channels = out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.classifier = factory.conv(in_channels, num_classes, 1, role="classifier")
        kaiming_init(self)
        redraw_endpoint1(self, classifier=self.classifier, classifier_std=0.01)

    def forward(self, x):
        for conv, norm, pool in zip(self.convs, self.norms, self.pool_after):
            x = F.relu(norm(conv(x)))
            if pool:
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(x).flatten(1)

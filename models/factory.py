"""The layer factory every network is built from (the original's Builder, without names).

A network asks for `conv(..., role=...)` and `norm(..., role=...)`; the factory decides
which layer class that is for the setting and method. Roles:

* "stem"       the first conv (never compressed; in slimmable nets it keeps 3 inputs)
* "classifier" the last 1x1 conv (never compressed; in slimmable nets it keeps its outputs)
* "body"       every other conv, residual down-sampling convs included (compressed)

Norm roles: "stem" for norms built by the original's stem builder (the final norm of
cPreResNet, the stem norm of ResNet18 and VGG), "body" for the others. In the quantized
setting body norms are no-ops because each quantized conv carries its norm inside.
"""

from dataclasses import dataclass

from models.layers import (ChannelSelection, Conv2d, FrozenQuantConv2d, FrozenQuantLinear, Linear, NoOp, Norm2d,
                           QuantConv2d, QuantLinear, SlimConv2d, SlimLinear, TopKConv2d, TopKLinear)

# "frozen_quant": the quantized body of an exported model (weights already quantized).
BODY_KINDS = ("dense", "slim", "topk", "quant", "frozen_quant")
QUANT_BODIES = ("quant", "frozen_quant")
# A slimmable layer's role: the stem keeps its 3 inputs, the classifier its outputs.
SLIM_ROLES = {"stem": "first", "classifier": "last"}


@dataclass(frozen=True)
class LayerFactory:
    norm_kind: str = "BN"          # BN, IN or GN
    body: str = "dense"            # one of BODY_KINDS
    line_convs: bool = False       # convs carry two endpoints (unstructured/quantized LCS+L)
    line_norms: bool = False       # norms carry two endpoints (every LCS+L variant but quantized BN)
    num_groups: int = 32           # GN only
    num_bits: int = 8              # initial bit width of quantized convs
    # LEC: dense layers whose channels are removed at evaluation, so a converted network's
    # topology must allow channel slimming, as the slimmable body's does.
    prunes_channels: bool = False

    def __post_init__(self):
        assert self.body in BODY_KINDS, self.body

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0, role="body",
             groups=1, dilation=1, bias=False, norm_inside=True):
        """The setting's conv. `norm_inside` (quantized bodies): the conv carries its own norm, as
        every body conv of the three networks does; a converted network's conv that no BatchNorm
        follows directly carries none."""
        args = (in_channels, out_channels, kernel_size, stride, padding)
        shape = {"groups": groups, "dilation": dilation, "bias": bias}
        if self.body == "slim":
            return SlimConv2d(*args, role=SLIM_ROLES.get(role, "body"), **shape)
        if role != "body" or self.body == "dense":
            return Conv2d(*args, line=self.line_convs, **shape)
        if self.body == "topk":
            return TopKConv2d(*args, line=self.line_convs, **shape)
        quant_class = FrozenQuantConv2d if self.body == "frozen_quant" else QuantConv2d
        norm = self._norm(out_channels) if norm_inside else None
        return quant_class(*args, norm=norm, line=self.line_convs, num_bits=self.num_bits, **shape)

    def linear(self, in_features, out_features, bias=True, role="body"):
        """The setting's fully connected layer (converted networks; the three networks end in a
        1x1 conv instead)."""
        if self.body == "slim":
            return SlimLinear(in_features, out_features, bias=bias, role=SLIM_ROLES.get(role, "body"))
        if role != "body" or self.body == "dense":
            return Linear(in_features, out_features, bias=bias, line=self.line_convs)
        if self.body == "topk":
            return TopKLinear(in_features, out_features, bias=bias, line=self.line_convs)
        quant_class = FrozenQuantLinear if self.body == "frozen_quant" else QuantLinear
        return quant_class(in_features, out_features, bias=bias, line=self.line_convs, num_bits=self.num_bits)

    def norm(self, num_features, role="body"):
        if self.body in QUANT_BODIES and role == "body":
            return NoOp()
        return self._norm(num_features)

    def _norm(self, num_features):
        return Norm2d(self.norm_kind, num_features, line=self.line_norms,
                      slim=self.body == "slim", num_groups=self.num_groups)

    def selection(self, num_channels):
        return ChannelSelection(num_channels)


def dense_factory(norm_kind, num_groups=32):
    """Plain layers: what an exported (physically compressed) model is built from."""
    return LayerFactory(norm_kind=norm_kind, body="dense", num_groups=num_groups)


def frozen_quant_factory(norm_kind, num_bits, num_groups=32):
    """The layers of an exported quantized model: fixed bit width, no lines."""
    return LayerFactory(norm_kind=norm_kind, body="frozen_quant", num_groups=num_groups, num_bits=num_bits)

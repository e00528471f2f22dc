"""models/topology.py: the topology of unconverted networks read from one forward pass: execution
order, stem, classifier, conv -> BN pairs, dense leftovers, and whether width slimming is sound
(torchvision networks accepted and refused, each refused kind on a small hand-written network)."""

import time
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.ops import stochastic_depth

from models.topology import REFUSAL_TAIL, analyze
from unit_support import single_thread  # noqa: F401 (autouse fixture)


def image(size=32, batch=2):
    return torch.randn(batch, 3, size, size)


def torchvision_model(name, **kwargs):
    """A torchvision network, untrained. VGG's 100M-parameter classifier takes seconds to
    initialise and the analysis reads no values: VGG is built on the meta device and given zeros
    (RegNet computes its widths from tensors and cannot be built there)."""
    if not name.startswith("vgg"):
        return getattr(tvm, name)(weights=None, **kwargs)
    with torch.device("meta"):
        model = getattr(tvm, name)(weights=None, **kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def stem_mid_head(mid, mid_channels=8):
    """conv 3 -> 8, `mid`, global pool, Linear: names stem, mid, pool, flatten, fc."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), mid=mid, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc=nn.Linear(mid_channels, 10)))


# -- a hand-written chain -----------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)   # defined first, runs last: the order is execution order
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.shared = nn.Conv2d(8, 8, 1, bias=False)   # read by shared_bn AND the residual add
        self.shared_bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.body(x)
        y = self.shared(x)
        x = self.shared_bn(y) + y
        return self.fc(torch.flatten(self.pool(x), 1))


def test_a_hand_written_chain():
    model = Chain().train()
    running_mean = model.stem_bn.running_mean.clone()
    topology = analyze(model, image())
    assert topology.order == ("stem", "body.0", "shared", "fc")
    assert (topology.stem, topology.classifier) == ("stem", "fc")
    # "shared" feeds its BN and the add: folding it into shared_bn would change the add
    assert topology.bn_after == {"stem": "stem_bn", "body.0": "body.1"}
    assert topology.norms == ("stem_bn", "body.1", "shared_bn")
    assert topology.dense == ()
    assert topology.structured_refusal is None
    # run in eval mode (BN statistics untouched), and the model's modes restored
    assert torch.equal(model.stem_bn.running_mean, running_mean)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Failing(Chain):
    def forward(self, x):
        self.stem(x)
        raise RuntimeError("stop")


def test_a_failing_forward_leaves_the_model_as_it_was():
    model = Failing().train()
    with pytest.raises(RuntimeError, match="stop"):
        analyze(model, image())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert analyze(Chain(), image()).order[0] == "stem"   # the next trace starts clean


# -- torchvision ------------------------------------------------------------------------------------
ACCEPTED = [
    ("resnet18", {}, "conv1", "fc"),
    ("resnet50", {}, "conv1", "fc"),
    ("mobilenet_v2", {"width_mult": 0.5}, "features.0.0", "classifier.1"),
    ("mobilenet_v3_small", {"width_mult": 0.5}, "features.0.0", "classifier.3"),
    ("efficientnet_b0", {}, "features.0.0", "classifier.1"),
    ("vgg11_bn", {}, "features.0", "classifier.6"),
]


@pytest.mark.parametrize("name, kwargs, stem, classifier", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_torchvision_networks_that_slim(name, kwargs, stem, classifier):
    model = torchvision_model(name, **kwargs)
    start = time.perf_counter()
    topology = analyze(model, image())
    print(f"analyze({name}) at 32x32: {time.perf_counter() - start:.3f} s")
    assert topology.structured_refusal is None
    assert (topology.stem, topology.classifier) == (stem, classifier)
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(topology.order) == sorted(layers)
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(topology.norms) == sorted(norms)
    assert topology.dense == ()
    # every conv followed by its own BN, and no other
    for conv, bn in topology.bn_after.items():
        assert isinstance(model.get_submodule(conv), nn.Conv2d)
        assert isinstance(model.get_submodule(bn), nn.BatchNorm2d)


def test_the_pairs_of_resnet18():
    topology = analyze(torchvision_model("resnet18"), image())
    assert topology.bn_after["conv1"] == "bn1"
    assert topology.bn_after["layer1.0.conv2"] == "layer1.0.bn2"
    assert topology.bn_after["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(topology.bn_after) == 20   # every conv; fc has no BN


REFUSED = [
    ("regnet_x_400mf", "trunk_output.block1.block1-0.f.b.0 (Conv2d): a grouped conv"),
    ("densenet121", "features.denseblock1.denselayer2 (cat): concatenates 2 tensors along the channel dim"),
    ("shufflenet_v2_x0_5", "stage2.0 (cat): concatenates 2 tensors along the channel dim"),
    ("convnext_tiny", "features.0.1 (LayerNorm2d): a LayerNorm with a forward of its own"),
]


@pytest.mark.parametrize("name, start", REFUSED, ids=[c[0] for c in REFUSED])
def test_torchvision_networks_that_cannot_slim(name, start):
    model = torchvision_model(name)
    topology = analyze(model, image())
    line = topology.structured_refusal
    assert line.startswith(start) and line.endswith(REFUSAL_TAIL) and "\n" not in line
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(topology.order) == len(layers)


def test_convnext_layer_scale_is_dense():
    topology = analyze(torchvision_model("convnext_tiny"), image())
    assert topology.dense[0] == "features.1.0: mul with loose parameter features.1.0.layer_scale (96, 1, 1)"
    assert len(topology.dense) == 18   # one per block
    assert topology.bn_after == {}   # LayerNorm only


def test_mobilenet_v2_analyses_well_under_a_second():
    model = torchvision_model("mobilenet_v2")
    start = time.perf_counter()
    analyze(model, image())
    print(f"analyze(mobilenet_v2) at 32x32: {time.perf_counter() - start:.3f} s")


# -- each refused kind, on a small network ---------------------------------------------------------
REFUSED_OPS = [
    ("split", Lambda(lambda x: x.chunk(2, dim=1)[0]), 4, "mid (chunk): chunk along the channel dim"),
    ("index", Lambda(lambda x: x[:, :4]), 4, "mid (getitem): indexes the channel dim"),
    ("shuffle", Lambda(lambda x: x.view(x.shape[0], 2, 4, 32, 32).transpose(1, 2).flatten(1, 2)), 8,
     "mid (view): reshapes (2, 8, 32, 32)"),
    ("permute", Lambda(lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)), 8,
     "mid (permute): moves the channel dim from 1 to 3"),
    ("attention", Lambda(lambda x: torch.matmul(x, x)), 8, "mid (matmul): matmul between activations"),
    ("grouped conv", nn.Conv2d(8, 8, 3, padding=1, groups=2), 8, "mid (Conv2d): a grouped conv (2 groups"),
    ("group norm", nn.GroupNorm(2, 8), 8, "mid (GroupNorm): GroupNorm with 2 groups of 8 channels"),
    ("unknown op", Lambda(lambda x: torch.roll(x, 1, 1)), 8, "mid (roll): an op this analysis does not know"),
]


@pytest.mark.parametrize("mid, channels, start", [c[1:] for c in REFUSED_OPS], ids=[c[0] for c in REFUSED_OPS])
def test_each_refused_kind(mid, channels, start):
    line = analyze(stem_mid_head(mid, channels), image()).structured_refusal
    assert line.startswith(start) and line.endswith(REFUSAL_TAIL)


ACCEPTED_OPS = [
    ("stochastic depth", Lambda(lambda x: x + stochastic_depth(x, 0.5, "row", training=True))),
    ("squeeze-excitation", Lambda(lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)))),
    ("spatial index and transpose", Lambda(lambda x: x[..., 1:, :].transpose(2, 3).contiguous())),
    ("depthwise conv", nn.Conv2d(8, 8, 3, padding=1, groups=8)),
    ("one-group and per-channel norms", nn.Sequential(nn.GroupNorm(1, 8), nn.GroupNorm(8, 8))),
    ("a mean over channels", Lambda(lambda x: x * x.mean(1, keepdim=True))),
]


@pytest.mark.parametrize("mid", [c[1] for c in ACCEPTED_OPS], ids=[c[0] for c in ACCEPTED_OPS])
def test_each_accepted_kind(mid):
    assert analyze(stem_mid_head(mid), image()).structured_refusal is None


def test_a_layer_norm_over_channels_last():
    model = nn.Sequential(OrderedDict(
        embed=nn.Linear(3, 8), norm=nn.LayerNorm(8), pool=Lambda(lambda x: x.mean((1, 2))), fc=nn.Linear(8, 10)))
    line = analyze(model, torch.randn(2, 8, 8, 3)).structured_refusal   # an (N, H, W, C) input
    assert line.startswith("norm (LayerNorm): normalises channels-last layout (over dims (3,) of a 4-D tensor)")
    # the same norm over the features of an (N, C) tensor slims
    features = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    assert analyze(features, torch.randn(2, 3)).structured_refusal is None


def test_a_flatten_into_a_linear_keeps_channel_major_features():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    topology = analyze(model, image())
    assert topology.structured_refusal is None
    assert (topology.stem, topology.classifier) == ("0", "3")


# -- dense leftovers, control flow, errors ------------------------------------------------------------
class LooseParameters(nn.Module):
    def __init__(self, per_channel):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))   # a functional stem
        self.conv = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1) if per_channel else torch.tensor(2.0))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.conv2d(x, self.weight, padding=1)
        x = self.scale * self.conv(x)
        return self.fc(x.mean((2, 3)))


def test_loose_parameters_are_dense():
    topology = analyze(LooseParameters(per_channel=True), image())
    assert topology.dense == ("LooseParameters: conv2d on loose parameter weight (8, 3, 3, 3)",
                              "LooseParameters: mul with loose parameter scale (1, 8, 1, 1)")
    assert topology.order == ("conv", "fc")
    # the functional stem reads the full input (no width), the per-channel scale a slimmed tensor
    assert topology.structured_refusal.startswith(
        "LooseParameters (mul): uses the per-channel parameter scale (8 entries along the channel dim)")
    scalar = analyze(LooseParameters(per_channel=False), image())
    assert scalar.dense[1] == "LooseParameters: mul with loose parameter scale ()"
    assert scalar.structured_refusal is None   # a scalar broadcasts over any width


class FunctionalMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.conv2d(self.stem(x), self.weight).mean((2, 3)))


def test_a_functional_conv_on_a_slimmed_tensor_is_refused():
    topology = analyze(FunctionalMiddle(), image())
    assert topology.dense == ("FunctionalMiddle: conv2d on loose parameter weight (8, 8, 1, 1)",)
    assert topology.structured_refusal.startswith(
        "FunctionalMiddle (conv2d): a functional conv2d with the loose parameter weight")


class Branchy(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, bias)
        self.positive, self.negative = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        x = self.positive(x) if x.mean() > 0 else self.negative(x)   # torch.fx cannot trace this
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("bias, branch", [(1.0, "positive"), (-1.0, "negative")])
def test_data_dependent_control_flow_takes_the_branch_the_input_takes(bias, branch):
    topology = analyze(Branchy(bias), image())
    assert topology.order == ("conv", branch, "fc")
    assert topology.structured_refusal is None


def test_an_output_no_conv_or_linear_produces_is_an_error():
    with pytest.raises(ValueError, match=r"the output does not come from a Conv2d or Linear .* BatchNorm2d in 1"):
        analyze(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)), image())

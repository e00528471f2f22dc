"""The three networks (models/), their compression metrics and LEC slimming, against the
numbers of SPEC 3.1, 3.3, 3.4, 3.5, 3.6 and 3.12."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.structured import structured_metrics
from methods.unstructured import unstructured_metrics
from models import build_model, count_parameters
from models.factory import LayerFactory
from models.layers import Conv2d, NoOp, Norm2d, QuantConv2d, set_level
from models.slimming import lec_keep_masks, lec_slim
from unit_support import single_thread  # noqa: F401 (single_thread: autouse fixture)

STANDARD = LayerFactory(norm_kind="BN")
SLIM = LayerFactory(norm_kind="IN", body="slim")
TOPK = LayerFactory(norm_kind="GN", body="topk")
TOPK_LINE = LayerFactory(norm_kind="GN", body="topk", line_convs=True, line_norms=True)
QUANT = LayerFactory(norm_kind="GN", body="quant")


@pytest.fixture(scope="module")
def resnet18_topk():
    return build_model("resnet18", TOPK, 1000)


def norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Norm2d)]


# -- parameter counts (SPEC 3.12) -------------------------------------------------------------
def test_cpreresnet20_parameter_count():
    model = build_model("cpreresnet20", STANDARD, 10)
    assert count_parameters(model) == 220384


def test_cpreresnet20_line_parameter_count():
    # 216,752 conv weights + 2 * 1360 norm parameters + 912 selection indexes = 220,384;
    # on a line every conv weight and every gamma/beta is doubled (indexes are not)
    model = build_model("cpreresnet20", TOPK_LINE, 10)
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv_weights == 216752
    assert count_parameters(model) == 2 * 216752 + 2 * 2 * 1360 + 912


def test_resnet18_parameter_count():
    assert count_parameters(build_model("resnet18", STANDARD, 1000)) == 11688512


# -- output shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [STANDARD, SLIM, TOPK, QUANT], ids=["dense", "slim", "topk", "quant"])
def test_cpreresnet20_output_shape(factory):
    model = build_model("cpreresnet20", factory, 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_output_shape(size):
    model = build_model("resnet18", STANDARD, 1000).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


@pytest.mark.parametrize("num_classes, size", [(10, 32), (1000, 64)])
def test_vgg19_gives_num_classes_logits(num_classes, size):
    # SPEC 5: global average pooling before the classifier (the original gave 49,000 columns)
    model = build_model("vgg19", STANDARD, num_classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, num_classes)


# -- structured sparsity (SPEC 3.4) ------------------------------------------------------------
@pytest.mark.parametrize("width, sparsity", [(1.0, 0.0), (0.875, 0.2329), (0.75, 0.4349), (0.625, 0.6061),
                                             (0.5, 0.7465), (0.375, 0.8561), (0.25, 0.9349)])
def test_cpreresnet20_structured_sparsity(width, sparsity):
    model = build_model("cpreresnet20", SLIM, 10)
    set_level(model, width_factor=width)
    assert structured_metrics(model, 32)["sparsity"] == pytest.approx(sparsity, abs=5e-5)


def test_structured_sparsity_at_alpha_grid_widths():
    # LCS+L evaluates at widths from the 5-digit alpha grid (0.8749975, ...): same numbers
    model = build_model("cpreresnet20", LayerFactory(norm_kind="IN", body="slim", line_norms=True), 10)
    set_level(model, width_factor=0.25 + 0.75 * 0.83333)
    assert structured_metrics(model, 32)["sparsity"] == pytest.approx(0.2329, abs=5e-5)


def test_resnet18_structured_sparsity():
    model = build_model("resnet18", LayerFactory(norm_kind="BN", body="slim"), 1000)
    set_level(model, width_factor=0.875)
    # the channel counts do not depend on the image size; a small one keeps this fast
    assert structured_metrics(model, 64)["sparsity"] == pytest.approx(0.2295, abs=5e-5)


def test_slim_cpreresnet20_channel_counts():
    """Stem keeps 3 inputs, the classifier its 10 outputs, every other conv round(C * w)."""
    model = build_model("cpreresnet20", SLIM, 10)
    set_level(model, width_factor=0.375)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, (i[0].shape[1], o.shape[1])))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert outputs["conv1"] == (3, 6)                     # round(16 * 0.375) = 6
    assert outputs["layer1.0.conv1"] == (6, 6)
    assert outputs["layer1.0.conv3"] == (6, 24)           # 64 * 0.375
    assert outputs["layer1.0.downsample"] == (6, 24)
    assert outputs["layer2.0.conv2"] == (12, 12)          # 32 * 0.375
    assert outputs["layer3.1.conv3"] == (24, 96)          # 256 * 0.375
    assert outputs["fc"] == (96, 10)


# -- unstructured sparsity (SPEC 3.3) ----------------------------------------------------------
@pytest.mark.parametrize("topk, sparsity", [(0.025, 0.9615), (0.5, 0.4931), (1.0, 0.0)])
def test_cpreresnet20_unstructured_sparsity(topk, sparsity):
    model = build_model("cpreresnet20", TOPK, 10)
    set_level(model, topk=topk)
    metrics = unstructured_metrics(model)
    assert metrics["sparsity"] == pytest.approx(sparsity, abs=5e-5)
    # hand check: body convs prune floor((1 - k) * numel) each, over all 216,752 conv weights
    pruned = sum(int((1 - topk) * m.weight.numel()) for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and name not in ("conv1", "fc"))
    assert metrics["sparsity"] == pytest.approx(pruned / 216752, abs=1e-12)
    assert metrics["nonzero_params"] == 216752 - pruned


def test_line_unstructured_sparsity_counts_the_applied_masks():
    model = build_model("cpreresnet20", TOPK_LINE, 10)
    set_level(model, topk=0.025, alpha=0.3)
    assert unstructured_metrics(model)["sparsity"] == pytest.approx(0.9615, abs=5e-5)


def test_resnet18_unstructured_sparsity(resnet18_topk):
    set_level(resnet18_topk, topk=0.025)
    assert unstructured_metrics(resnet18_topk)["sparsity"] == pytest.approx(0.9315, abs=5e-5)


# -- initialisation (SPEC 3.1) -------------------------------------------------------------------
def std(tensor):
    return tensor.detach().float().std().item()


def test_cpreresnet20_line_init():
    model = build_model("cpreresnet20", TOPK_LINE, 10)
    for _, norm in norms(model):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
        assert torch.all(norm.weight1 == 0.5) and torch.all(norm.bias1 == 0)
    conv = model.layer3[0].conv3                                       # 1x1, 64 -> 256
    assert std(conv.weight) == pytest.approx(math.sqrt(2 / 64), rel=0.05)      # Kaiming fan-in
    assert std(conv.weight1) == pytest.approx(math.sqrt(2 / 256), rel=0.05)    # N(0, 2 / (k k C_out))
    stem = model.conv1                                                 # 3x3, 3 -> 16
    assert std(stem.weight1) == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.15)
    # the classifier keeps its Kaiming endpoint 1 (fan-in 256), not N(0, 2/10)
    assert std(model.fc.weight1) == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert not torch.equal(model.fc.weight, model.fc.weight1)


def test_resnet18_line_init():
    model = build_model("resnet18", TOPK_LINE, 1000)
    for _, norm in norms(model):
        assert torch.all(norm.weight1 == 1) and torch.all(norm.bias1 == 0)
    conv = model.layer2[0].conv1                                       # 3x3, 64 -> 128
    # both endpoints Kaiming fan-in (576), drawn independently
    assert std(conv.weight) == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert std(conv.weight1) == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert not torch.equal(conv.weight, conv.weight1)


def test_vgg19_line_init():
    model = build_model("vgg19", TOPK_LINE, 10)
    for _, norm in norms(model):
        assert torch.all(norm.weight == 1) and torch.all(norm.weight1 == 0.5) and torch.all(norm.bias1 == 0)
    conv = model.convs[2]                                              # 3x3, 64 -> 128
    assert std(conv.weight) == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert std(conv.weight1) == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.05)
    assert std(model.classifier.weight1) == pytest.approx(0.01, rel=0.1)


def test_standard_model_init():
    model = build_model("cpreresnet20", STANDARD, 10)
    assert std(model.layer3[0].conv3.weight) == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    for _, norm in norms(model):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
        assert not norm.on_line


# -- quantized topology (SPEC 3.6) ---------------------------------------------------------------
def test_quantized_cpreresnet20_topology():
    model = build_model("cpreresnet20", QUANT, 10)
    assert type(model.conv1) is Conv2d and type(model.fc) is Conv2d         # full precision
    assert isinstance(model.bn, Norm2d)                                     # the final norm stays
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert len(quantized) == 6 * 3 + 3                                      # 18 block convs + 3 down-sampling
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            assert all(isinstance(getattr(block, n), NoOp) for n in ("bn1", "bn2", "bn3"))
            for conv in (block.conv1, block.conv2, block.conv3) + ((block.downsample,) if block.downsample else ()):
                assert isinstance(conv, QuantConv2d)
                assert isinstance(conv.norm, Norm2d) and conv.norm.num_features == conv.out_channels


# -- LEC: threshold, floor and slimming (SPEC 3.5, 5) -----------------------------------------------
def lec_model():
    return build_model("cpreresnet20", STANDARD, 10).eval()


def set_gammas(model, value_for):
    with torch.no_grad():
        for name, norm in norms(model):
            norm.weight.copy_(value_for(name, norm.num_features))


def test_cpreresnet20_has_1360_norm_channels_in_19_layers():
    model = lec_model()
    assert len(norms(model)) == 19
    assert sum(n.num_features for _, n in norms(model)) == 1360


def hand_made_lec_model():
    """All |gamma| = 2 except layer1.0.bn2: +-0.1, 0.2, ..., 1.6 (alternating signs)."""
    model = lec_model()
    special = torch.tensor([(-1) ** i * 0.1 * (i + 1) for i in range(16)])
    set_gammas(model, lambda name, c: special if name == "layer1.0.bn2" else torch.full((c,), 2.0))
    return model


def test_lec_threshold_on_a_hand_made_model():
    model = hand_made_lec_model()
    # fraction 0.99: threshold = sorted |gamma| [int(1360 * 0.01)] = [13] = 1.4 -> keep 1.5 and 1.6 only
    masks, floored = lec_keep_masks(model, 0.99)
    assert floored == []
    assert masks["layer1.0.bn2"].nonzero().flatten().tolist() == [14, 15]
    assert all(mask.all() for name, mask in masks.items() if name != "layer1.0.bn2")


def test_lec_slimmed_network_on_a_hand_made_model():
    model = hand_made_lec_model()
    slim, info = lec_slim(model, "cpreresnet20", 10, 0.99)
    assert info["floored_layers"] == []
    block, source = slim.layer1[0], model.layer1[0]
    assert block.conv1.weight.shape == (2, 16, 1, 1)
    assert block.bn2.num_features == 2
    assert block.conv2.weight.shape == (16, 2, 3, 3)
    assert torch.equal(block.conv1.weight, source.conv1.weight[[14, 15]])
    assert torch.equal(block.conv2.weight, source.conv2.weight[:, [14, 15]])
    assert block.bn2.weight.tolist() == pytest.approx([1.5, -1.6])
    # removed: conv1 14 x 16, bn2 14 gammas + 14 betas, conv2 16 x 14 x 9 = 2,268 parameters
    assert count_parameters(slim) == 220384 - 2268


def test_lec_keep_rule_is_strictly_greater():
    model = lec_model()
    gen = torch.Generator().manual_seed(0)
    set_gammas(model, lambda name, c: 0.1 + torch.rand(c, generator=gen))
    smallest = min((norm.weight.abs().min().item(), name) for name, norm in norms(model))
    masks, floored = lec_keep_masks(model, 1.0)
    # fraction 1.0: threshold = the smallest |gamma|, which is not strictly greater than itself
    assert sum(int(m.sum()) for m in masks.values()) == 1360 - 1
    removed = [(name, int((~m).nonzero())) for name, m in masks.items() if not m.all()]
    assert len(removed) == 1 and removed[0][0] == smallest[1]
    assert floored == []


def test_lec_equal_gammas_floor_every_layer_to_one_channel():
    # the original's epoch-0 evaluation: all gammas 1, nothing is strictly greater than 1
    model = lec_model()
    masks, floored = lec_keep_masks(model, 1.0)
    assert sorted(floored) == sorted(name for name, _ in norms(model))
    assert all(int(m.sum()) == 1 for m in masks.values())
    slim, info = lec_slim(model, "cpreresnet20", 10, 1.0)
    with torch.no_grad():
        assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg19_lec_equal_gammas_leave_one_channel_per_layer():
    model = build_model("vgg19", STANDARD, 10).eval()
    slim, info = lec_slim(model, "vgg19", 10, 1.0)
    assert len(info["floored_layers"]) == 16
    # 16 convs of one output channel: 3 * 9 + 15 * 9 weights, 16 gammas and betas, 10 classifier weights
    assert count_parameters(slim) == 27 + 15 * 9 + 2 * 16 + 10
    with torch.no_grad():
        assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lec_one_channel_floor():
    model = lec_model()
    gen = torch.Generator().manual_seed(1)
    tiny = torch.tensor([0.001 * (i + 1) for i in range(32)])
    set_gammas(model, lambda name, c: tiny if name == "layer2.1.bn3" else 1 + torch.rand(c, generator=gen))
    # fraction 0.9: threshold = sorted[136], far above 0.032: layer2.1.bn3 would be emptied
    masks, floored = lec_keep_masks(model, 0.9)
    assert floored == ["layer2.1.bn3"]
    assert masks["layer2.1.bn3"].nonzero().flatten().tolist() == [31]     # its largest |gamma|
    slim, info = lec_slim(model, "cpreresnet20", 10, 0.9)
    assert info["floored_layers"] == ["layer2.1.bn3"]
    assert slim.layer2[1].conv2.out_channels == 1
    with torch.no_grad():
        assert torch.isfinite(slim(torch.randn(2, 3, 32, 32))).all()


def randomise_norms(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, norm in norms(model):
            c = norm.num_features
            sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
            norm.weight.copy_(sign * (0.05 + torch.rand(c, generator=gen)))
            norm.bias.copy_(0.1 * torch.randn(c, generator=gen))
            norm.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            norm.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def masked_copy(model, fraction):
    """The unslimmed network with gamma and beta of pruned channels zeroed (threshold by hand)."""
    masked = copy.deepcopy(model)
    gammas = torch.cat([n.weight.detach().abs() for _, n in norms(masked)])
    threshold = gammas.sort().values[int(gammas.numel() * (1 - fraction))]
    with torch.no_grad():
        for _, norm in norms(masked):
            keep = norm.weight.abs() > threshold
            assert keep.any(), "the test wants no layer emptied"
            norm.weight.mul_(keep)
            norm.bias.mul_(keep)
    return masked


@pytest.mark.parametrize("name, fraction, size", [("cpreresnet20", 0.5, 32), ("cpreresnet20", 0.9, 32),
                                                  ("vgg19", 0.6, 32)])

def test_slimmed_network_gives_the_masked_network_logits(name, fraction, size):
    model = build_model(name, STANDARD, 10).eval()
    randomise_norms(model, seed=3)
    masked = masked_copy(model, fraction)
    slim, info = lec_slim(model, name, 10, fraction)
    assert info["floored_layers"] == []
    assert count_parameters(slim) < count_parameters(model)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = masked(x)
        assert torch.allclose(slim(x), expected, atol=1e-4 * expected.abs().max().item())
        assert expected.std() > 0


def test_slimmed_model_uses_plain_layers():
    slim, _ = lec_slim(hand_made_lec_model(), "cpreresnet20", 10, 0.99)
    kinds = {type(m) for m in slim.modules() if isinstance(m, nn.Conv2d)}
    assert kinds == {Conv2d}


# -- the cPreResNet20 shortcut (SPEC 3.6) ------------------------------------------------------
SHORTCUT_FACTORIES = {
    "quantized-BN": (LayerFactory(norm_kind="BN", body="quant"), True),
    "quantized-GN": (LayerFactory(norm_kind="GN", body="quant"), True),
    "quantized-IN": (LayerFactory(norm_kind="IN", body="quant", line_convs=True, line_norms=True), True),
    "structured-BN": (LayerFactory(norm_kind="BN", body="slim"), False),
    "unstructured-GN": (TOPK, False),
}


@pytest.mark.parametrize("name", SHORTCUT_FACTORIES)
@pytest.mark.parametrize("block_name", ["layer1.1", "layer2.0"], ids=["identity", "downsample"])
def test_cpreresnet_shortcut_input(name, block_name):
    """The quantized bottleneck feeds relu(x) to its identity shortcut and down-sampling conv
    (the original's in-place ReLU on the block input, its first norm being a no-op); the other
    settings feed x. Checked against the block written out by hand, on an input with negative
    entries, in training and evaluation."""
    factory, sees_relu = SHORTCUT_FACTORIES[name]
    torch.manual_seed(0)
    model = build_model("cpreresnet20", factory, 10)
    block = dict(model.named_modules())[block_name]
    assert block.shortcut_sees_relu is sees_relu
    x = torch.randn(4, block.conv1.in_channels, 8, 8)
    assert (x < 0).any()
    for training in (True, False):
        block.train(training)
        # Training-mode BN updates running statistics (and the quantized BN fold reads them):
        # the reference runs on a copy, so both see the same state.
        ref = copy.deepcopy(block)
        with torch.no_grad():
            out = ref.conv1(F.relu(ref.bn1(x)))
            out = ref.conv2(F.relu(ref.bn2(out)))
            out = ref.conv3(F.relu(ref.bn3(out)))
            shortcut_input = F.relu(x) if sees_relu else x
            shortcut = shortcut_input if ref.downsample is None else ref.downsample(shortcut_input)
            assert (block_name == "layer1.1") == (block.downsample is None)
            expected = out + shortcut
            other = out + (x if sees_relu else F.relu(x)) if block.downsample is None else None
            actual = block(x.clone())
        assert torch.allclose(actual, expected, atol=1e-6)
        if other is not None:
            assert (actual - other).abs().max() > 1e-3


def test_a_build_without_initialisation_draws_nothing_and_restores_the_initialisers():
    """initialize=False (exports, checkpoints read back): the global random state is as before,
    the weights random inits would have drawn are zeros, nn.init's random initialisers are
    themselves again afterwards (also after an error inside), and the network loaded with
    another build's weights computes what that build computes."""
    from models.factory import dense_factory
    from models.init import random_init_skipped

    originals = (nn.init.kaiming_normal_, nn.init.uniform_, nn.init.normal_)
    torch.manual_seed(0)
    reference = build_model("torchvision.mobilenet_v2", dense_factory("BN"), 10, model_kwargs={"width_mult": 0.25})
    state = torch.get_rng_state()
    bare = build_model("torchvision.mobilenet_v2", dense_factory("BN"), 10, model_kwargs={"width_mult": 0.25},
                       initialize=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert (nn.init.kaiming_normal_, nn.init.uniform_, nn.init.normal_) == originals
    assert all(not bool(module.weight.any()) for module in bare.modules() if isinstance(module, (nn.Conv2d, nn.Linear)))
    bare.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bare.eval()(x), reference.eval()(x))
    with pytest.raises(RuntimeError), random_init_skipped():
        assert nn.init.uniform_ is not originals[1]
        raise RuntimeError("inside")
    assert nn.init.uniform_ is originals[1]

"""Layers of models/layers.py on small hand-made tensors: the TopK mask and TopK convs
(SPEC 3.3), slimmable convs and norms (SPEC 3.4), line norms (SPEC 3.1) and GN/IN (SPEC 3.8)."""

import pytest
import torch
import torch.nn.functional as F

from models.layers import Conv2d, Norm2d, SlimConv2d, TopKConv2d, set_level, topk_mask
from unit_support import single_thread, t  # noqa: F401 (single_thread: autouse fixture)


# -- TopK mask ------------------------------------------------------------------------------
def test_topk_mask_keeps_the_largest_magnitudes():
    w = t([[0.5, -2.0], [1.0, -0.1]])
    # k = 0.5 of 4: floor(0.5 * 4) = 2 pruned; |w| = 0.5, 2, 1, 0.1 -> keep -2 and 1
    assert topk_mask(w, 0.5).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    # k = 0.75: floor(0.25 * 4) = 1 pruned (the 0.1)
    assert topk_mask(w, 0.75).tolist() == [[1.0, 1.0], [1.0, 0.0]]
    # k = 0.3: floor(0.7 * 4) = 2 pruned as well
    assert topk_mask(w, 0.3).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    # k = 0.2: floor(0.8 * 4) = 3 pruned: only -2 stays
    assert topk_mask(w, 0.2).tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_topk_mask_k_zero_prunes_everything_and_k_one_keeps_everything():
    w = t([[0.5, -2.0, 3.0], [1.0, -0.1, 0.0]])
    assert topk_mask(w, 0.0).tolist() == [[0.0] * 3] * 2
    assert topk_mask(w, 1.0).tolist() == [[1.0] * 3] * 2


def test_topk_mask_with_ties_keeps_the_right_count():
    w = t([3.0, 1.0, -1.0, 1.0, 0.5])
    # k = 0.6 of 5: floor(0.4 * 5) = 2 pruned: the 0.5 and one of the three tied 1s
    mask = topk_mask(w, 0.6)
    assert mask.sum().item() == 3
    assert mask[0].item() == 1.0 and mask[4].item() == 0.0
    assert mask[1:4].sum().item() == 2
    # all equal: exactly half kept
    assert topk_mask(torch.ones(8), 0.5).sum().item() == 4


def test_topk_mask_ties_are_broken_by_position():
    # the earlier of equal magnitudes is pruned first (stable order)
    assert topk_mask(t([1.0, -1.0, 1.0, 1.0]), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("k", [0.025, 0.3, 0.5, 0.77, 0.975])
def test_topk_mask_on_the_cpu_prunes_what_the_stable_sort_prunes(k):
    """The CPU's selection (kthvalue, then the earliest ties) against the sort the GPU uses, on
    weights with many ties (small integers) and without."""
    generator = torch.Generator().manual_seed(0)
    for weight in (torch.randint(-3, 4, (4, 8, 3, 3), generator=generator).float(),
                   torch.randn(64, 16, 3, 3, generator=generator)):
        pruned = int((1 - k) * weight.numel())
        by_sort = torch.ones(weight.numel())
        by_sort[weight.abs().flatten().argsort(stable=True)[:pruned]] = 0
        assert torch.equal(topk_mask(weight, k), by_sort.view_as(weight))


@pytest.mark.parametrize("shape, k, kept", [
    ((3, 4, 3, 3), 0.3, 108 - 75),     # floor(0.7 * 108) = floor(75.6) = 75 pruned
    ((16, 16, 1, 1), 0.025, 256 - 249),  # floor(0.975 * 256) = floor(249.6) = 249
    ((8, 2, 3, 3), 0.5, 144 - 72),
    ((10,), 0.25, 10 - 7),              # floor(7.5) = 7

])
def test_topk_mask_per_layer_count(shape, k, kept):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(w, k)
    assert mask.shape == w.shape
    assert mask.sum().item() == kept
    magnitudes = w.abs()
    assert magnitudes[mask.bool()].min() >= magnitudes[~mask.bool()].max()


# -- TopK conv ------------------------------------------------------------------------------
def topk_conv(weight, topk, line_weight1=None, alpha=1.0):
    conv = TopKConv2d(1, 1, 2, line=line_weight1 is not None)
    with torch.no_grad():
        conv.weight.copy_(t(weight).view(1, 1, 2, 2))
        if line_weight1 is not None:
            conv.weight1.copy_(t(line_weight1).view(1, 1, 2, 2))
    set_level(conv, topk=topk, alpha=alpha)
    return conv


def test_topk_conv_forward_and_gradient_only_through_kept_entries():
    conv = topk_conv([1.0, -3.0, 0.5, 2.0], 0.5)   # keeps -3 and 2
    conv.train()
    x = t([1.0, 10.0, 100.0, 1000.0]).view(1, 1, 2, 2)
    out = conv(x)
    assert out.item() == pytest.approx(-3 * 10 + 2 * 1000)
    out.sum().backward()
    # d out / d w = x where kept, 0 where pruned
    assert conv.weight.grad.flatten().tolist() == [0.0, 10.0, 0.0, 1000.0]


def test_topk_conv_at_k_one_is_dense():
    conv = topk_conv([1.0, -3.0, 0.5, 2.0], 1.0)
    conv.train()
    conv(torch.ones(1, 1, 2, 2)).sum().backward()
    assert conv.weight.grad.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]


def test_line_topk_conv_mask_follows_theta_alpha():
    # endpoint 0 alone would keep positions 0, 1; theta(0.75) = 0.25 * w0 + 0.75 * w1 = [1, 0.75, 3, 2.25]
    # keeps positions 2, 3
    w0, w1 = [4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 3.0]
    conv = topk_conv(w0, 0.5, line_weight1=w1, alpha=0.75)
    assert topk_mask(conv.weight, 0.5).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert conv.mask().flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    conv.train()
    out = conv(torch.ones(1, 1, 2, 2))
    assert out.item() == pytest.approx(3.0 + 2.25)    # masked theta(alpha), not 1 + 0.75
    out.sum().backward()
    # both endpoints get gradient through the kept entries, with factors (1 - alpha) and alpha
    assert conv.weight.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.25, 0.25])
    assert conv.weight1.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.75, 0.75])


def test_line_topk_conv_in_eval_follows_alpha_and_weight_updates():
    w0, w1 = [4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 3.0]
    conv = topk_conv(w0, 0.5, line_weight1=w1, alpha=0.75)
    conv.eval()
    x = torch.ones(1, 1, 2, 2)
    assert conv(x).item() == pytest.approx(5.25)
    set_level(conv, alpha=0.0)                          # theta(0) = w0: keeps 4, 3
    assert conv(x).item() == pytest.approx(7.0)
    set_level(conv, alpha=0.75)
    assert conv(x).item() == pytest.approx(5.25)
    with torch.no_grad():                                # an optimiser step changes the weights
        conv.weight1.mul_(2.0)                           # theta(0.75) = [1, 0.75, 6, 4.5]
    assert conv(x).item() == pytest.approx(10.5)
    set_level(conv, topk=1.0)
    assert conv(x).item() == pytest.approx(1 + 0.75 + 6 + 4.5)


# -- set_level -------------------------------------------------------------------------------
def test_set_level_only_touches_layers_that_read_the_level():
    model = torch.nn.Sequential(TopKConv2d(1, 1, 1), SlimConv2d(1, 2, 1), Conv2d(2, 2, 1), Norm2d("BN", 2))
    set_level(model, topk=0.3, width_factor=0.5, alpha=0.2, num_bits=None)
    assert (model[0].topk, model[0].alpha) == (0.3, 0.2)
    assert model[1].width_factor == 0.5 and not hasattr(model[1], "topk")
    assert model[2].alpha == 0.2 and not hasattr(model[2], "topk")
    assert model[3].alpha == 0.2


# -- slimmable conv --------------------------------------------------------------------------
@pytest.mark.parametrize("width, c_out", [(1.0, 16), (0.875, 14), (0.5, 8), (0.3, 5), (0.25, 4), (0.01, 1)])
def test_slim_conv_output_channels(width, c_out):
    # max(1, round(16 * w)): 0.3 -> 4.8 -> 5; 0.01 -> 0.16 -> 0 -> 1
    conv = SlimConv2d(8, 16, 3, padding=1)
    conv.width_factor = width
    x = torch.randn(2, 6, 5, 5)                       # input channels follow the incoming tensor
    out = conv(x)
    assert out.shape == (2, c_out, 5, 5)
    assert conv.active_channels(6) == (6, c_out)
    assert torch.allclose(out, F.conv2d(x, conv.weight[:c_out, :6], padding=1), atol=1e-6)


def test_slim_stem_keeps_three_inputs_and_classifier_keeps_its_outputs():
    stem = SlimConv2d(3, 16, 3, padding=1, role="first")
    classifier = SlimConv2d(16, 10, 1, role="last")
    set_level(torch.nn.Sequential(stem, classifier), width_factor=0.5)
    x = torch.randn(1, 3, 4, 4)
    hidden = stem(x)
    assert hidden.shape[1] == 8
    assert torch.allclose(hidden, F.conv2d(x, stem.weight[:8], padding=1), atol=1e-6)
    out = classifier(hidden)
    assert out.shape[1] == 10
    assert torch.allclose(out, F.conv2d(hidden, classifier.weight[:, :8]), atol=1e-6)
    assert stem.active_channels(3) == (3, 8)
    assert classifier.active_channels(8) == (8, 10)


# -- norms -----------------------------------------------------------------------------------
def test_slim_bn_updates_running_stats_only_on_the_leading_slice():
    norm = Norm2d("BN", 8, slim=True)
    norm.train()
    # channel c holds c + [0, 2, 4, 6]: mean c + 3, biased variance 5, unbiased 20/3
    x = torch.stack([c + t([[0.0, 2.0], [4.0, 6.0]]) for c in range(4)], dim=1)  # (2, 4, 2)
    x = x.unsqueeze(-1)                                                            # (2, 4, 2, 1)
    out = norm(x)
    assert out.shape == (2, 4, 2, 1)
    assert norm.running_mean.tolist() == pytest.approx([0.1 * (c + 3) for c in range(4)] + [0.0] * 4)
    assert norm.running_var.tolist() == pytest.approx([0.9 + 0.1 * 20 / 3] * 4 + [1.0] * 4)
    expected = (x - torch.arange(4.0).view(1, 4, 1, 1) - 3) / torch.sqrt(torch.tensor(5.0 + 1e-5))
    assert torch.allclose(out, expected, atol=1e-5)


def test_slim_bn_eval_uses_the_leading_running_stats_and_affine():
    norm = Norm2d("BN", 4, slim=True)
    with torch.no_grad():
        norm.weight.copy_(t([2.0, 3.0, 4.0, 5.0]))
        norm.bias.copy_(t([1.0, -1.0, 0.0, 0.0]))
        norm.running_mean.copy_(t([1.0, 2.0, 3.0, 4.0]))
        norm.running_var.copy_(t([4.0, 9.0, 1.0, 1.0]))
    norm.eps = 0.0
    norm.eval()
    x = t([3.0, 5.0]).view(1, 2, 1, 1)
    # (3 - 1) / 2 * 2 + 1 = 3; (5 - 2) / 3 * 3 - 1 = 2
    assert norm(x).flatten().tolist() == pytest.approx([3.0, 2.0])


@pytest.mark.parametrize("kind", ["BN", "IN", "GN"])
def test_line_norm_interpolates_gamma_and_beta(kind):
    norm = Norm2d(kind, 4, line=True, num_groups=2)
    with torch.no_grad():
        norm.weight.copy_(t([1.0, 2.0, 3.0, 4.0]))
        norm.weight1.copy_(t([5.0, 6.0, -1.0, 0.0]))
        norm.bias.copy_(t([0.0, 1.0, 0.0, 1.0]))
        norm.bias1.copy_(t([4.0, -3.0, 2.0, 1.0]))
    set_level(norm, alpha=0.25)
    gamma = t([2.0, 3.0, 2.0, 3.0])        # 0.75 * gamma0 + 0.25 * gamma1
    beta = t([1.0, 0.0, 0.5, 1.0])
    affine = norm.affine()
    assert affine[0].tolist() == pytest.approx(gamma.tolist())
    assert affine[1].tolist() == pytest.approx(beta.tolist())
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    norm.train()
    if kind == "BN":
        expected = F.batch_norm(x, None, None, gamma, beta, training=True)
    elif kind == "IN":
        expected = F.instance_norm(x, weight=gamma, bias=beta)
    else:
        expected = F.group_norm(x, 2, gamma, beta)
    assert torch.allclose(norm(x), expected, atol=1e-5)
    # the endpoints themselves
    set_level(norm, alpha=0.0)
    assert norm.affine()[0].tolist() == [1.0, 2.0, 3.0, 4.0]
    set_level(norm, alpha=1.0)
    assert norm.affine()[1].tolist() == [4.0, -3.0, 2.0, 1.0]


def test_line_norm_gradient_reaches_both_endpoints():
    norm = Norm2d("IN", 2, line=True)
    set_level(norm, alpha=0.25)
    norm(torch.randn(2, 2, 3, 3)).sum().backward()
    # d out / d beta(alpha) = number of elements per channel = 2 * 9
    assert norm.bias.grad.tolist() == pytest.approx([0.75 * 18] * 2)
    assert norm.bias1.grad.tolist() == pytest.approx([0.25 * 18] * 2)


@pytest.mark.parametrize("channels, groups", [(16, 16), (32, 32), (64, 32), (128, 32), (256, 32)])
def test_group_norm_groups(channels, groups):
    norm = Norm2d("GN", channels, num_groups=32)
    assert norm.num_groups == groups
    x = torch.randn(2, channels, 2, 2, generator=torch.Generator().manual_seed(channels))
    assert torch.allclose(norm(x), F.group_norm(x, groups, norm.weight, norm.bias), atol=1e-5)


def test_group_norm_on_16_channels_is_an_instance_norm():
    x = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(Norm2d("GN", 16)(x), F.instance_norm(x), atol=1e-5)


@pytest.mark.parametrize("slim", [False, True])
def test_instance_norm_uses_instance_statistics_in_training_and_eval(slim):
    norm = Norm2d("IN", 6, slim=slim)
    x = torch.randn(3, 6 if not slim else 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 2
    for mode in ("train", "eval"):
        getattr(norm, mode)()
        out = norm(x)
        # each image normalised on its own: zero mean, unit variance per (image, channel)
        assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(out.shape[:2]), atol=1e-5)
        assert torch.allclose(out.var(dim=(2, 3), unbiased=False), torch.ones(out.shape[:2]), atol=1e-3)
        # and independent of the rest of the batch
        assert torch.allclose(norm(x[:1]), out[:1], atol=1e-5)
    assert not hasattr(norm, "running_mean")

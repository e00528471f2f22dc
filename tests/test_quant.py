"""Fake quantiser (models/quant.py) and the quantized conv (models/layers.QuantConv2d) against
values computed by hand from SPEC 3.6: per-tensor asymmetric affine on the signed b-bit grid
[-2^(b-1), 2^(b-1) - 1], scale = range / (2^b - 1), zero point = round(q_min - r_min / scale)
clipped to the grid, round-half-even, clipping, straight-through gradients."""

import pytest
import torch
import torch.nn.functional as F

from models.layers import Norm2d, QuantConv2d
from models.quant import affine_params, fake_quantize, fake_quantize_tensor, grid_limits, quantize_to_int
from unit_support import single_thread, t  # noqa: F401 (single_thread: autouse fixture)


def close(actual, expected, tol=1e-6):
    assert torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0), \
        f"{actual.tolist()} != {torch.as_tensor(expected).tolist()}"


def test_grid_limits():
    assert grid_limits(3) == (-4, 3)
    assert grid_limits(8) == (-128, 127)


# -- hand-computed examples -------------------------------------------------------------
# 3 bits, range [-1, 2]: scale = 3/7, zero point = round(-4 + 7/3) = round(-1.667) = -2.
X3 = [-5.0, -1.0, -0.3, 0.0, 0.2, 0.5, 1.4, 2.0, 3.0]
# x / scale = -11.67, -2.33, -0.7, 0, 0.47, 1.17, 3.27, 4.67, 7 -> rounded -12, -2, -1, 0, 0, 1, 3, 5, 7
# + zero point, clipped to [-4, 3]:
CODES3 = [-4, -4, -3, -2, -2, -1, 1, 3, 3]
# (code + 2) * 3/7:
VALUES3 = [-6 / 7, -6 / 7, -3 / 7, 0.0, 0.0, 3 / 7, 9 / 7, 15 / 7, 15 / 7]


def test_affine_params_3_bits():
    scale, zero_point = affine_params(t(-1.0), t(2.0), 3)
    assert scale.item() == pytest.approx(3 / 7)
    assert zero_point.item() == -2


def test_fake_quantize_3_bits():
    close(fake_quantize(t(X3), t(-1.0), t(2.0), 3), VALUES3)


def test_quantize_to_int_3_bits():
    scale, zero_point = affine_params(t(-1.0), t(2.0), 3)
    assert quantize_to_int(t(X3), scale, zero_point, 3).tolist() == CODES3


def test_round_half_to_even_and_clipping_3_bits():
    # range [0, 7]: scale exactly 1, zero point round(-4 - 0) = -4
    scale, zero_point = affine_params(t(0.0), t(7.0), 3)
    assert (scale.item(), zero_point.item()) == (1.0, -4)
    x = t([-0.6, -0.5, 0.5, 1.5, 2.5, 3.5, 7.0, 7.6])
    # half-even: -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4; -0.6 -> -1 and 7.6 -> 8 are
    # clipped to the grid (codes -4 .. 3 = values 0 .. 7)
    close(fake_quantize(x, t(0.0), t(7.0), 3), [0.0, 0.0, 0.0, 2.0, 2.0, 4.0, 7.0, 7.0])


def test_fake_quantize_8_bits_negative_range():
    # range [-255/128, 0]: scale 1/128, zero point round(-128 + 255) = 127
    low = t(-255 / 128)
    scale, zero_point = affine_params(low, t(0.0), 8)
    assert (scale.item(), zero_point.item()) == (1 / 128, 127)
    x = t([-3.0, -255 / 128, -0.5, -3 / 256, -1 / 256, 0.0, 0.5])
    # x * 128 = -384, -255, -64, -1.5, -0.5, 0, 64 -> half-even -384, -255, -64, -2, 0, 0, 64
    # codes (+127, clipped to [-128, 127]): -128, -128, 63, 125, 127, 127, 127
    assert quantize_to_int(x, scale, zero_point, 8).tolist() == [-128, -128, 63, 125, 127, 127, 127]
    close(fake_quantize(x, low, t(0.0), 8), [-255 / 128, -255 / 128, -0.5, -2 / 128, 0.0, 0.0, 0.0])


def test_fake_quantize_8_bits_general_range():
    # range [-0.6, 1.0]: scale 1.6/255, zero point round(-128 + 95.625) = round(-32.375) = -32
    scale, zero_point = affine_params(t(-0.6), t(1.0), 8)
    assert scale.item() == pytest.approx(1.6 / 255, rel=1e-6)
    assert zero_point.item() == -32
    x = t([-0.6, 0.0, 0.3, 1.0, 1.2])
    # x / scale = -95.625, 0, 47.8125, 159.375, 191.25 -> -96, 0, 48, 159, 191; codes -128, -32, 16,
    # 127, 159 -> clipped 127; values (code + 32) * 1.6/255

    step = 1.6 / 255
    close(fake_quantize(x, t(-0.6), t(1.0), 8), [-96 * step, 0.0, 48 * step, 159 * step, 159 * step])


def test_range_always_contains_zero():
    # [0.5, 7] is widened to [0, 7]; [-7, -0.5] to [-7, 0]
    x = t([0.2, 1.5, 2.5, 6.9])
    assert torch.equal(fake_quantize(x, t(0.5), t(7.0), 3), fake_quantize(x, t(0.0), t(7.0), 3))
    assert torch.equal(fake_quantize(-x, t(-7.0), t(-0.5), 3), fake_quantize(-x, t(-7.0), t(0.0), 3))


def test_fake_quantize_tensor_uses_the_tensor_range():
    # weights [0.3, 0.1] at 3 bits: range [0, 0.3], scale 0.3/7, zero point -4;
    # 0.1 / scale = 2.33 -> 2 -> 0.6/7; 0.3 -> 7 -> 0.3
    close(fake_quantize_tensor(t([0.3, 0.1]), 3), [0.3, 0.6 / 7])


def reference(x, low, high, bits):
    """Float64 re-derivation of the quantiser (half-even rounding), for random inputs."""
    x = x.double()
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (2 ** bits - 1)
    zero_point = min(max(round(q_min - low / scale), q_min), q_max)
    codes = torch.clamp(torch.round(x / scale) + zero_point, q_min, q_max)
    return (codes - zero_point) * scale, scale


@pytest.mark.parametrize("bits", range(3, 9))
def test_fake_quantize_matches_a_reference_on_random_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2000, generator=gen) * 2
    low, high = -1.3, 2.1
    expected, scale = reference(x, low, high, bits)
    actual = fake_quantize(x, t(low), t(high), bits).double()
    error = (actual - expected).abs()
    # float32 vs float64 may round a value sitting on a half step differently: one quantum at most
    assert error.max() <= scale * 1.0001
    assert (error < 1e-5).float().mean() > 0.999
    # the values lie on the grid: at most 2^b distinct
    assert actual.unique().numel() <= 2 ** bits


@pytest.mark.parametrize("bits", range(3, 9))
def test_quantize_to_int_reproduces_fake_quantize_exactly(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    for low, high in ((-1.3, 2.1), (0.0, 0.7), (-4.0, 0.0), (-0.01, 0.05)):
        x = torch.randn(500, generator=gen) * 2
        scale, zero_point = affine_params(t(low), t(high), bits)
        codes = quantize_to_int(x, scale, zero_point, bits)
        q_min, q_max = grid_limits(bits)
        assert codes.min() >= q_min and codes.max() <= q_max
        assert torch.equal(codes, codes.round())
        assert torch.equal((codes - zero_point) * scale, fake_quantize(x, t(low), t(high), bits))


def test_straight_through_gradient_is_the_identity_also_outside_the_range():
    x = t([-5.0, -1.0, 0.3, 2.0, 3.0]).requires_grad_()
    upstream = t([1.0, 2.0, 3.0, 4.0, 5.0])
    (fake_quantize(x, t(-1.0), t(2.0), 3) * upstream).sum().backward()
    assert x.grad.tolist() == upstream.tolist()


def test_weight_quantizer_gradient_is_the_identity():
    w = t([[0.3, -0.1], [0.05, 0.2]]).requires_grad_()
    upstream = t([[1.0, -2.0], [0.5, 4.0]])
    (fake_quantize_tensor(w, 4) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_all_zero_tensor():
    zeros = torch.zeros(2, 3, requires_grad=True)
    out = fake_quantize_tensor(zeros, 8)
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert torch.equal(zeros.grad, torch.ones(2, 3))
    scale, zero_point = affine_params(t(0.0), t(0.0), 8)
    assert torch.isfinite(scale) and scale > 0
    assert zero_point.item() == -128
    # any input quantized with an all-zero range is (about) zero and finite
    close(fake_quantize(t([1.0, -2.0]), t(0.0), t(0.0), 4), [0.0, 0.0], tol=1e-9)


# -- QuantConv2d -----------------------------------------------------------------------------
def identity_conv(num_bits=8, norm=None):
    """1x1 conv 1 -> 1 with weight 1 (quantized exactly: range [0, 1], 1 -> top code)."""
    conv = QuantConv2d(1, 1, 1, norm=norm, num_bits=num_bits)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return conv


def image(values):
    """A 1x1xHxW... batch: one channel, the values along the width."""
    return t(values).view(1, 1, 1, -1)


def test_weights_are_quantized_at_every_forward():
    conv = QuantConv2d(1, 2, 1, num_bits=3)
    with torch.no_grad():
        conv.weight.copy_(t([0.3, 0.1]).view(2, 1, 1, 1))
    out = conv(torch.ones(1, 1, 1, 1))
    close(out.flatten(), [0.3, 0.6 / 7])


def test_no_input_quantization_before_act_quant():
    conv = identity_conv()
    conv.train()
    x = image([0.1234567, -0.7654321, 2.3456789])
    close(conv(x), x)
    assert not bool(conv.act_range_ready)
    assert conv.act_min.item() == 0.0 and conv.act_max.item() == 0.0


def test_activation_range_ema():
    conv = identity_conv()
    conv.train()
    conv.act_quant = True
    # the first active batch copies its range
    out = conv(image([-1.0, 0.5, 3.0]))
    assert (conv.act_min.item(), conv.act_max.item()) == (-1.0, 3.0)
    # and is quantized with it: scale 4/255, zero point round(-128 + 63.75) = -64;
    # 0.5 -> 31.875 -> 32; -1 -> -63.75 -> -64; 3 -> 191.25 -> 191
    close(out, image([-64 * 4 / 255, 32 * 4 / 255, 191 * 4 / 255]))
    # then EMA with momentum 0.1; the batch range always includes 0: [2, 5] -> [0, 5]
    conv(image([2.0, 5.0]))
    assert conv.act_min.item() == pytest.approx(-0.9)   # 0.9 * -1 + 0.1 * 0
    assert conv.act_max.item() == pytest.approx(3.2)    # 0.9 * 3 + 0.1 * 5
    conv(image([-4.0, -2.0]))                            # [-4, 0]
    assert conv.act_min.item() == pytest.approx(-1.21)  # 0.9 * -0.9 + 0.1 * -4
    assert conv.act_max.item() == pytest.approx(2.88)   # 0.9 * 3.2 + 0.1 * 0


def test_first_active_batch_range_includes_zero():
    conv = identity_conv()
    conv.train()
    conv.act_quant = True
    conv(image([1.0, 2.0]))
    assert (conv.act_min.item(), conv.act_max.item()) == (0.0, 2.0)


def test_eval_before_any_range_is_unquantized_and_quantized_after():
    conv = identity_conv()
    conv.eval()
    x = image([0.5, 10.0, -0.7654321])
    close(conv(x), x)                       # no range recorded yet: inputs pass unchanged
    assert not bool(conv.act_range_ready)
    conv.train()
    conv.act_quant = True
    conv(image([-1.0, 3.0]))                # records [-1, 3]
    conv.eval()
    conv.act_quant = False                  # evaluation uses the stored range regardless
    # 0.5 -> 32 * 4/255; 10 -> clipped to the top code 127 -> 191 * 4/255; -0.765 * 63.75 = -48.8 -> -49
    close(conv(x), image([32 * 4 / 255, 191 * 4 / 255, -49 * 4 / 255]))
    # evaluation does not move the range
    assert (conv.act_min.item(), conv.act_max.item()) == (-1.0, 3.0)


def test_line_quant_conv_quantizes_the_interpolated_weight():
    conv = QuantConv2d(1, 2, 1, num_bits=3, line=True)
    with torch.no_grad():
        conv.weight.copy_(t([0.6, 0.0]).view(2, 1, 1, 1))
        conv.weight1.copy_(t([0.0, 0.4]).view(2, 1, 1, 1))
    conv.alpha = 0.5
    # theta(0.5) = [0.3, 0.2]: range [0, 0.3], scale 0.3/7; 0.2 / scale = 4.67 -> 5 -> 1.5/7
    close(conv(torch.ones(1, 1, 1, 1)).flatten(), [0.3, 1.5 / 7])


def bn_conv():
    gen = torch.Generator().manual_seed(0)
    norm = Norm2d("BN", 3)
    conv = QuantConv2d(2, 3, 3, padding=1, norm=norm, num_bits=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(3, 2, 3, 3, generator=gen) * 0.5)
        norm.weight.copy_(t([1.5, -0.5, 0.8]))
        norm.bias.copy_(t([0.1, -0.2, 0.3]))
        norm.running_mean.copy_(t([0.2, -0.1, 0.05]))
        norm.running_var.copy_(t([0.5, 2.0, 1.2]))
    return conv, torch.randn(4, 2, 5, 5, generator=gen)


def manual_folded_conv(conv, x):
    """SPEC 3.6 by hand: s = gamma / sqrt(var + eps); conv(x, q(w * s)) / s."""
    norm = conv.norm
    s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = fake_quantize_tensor(conv.weight * s.view(-1, 1, 1, 1), conv.num_bits)
    return F.conv2d(x, weight, padding=1) / s.view(1, -1, 1, 1)


def test_bn_folding_in_eval():
    conv, x = bn_conv()
    conv.eval()
    norm = conv.norm
    y = manual_folded_conv(conv, x)
    expected = ((y - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(norm.running_var.view(1, -1, 1, 1) + norm.eps)
                * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        assert torch.allclose(conv(x), expected, atol=1e-5)
    # folding matters: quantizing the unfolded weight gives another result
    unfolded = F.conv2d(x, fake_quantize_tensor(conv.weight, conv.num_bits), padding=1)
    unfolded = F.batch_norm(unfolded, norm.running_mean, norm.running_var, norm.weight, norm.bias, False)
    assert not torch.allclose(conv(x), unfolded, atol=1e-3)


def test_bn_folding_in_training_uses_batch_statistics():
    conv, x = bn_conv()
    conv.train()
    norm = conv.norm
    y = manual_folded_conv(conv, x).detach()
    expected = F.batch_norm(y, None, None, norm.weight.detach(), norm.bias.detach(), training=True)
    running_mean = norm.running_mean.clone()
    assert torch.allclose(conv(x), expected, atol=1e-5)
    # the folded conv's BN updates its running mean from the batch: 0.9 * old + 0.1 * mean(y)
    assert torch.allclose(norm.running_mean, 0.9 * running_mean + 0.1 * y.mean(dim=(0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("kind", ["IN", "GN"])
def test_no_folding_without_bn(kind):
    gen = torch.Generator().manual_seed(1)
    norm = Norm2d(kind, 4, num_groups=2)
    conv = QuantConv2d(2, 4, 1, norm=norm, num_bits=5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 2, 1, 1, generator=gen))
        norm.weight.copy_(t([2.0, 0.5, -1.0, 1.0]))
    x = torch.randn(2, 2, 3, 3, generator=gen)
    assert conv.fold_scale() is None
    y = F.conv2d(x, fake_quantize_tensor(conv.weight, 5))
    if kind == "IN":
        expected = F.instance_norm(y, weight=norm.weight, bias=norm.bias)
    else:
        expected = F.group_norm(y, 2, norm.weight, norm.bias)
    assert torch.allclose(conv(x), expected, atol=1e-5)

"""Affine fake-quantisation (SPEC 3.6) as pure functions.

Per-tensor, asymmetric, on the signed b-bit grid [-2^(b-1), 2^(b-1) - 1]. The range always
contains 0. Rounding is half-to-even. Gradients are straight-through (identity), also for
values outside the range, as in the original.
"""

import torch

# A range of exactly [0, 0] (an all-zero tensor) would give a zero scale; the floor keeps the
# arithmetic finite and maps such a tensor to zeros, which is its exact value.
MIN_SCALE = 1e-12


def grid_limits(num_bits):
    """(q_min, q_max) of the signed integer grid of `num_bits` bits."""
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def affine_params(range_min, range_max, num_bits):
    """Scale and zero point for a tensor range; returns (scale float32, zero_point int32)."""
    q_min, q_max = grid_limits(num_bits)
    range_min = torch.clamp(range_min.float(), max=0.0)
    range_max = torch.clamp(range_max.float(), min=0.0)
    scale = torch.clamp((range_max - range_min) / (2**num_bits - 1), min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(q_min - range_min / scale), q_min, q_max)
    return scale, zero_point.to(torch.int32)


def quantize_to_int(x, scale, zero_point, num_bits):
    """Integer codes of x on the grid (used by export); (q - zero_point) * scale dequantizes.

    Multiplies by the reciprocal of the scale, as the fused fake-quant kernel does, so the
    codes reproduce `fake_quantize` bit for bit.
    """
    q_min, q_max = grid_limits(num_bits)
    return torch.clamp(torch.round(x.float() * (1.0 / scale)) + zero_point, q_min, q_max)


def quantize_tensor_to_int(x, num_bits):
    """The integer form of `fake_quantize_tensor`: (codes, scale, zero_point) with the range of
    x itself; dequantize(codes, scale, zero_point) equals fake_quantize_tensor(x) bit for bit."""
    detached = x.detach()
    scale, zero_point = affine_params(detached.min(), detached.max(), num_bits)
    return quantize_to_int(detached, scale, zero_point, num_bits), scale, zero_point


def dequantize(codes, scale, zero_point):
    """(q - zero_point) * scale in float32, as the fake-quant kernel computes it."""
    return (codes - zero_point).float() * scale


def quantize_dequantize(x, scale, zero_point, q_min, q_max):
    """(clamp(round(x / scale) + zero_point, q_min, q_max) - zero_point) * scale with the
    arithmetic of torch.fake_quantize_per_tensor_affine (x times the float reciprocal of the
    scale, round half to even), so the two agree bit for bit.

    On CUDA the fused kernel is one launch; elsewhere (and when compiled, where it would break
    the graph) these elementwise operations are faster: the fused CPU kernel also writes a
    mask that the straight-through gradient never reads.
    """
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, q_min, q_max)
    zero_point = zero_point.to(x.dtype)
    codes = torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(q_min, q_max)
    return codes.sub_(zero_point).mul_(scale)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min, q_max):
        return quantize_dequantize(x, scale, zero_point, q_min, q_max)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


def fake_quantize(x, range_min, range_max, num_bits):
    """Quantize-dequantize x with the range [min(range_min, 0), max(range_max, 0)]."""
    scale, zero_point = affine_params(range_min, range_max, num_bits)
    q_min, q_max = grid_limits(num_bits)
    return _FakeQuantSTE.apply(x.float(), scale, zero_point, q_min, q_max).to(x.dtype)


def fake_quantize_tensor(x, num_bits):
    """Fake-quantize with the range of x itself (weights: recomputed at every call)."""
    range_min, range_max = torch.aminmax(x.detach())
    return fake_quantize(x, range_min, range_max, num_bits)

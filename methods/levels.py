"""Pure functions for compression levels: samplers, maps and schedules (SPEC 3.2, 3.7).

The samplers import torch when called: the maps and the classes of methods/ that use them are
read by the command line before torch is imported (see methods/__init__.py)."""

import math


def uniform(low, high, generator):
    """One draw of U(low, high) from a torch generator."""
    import torch

    return low + (high - low) * torch.rand((), generator=generator).item()


def sandwich(low, high, num_samples, generator):
    """[low, high, u_1, ..., u_{n-2}] with u ~ U(low, high) (US / LCS sandwich rule)."""
    assert num_samples >= 2, "the sandwich rule needs at least the two ends"
    return [low, high] + [uniform(low, high, generator) for _ in range(num_samples - 2)]


def sample_alpha_biased(low, high, endpoint_probability, generator):
    """With probability p an endpoint (low or high, 50/50), otherwise U(low, high)."""
    import torch

    if torch.rand((), generator=generator).item() < endpoint_probability:
        return low if torch.rand((), generator=generator).item() < 0.5 else high
    return uniform(low, high, generator)


def decayed_topk(target, step, warmup_iterations):
    """TopK fraction falling linearly from 1 to `target` over the warmup:
    k = target + (1 - target) * max(1 - step / W, 0)."""
    return target + (1.0 - target) * max(1.0 - step / warmup_iterations, 0.0)


def alpha_to_width(alpha, low, high):
    return low + (high - low) * alpha


def width_to_alpha(width, low, high):
    return (width - low) / (high - low)


def alpha_to_bits(alpha, min_bits, max_bits):
    """min_bits + i for the first i with i/n <= alpha <= (i+1)/n, n = max - min + 1
    (closed intervals, first match wins: alpha = k/6 -> 2 + k bits for 3..8)."""
    n = max_bits - min_bits + 1
    for i in range(n):
        if i / n <= alpha <= (i + 1) / n:
            return min_bits + i
    raise ValueError(f"alpha {alpha} is outside [0, 1]")


def bits_to_alpha(num_bits, min_bits, max_bits):
    """The alpha at which a bit width is evaluated: the original's grid (SPEC 2.3), i.e. the
    largest multiple of 0.001 below i/n, i = bits - min + 1, and 1.0 for max_bits
    (3..8 -> 0.166, 0.333, 0.499, 0.666, 0.833, 1.0). Strictly inside the bit width's
    interval of alpha_to_bits, so the two maps are inverse."""
    n = max_bits - min_bits + 1
    i = num_bits - min_bits + 1
    if i == n:
        return 1.0
    return (math.ceil(1000 * i / n) - 1) / 1000


def discrete_alpha(min_bits, max_bits, generator):
    """alpha uniform over {1/n, 2/n, ..., 1} (alpha = 0 is never drawn)."""
    import torch

    n = max_bits - min_bits + 1
    return int(torch.randint(1, n + 1, (), generator=generator)) / n


def cosine_lr(base_lr, epoch, epochs, warmup_length=5):
    """Per-epoch LR: linear warmup lr * (e + 1) / 5 for e < 5, then half-cosine to 0."""
    if epoch < warmup_length:
        return base_lr * (epoch + 1) / warmup_length
    progress = (epoch - warmup_length) / (epochs - warmup_length)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def warmup_iterations(warmup_budget, epochs, num_train, batch_size):
    """ceil(budget/100 * epochs * N / B), N / B not rounded up (SPEC 1.3)."""
    return math.ceil(warmup_budget / 100 * epochs * num_train / batch_size)


def cosine_squared(pairs):
    """Squared cosine similarity of the two endpoints, all pairs concatenated (one global
    cosine): (sum <v0, v1>)^2 / (sum |v0|^2 * sum |v1|^2)."""
    dot = sum((v0 * v1).sum() for v0, v1 in pairs)
    norm0 = sum(v0.pow(2).sum() for v0, _ in pairs)
    norm1 = sum(v1.pow(2).sum() for _, v1 in pairs)
    return dot.pow(2) / (norm0 * norm1)

"""Level math of methods/levels.py against values derived by hand from SPEC 1.3, 2.3, 3.2,
3.7 and 3.9."""

import math

import pytest
import torch

from methods.levels import (alpha_to_bits, alpha_to_width, bits_to_alpha, cosine_lr, cosine_squared,
                            decayed_topk, discrete_alpha, sample_alpha_biased, sandwich, warmup_iterations,
                            width_to_alpha)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# -- sandwich sampler (US, structured LCS+P / LCS+L) -------------------------------------
def test_sandwich_starts_with_both_ends_then_uniform_draws_in_range():
    gen = generator()
    for _ in range(200):
        widths = sandwich(0.25, 1.0, 4, gen)
        assert len(widths) == 4
        assert widths[:2] == [0.25, 1.0]
        assert all(0.25 <= w <= 1.0 for w in widths[2:])


def test_sandwich_draws_cover_the_range_uniformly():
    gen = generator(1)
    draws = [w for _ in range(2000) for w in sandwich(0.0, 1.0, 4, gen)[2:]]
    # U(0, 1): mean 1/2 (std of the mean of 4000 draws: 0.0046), a quarter in each quarter.
    assert abs(sum(draws) / len(draws) - 0.5) < 0.02
    for quarter in range(4):
        share = sum(quarter / 4 <= d < (quarter + 1) / 4 for d in draws) / len(draws)
        assert abs(share - 0.25) < 0.03


def test_sandwich_is_reproducible_from_the_seed():
    assert sandwich(0.25, 1.0, 6, generator(7)) == sandwich(0.25, 1.0, 6, generator(7))
    assert sandwich(0.25, 1.0, 6, generator(7)) != sandwich(0.25, 1.0, 6, generator(8))


def test_sandwich_of_two_is_just_the_ends():
    assert sandwich(0.25, 1.0, 2, generator()) == [0.25, 1.0]


# -- biased endpoint sampling (unstructured LCS+L) ---------------------------------------
def test_biased_endpoint_sampling_frequencies():
    """alpha_sampling [0.025, 1, 0.5]: P(lo) = P(hi) = 0.25, P(interior) = 0.5 (SPEC 3.2).
    With 20,000 draws a frequency's standard deviation is at most 0.0036: bound at 5 sigma."""
    gen = generator(3)
    draws = [sample_alpha_biased(0.025, 1.0, 0.5, gen) for _ in range(20000)]
    n = len(draws)
    low = sum(d == 0.025 for d in draws) / n
    high = sum(d == 1.0 for d in draws) / n
    interior = [d for d in draws if d not in (0.025, 1.0)]
    assert abs(low - 0.25) < 0.018
    assert abs(high - 0.25) < 0.018
    assert abs(len(interior) / n - 0.5) < 0.018
    assert all(0.025 < d < 1.0 for d in interior)
    # Interior draws are U(0.025, 1): mean 0.5125.
    assert abs(sum(interior) / len(interior) - 0.5125) < 0.01


def test_biased_sampling_without_endpoint_probability_is_uniform():
    gen = generator(4)
    draws = [sample_alpha_biased(0.2, 0.6, 0.0, gen) for _ in range(2000)]
    assert all(0.2 <= d < 0.6 for d in draws)
    assert sum(d in (0.2, 0.6) for d in draws) == 0
    assert abs(sum(draws) / len(draws) - 0.4) < 0.01


def test_biased_sampling_is_reproducible_from_the_seed():
    def draws(seed):
        gen = generator(seed)
        return [sample_alpha_biased(0.025, 1.0, 0.5, gen) for _ in range(50)]

    assert draws(6) == draws(6)
    assert draws(6) != draws(7)


# -- TopK warmup decay --------------------------------------------------------------------
@pytest.mark.parametrize("step, expected", [
    (0, 1.0),                        # dense at the start
    (500, 0.025 + 0.975 * 0.5),      # half way: 0.5125
    (1000, 0.025),                   # the target at W
    (2000, 0.025),                   # and after W (max(1 - t/W, 0) = 0)
])
def test_decayed_topk(step, expected):
    assert decayed_topk(0.025, step, 1000) == pytest.approx(expected, abs=1e-12)


def test_decayed_topk_of_a_dense_target_stays_dense():
    assert [decayed_topk(1.0, t, 10) for t in (0, 5, 10, 20)] == [1.0, 1.0, 1.0, 1.0]


# -- alpha <-> width ----------------------------------------------------------------------
@pytest.mark.parametrize("alpha, width", [(0.0, 0.25), (1.0, 1.0), (0.5, 0.625), (1 / 6, 0.375),
                                          (5 / 6, 0.875)])
def test_alpha_to_width(alpha, width):
    assert alpha_to_width(alpha, 0.25, 1.0) == pytest.approx(width, abs=1e-12)


@pytest.mark.parametrize("width, alpha", [(1.0, 1.0), (0.875, 5 / 6), (0.75, 2 / 3), (0.625, 0.5),
                                          (0.5, 1 / 3), (0.375, 1 / 6), (0.25, 0.0)])
def test_width_to_alpha(width, alpha):
    assert width_to_alpha(width, 0.25, 1.0) == pytest.approx(alpha, abs=1e-12)
    assert alpha_to_width(width_to_alpha(width, 0.25, 1.0), 0.25, 1.0) == pytest.approx(width, abs=1e-12)


def test_width_to_alpha_with_other_limits():
    # limits (0.5, 1.0): width 0.75 is half way
    assert width_to_alpha(0.75, 0.5, 1.0) == pytest.approx(0.5)


# -- alpha <-> bits (quantized LCS+L) -------------------------------------------------------
@pytest.mark.parametrize("alpha, bits", [
    (0.166, 3), (0.333, 4), (0.499, 5), (0.666, 6), (0.833, 7), (1.0, 8),   # the YAML grid (SPEC 2.3)
    (0.0, 3), (0.5, 5),                                                    # closed intervals, first wins
    (0.1, 3), (0.2, 4), (0.4, 5), (0.6, 6), (0.7, 7), (0.9, 8),             # interiors
])
def test_alpha_to_bits(alpha, bits):
    assert alpha_to_bits(alpha, 3, 8) == bits


@pytest.mark.parametrize("k", range(1, 7))
def test_alpha_k_sixths_maps_to_two_plus_k_bits(k):
    # k/6 is the upper end of bucket k - 1 and the lower end of bucket k: the first match wins.
    assert alpha_to_bits(k / 6, 3, 8) == 2 + k


def test_alpha_to_bits_other_limits():
    # 4..6: n = 3 buckets [0, 1/3], [1/3, 2/3], [2/3, 1]
    assert [alpha_to_bits(a, 4, 6) for a in (0.0, 0.3, 1 / 3, 0.5, 0.7, 1.0)] == [4, 4, 4, 5, 6, 6]


def test_alpha_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError):
        alpha_to_bits(1.01, 3, 8)
    with pytest.raises(ValueError):
        alpha_to_bits(-0.01, 3, 8)


def test_bits_to_alpha_gives_the_original_grid():
    # The alphas of configs/quantized/lcs_l.yaml in the original (SPEC 2.3): 5 bits at 0.499,
    # strictly inside its interval [2/6, 3/6] rather than on the boundary 0.5.
    assert [bits_to_alpha(b, 3, 8) for b in range(3, 9)] == [0.166, 0.333, 0.499, 0.666, 0.833, 1.0]
    assert [bits_to_alpha(b, 4, 6) for b in range(4, 7)] == [0.333, 0.666, 1.0]
    assert [bits_to_alpha(b, 3, 4) for b in range(3, 5)] == [0.499, 1.0]


def test_bits_to_alpha_round_trips():
    for low, high in ((3, 8), (4, 6), (3, 4), (2, 8)):
        for bits in range(low, high + 1):
            assert alpha_to_bits(bits_to_alpha(bits, low, high), low, high) == bits


def test_discrete_alpha_draws_each_sixth_equally_and_never_zero():
    gen = generator(9)
    draws = [discrete_alpha(3, 8, gen) for _ in range(6000)]
    values = sorted(set(draws))
    assert values == [k / 6 for k in range(1, 7)]
    for value in values:
        # P = 1/6; std of the frequency = 0.0048
        assert abs(draws.count(value) / len(draws) - 1 / 6) < 0.025
    assert [alpha_to_bits(v, 3, 8) for v in values] == [3, 4, 5, 6, 7, 8]


# -- learning rate schedule (SPEC 3.9) --------------------------------------------------------
def test_cosine_lr_warmup_epochs():
    assert [cosine_lr(0.1, e, 200) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])


def test_cosine_lr_cosine_part():
    assert cosine_lr(0.1, 5, 200) == pytest.approx(0.1)
    # epoch 199 of 200: 0.05 * (1 + cos(pi * 194/195)) = 0.05 * (1 - cos(pi/195)) ~ 0.05 * (pi/195)^2 / 2
    assert cosine_lr(0.1, 199, 200) == pytest.approx(0.05 * (math.pi / 195) ** 2 / 2, rel=1e-4)
    assert cosine_lr(0.1, 199, 200) == pytest.approx(6.5e-6, abs=0.05e-6)
    # 15 epochs: epoch 10 is half way through the cosine (progress 5/10)
    assert cosine_lr(0.2, 10, 15) == pytest.approx(0.1)
    # a quarter of the way: 0.5 * (1 + cos(pi/4))
    assert cosine_lr(1.0, 7, 13) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))


def test_cosine_lr_decreases_after_the_warmup():
    values = [cosine_lr(0.1, e, 200) for e in range(5, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 0


# -- warmup iterations (SPEC 1.3) ----------------------------------------------------------
def test_warmup_iterations_cifar_default():
    # ceil(0.8 * 200 * 50000 / 128): N / B is not rounded up (391 steps per epoch would give 62,560)
    assert warmup_iterations(80, 200, 50000, 128) == 62500


def test_warmup_iterations_imagenet_resnet18():
    # 0.8 * 90 * 1281167 / 128 = 720656.44 -> 720657
    assert warmup_iterations(80, 90, 1281167, 128) == 720657


def test_warmup_iterations_rounds_up():
    # 0.5 * 1 * 10 / 4 = 1.25 -> 2
    assert warmup_iterations(50, 1, 10, 4) == 2
    assert warmup_iterations(100, 2, 256, 128) == 4


# -- cos^2 between the endpoints (SPEC 3.7) ---------------------------------------------------
def test_cosine_squared_single_pair():
    # <[1, 0], [1, 1]> = 1, |v0|^2 = 1, |v1|^2 = 2
    value = cosine_squared([(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))])
    assert value.item() == pytest.approx(0.5)


def test_cosine_squared_is_one_global_cosine_over_all_pairs():
    pairs = [(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])),   # orthogonal
             (torch.tensor([[2.0]]), torch.tensor([[2.0]]))]            # parallel
    # concatenated: dot = 4, |v0|^2 = 5, |v1|^2 = 5 -> 16/25 (a per-pair mean would give 0.5)
    assert cosine_squared(pairs).item() == pytest.approx(0.64)


def test_cosine_squared_extremes():
    v = torch.tensor([1.0, -2.0, 3.0])
    assert cosine_squared([(v, 3 * v)]).item() == pytest.approx(1.0)
    assert cosine_squared([(v, -v)]).item() == pytest.approx(1.0)
    assert cosine_squared([(v, torch.tensor([2.0, 1.0, 0.0]))]).item() == pytest.approx(0.0)


def test_cosine_squared_gradient():
    # f = <a,b>^2 / (|a|^2 |b|^2); df/da = 2<a,b> b / (|a|^2|b|^2) - 2<a,b>^2 a / (|a|^4 |b|^2)
    # a = [1, 0], b = [1, 1]: [1, 1] - [1, 0] = [0, 1]; df/db = [1, 0] - [0.5, 0.5] = [0.5, -0.5]
    a = torch.tensor([1.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0], requires_grad=True)
    cosine_squared([(a, b)]).backward()
    assert a.grad.tolist() == pytest.approx([0.0, 1.0])
    assert b.grad.tolist() == pytest.approx([0.5, -0.5])

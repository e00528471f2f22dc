"""Training methods (methods/): the levels each draws per step (SPEC 3.2, 3.4), the cos^2
line regulariser (SPEC 3.7), LEC's L1 sub-gradient and sparsity (SPEC 3.5), and one training
step plus one evaluation for every setting x method on tiny random data."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods import METHODS
from methods.levels import alpha_to_bits
from models import build_model, count_parameters
from models.layers import ChannelSelection, Level, Norm2d, QuantConv2d, quant_layers
from training_params import parse
from utils.distributed import Context
from engine.evaluate import evaluate
from unit_support import single_thread  # noqa: F401 (single_thread: autouse fixture)

REGISTRY = [(setting, name) for setting, methods in METHODS.items() for name in methods]
ENDPOINTS = (0.025, 1.0)


def make_method(setting, name, warmup=100, *flags):
    config, _ = parse(setting, ["--method", name, *flags])
    return METHODS[setting][name](config, warmup)


def make_model(method):
    model = build_model("cpreresnet20", method.layer_factory(), 10)
    method.bind(model)
    return model


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# -- every setting x method: build, one training step, one evaluation ----------------------------
def train_step(method, model, step, gen, images, labels, lr=0.01):
    """SPEC 3.9: one forward per level, summed losses, the regulariser once, one SGD step
    (plain SGD written out: torch.optim's first use costs seconds of imports)."""
    levels_list = method.train_levels(step, gen)
    assert levels_list, "a step has at least one forward"
    total = 0.0
    for index, levels in enumerate(levels_list):
        method.apply_levels(model, levels)
        loss = F.cross_entropy(model(images), labels)
        if index == len(levels_list) - 1:
            penalty = method.regularizer(model)
            if penalty is not None:
                loss = loss + penalty
        loss.backward()
        total += loss.item()
    method.after_backward(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing[:5]}"
    with torch.no_grad():
        for _, p in trainable:
            p.sub_(lr * p.grad)
            p.grad = None
    return total


@pytest.mark.parametrize("setting, name", REGISTRY, ids=[f"{s}-{n}" for s, n in REGISTRY])
def test_every_method_trains_a_step_and_evaluates(setting, name):
    torch.manual_seed(0)
    method = make_method(setting, name, 1)
    model = make_model(method)
    gen = generator()
    images = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for step in (0, 1):                     # before and after the warmup (W = 1)
        loss = train_step(method, model, step, gen, images, labels)
        assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # evaluate the first point of the grid
    method.config.eval_param_grid = method.config.eval_param_grid[:1]
    data = SimpleNamespace(test=SimpleNamespace(batches=lambda: [(images, labels)]), input_size=32)
    [row] = evaluate(model, method, data, Context(), step=2)
    assert row["num_images"] == 4
    assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0
    assert row["level"] == pytest.approx(method.eval_points()[0].level)
    if setting == "quantized":
        assert row["num_bits"] == row["level"] and row["act_quant"] is True
    else:
        assert 0 <= row["sparsity"] < 1
    assert model.training, "evaluation restores training mode"


# -- unstructured ----------------------------------------------------------------------------------
def test_lcs_l_unstructured_levels_follow_the_warmup_decay():
    method = make_method("unstructured_sparsity", "lcs_l", 100)
    gen = generator()
    for step, expected in ((0, lambda a: 1.0), (50, lambda a: a + (1 - a) * 0.5), (100, lambda a: a),
                           (300, lambda a: a)):
        for _ in range(20):
            [levels] = method.train_levels(step, gen)
            assert 0.025 <= levels.alpha <= 1.0
            assert levels.topk == pytest.approx(expected(levels.alpha))


def test_lcs_l_unstructured_samples_endpoints_a_quarter_each():
    method = make_method("unstructured_sparsity", "lcs_l", 100)
    gen = generator(1)
    alphas = [method.train_levels(200, gen)[0].alpha for _ in range(8000)]
    for endpoint in ENDPOINTS:                           # std of the frequency 0.005
        assert abs(alphas.count(endpoint) / len(alphas) - 0.25) < 0.025


def test_lcs_l_unstructured_bounds_set_the_sampled_range():
    method = make_method("unstructured_sparsity", "lcs_l", 100, "--topk_lower_bound", "0.005",
                         "--topk_upper_bound", "0.05", "--eval_topk_grid", "0.005,0.05")
    gen = generator(2)
    alphas = [method.train_levels(200, gen)[0].alpha for _ in range(400)]
    assert min(alphas) == 0.005 and max(alphas) == 0.05


def test_lcs_l_unstructured_evaluation_levels():
    method = make_method("unstructured_sparsity", "lcs_l", 100)
    points = method.eval_points()
    assert [p.alpha for p in points] == [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 0.75,
                                         0.9, 0.95, 1.0]
    assert all(p.level == p.alpha for p in points)
    # during the warmup evaluations are denser than their label (SPEC 3.2)
    assert method.eval_levels(points[0], 50) == Level(alpha=0.025, topk=pytest.approx(0.5125))
    assert method.eval_levels(points[0], 100) == Level(alpha=0.025, topk=pytest.approx(0.025))


def test_lcs_p_unstructured_dense_during_warmup_then_uniform():
    method = make_method("unstructured_sparsity", "lcs_p", 10)
    gen = generator()
    assert method.train_levels(9, gen) == [Level(topk=1.0)]
    draws = [method.train_levels(10, gen)[0].topk for _ in range(500)]
    assert all(0.025 <= k < 1.0 for k in draws)
    assert abs(sum(draws) / len(draws) - 0.5125) < 0.04              # U(0.025, 1)
    # evaluation at the grid value itself, no decay
    assert method.eval_levels(method.eval_points()[0], 0) == Level(topk=0.025)


def test_target_topk_decays_to_the_target():
    method = make_method("unstructured_sparsity", "target_topk", 10)
    gen = generator()
    assert [method.train_levels(t, gen)[0].topk for t in (0, 5, 10, 20)] == pytest.approx([1.0, 0.95, 0.9, 0.9])
    point = [p for p in method.eval_points() if p.level == 0.5][0]
    assert method.eval_levels(point, 5).topk == pytest.approx(0.75)
    assert method.eval_levels(point, 10).topk == pytest.approx(0.5)


def test_target_topk_flag_sets_the_target():
    method = make_method("unstructured_sparsity", "target_topk", 10, "--topk", "0.5")
    assert method.train_levels(10, generator())[0].topk == 0.5


# -- structured ------------------------------------------------------------------------------------
def test_lcs_l_structured_sandwich_of_alphas():
    method = make_method("structured_sparsity", "lcs_l")
    gen = generator()
    for _ in range(20):
        levels = method.train_levels(0, gen)
        assert len(levels) == 4
        assert [lv.alpha for lv in levels[:2]] == [0.0, 1.0]
        assert [lv.width_factor for lv in levels[:2]] == [0.25, 1.0]
        for lv in levels[2:]:
            assert 0 <= lv.alpha <= 1
            assert lv.width_factor == pytest.approx(0.25 + 0.75 * lv.alpha)


def test_lcs_l_structured_evaluation_points():
    method = make_method("structured_sparsity", "lcs_l")
    points = method.eval_points()
    assert [p.level for p in points] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25]
    # the grid is in widths; alpha = (w - 0.25) / 0.75 lives inside the method
    assert [p.alpha for p in points] == pytest.approx([1.0, 5 / 6, 4 / 6, 0.5, 2 / 6, 1 / 6, 0.0])
    assert method.eval_levels(points[3], 0) == Level(alpha=0.5, width_factor=0.625)


@pytest.mark.parametrize("name", ["us", "lcs_p"])
def test_us_and_lcs_p_sandwich_of_widths(name):
    method = make_method("structured_sparsity", name)
    gen = generator()
    draws = []
    for _ in range(200):
        widths = [lv.width_factor for lv in method.train_levels(0, gen)]
        assert widths[:2] == [0.25, 1.0] and len(widths) == 4
        draws += widths[2:]
    assert all(0.25 <= w <= 1.0 for w in draws)
    assert abs(sum(draws) / len(draws) - 0.625) < 0.03
    assert method.eval_levels(method.eval_points()[1], 0) == Level(width_factor=0.875)


def test_ns_runs_its_width_list_in_order():
    method = make_method("structured_sparsity", "ns")
    assert method.train_levels(0, generator()) == [Level(width_factor=w) for w in (1.0, 0.75, 0.5, 0.25)]


# -- quantized -------------------------------------------------------------------------------------
def test_lcs_l_quantized_levels():
    method = make_method("quantized", "lcs_l", 10)
    gen = generator()
    seen = set()
    for step, act in ((0, False), (9, False), (10, True), (50, True)):
        for _ in range(30):
            [levels] = method.train_levels(step, gen)
            k = round(levels.alpha * 6)
            assert levels.alpha == k / 6 and 1 <= k <= 6     # {1/6, ..., 1}, never 0
            assert levels.num_bits == 2 + k
            assert levels.act_quant is act
            seen.add(levels.num_bits)
    assert seen == {3, 4, 5, 6, 7, 8}
    points = method.eval_points()
    assert [p.level for p in points] == [3, 4, 5, 6, 7, 8]
    assert [p.alpha for p in points] == [0.166, 0.333, 0.499, 0.666, 0.833, 1.0]
    assert method.eval_levels(points[2], 0) == Level(alpha=0.499, num_bits=5)


def test_lcs_l_quantized_continuous_alpha():
    method = make_method("quantized", "lcs_l", 10)
    method.config.discrete_alpha_map = False
    gen = generator()
    for _ in range(50):
        [levels] = method.train_levels(0, gen)
        assert levels.num_bits == alpha_to_bits(levels.alpha, 3, 8)


def test_target_bit_width_levels():
    method = make_method("quantized", "target_bit_width", 10)
    assert method.train_levels(0, generator()) == [Level(num_bits=6, act_quant=False)]
    assert method.train_levels(10, generator()) == [Level(num_bits=6, act_quant=True)]
    method = make_method("quantized", "target_bit_width", 10, "--bit_width", "4")
    assert method.train_levels(10, generator())[0].num_bits == 4


@pytest.mark.parametrize("flags, warmup_bits", [((), 8), (("--bit_width_limits", "3,6"), 6)])
def test_lcs_p_quantized_upper_bit_width_during_warmup(flags, warmup_bits):
    """The warmup trains at max_bits (the original's), not at a fixed 8 bits."""
    method = make_method("quantized", "lcs_p", 10, *flags)
    model = make_model(method)
    assert len(quant_layers(model)) == 21
    for layer in quant_layers(model):
        layer.num_bits = 3
    [levels] = method.train_levels(9, generator())
    assert levels == Level(num_bits=warmup_bits, act_quant=False)
    method.apply_levels(model, levels)
    assert [layer.num_bits for layer in quant_layers(model)] == [warmup_bits] * 21


def test_lcs_p_quantized_independent_bits_per_layer_after_warmup():
    method = make_method("quantized", "lcs_p", 10)
    model = make_model(method)
    gen = generator(5)
    draws = []
    for _ in range(600):
        [levels] = method.train_levels(10, gen)
        assert levels.act_quant is True
        method.apply_levels(model, levels)
        bits = [layer.num_bits for layer in quant_layers(model)]
        assert bits == list(levels.layer_bits)
        assert len(set(bits)) > 1                      # all 21 equal: probability 6^-20
        draws.append(bits)
    assert all(layer.act_quant for layer in quant_layers(model))
    columns = list(zip(*draws))
    for column in (columns[0], columns[10], columns[20]):
        assert set(column) == {3, 4, 5, 6, 7, 8}
        for bits in range(3, 9):                       # 1/6 each; std 0.015
            assert abs(column.count(bits) / len(column) - 1 / 6) < 0.07
    # independent layers agree 1/6 of the time (fully tied layers would always agree)
    agree = sum(a == b for a, b in zip(columns[0], columns[1])) / len(draws)
    assert abs(agree - 1 / 6) < 0.07


def test_quantized_metrics_say_whether_activations_were_quantized():
    method = make_method("quantized", "target_bit_width", 1)
    model = make_model(method)
    assert method.compression_metrics(model, 32) == {"num_bits": 8, "act_quant": False}
    model.train()
    method.apply_levels(model, method.train_levels(1, generator())[0])
    model(torch.randn(2, 3, 32, 32))
    assert method.compression_metrics(model, 32) == {"num_bits": 6, "act_quant": True}


# -- the cos^2 regulariser of LCS+L (SPEC 3.7) --------------------------------------------------------
def line_convs(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and getattr(m, "weight1", None) is not None]


def test_structured_regulariser_uses_norm_gammas_only():
    method = make_method("structured_sparsity", "lcs_l")
    model = make_model(method)
    assert line_convs(model) == []                                     # convs are shared
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Norm2d):
                m.weight.fill_(1.0)
                m.weight1.copy_((torch.arange(m.num_features) % 2 == 0).float())   # half the channels
                m.bias1.normal_()                                      # betas do not enter
    # 1360 channels: dot = 680, |g0|^2 = 1360, |g1|^2 = 680 -> 680^2 / (1360 * 680) = 0.5
    assert method.regularizer(model).item() == pytest.approx(0.5)
    method.config.apply_beta_to_norm = False
    assert method.regularizer(model) is None


def set_conv_endpoints(model):
    """Endpoint 0 all ones; endpoint 1 ones on the stem and classifier, zeros in the body."""
    with torch.no_grad():
        for name, m in line_convs(model):
            m.weight.fill_(1.0)
            m.weight1.fill_(1.0 if name in ("conv1", "fc") else 0.0)
        for m in model.modules():
            if isinstance(m, Norm2d) and m.on_line:
                m.weight1.fill_(-3.0)                                  # norms do not enter


@pytest.mark.parametrize("setting, norm", [("unstructured_sparsity", "GN"), ("quantized", "GN"), ("quantized", "BN")])
def test_conv_regulariser_covers_every_line_conv_including_stem_and_classifier(setting, norm):
    method = make_method(setting, "lcs_l", 100, "--norm", norm)
    model = make_model(method)
    convs = dict(line_convs(model))
    assert "conv1" in convs and "fc" in convs and len(convs) == 2 + 21
    assert sum(m.weight.numel() for m in convs.values()) == 216752
    set_conv_endpoints(model)
    # stem 3*16*9 = 432 and classifier 256*10 = 2560 weights overlap: dot = |w1|^2 = 2992
    expected = 2992 / 216752
    assert method.regularizer(model).item() == pytest.approx(expected, rel=1e-5)
    method.config.beta = 2.0
    assert method.regularizer(model).item() == pytest.approx(2 * expected, rel=1e-5)


def test_regulariser_gradient_reaches_both_conv_endpoints_not_norms():
    method = make_method("unstructured_sparsity", "lcs_l")
    model = make_model(method)
    method.regularizer(model).backward()
    for _, m in line_convs(model):
        assert m.weight.grad.abs().sum() > 0 and m.weight1.grad.abs().sum() > 0
    assert all(m.weight.grad is None and m.weight1.grad is None for m in model.modules() if isinstance(m, Norm2d))


# -- LEC -------------------------------------------------------------------------------------------
def test_lec_l1_subgradient_on_norm_weights_only():
    method = make_method("structured_sparsity", "lec")
    method.config.bn_update_factor = 0.5
    model = make_model(method)
    norm = model.layer1[0].bn2
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -1.0, 0.0] + [1.0] * 13))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    method.after_backward(model)
    assert norm.weight.grad[:3].tolist() == [1.5, 0.5, 1.0]               # 1 + 0.5 * sign(gamma)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Norm2d):
            continue
        assert torch.all(p.grad == 1), name                                # biases, convs untouched


def test_lec_yaml_strength():
    assert make_method("structured_sparsity", "lec").config.bn_update_factor == 1e-5


def test_lec_evaluation_sparsity_is_one_minus_the_parameter_ratio():
    method = make_method("structured_sparsity", "lec")
    model = make_model(method).eval()
    special = torch.tensor([0.1 * (i + 1) for i in range(16)])
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Norm2d):
                m.weight.copy_(special if name == "layer1.0.bn2" else torch.full((m.num_features,), 2.0))
    point = SimpleNamespace(level=0.99)
    slim, metrics = method.eval_model(model, point)
    # layer1.0.bn2 keeps 2 of 16 channels: 224 + 28 + 2016 = 2268 parameters fewer (see test_models)
    assert count_parameters(model) == 220384
    assert metrics["params"] == 220384 - 2268 == count_parameters(slim)
    assert metrics["sparsity"] == pytest.approx(2268 / 220384)
    assert metrics["channel_floor_applied"] is False
    # at fraction 0.05 the small layer would lose every channel: the floor applies
    assert method.eval_model(model, SimpleNamespace(level=0.05))[1]["channel_floor_applied"] is True


def test_lec_channel_selection_indexes_never_train():
    model = make_model(make_method("structured_sparsity", "lec"))
    selections = [m for m in model.modules() if isinstance(m, ChannelSelection)]
    assert selections and all(not m.indexes.requires_grad for m in selections)
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())

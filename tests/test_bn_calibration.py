"""Re-estimated BN statistics (models/bn_calibration.py) and how evaluation uses them: exact
statistics on a hand-checked network, torch's update_bn as a cross-check, the slimmable slice,
the original's test-batch mode of LEC, and the model left as it was."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from methods import METHODS
from methods.base import EvalPoint
from models import build_model
from models.bn_calibration import bn_layers, calibrate_bn, own_batch_statistics, preserved_bn_statistics
from models.layers import Norm2d, SlimConv2d
from training_params import parse
from utils.distributed import Context
from utils.evaluate import evaluate
from unit_support import single_thread  # noqa: F401 (single_thread: autouse fixture)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> BN, with the project's Norm2d or torch's BatchNorm2d."""

    def __init__(self, torch_bn=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        make = (lambda c: nn.BatchNorm2d(c)) if torch_bn else (lambda c: Norm2d("BN", c))
        self.bn1, self.bn2 = make(3), make(3)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
            self.bn1.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
            for bn in (self.bn1, self.bn2):  # statistics that calibration must replace
                bn.running_mean.fill_(7.0)
                bn.running_var.fill_(9.0)

    def forward(self, x):
        return self.bn2(F.relu(self.bn1(self.conv(x))))


def channel_stats(y):
    """Mean and unbiased variance per channel over (N, H, W)."""
    return y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=True)


def batches_of(images, size):
    return [(images[i:i + size], None) for i in range(0, len(images), size)]


def test_one_batch_gives_the_exact_mean_and_unbiased_variance_of_each_layer_input():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(6, 2, 4, 4) * 3 + 1
    assert calibrate_bn(model, batches_of(x, 6)) == 6
    with torch.no_grad():
        y = model.conv(x)
        mean1, var1 = channel_stats(y)
        # bn1 in training normalises with the batch's biased variance
        biased = y.var(dim=(0, 2, 3), unbiased=False)
        z = F.relu((y - mean1[:, None, None]) / torch.sqrt(biased[:, None, None] + 1e-5)
                   * model.bn1.weight[:, None, None] + model.bn1.bias[:, None, None])
        mean2, var2 = channel_stats(z)
    for bn, mean, var in ((model.bn1, mean1, var1), (model.bn2, mean2, var2)):
        assert torch.allclose(bn.running_mean, mean, atol=1e-6)
        assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert not model.training and not model.bn1.training
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.1


def test_equal_batches_average_their_statistics_as_torch_update_bn_does():
    """Cumulative average (momentum None): the exact mean over the set, the mean of the per-batch
    unbiased variances; torch's update_bn on nn.BatchNorm2d gives the same."""
    torch.manual_seed(1)
    model = Tiny()
    reference = Tiny(torch_bn=True)
    reference.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(12, 2, 3, 3) * 2 - 1
    assert calibrate_bn(model, batches_of(x, 4)) == 12
    with torch.no_grad():
        y = model.conv(x)
    per_batch = [channel_stats(y[i:i + 4]) for i in range(0, 12, 4)]
    assert torch.allclose(model.bn1.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.bn1.running_var, torch.stack([v for _, v in per_batch]).mean(0), atol=1e-5)
    update_bn([images for images, _ in batches_of(x, 4)], reference)
    for ours, theirs in ((model.bn1, reference.bn1), (model.bn2, reference.bn2)):
        assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-6)
        assert torch.allclose(ours.running_var, theirs.running_var, atol=1e-5)


def test_a_slimmable_network_is_calibrated_on_its_leading_channels_and_can_be_restored():
    torch.manual_seed(2)
    conv = SlimConv2d(2, 8, 1, role="first")
    bn = Norm2d("BN", 8, slim=True)
    model = nn.Sequential(conv, bn).eval()
    conv.width_factor = 0.5
    x = torch.randn(5, 2, 4, 4)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with preserved_bn_statistics(model):
        calibrate_bn(model, batches_of(x, 5))
        mean, var = channel_stats(conv(x).detach())
        assert torch.allclose(bn.running_mean[:4], mean, atol=1e-6)
        assert torch.allclose(bn.running_var[:4], var, atol=1e-5)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.num_batches_tracked == 0


def test_test_batch_statistics_normalise_each_batch_and_keep_nothing():
    torch.manual_seed(3)
    model = Tiny().eval()
    x = torch.randn(4, 2, 3, 3)
    expected = copy.deepcopy(model).train()(x)
    with torch.no_grad(), own_batch_statistics(model):
        actual = model(x)
    assert torch.allclose(actual, expected, atol=1e-6)
    assert all(torch.equal(bn.running_mean, torch.full((3,), 7.0)) for bn in bn_layers(model))
    assert not any(bn.training for bn in bn_layers(model))


# -- evaluation with calibration / test-batch statistics ------------------------------------------
def make(method_name, *flags):
    config, _ = parse("structured_sparsity", ["--method", method_name, "--norm", "BN", *flags])
    method = METHODS["structured_sparsity"][method_name](config, None)
    torch.manual_seed(0)
    model = build_model("cpreresnet20", method.layer_factory(), 10)
    with torch.no_grad():
        for bn in bn_layers(model):
            bn.weight.uniform_(0.2, 1.5)
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    method.bind(model)
    return method, model


def stream(seed, count=2, size=6):
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator))
               for _ in range(count)]
    return SimpleNamespace(batches=lambda: iter(batches)), batches


def hand_pass(net, batches):
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in batches:
            logits = net(images)
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    count = sum(len(labels) for _, labels in batches)
    return correct / count, loss / count


def test_lec_test_batch_mode_equals_a_hand_written_training_mode_pass():
    method, model = make("lec", "--lec_test_batch_statistics")
    method.config.eval_param_grid = [0.75]
    test, batches = stream(4)
    [row] = evaluate(model, method, SimpleNamespace(test=test, input_size=16), Context(), step=0,
                     test_batch_bn=True)
    slim, _ = method.eval_model(model, EvalPoint(level=0.75))
    accuracy, loss = hand_pass(slim.train(), batches)
    assert row["accuracy"] == accuracy and row["loss"] == pytest.approx(loss, rel=1e-6)
    assert row["lec_test_batch_statistics"] is True and row["bn_calibration_images"] == 0
    accuracy_running, loss_running = hand_pass(method.eval_model(model, EvalPoint(level=0.75))[0], batches)
    assert loss_running != pytest.approx(loss, rel=1e-3)  # the mode changed the evaluation


@pytest.mark.parametrize("method_name, level", [("us", 0.5), ("lec", 0.9)])
def test_evaluation_with_calibration_equals_a_calibrated_network_in_eval_mode(method_name, level):
    """With calibration the row is that of the network calibrated on the calibration stream and
    evaluated in eval mode; the training model keeps its statistics. Without, the running ones."""
    method, model = make(method_name)
    method.config.eval_param_grid = [level]
    test, test_batches = stream(5)
    calibration, calibration_batches = stream(6, count=3, size=4)
    state = copy.deepcopy(model.state_dict())
    rows = {}
    for calibrated in (True, False):
        data = SimpleNamespace(test=test, input_size=16, calibration=calibration if calibrated else None)
        [rows[calibrated]] = evaluate(model, method, data, Context(), step=0)
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    point = EvalPoint(level=level)
    method.apply_levels(model, method.eval_levels(point, 0))
    net = copy.deepcopy(method.eval_model(model, point)[0])
    calibrate_bn(net, calibration_batches)
    accuracy, loss = hand_pass(net.eval(), test_batches)
    assert rows[True]["bn_calibration_images"] == 12 and rows[False]["bn_calibration_images"] == 0
    assert rows[True]["accuracy"] == accuracy and rows[True]["loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[False]["loss"] != pytest.approx(loss, rel=1e-3)

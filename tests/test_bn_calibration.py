"""Re-estimated BN statistics (models/bn_calibration.py) and how evaluation uses them: exact
statistics on a hand-checked network, torch's update_bn as a cross-check, the slimmable slice,
the original's test-batch mode of LEC, and the model left as it was."""

import copy
import csv
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.optim.swa_utils import update_bn

import inprocess
from cli_helpers import assert_refused
from data.augment import Normalizer
from data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar10, subset_indices
from methods import METHODS
from methods.base import EvalPoint
from models import build_model
from models.bn_calibration import bn_layers, calibrate_bn, own_batch_statistics, preserved_bn_statistics
from models.layers import Norm2d, SlimConv2d
from training_params import parse
from engine import evaluate as evaluate_module
from utils import metrics
from utils.distributed import Context
from engine.evaluate import evaluate
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


# -- runs: the calibration subset, recorded settings, resume, eval-only, refusals --------------------
RUN_FLAGS = ("--epochs", 2, "--test_freq", 1, "--batch_size", 8, "--train_subset", 16, "--test_subset", 8,
             "--seed", 3)


@pytest.fixture
def recorded_calibrations(monkeypatch):
    """The images of every calibration the evaluations run, in order."""
    calls = []

    def recording(net, batches):
        batches = list(batches)
        calls.append(torch.cat([images for images, _ in batches]))
        return original(net, batches)

    original = evaluate_module.calibrate_bn
    monkeypatch.setattr(evaluate_module, "calibrate_bn", recording)
    return calls


def lec_flags(tiny_cifar, tmp_path, save_dir):
    grid = tmp_path / "grid.yaml"
    grid.write_text("eval_param_grid: [0.9, 1.0]\n")
    return ("--method", "lec", *RUN_FLAGS, "--bn_calibration_images", 12, "--config", grid,
            "--data_dir", tiny_cifar, "--save_dir", save_dir)


def test_calibration_images_are_the_same_at_every_level_evaluation_and_after_a_resume(
        tiny_cifar, tmp_path, recorded_calibrations):
    """12 seeded training images with the test transform (no augmentation), the same for both
    levels of all three evaluations of a run interrupted after epoch 1 and resumed (two at
    epoch 0 before the interruption, four after the resume), and for --eval_only."""
    images, _ = load_cifar10(tiny_cifar, True, 16, 3)
    chosen = subset_indices(16, 12, 3)
    expected = Normalizer(CIFAR_MEAN, CIFAR_STD, torch.device("cpu"))(
        torch.from_numpy(images[chosen]).permute(0, 3, 1, 2).contiguous())
    save_dir = tmp_path / "run"
    with inprocess.signal_during_step(1, signal.SIGTERM):  # the last step of epoch 1
        assert inprocess.run_script("structured_sparsity", *lec_flags(tiny_cifar, tmp_path, save_dir)) == 143
    assert len(recorded_calibrations) == 2
    assert inprocess.run_script("structured_sparsity", "--save_dir", save_dir, "--resume") == 0
    assert len(recorded_calibrations) == 6
    assert all(torch.equal(call, expected) for call in recorded_calibrations)
    rows = inprocess.read_rows(save_dir)
    assert [row["epoch"] for row in rows] == [0, 0, 1, 1, 2, 2]
    assert all(row["bn_calibration_images"] == 12 and row["lec_test_batch_statistics"] is False for row in rows)
    assert yaml.safe_load((save_dir / "config.yaml").read_text())["bn_calibration_images"] == 12

    # --eval_only takes both flags: the original's test-batch statistics, then running statistics.
    checkpoint = save_dir / "model_final.pt"
    assert inprocess.run_script("structured_sparsity", "--eval_only", "--checkpoint", checkpoint) == 0
    assert len(recorded_calibrations) == 8 and torch.equal(recorded_calibrations[-1], expected)
    assert [row["accuracy"] for row in inprocess.read_rows(save_dir)[-2:]] == [row["accuracy"] for row in rows[-2:]]
    for flag, value in (("--lec_test_batch_statistics", None), ("--bn_calibration_images", 0)):
        args = (flag,) if value is None else (flag, value)
        assert inprocess.run_script("structured_sparsity", "--eval_only", "--checkpoint", checkpoint, *args) == 0
        last = inprocess.read_rows(save_dir)[-2:]
        assert [row["level"] for row in last] == [0.9, 1.0]
        assert all(row["bn_calibration_images"] == 0 for row in last)
        assert all(row["lec_test_batch_statistics"] is (value is None) for row in last)
    assert len(recorded_calibrations) == 8


def test_us_with_and_without_calibration(tiny_cifar, tmp_path):
    """Calibration changes the recorded evaluation, never the training: both runs end with the
    same weights and statistics."""
    runs = {}
    for images in (0, 16):
        save_dir = tmp_path / f"us_{images}"
        assert inprocess.run_script("structured_sparsity", "--method", "us", *RUN_FLAGS[2:], "--epochs", 1,
                                    "--eval_width_factors", "1.0,0.5", "--bn_calibration_images", images,
                                    "--data_dir", tiny_cifar, "--save_dir", save_dir) == 0
        runs[images] = save_dir
    final = {images: [row for row in inprocess.read_rows(d) if row["final"]] for images, d in runs.items()}
    assert [row["bn_calibration_images"] for row in final[0]] == [0, 0]
    assert [row["bn_calibration_images"] for row in final[16]] == [16, 16]
    assert final[0][1]["loss"] != pytest.approx(final[16][1]["loss"], rel=1e-4)
    inprocess.assert_same_tensors(inprocess.load_checkpoint(runs[0] / "model_final.pt")["model"],
                                  inprocess.load_checkpoint(runs[16] / "model_final.pt")["model"])
    assert {row["data_dir"] for row in final[0]} == {os.path.abspath(tiny_cifar)}


def test_eval_only_with_other_bn_statistics_is_a_series_of_its_own(tiny_cifar, tmp_path, monkeypatch):
    """The issue's case: a us run (running statistics) evaluated again at 0.3 and 1.0 with
    re-estimated statistics keeps its own width-1.0 row; results.csv holds both, the plot draws
    two labelled series, and only 0.3 (outside the training grid) is marked as added. An
    --eval_only the training's way at a level of its grid adds no series and no mark."""
    save_dir = tmp_path / "us"
    assert inprocess.run_script("structured_sparsity", "--method", "us", *RUN_FLAGS[2:], "--epochs", 1,
                                "--eval_width_factors", "1.0,0.5", "--data_dir", tiny_cifar,
                                "--save_dir", save_dir) == 0
    figures, original = [], metrics.draw_runs

    def draw_and_keep(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(metrics, "draw_runs", draw_and_keep)
    checkpoint = save_dir / "model_final.pt"
    assert inprocess.run_script("structured_sparsity", "--eval_only", "--checkpoint", checkpoint,
                                "--eval_width_factors", "0.3,1.0", "--bn_calibration_images", 16) == 0
    assert inprocess.run_script("structured_sparsity", "--eval_only", "--checkpoint", checkpoint,
                                "--eval_width_factors", "1.0") == 0
    with open(save_dir / "results.csv", newline="") as handle:
        table = [(float(line["level"]), line["bn_calibration_images"], line["eval_only"])
                 for line in csv.DictReader(handle)]
    assert table == [(0.5, "0", "False"), (1.0, "0", "False"), (0.3, "16", "True"), (1.0, "16", "True")]
    running, calibrated = "us: BN running statistics", "us: BN re-estimated on 16 training images"
    lines = {line.get_label(): list(line.get_xdata()) for line in figures[-1].axes[0].get_lines()}
    assert {label: x for label, x in lines.items() if not label.startswith("chance")} == \
        {running: [0.5, 1.0], calibrated: [0.3, 1.0], f"{calibrated}: --eval_only": [0.3]}


@pytest.mark.parametrize("script, args, flag", [
    ("train_structured.py", ("--method", "lcs_p", "--bn_calibration_images", 64), "--bn_calibration_images"),
    ("train_structured.py", ("--method", "us", "--norm", "IN", "--bn_calibration_images", 8),
     "--bn_calibration_images"),
    ("train_structured.py", ("--method", "lec", "--bn_calibration_images", -1), "--bn_calibration_images"),
    ("train_structured.py", ("--method", "us", "--lec_test_batch_statistics"), "--lec_test_batch_statistics"),
    ("train_structured.py", ("--method", "lec", "--lec_test_batch_statistics", "--bn_calibration_images", 8),
     "--lec_test_batch_statistics"),
    ("train_unstructured.py", ("--bn_calibration_images", 8), "--bn_calibration_images"),
    ("train_quantized.py", ("--lec_test_batch_statistics",), "--lec_test_batch_statistics"),
])
def test_refused_combinations(tiny_cifar, tmp_path, script, args, flag):
    assert_refused(script, args, flag, tiny_cifar, tmp_path / "run")

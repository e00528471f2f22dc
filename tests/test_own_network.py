"""A network not written here, converted (models/convert.py): the conversion IS the hand-built
network (cPreResNet20 written with torch.nn layers only gives the project's cPreResNet20's
logits at every level of every setting), and converted torchvision networks train, evaluate,
resume and refuse what they cannot do through the three scripts."""

import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli_helpers import micro_cifar  # noqa: F401 (a fixture)
from cli_helpers import assert_ok, read_config, read_metrics, run_script, run_subprocess
from models import build_model
from models.convert import convert, group_count
from models.factory import LayerFactory
from models.layers import Level, set_level
from models.topology import analyze

HERE = os.path.dirname(os.path.abspath(__file__))


# -- cPreResNet20 in torch.nn ------------------------------------------------------------
class Block(nn.Module):
    """The bottleneck of models/cpreresnet.py in plain layers. `conv_bn`: the form the quantized
    setting builds (each conv followed by its norm, no pre-activation norm, the shortcut reads the
    rectified input), which the conversion turns into convs carrying their norms."""

    def __init__(self, cin, planes, stride, downsample, conv_bn):
        super().__init__()
        cout = 4 * planes
        self.conv_bn = conv_bn
        if not conv_bn:
            self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False) if downsample else None
        if conv_bn:
            self.bn4 = nn.BatchNorm2d(cout)
            self.bn_down = nn.BatchNorm2d(cout) if downsample else None

    def forward(self, x):
        if self.conv_bn:
            x = out = F.relu(x)
            out = F.relu(self.bn2(self.conv1(out)))
            out = F.relu(self.bn3(self.conv2(out)))
            out = self.bn4(self.conv3(out))
            residual = x if self.downsample is None else self.bn_down(self.downsample(x))
            return out + residual
        out = F.relu(self.bn1(x))
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class TorchCPreResNet20(nn.Module):
    def __init__(self, num_classes=10, conv_bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        cin, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [Block(cin, planes, stride, True, conv_bn), Block(4 * planes, planes, 1, False, conv_bn)]
            cin = 4 * planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Conv2d(cin, num_classes, 1, bias=False)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(x).flatten(1)


# (setting, factory, levels): the factories of the methods' layer_factory()
FIDELITY = [
    ("structured lcs_l IN", LayerFactory(norm_kind="IN", body="slim", line_norms=True),
     [Level(alpha=a, width_factor=w) for a, w in ((0.0, 0.25), (0.3, 0.475), (1.0, 1.0))]),
    ("structured us BN", LayerFactory(norm_kind="BN", body="slim"),
     [Level(width_factor=w) for w in (0.25, 0.6, 1.0)]),
    ("unstructured lcs_l GN", LayerFactory(norm_kind="GN", body="topk", line_convs=True, line_norms=True),
     [Level(alpha=a, topk=a) for a in (0.05, 0.5, 1.0)]),
    ("unstructured target_topk BN", LayerFactory(norm_kind="BN", body="topk"),
     [Level(topk=k) for k in (0.1, 0.9)]),
    ("quantized lcs_l BN", LayerFactory(norm_kind="BN", body="quant", line_convs=True),
     [Level(alpha=b / 8, num_bits=b) for b in range(3, 9)]),
    ("quantized lcs_l IN", LayerFactory(norm_kind="IN", body="quant", line_convs=True, line_norms=True),
     [Level(alpha=b / 8, num_bits=b) for b in range(3, 9)]),
    ("quantized target_bit_width GN", LayerFactory(norm_kind="GN", body="quant"),
     [Level(num_bits=b) for b in (3, 6)]),
]


@torch.no_grad()
def randomized(model, seed):
    """Every parameter and buffer drawn (norm statistics and activation ranges included), so a
    weight that lands in the wrong place cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.dtype == torch.bool:
            tensor.fill_(True)
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name.endswith("act_min"):
            tensor.fill_(-0.5)
        elif name.endswith("act_max"):
            tensor.fill_(3.0)
        elif name.endswith("indexes"):
            continue
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("label,factory,levels", FIDELITY, ids=[f[0] for f in FIDELITY])
def test_converted_torch_nn_cpreresnet20_is_the_hand_built_one_at_every_level(label, factory, levels):
    hand = randomized(build_model("cpreresnet20", factory, 10), seed=1).eval()
    plain = TorchCPreResNet20(conv_bn=factory.body == "quant")
    conversion = convert(plain, factory, analyze(plain, torch.zeros(2, 3, 32, 32)))
    # The hand-built network's frozen channel-selection indexes (LEC's) are all ones: nothing maps.
    state = {k: v for k, v in hand.state_dict().items() if not k.endswith("select.indexes")}
    plain.load_state_dict(state, strict=True)
    plain.eval()
    assert conversion.stem == "conv1" and conversion.classifier == "fc"
    assert len(conversion.convs) == 3 * (3 * 2 + 1) and conversion.linears == ()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for level in levels:
        set_level(hand, level)
        set_level(plain, level)
        with torch.no_grad():
            expected, got = hand(images), plain(images)
        assert expected.abs().max() > 0.1, "a degenerate comparison"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{label} at {level}")


# -- LEC on converted networks: the slimming plan from the topology -----------------------
LEC_FACTORY = LayerFactory(norm_kind="BN", body="dense", prunes_channels=True)


def converted(plain, input_size=32):
    plain.conversion = convert(plain, LEC_FACTORY, analyze(plain, torch.zeros(2, 3, input_size, input_size)))
    return plain


@pytest.mark.parametrize("fraction", [1.0, 0.6, 0.3, 0.1])
def test_lec_on_converted_cpreresnet20_slims_as_the_hand_written_plan(fraction):
    """The plan read from the topology gives the logits, the pruned convs and the selections of
    the plan written by hand for cPreResNet20 (pre-activation norms zeroed and selected, bn2/bn3
    pruned)."""
    from models import count_parameters
    from models.slimming import lec_keep_masks, lec_slim

    hand = randomized(build_model("cpreresnet20", LEC_FACTORY, 10), seed=1).eval()
    plain = converted(TorchCPreResNet20())
    plain.load_state_dict({k: v for k, v in hand.state_dict().items() if not k.endswith("select.indexes")})
    plain.eval()
    hand_slim, hand_info = lec_slim(hand, "cpreresnet20", 10, fraction)
    slim, info = lec_slim(plain, "tests.plain:cpreresnet20", 10, fraction)
    assert {name: shape[1] for name, shape in info["widths"].items()
            if name.endswith(("conv1", "conv2")) and name != "conv1"} == hand_info["widths"]
    selections = {name.replace("select", "conv1") if name != "select" else "fc": count
                  for name, count in hand_info["selected"].items()}
    assert {name: info["widths"][name][0] for name in selections} == selections
    # The streams of stages 1 and 2 keep every channel (down-sampling convs read them raw), as by
    # hand; the last stream also loses the channels both its readers (layer3.1's and the final
    # norm) zero, which the hand-written plan keeps: the same function, fewer weights.
    assert info["widths"]["conv1"] == [3, 16] and info["widths"]["layer2.1.conv3"][1] == 128
    masks, _ = lec_keep_masks(plain, fraction)
    assert info["widths"]["layer3.1.conv3"][1] == int((masks["layer3.1.bn1"] | masks["bn"]).sum())
    assert count_parameters(slim) < count_parameters(hand_slim)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = hand_slim(images), slim(images)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class GateNet(nn.Module):
    """A conv -> norm -> ReLU -> conv chain, a conv -> norm -> sigmoid -> conv chain (sigmoid(0)
    is not 0), and a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 4, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.b_bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(F.relu(self.a_bn(self.a(x))))          # a's zeros removed: ReLU keeps them
        z = self.d(torch.sigmoid(self.c_bn(self.c(y))))   # c's zeros reach d as 0.5: kept
        return self.fc(F.adaptive_avg_pool2d(x + self.b_bn(z), 1).flatten(1))  # the stream: x never zero


def test_the_plan_removes_exactly_the_channels_that_carry_only_zeros():
    from models.slimming import converted_plan, slim_converted

    net = converted(randomized(GateNet(), seed=3)).eval()
    masks = {"a_bn": torch.tensor([True, False, True, False]), "b_bn": torch.tensor([False, True, True, True]),
             "c_bn": torch.tensor([True, False, False, True])}
    plan = converted_plan(net.conversion.channels, masks, dict(net.named_modules()))
    assert plan["a"][0].tolist() == [0, 2] and plan["b"][1].tolist() == [0, 2]     # rows of a, columns of b
    assert plan["c"][0].tolist() == [0, 1, 2, 3] and plan["d"][2] is None          # behind a sigmoid: all kept
    assert plan["c_bn"][1].tolist() == [False, True, True, False]                   # ... and zeroed
    assert plan["stem"][0].tolist() == [0, 1, 2, 3] and plan["fc"][1].tolist() == [0, 1, 2, 3]
    slim, shapes, picks = slim_converted(net, masks)
    assert shapes["a"] == [4, 2] and shapes["b"] == [2, 4] and picks == {}
    zeroed = converted(randomized(GateNet(), seed=3)).eval()
    with torch.no_grad():
        for name, mask in masks.items():
            zeroed.get_submodule(name).weight[~mask] = 0
            zeroed.get_submodule(name).bias[~mask] = 0
        images = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(slim(images), zeroed(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,kwargs", [("mobilenet_v2", {"width_mult": 0.25}), ("resnet18", {}),
                                         ("efficientnet_b0", {})])
def test_lec_slimming_of_a_converted_torchvision_network_computes_the_zeroed_network(name, kwargs):
    """Every removed channel carried only zeros: the slimmed network gives the logits of the full
    one with the pruned channels' gamma and beta set to zero, and is smaller at each fraction."""
    import torchvision

    from models.slimming import lec_keep_masks, lec_slim

    torch.manual_seed(0)
    plain = converted(torchvision.models.get_model(name, num_classes=10, **kwargs))
    randomized(plain, seed=4).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    full = sum(p.numel() for p in plain.parameters())
    previous = full + 1
    for fraction in (1.0, 0.5, 0.2):
        slim, _ = lec_slim(plain, f"torchvision.{name}", 10, fraction)
        masks, _ = lec_keep_masks(plain, fraction)
        zeroed = randomized(converted(torchvision.models.get_model(name, num_classes=10, **kwargs)), seed=4).eval()
        with torch.no_grad():
            for norm, mask in masks.items():
                zeroed.get_submodule(norm).weight[~mask] = 0
                zeroed.get_submodule(norm).bias[~mask] = 0
            expected, got = zeroed(images), slim(images)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
        kept = sum(p.numel() for p in slim.parameters())
        assert kept < previous
        previous = kept
    assert previous < 0.6 * full


def test_quantized_conversion_carries_each_batchnorm_a_conv_feeds_into_that_conv():
    factory = LayerFactory(norm_kind="BN", body="quant", line_convs=True)
    plain = TorchCPreResNet20(conv_bn=True)
    conversion = convert(plain, factory, analyze(plain, torch.zeros(2, 3, 32, 32)))
    assert "layer1.0.bn4" in conversion.folded_norms and "layer1.0.bn_down" in conversion.folded_norms
    assert type(plain.layer1[0].bn4).__name__ == "NoOp"
    assert plain.layer1[0].conv3.norm.kind == "BN"
    assert plain.bn.kind == "BN"  # the final norm reads a sum, not a conv: a norm of its own
    assert plain.conv1.__class__.__name__ == "Conv2d"  # the stem stays dense


def test_group_norm_groups_follow_the_stated_rule():
    assert [group_count(c) for c in (16, 24, 64, 96, 100, 7)] == [16, 24, 32, 32, 25, 7]


# -- converted torchvision networks through the scripts -----------------------------------
MOBILENET = ("--model", "torchvision.mobilenet_v2", "--model_kwargs", "width_mult=0.1")
SCRIPTS = [("train_structured.py", "structured_sparsity", m, "BN") for m in ("lcs_l", "lcs_p", "us", "ns", "lec")] + \
          [("train_unstructured.py", "unstructured_sparsity", m, "GN") for m in ("lcs_l", "lcs_p", "target_topk")] + \
          [("train_quantized.py", "quantized", m, "BN") for m in ("lcs_l", "lcs_p", "target_bit_width")]


@pytest.mark.parametrize("script,setting,method,norm", SCRIPTS, ids=[f"{s[1]}-{s[2]}" for s in SCRIPTS])
def test_a_converted_torchvision_network_trains_and_evaluates_every_level(micro_cifar, tmp_path, script, setting,
                                                                           method, norm):
    save_dir = str(tmp_path / "run")
    result = run_script(script, *MOBILENET, "--method", method, "--norm", norm, "--data_dir", micro_cifar,
                        "--epochs", "1", "--batch_size", "10", "--save_dir", save_dir)
    assert_ok(result)
    assert "torchvision.mobilenet_v2: 51 convs and 0 linears compressed; dense: stem conv (features.0.0), " \
           "classifier (classifier.1)" in result.stdout
    config = read_config(save_dir)
    assert config["model"] == "torchvision.mobilenet_v2" and config["model_kwargs"] == {"width_mult": 0.1}
    rows = read_metrics(save_dir)
    final = [row for row in rows if row["final"]]
    assert len(final) == len(config["eval_param_grid"]) and all(row["model"] == "torchvision.mobilenet_v2"
                                                                 for row in final)
    assert all(0 <= row["accuracy"] <= 100 for row in final)


def test_a_converted_network_resumes_exactly(micro_cifar, tmp_path):
    """Stopped by SIGTERM in the middle of its first epoch, resumed: the same weights as a run
    that was never stopped."""
    import signal

    from inprocess import run_script as run_inprocess
    from inprocess import signal_during_step
    args = (*MOBILENET, "--norm", "GN", "--data_dir", micro_cifar, "--batch_size", "5", "--test_freq", "1",
            "--epochs", "2")
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert_ok(run_script("train_unstructured.py", *args, "--save_dir", whole))
    with signal_during_step(1, signal.SIGTERM):
        assert run_inprocess("unstructured_sparsity", *args, "--save_dir", parts) == 143
    assert not os.path.exists(os.path.join(parts, "model_final.pt"))
    assert_ok(run_script("train_unstructured.py", "--resume", "--save_dir", parts))
    first = torch.load(os.path.join(whole, "model_final.pt"), weights_only=True)["model"]
    second = torch.load(os.path.join(parts, "model_final.pt"), weights_only=True)["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def user_network(num_classes, width=8):
    """A user's own network (package.module:callable): a conv, a residual pair and a linear head."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.bn0 = nn.BatchNorm2d(width)
            self.a = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn_a = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            x = x + F.relu(self.bn_a(self.a(x)))
            return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
    return Net()


def test_a_user_callable_trains_with_its_arguments(micro_cifar, tmp_path):
    sys.path.insert(0, HERE)
    try:
        result = run_script("train_quantized.py", "--model", "test_own_network:user_network", "--model_kwargs",
                            "width=6", "--norm", "BN", "--data_dir", micro_cifar, "--epochs", "1",
                            "--save_dir", str(tmp_path / "run"))
    finally:
        sys.path.remove(HERE)
    assert_ok(result)
    assert "test_own_network:user_network: 1 convs and 0 linears compressed; dense: stem conv (stem), " \
           "classifier (head)" in result.stdout
    state = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)["model"]
    assert state["a.weight"].shape == (6, 6, 3, 3) and "a.norm.running_mean" in state  # bn_a carried inside
    assert "bn0.running_mean" in state  # the stem's norm stays a norm of its own


@pytest.mark.parametrize("args,message", [
    (("--model", "torchvision.no_such_net"), "torchvision has no classification builder 'no_such_net'"),
    (("--model", "torchvision.mobilenet_v2", "--model_kwargs", "width_mul=0.5"),
     "the builder refused its arguments"),
    (("--model", "torchvision.mobilenet_v2", "--model_kwargs", "num_classes=3"), "num_classes is set from the"),
    (("--model", "cpreresnet20", "--model_kwargs", "width_mult=0.5"), "only for a converted network"),
    (("--model", "nosuchpackage.module:build"), "cannot import nosuchpackage.module"),
    (("--model", "torch.nn"), "unknown network 'torch.nn'"),
    (("--model", "timm.resnet18"), "timm"),
    # lec slims channels: the structured topology check applies
    (("--model", "torchvision.shufflenet_v2_x0_5", "--method", "lec", "--norm", "BN"),
     "(cat): concatenates 2 tensors along the channel dim"),
    (("--model", "resnet18", "--method", "lec", "--dataset", "imagenet", "--imagenet_dir", "IMAGENET"),
     "lec runs on cpreresnet20, vgg19 or a converted network"),
])
def test_model_mistakes_are_one_line(micro_cifar, tmp_path, args, message):
    save_dir = tmp_path / "run"
    script = "train_structured.py" if "lec" in args else "train_unstructured.py"
    data = ("--data_dir", micro_cifar)
    if "IMAGENET" in args:   # an ImageNet layout, so that the model is what is refused
        for folder in ("train/a", "val/a"):
            os.makedirs(tmp_path / "imagenet" / folder)
        args, data = tuple(str(tmp_path / "imagenet") if a == "IMAGENET" else a for a in args), ()
    result = run_script(script, *args, *data, "--epochs", "1", "--save_dir", str(save_dir))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not save_dir.exists()


def test_a_refused_topology_is_answered_before_the_data_is_read(micro_cifar, tmp_path):
    """Training images that cannot be decoded: the topology's refusal comes first, so it was made
    before any image was read (and the random state it used was given back: the own-loop test
    below matches the script bit for bit)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(micro_cifar, data)
    for image in (data / "train" / "cat").iterdir():
        image.write_bytes(b"not an image")
    save_dir = tmp_path / "run"
    result = run_script("train_structured.py", "--model", "torchvision.shufflenet_v2_x0_5", "--norm", "BN",
                        "--data_dir", str(data), "--save_dir", str(save_dir))
    assert result.returncode == 2 and "(cat): concatenates" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not save_dir.exists()


def test_instance_norm_on_a_1x1_map_is_refused_before_anything_is_written(micro_cifar, tmp_path):
    save_dir = tmp_path / "run"
    result = run_subprocess("train_structured.py", *MOBILENET, "--norm", "IN", "--data_dir", micro_cifar,
                            "--epochs", "1", "--save_dir", str(save_dir))
    assert result.returncode == 2
    assert "--norm IN: torchvision.mobilenet_v2's features.14.conv.1.1 normalises a 1x1 map" in result.stderr
    assert "Traceback" not in result.stderr and not save_dir.exists()


# -- from trained weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory):
    """A state_dict of the unconverted mobilenet_v2 (width 0.1), its BatchNorm running statistics
    moved off their initial values so that taking them (or not) shows in the logits."""
    import torchvision

    torch.manual_seed(3)
    plain = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.1)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        plain.classifier[1].weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("plain") / "mobilenet_v2.pt"
    torch.save(plain.state_dict(), path)
    return path


INIT_GRIDS = {"train_structured.py": ("--eval_width_factors", "1.0,0.5", 1.0),
              "train_unstructured.py": ("--eval_topk_grid", "0.05,1.0", 1.0),
              "train_quantized.py": ("--eval_bit_widths", "4,8", 8)}


@pytest.mark.parametrize("script", sorted(INIT_GRIDS))
def test_eval_only_init_from_evaluates_the_weights_a_run_starts_from(micro_cifar, tmp_path, plain_weights, script):
    """--eval_only --init_from FILE writes a run directory without checkpoints, its rows naming
    FILE; at the uncompressed level they are the start-of-run evaluation of a training run from
    the same file; the other levels as a trained model holds them (TopK 0.05 pruned, where the
    run's start is still dense; quantized: weights only)."""
    flag, grid, uncompressed = INIT_GRIDS[script]
    common = (*MOBILENET, "--norm", "BN", "--init_from", plain_weights, flag, grid, "--data_dir", micro_cifar)
    evaluated = tmp_path / "evaluated"
    result = run_script(script, *common, "--eval_only", "--save_dir", evaluated)
    assert_ok(result)
    assert "from --init_from: every weight; BatchNorm affine parameters and running statistics" in result.stdout
    assert sorted(os.listdir(evaluated)) == ["accuracy_vs_compression.png", "config.yaml", "metrics.jsonl",
                                             "results.csv"]
    rows = {row["level"]: row for row in read_metrics(evaluated)}
    assert sorted(rows) == sorted(float(value) for value in grid.split(","))
    assert all(row["eval_only"] and not row["final"] and row["checkpoint"] == str(plain_weights)
               and row["epoch"] == row["step"] == 0 for row in rows.values())
    trained = tmp_path / "trained"
    assert_ok(run_script(script, *common, "--epochs", "1", "--save_dir", trained))
    start = {row["level"]: row for row in read_metrics(trained) if row["epoch"] == 0}
    assert (start[uncompressed]["accuracy"], start[uncompressed]["loss"]) == \
        (rows[uncompressed]["accuracy"], rows[uncompressed]["loss"])
    if script == "train_unstructured.py":
        assert rows[0.05]["effective_topk"] == 0.05 and start[0.05]["effective_topk"] == 1.0
    if script == "train_quantized.py":
        assert not any(row["act_quant"] for row in rows.values())


def test_init_from_mistakes_are_one_line_and_write_nothing(micro_cifar, tmp_path, plain_weights):
    import torchvision

    other_width = tmp_path / "width_0.5.pt"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5).state_dict(), other_width)
    other_network = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), other_network)
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a weights file")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "metrics.jsonl").write_text("")
    save_dir = tmp_path / "run"
    for flags, message in [
        (("--init_from", other_width), f"--init_from {other_width}: features.0.0.weight has shape (16, 3, 3, 3), "
                                        "the network's (8, 3, 3, 3)"),
        (("--init_from", other_network), f"--init_from {other_network}: does not fit the network (lacks "
                                          "features.0.0.weight;"),
        (("--init_from", not_weights), f"--init_from {not_weights}: not a readable weights file"),
        (("--eval_only",), "--eval_only: needs --checkpoint PATH (the trained model to evaluate) or --init_from FILE"),
        (("--eval_only", "--init_from", plain_weights, "--checkpoint", plain_weights),
         "--init_from: not used with --checkpoint (the checkpoint holds the weights)"),
        (("--eval_only", "--init_from", plain_weights, "--save_dir", occupied),
         f"--save_dir {occupied}: already holds a run (metrics.jsonl); pass --overwrite to replace it"),
    ]:
        target = () if "--save_dir" in flags else ("--save_dir", save_dir)
        result = run_script("train_structured.py", *MOBILENET, "--norm", "BN", "--data_dir", micro_cifar, *flags,
                            *target)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
        assert not save_dir.exists() and os.listdir(occupied) == ["metrics.jsonl"]


# -- the topology matrix ------------------------------------------------------------------
# torchvision networks at CIFAR size (width multipliers where the builder has one): accepted
# or refused for structured sparsity as models/topology.py decides; unstructured and quantized
# accept every one. Each accepted pair trains two steps and evaluates two levels.
# Plain SGD (--momentum 0): no momentum buffer of the size of the network (VGG11's classifier
# holds 100M weights) to update, checkpoint and write to disk; the topology is what is tested.
MATRIX = {
    "resnet18": None, "resnet50": None, "mobilenet_v2": None, "mobilenet_v3_small": None,
    "efficientnet_b0": None, "vgg11_bn": None,
    "regnet_x_400mf": "(Conv2d): a grouped conv", "densenet121": "(cat)", "shufflenet_v2_x0_5": "(cat)",
    "convnext_tiny": "(LayerNorm2d)",
}
MATRIX_KWARGS = {"mobilenet_v2": "width_mult=0.25", "mobilenet_v3_small": "width_mult=0.25"}
GRIDS = {"train_structured.py": ("--eval_width_factors", "0.5,1"),
         "train_unstructured.py": ("--eval_topk_grid", "0.5,1"),
         "train_quantized.py": ("--eval_bit_widths", "4,8")}
MATRIX_CASES = [(name, script) for name in MATRIX for script in GRIDS]


@pytest.mark.slow
@pytest.mark.parametrize("name,script", MATRIX_CASES, ids=[f"{n}-{s[6:-3]}" for n, s in MATRIX_CASES])
def test_topology_matrix(micro_cifar, tmp_path, name, script):
    save_dir = tmp_path / "run"
    kwargs = ("--model_kwargs", MATRIX_KWARGS[name]) if name in MATRIX_KWARGS else ()
    method = "target_topk" if script == "train_unstructured.py" else "target_bit_width" \
        if script == "train_quantized.py" else "us"
    result = run_script(script, "--model", f"torchvision.{name}", *kwargs, "--method", method, "--norm", "BN",
                        *GRIDS[script], "--data_dir", micro_cifar, "--epochs", "1", "--batch_size", "10",
                        "--momentum", "0", "--no-eval_at_start", "--save_dir", str(save_dir))
    refusal = MATRIX[name] if script == "train_structured.py" else None
    if refusal:
        assert result.returncode == 2 and refusal in result.stderr, result.stderr
        assert "unstructured and quantized accept this model" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not save_dir.exists()
        return
    assert_ok(result)
    rows = [row for row in read_metrics(save_dir) if row["final"]]
    assert sorted(row["level"] for row in rows) == sorted(float(v) for v in GRIDS[script][1].split(","))


# -- deploying converted networks ---------------------------------------------------------
DEPLOYED = [("torchvision.resnet18", ()), ("torchvision.mobilenet_v2", ("--model_kwargs", "width_mult=0.25")),
            ("torchvision.efficientnet_b0", ())]
DEPLOY_SETTINGS = [("train_structured.py", ("--norm", "BN"), "0.5"),
                   # BN: GroupNorm over a 1x1 map of a barely trained network normalises pairs of
                   # nearly equal values, whose float rounding ONNX Runtime and torch resolve apart
                   ("train_unstructured.py", ("--norm", "BN"), "0.5"),
                   ("train_quantized.py", ("--norm", "BN", "--warmup_budget", "1"), "4")]
DEPLOY_CASES = [(m, k, s, f, level) for m, k in DEPLOYED for s, f, level in DEPLOY_SETTINGS] + \
    [(m, k, "train_structured.py", ("--method", "lec", "--norm", "BN"), "0.3") for m, k in DEPLOYED[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("model,kwargs,script,flags,level", DEPLOY_CASES,
                         ids=[f"{c[0][12:]}-{c[2][6:-3]}{'-lec' * ('lec' in c[3])}" for c in DEPLOY_CASES])
def test_a_converted_network_exports_every_artefact_checked_against_the_training_time_model(
        micro_cifar, tmp_path, capsys, model, kwargs, script, flags, level):
    """Per-level .pt, the subspace and ONNX of a briefly trained converted network: each written
    only after its logits matched the training-time model's at its level (deploy/verify.py);
    the structured export is physically narrower."""
    from deploy.compressed import load_exported
    from deploy.export import main as export

    run = tmp_path / "run"
    # Two levels, the exported one and the uncompressed end, evaluated in training and held by the
    # subspace (each level of a grid is evaluated and checked the same way; every level of each
    # setting's subspace: tests/test_subspace.py). LEC's grid of kept fractions comes from YAML.
    grid = GRIDS[script]
    if "lec" in flags:
        (tmp_path / "grid.yaml").write_text(f"eval_param_grid: [{level}, 1.0]\n")
        grid = ("--config", str(tmp_path / "grid.yaml"))
    assert_ok(run_script(script, "--model", model, *kwargs, *flags, *grid, "--data_dir", micro_cifar, "--epochs",
                         "1", "--batch_size", "10", "--no-eval_at_start", "--save_dir", str(run)))
    checkpoint = str(run / "model_final.pt")
    capsys.readouterr()
    # lec re-estimates BN statistics of each slimmed network on training images, as it evaluated
    data = ["--data_dir", micro_cifar] if "lec" in flags else []
    for args in (["--level", level, *data, "--out", str(tmp_path / "level.pt")],
                 ["--subspace", *data, "--out", str(tmp_path / "model.lcs.pt")],
                 ["--level", level, *data, "--format", "onnx", "--check_images", "16", "--out",
                  str(tmp_path / "m.onnx")]):
        export(["--checkpoint", checkpoint, *args])
        out = capsys.readouterr().out
        assert "checked against the training-time model at" in out, out
        assert os.path.getsize(args[-1]) > 0
    exported = load_exported(str(tmp_path / "level.pt"))
    full = torch.load(checkpoint, weights_only=True)["model"]
    if script == "train_structured.py":  # physically fewer channels than the trained network
        parameters = sum(p.numel() for p in exported.parameters())
        assert parameters < 0.5 * sum(v.numel() for k, v in full.items() if k.endswith(("weight", "bias")))
    with torch.no_grad():
        assert exported(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# -- the own-loop example of docs/own_network.md -------------------------------------------
def own_loop_example():
    import re
    text = open(os.path.join(HERE, "..", "docs", "own_network.md"), encoding="utf-8").read()
    [code] = [block for block in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S) if "Compressible(" in block]
    return code


def test_the_own_loop_example_trains_what_the_script_trains_bit_for_bit(micro_cifar, tmp_path):
    """The docs' example, run on the batches train_unstructured.py draws (its epoch_batches
    replaced by the script's data stream), ends with the script's weights, every tensor equal.
    micro_cifar: 20 training images, batches of 8: 3 steps per epoch, the last of 4 images."""
    import training_params
    from data import build_data
    from inprocess import one_thread

    save_dir = tmp_path / "run"
    code = own_loop_example()
    flags = eval(re.search(r'run_config\("unstructured_sparsity", (\[.*?\])\)', code, re.S).group(1))
    assert flags[:4] == ["--method", "lcs_l", "--model", "torchvision.mobilenet_v2"]
    with one_thread():
        assert_ok(run_script("train_unstructured.py", *flags, "--data_dir", micro_cifar, "--save_dir", str(save_dir)))
        config = read_config(save_dir)
        data_config = training_params.run_config("unstructured_sparsity", [*flags, "--data_dir", micro_cifar])
        data = build_data(data_config, torch.device("cpu"), 0, 1)
        code = code.replace("num_train=24", f"num_train={data.num_train}")
        code = code.replace("def epoch_batches(epoch):", "def example_batches(epoch):")
        namespace = {"__name__": "__example__", "epoch_batches": lambda epoch: list(data.train.batches(epoch))}
        exec(compile(code, "docs/own_network.md", "exec"), namespace)
    trained = torch.load(save_dir / "model_final.pt", weights_only=True)["model"]
    mine = namespace["lcs"].model.state_dict()
    assert config["model"] == "torchvision.mobilenet_v2" and namespace["lcs"].steps == 6
    assert trained.keys() == mine.keys()
    for key in trained:
        assert torch.equal(trained[key], mine[key]), key

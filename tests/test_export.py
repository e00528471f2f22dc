"""Export of compressed models (deploy.export) and the deployment benchmark (benchmarks/deploy.py).

Models are built for each setting and method, their norms, running statistics and activation
ranges set to non-trivial values (line endpoints differ from the initialisation), saved as a
checkpoint, exported, loaded back and compared with the training-time model evaluated at the
same level by its method.
"""

import os
import subprocess
import sys

import pytest
import torch

from data import build_data
from methods import METHODS
from methods.base import EvalPoint
from models import build_model
from models.bn_calibration import calibrate_bn
from models.factory import dense_factory
from models.layers import ChannelSelection, Norm2d, QuantConv2d
from training_params import parse
from utils import checkpoint as ckpt
from deploy.compressed import export_model, load_exported, save_export
from deploy.formats.channels import round_up_widths
from deploy import verify
from deploy.export import main
from deploy.packing import pack_bits, unpack_bits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training-time evaluations of the warmup methods are taken after their warmup.
WARMUP, STEP = 10, 10


def perturb(model, seed=0):
    """Random norm affine parameters (some near zero, so LEC prunes unevenly), BN statistics,
    and an activation range on every other quantized conv."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Norm2d):
                for name in ("weight", "weight1", "bias", "bias1"):
                    p = getattr(module, name, None)
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + (1.0 if "weight" in name else 0.0))
                if module.kind == "BN":
                    module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        for index, layer in enumerate(m for m in model.modules() if isinstance(m, QuantConv2d)):
            if index % 2 == 0:
                layer.act_min.fill_(-0.25 * (1 + index % 3))
                layer.act_max.fill_(2.0 + index)
                layer.act_range_ready.fill_(True)


def make_checkpoint(tmp_path, setting, method, flags=()):
    """A perturbed model of `setting`/`method` saved as this project's final-model checkpoint."""
    config, _ = parse(setting, ["--method", method, "--save_dir", str(tmp_path / "run"), *flags])
    torch.manual_seed(0)  # the initialisation draws from the global generator
    trainer = METHODS[setting][method](config, WARMUP)
    model = build_model(config.model, trainer.layer_factory(), 10)
    perturb(model)
    trainer.bind(model)
    model.eval()
    payload = {"format": ckpt.FORMAT, "kind": "model", "setting": setting, "method": method,
               "model_name": config.model, "config": config.to_dict(), "model": model.state_dict(),
               "epoch": 1, "global_step": STEP}
    path = str(tmp_path / f"{setting}_{method}.pt")
    ckpt.save(path, payload)
    return path, payload, model, trainer


def training_time_logits(model, trainer, level, alpha, x):
    """The logits the run evaluated at `level` (after the warmup), as deploy.export checks them."""
    point = EvalPoint(level=level, alpha=alpha)
    return verify.training_time_logits(model, trainer, point, x, levels=trainer.eval_levels(point, STEP))


def inputs(count=8, size=16, seed=1):
    """Small images keep the test fast; the network pools globally, so any size runs."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# (setting, method, flags, two levels (less compressed first), the alphas LCS+L uses for them)
CASES = [
    ("structured_sparsity", "lcs_l", (), (1.0, 0.5), (1.0, 1 / 3)),
    ("structured_sparsity", "lcs_l", ("--norm", "BN"), (0.75, 0.25), (2 / 3, 0.0)),
    ("structured_sparsity", "lcs_p", (), (1.0, 0.5), None),
    ("structured_sparsity", "us", (), (0.75, 0.25), None),
    ("structured_sparsity", "ns", (), (1.0, 0.5), None),
    ("structured_sparsity", "lec", ("--bn_calibration_images", "0"), (0.9, 0.4), None),
    ("unstructured_sparsity", "lcs_l", (), (0.5, 0.05), (0.5, 0.05)),
    ("unstructured_sparsity", "lcs_p", (), (0.5, 0.05), None),
    ("unstructured_sparsity", "target_topk", (), (0.5, 0.05), None),
    ("quantized", "lcs_l", (), (8, 4), (1.0, 0.333)),
    ("quantized", "lcs_l", ("--norm", "BN"), (5, 3), (0.499, 0.166)),
    ("quantized", "lcs_p", (), (8, 4), None),
    ("quantized", "target_bit_width", (), (6, 3), None),
]


@pytest.mark.parametrize("setting,method,flags,levels,alphas", CASES,
                         ids=[f"{c[0].split('_')[0]}-{c[1]}{'-' + c[2][1] if c[2] else ''}" for c in CASES])
def test_round_trip_equals_training_time_model(tmp_path, setting, method, flags, levels, alphas):
    path, payload, model, trainer = make_checkpoint(tmp_path, setting, method, flags)
    x = inputs()
    sizes = []
    for index, level in enumerate(levels):
        content = export_model(ckpt.load(path), level)
        if alphas is None:
            assert content["alpha"] is None
        else:
            assert content["alpha"] == pytest.approx(alphas[index], abs=1e-12)
        out = str(tmp_path / f"export_{index}.pt")
        save_export(out, content)
        sizes.append(os.path.getsize(out))
        stored = torch.load(out, weights_only=True)
        assert (stored["setting"], stored["method"], stored["model_name"]) == (setting, method, "cpreresnet20")
        assert stored["num_classes"] == 10 and stored["input_size"] == 32 and stored["level"] == level
        loaded = load_exported(out)
        assert not loaded.training
        assert not any(hasattr(m, "weight1") and m.weight1 is not None for m in loaded.modules())
        with torch.no_grad():
            exported_logits = loaded(x)
        expected = training_time_logits(model, trainer, level, content["alpha"], x)
        assert (exported_logits - expected).abs().max() <= 1e-5
        assert torch.equal(exported_logits.argmax(1), expected.argmax(1))
    assert sizes[1] < sizes[0]


def conv_shapes(model):
    return {name: (m.in_channels, m.out_channels) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


def expected_cpreresnet_channels(stem, planes, outputs):
    """(in, out) per conv of a cPreResNet20 with the given stem width, stage planes and stage
    (bottleneck) outputs."""
    shapes, in_channels = {"conv1": (3, stem)}, stem
    for stage, (p, out) in enumerate(zip(planes, outputs), start=1):
        for index in range(2):
            name = f"layer{stage}.{index}"
            shapes.update({f"{name}.conv1": (in_channels, p), f"{name}.conv2": (p, p), f"{name}.conv3": (p, out)})
            if index == 0:
                shapes[f"{name}.downsample"] = (in_channels, out)
            in_channels = out
    shapes["fc"] = (in_channels, 10)
    return shapes


def test_structured_export_has_the_channel_counts_of_the_width(tmp_path):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = str(tmp_path / "half.pt")
    save_export(out, export_model(ckpt.load(path), 0.5))
    loaded = load_exported(out)
    # Width 0.5 of cPreResNet20: stem 16 -> 8, planes 16/32/64 -> 8/16/32, outputs 32/64/128.
    assert conv_shapes(loaded) == expected_cpreresnet_channels(8, (8, 16, 32), (32, 64, 128))
    assert sum(p.numel() for p in loaded.parameters()) < 0.3 * 220384


def test_round_to_rounds_widths_up_and_says_so(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = str(tmp_path / "quarter8.pt")
    main(["--checkpoint", path, "--level", "0.25", "--out", out, "--round_to", "8"])
    printed = capsys.readouterr().out
    # Width 0.25: stem 4, planes 4/8/16, outputs 16/32/64; rounded up to multiples of 8.
    assert conv_shapes(load_exported(out)) == expected_cpreresnet_channels(8, (8, 8, 16), (16, 32, 64))
    assert "conv1 8" in printed and "layer1.0.conv1 8" in printed and "layer1.0.conv3 16" in printed
    assert "layer3.1.conv3 64" in printed
    assert "not comparable" in printed


def test_round_up_widths_never_exceeds_the_full_width():
    assert round_up_widths({"a": 4, "b": 9, "c": 16, "fc": 10}, {"a": 16, "b": 64, "c": 16, "fc": 10}, 8) == \
        {"a": 8, "b": 16, "c": 16, "fc": 10}


def test_lec_export_equals_the_masked_full_network(tmp_path):
    """Pruned channels of the full network, with gamma = beta = 0, contribute nothing: the
    slimmed export must give the same logits."""
    path, payload, model, _ = make_checkpoint(tmp_path, "structured_sparsity", "lec",
                                              ("--bn_calibration_images", "0"))
    fraction = 0.4
    out = str(tmp_path / "lec.pt")
    save_export(out, export_model(ckpt.load(path), fraction))
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, Norm2d)])
    threshold = gammas.sort().values[int(len(gammas) * (1 - fraction))]
    masked = build_model("cpreresnet20", dense_factory("BN"), 10)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in masked.modules():
            if isinstance(m, Norm2d):
                keep = (m.weight.abs() > threshold).float()
                m.weight.mul_(keep)
                m.bias.mul_(keep)
    masked.eval()
    loaded = load_exported(out)
    x = inputs()
    with torch.no_grad():
        slimmed, full = loaded(x), masked(x)
    # Dropping channels changes the order of the sums, so the match is to float32 rounding of
    # logits of magnitude ~10 (the exact comparison with the run's own slimming is above).
    assert torch.allclose(slimmed, full, rtol=1e-5, atol=1e-5)
    selections = [m for m in loaded.modules() if isinstance(m, ChannelSelection)]
    assert any(m.active for m in selections)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method, level", [("lec", 0.5), ("us", 0.5)])
def test_export_holds_the_statistics_the_evaluation_re_estimated(tmp_path, tiny_cifar, method, level):
    """A run that re-estimated BN statistics at evaluation exports them re-estimated the same way
    (same training images, transform and batches): the deployed model gives the evaluated logits."""
    flags = ("--data_dir", tiny_cifar, "--bn_calibration_images", "24", "--batch_size", "10", "--norm", "BN")
    path, payload, model, trainer = make_checkpoint(tmp_path, "structured_sparsity", method, flags)
    out = str(tmp_path / "calibrated.pt")
    save_export(out, export_model(ckpt.load(path), level, data_dir=tiny_cifar))
    point = EvalPoint(level=level)
    trainer.apply_levels(model, trainer.eval_levels(point, STEP))
    net, _ = trainer.eval_model(model, point)
    calibration = build_data(trainer.config, torch.device("cpu"), calibration_images=24).calibration
    assert calibrate_bn(net, calibration.batches()) == 24
    x = inputs()
    with torch.no_grad():
        expected, exported = net(x), load_exported(out)(x)
        uncalibrated = training_time_logits(*make_checkpoint(tmp_path, "structured_sparsity", method, flags)[2:],
                                            level, None, x)
    assert (exported - expected).abs().max() <= 1e-4
    assert (exported - uncalibrated).abs().max() > 1e-2  # the statistics did change


def test_export_of_a_calibrated_run_without_data_dir_is_a_one_line_error(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "lec")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", path, "--level", "0.5", "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("deploy.export: error: --data_dir: this structured_sparsity/lec run evaluated with BN "
                          "statistics re-estimated on 2048 training images")
    assert not (tmp_path / "o.pt").exists()


def test_unstructured_file_is_a_fraction_of_the_dense_one(tmp_path):
    path, *_ = make_checkpoint(tmp_path, "unstructured_sparsity", "target_topk")
    sizes = {}
    for level in (1.0, 0.05):
        out = str(tmp_path / f"k{level}.pt")
        save_export(out, export_model(ckpt.load(path), level))
        sizes[level] = os.path.getsize(out)
    # 5 % of the body values (4 bytes) and a 1-bit mask: about 0.325 bytes per weight instead of 4.
    assert sizes[1.0] > 8 * sizes[0.05]


def test_quantized_weights_are_packed_at_the_bit_width(tmp_path):
    path, *_ = make_checkpoint(tmp_path, "quantized", "target_bit_width")
    content = export_model(ckpt.load(path), 4)
    quantized = content["quantized"]
    weights = sum(torch.Size(shape).numel() for shape in quantized["shapes"])
    assert quantized["codes"].dtype == torch.uint8
    assert quantized["codes"].numel() == (4 * weights + 7) // 8
    assert len(content["act_ranges"]["names"]) == (len(quantized["names"]) + 1) // 2


def test_pack_bits_hand_computed():
    # 1 -> bits 1,0; 2 -> 0,1; 3 -> 1,1: stream 100111 (LSB first) = 1 + 8 + 16 + 32 = 57.
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    values = torch.randint(0, 32, (1001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(values, 5), 5, 1001), values)
    # 3 bits: 5 -> 101, 6 -> 011 (LSB first), 7 -> 111: stream 101011111 = 0b11110101, then 1.
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 1]
    assert unpack_bits(torch.tensor([0b11110101, 1], dtype=torch.uint8), 3, 3).tolist() == [5, 6, 7]


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_unpack_bits_inverts_pack_bits_at_every_width_and_count(num_bits):
    """Every bit width, counts that end inside a byte, on a byte and inside an 8-value group."""
    generator = torch.Generator().manual_seed(num_bits)
    for count in (0, 1, 7, 8, 9, 13, 64, 1001):
        values = torch.randint(0, 2 ** num_bits, (count,), generator=generator)
        packed = pack_bits(values, num_bits)
        assert packed.dtype == torch.uint8 and len(packed) == (count * num_bits + 7) // 8
        unpacked = unpack_bits(packed, num_bits, count)
        assert unpacked.dtype == torch.int64 and torch.equal(unpacked, values), (num_bits, count)


def run_module(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("setting,method,argv,message", [
    ("structured_sparsity", "us", ["--level", "1.5"], "--level 1.5: structured_sparsity/us checkpoints export width "
                                                      "factors in [0.25, 1]"),
    ("structured_sparsity", "lec", ["--level", "0.5", "--round_to", "8"], "--round_to 8: only for width-factor"),
    ("unstructured_sparsity", "lcs_l", ["--level", "0"], "TopK fractions in (0, 1]"),
    ("quantized", "lcs_l", ["--level", "4.5"], "integer bit widths in 3..8"),
    ("quantized", "target_bit_width", ["--level", "9"], "integer bit widths in 3..8"),
])
def test_bad_levels_are_one_line_errors(tmp_path, capsys, setting, method, argv, message):
    path, *_ = make_checkpoint(tmp_path, setting, method)
    out = tmp_path / "out.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", path, "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("deploy.export: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".out.pt") for p in tmp_path.iterdir())


def test_unreadable_files_are_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for argv, message in ([str(garbage), f"{garbage}: not a readable checkpoint"],
                          [str(tmp_path / "missing.pt"), "no such checkpoint"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", argv, "--level", "0.5", "--out", str(tmp_path / "o.pt")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    with pytest.raises(Exception, match="not a readable exported model"):
        load_exported(str(garbage))


@pytest.mark.slow
def test_cli_export_and_benchmark_table(tmp_path):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "lcs_l")
    out = tmp_path / "half.pt"
    result = run_module("-m", "deploy.export", "--checkpoint", path, "--level", "0.5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "lcs_l cpreresnet20: width_factor 0.5 (alpha 0.333333)" in result.stdout and out.is_file()
    result = run_module("benchmarks/deploy.py", "--checkpoint", path, "--levels", "0.5,0.25", "--repeats", "1",
                        "--warmup", "0", "--batch_sizes", "1,2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| level"))
    assert "nonzero params" in header and "MACs" in header and "file KiB" in header and "b2 ms" in header
    rows = [line.split(" | ") for line in lines if line.startswith(("| uncompressed", "| 0."))]
    assert [row[0] for row in rows] == ["| uncompressed", "| 0.5", "| 0.25"]
    assert rows[0][3] == "1.00x"
    # Width 0.25 of cPreResNet20 has about 15x fewer MACs than the full network.
    assert float(rows[2][5].rstrip("x")) > 10


# -- what deploy.export refuses, and what it stores beside the network ---------------------
def refused(capsys, argv):
    """The one stderr line of a refused export (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("deploy.export: error: ") and err.count("\n") == 1, err
    return err


def test_every_export_is_checked_against_the_training_time_model(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "lcs_l")
    main(["--checkpoint", path, "--level", "0.5", "--out", str(tmp_path / "half.pt")])
    main(["--checkpoint", path, "--subspace", "--out", str(tmp_path / "model.lcs.pt")])
    printed = capsys.readouterr().out
    assert "checked against the training-time model at width factor 0.5: max |Δlogit| " in printed
    assert "checked against the training-time model at width factor 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25: " \
           "max |Δlogit| " in printed


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_an_export_of_the_wrong_network_is_refused(tmp_path, capsys, monkeypatch, kind):
    """The channels format writes the full width under the label of width 0.5: a file that loads
    and agrees with itself (its ONNX graph with its torch network), but not with the model."""
    import dataclasses

    from deploy.formats import FORMATS
    from deploy.formats import channels

    def full_width(model, method, num_classes, level, round_to):
        return channels.export(model, method, num_classes, 1.0, round_to)
    monkeypatch.setitem(FORMATS, "channels", dataclasses.replace(FORMATS["channels"], export=full_width))
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "lcs_l")
    out = tmp_path / f"half.{kind}"
    err = refused(capsys, ["--checkpoint", path, "--level", "0.5", "--format", kind, "--out", str(out)])
    assert f"{out}: not written: at width factor 0.5 the export does not reproduce the training-time model " \
           f"(max |Δlogit| " in err
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_a_subspace_of_the_wrong_network_is_refused(tmp_path, capsys, monkeypatch):
    """The subspace serves every level at full width: each file would load and run."""
    import deploy.subspace

    real_resolve = deploy.subspace.resolve_level
    monkeypatch.setattr(deploy.subspace, "resolve_level", lambda method, level: real_resolve(method, 1.0))
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "model.lcs.pt"
    err = refused(capsys, ["--checkpoint", path, "--subspace", "--out", str(out)])
    assert f"{out}: not written: at width factor 0.875 the export does not reproduce the training-time model" in err
    assert os.listdir(tmp_path) == [os.path.basename(path)]


@pytest.mark.parametrize("argv,name,given", [
    (["--level", "0.5", "--format", "onnx"], "m.pt", ".pt"),
    (["--level", "0.5"], "m.onnx", ".onnx"),
    (["--level", "0.5"], "m.lcs.pt", ".lcs.pt"),
    (["--level", "0.5"], "model", "(none)"),
    (["--subspace"], "m.pt", ".pt"),
])
def test_an_out_suffix_that_does_not_fit_is_refused(tmp_path, capsys, argv, name, given):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / name
    err = refused(capsys, ["--checkpoint", path, "--out", str(out), *argv])
    assert f"--out {out}: suffix {given} does not fit " in err
    assert "allowed: .pt (--format pt), .onnx (--format onnx), .lcs.pt (--subspace)" in err
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_an_existing_out_is_replaced_only_with_force(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "half.pt"
    out.write_bytes(b"previous")
    err = refused(capsys, ["--checkpoint", path, "--level", "0.5", "--out", str(out)])
    assert f"--out {out}: already exists; pass --force to replace it" in err and out.read_bytes() == b"previous"
    main(["--checkpoint", path, "--level", "0.5", "--out", str(out), "--force"])
    assert load_exported(str(out)).preprocessing.input_size == 32


def test_exports_carry_the_input_normalisation_and_the_class_names(tmp_path):
    """pt: load_exported's attributes; subspace: load_subspace's; ONNX: metadata_props (JSON)."""
    import json

    from data.cifar import CIFAR_MEAN, CIFAR_STD
    from deploy import load_subspace

    from conftest import CIFAR_CLASSES

    path, *_ = make_checkpoint(tmp_path, "quantized", "lcs_l")
    main(["--checkpoint", path, "--level", "4", "--out", str(tmp_path / "m.pt")])
    main(["--checkpoint", path, "--subspace", "--out", str(tmp_path / "m.lcs.pt")])
    model, sub = load_exported(str(tmp_path / "m.pt")), load_subspace(str(tmp_path / "m.lcs.pt"))
    for loaded in (model, sub):
        assert loaded.class_names == CIFAR_CLASSES  # the sorted class folders the data pipeline labels by
        assert (loaded.preprocessing.mean, loaded.preprocessing.std) == (CIFAR_MEAN, CIFAR_STD)
        assert (loaded.preprocessing.input_size, loaded.preprocessing.resize) == (32, None)
    onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -r requirements-deploy.txt)")
    main(["--checkpoint", path, "--level", "4", "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
          "--check_images", "8"])
    stored = {prop.key: json.loads(prop.value) for prop in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert stored["class_names"] == list(CIFAR_CLASSES)
    assert stored["preprocessing"] == {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "input_size": 32,
                                       "resize": None}


def test_imagenet_preprocessing_is_that_of_its_test_transform():
    from types import SimpleNamespace

    from data import class_names, preprocessing
    from data.imagenet import IMAGENET_MEAN, IMAGENET_STD

    config = SimpleNamespace(dataset="imagenet", input_size=224)
    assert preprocessing(config).to_dict() == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                               "input_size": 224, "resize": 256}
    assert class_names(config) is None  # the config does not record the class folders


@pytest.mark.parametrize("kind", ["export", "subspace artefact"])
@pytest.mark.parametrize("key,value,message", [
    ("preprocessing", {"mean": "0.5"}, "preprocessing is {'mean': '0.5'}, expected a mapping of input_size, mean, "
                                       "resize, std"),
    ("class_names", ["cat", 3], "class_names is ['cat', 3], expected None or a list of names"),
])
def test_stored_metadata_of_the_wrong_type_is_one_line(tmp_path, kind, key, value, message):
    from deploy import load_subspace, make_subspace
    from utils.errors import CheckpointError

    path, payload, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    content = export_model(payload, 0.5) if kind == "export" else make_subspace(payload, path)
    out = str(tmp_path / "m.pt")
    save_export(out, dict(content, **{key: value}))
    with pytest.raises(CheckpointError) as error:
        (load_exported if kind == "export" else load_subspace)(out)
    assert str(error.value) == f"{out}: damaged {kind}: {message}"


@pytest.mark.parametrize("signum,status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signalled_export_removes_its_temporary_file(tmp_path, signum, status):
    """The signal arrives while the file is being written (a temporary beside --out): one line,
    the conventional status, and nothing left behind."""
    import signal

    from utils.atomic import TEMPORARY

    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "half.pt"
    # The payload is written, then the writer waits for the signal (at most a minute).
    code = ("import time\n"
            "from utils import checkpoint\n"
            "real = checkpoint._write_payload\n"
            "def slow(path, payload):\n"
            "    real(path, payload)\n"
            "    print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            "checkpoint._write_payload = slow\n"
            "from deploy.export import main\n"
            f"main(['--checkpoint', {path!r}, '--level', '0.5', '--out', {str(out)!r}])\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "writing\n"
        temporaries = [name for name in os.listdir(out_dir) if TEMPORARY.match(name)]
        process.send_signal(getattr(signal, signum))
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert temporaries and process.returncode == status, err
    assert err == f"deploy.export: interrupted by {signum}; {out} was not written (a previous file there is " \
                  f"intact)\n"
    assert os.listdir(out_dir) == []

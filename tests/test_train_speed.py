"""The speed work: the benchmark runs and prints its table, the fast fake-quantiser equals the
fused kernel bit for bit, and --compile is refused where it cannot work."""

import os
import re

import pytest
import torch

from models.quant import affine_params, grid_limits, quantize_dequantize

BENCHMARK = os.path.join("benchmarks", "train_speed.py")


@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 6, 7, 8])
def test_elementwise_fake_quantiser_equals_the_fused_kernel_bit_for_bit(num_bits):
    generator = torch.Generator().manual_seed(num_bits)
    x = torch.randn(4, 16, 9, 9, generator=generator) * 3
    # Values on and next to the rounding midpoints as well as far outside the range.
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e6, -1e6, 2.5, -2.5])
    for low, high in ((x.min(), x.max()), (torch.tensor(-1.0), torch.tensor(0.5)), (torch.tensor(0.0), x.max())):
        scale, zero_point = affine_params(low, high, num_bits)
        q_min, q_max = grid_limits(num_bits)
        midpoints = (torch.arange(-3, 4) + 0.5) * scale
        for values in (x, midpoints):
            fused = torch.fake_quantize_per_tensor_affine(values, scale, zero_point, q_min, q_max)
            assert torch.equal(quantize_dequantize(values, scale, zero_point, q_min, q_max), fused)


def test_elementwise_fake_quantiser_leaves_its_input_alone():
    x = torch.randn(3, 5)
    copy = x.clone()
    scale, zero_point = affine_params(x.min(), x.max(), 4)
    quantize_dequantize(x, scale, zero_point, *grid_limits(4))
    assert torch.equal(x, copy)


def test_compile_is_refused_for_methods_with_a_new_level_every_step(cli, tiny_cifar, tmp_path):
    method = "us"
    save_dir = tmp_path / "run"
    result = cli("train_structured.py", "--method", method, "--compile", "--data_dir", tiny_cifar,
                 "--epochs", "1", "--save_dir", save_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--compile" in lines[0] and f"structured_sparsity/{method}" in lines[0]
    assert not save_dir.exists()


@pytest.mark.slow
def test_benchmark_prints_its_table(cli, tiny_cifar):
    result = cli(BENCHMARK, "--device", "cpu", "--data_dir", tiny_cifar, "--images", "16", "--batch_size", "16",
                 "--epochs", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"^\w+/lcs_l ", line)]
    assert len(rows) == 6, result.stdout
    for setting in ("structured_sparsity", "unstructured_sparsity", "quantized"):
        original, project = [line.split() for line in rows if line.startswith(setting + "/")]
        assert original[1] == "original-style" and project[1:3] == ["this", "project"]
        # first epoch s, epoch s, images/s, ms/step, s per 50k, speed-up
        numbers = [float(value) for value in project[3:8]]
        assert all(value > 0 for value in numbers)
        assert numbers[2] == pytest.approx(16 / numbers[1], rel=0.02)   # images/s = images / epoch s
        assert numbers[3] == pytest.approx(1000 * numbers[1], rel=0.02)  # one step per epoch
        assert original[-1] == "1.00x"
        speedup = float(project[-1].rstrip("x"))
        assert speedup == pytest.approx(float(original[3]) / numbers[1], rel=0.02)
    assert "device: CPU" in result.stdout


def test_benchmark_refuses_an_unknown_setting(cli):
    result = cli(BENCHMARK, "--settings", "structured")
    assert result.returncode == 2
    assert "--settings: unknown setting 'structured'" in result.stderr


COMPILABLE = {("structured_sparsity", "ns"), ("structured_sparsity", "lec"), ("structured_sparsity", "target_width"),
              ("quantized", "target_bit_width"), ("quantized", "lcs_l")}


def method_for(setting, name, *flags):
    from methods import METHODS
    from training_params import parse

    config, _ = parse(setting, ["--method", name, "--save_dir", "unused", *flags])
    return METHODS[setting][name](config, 100), config


def test_compile_is_allowed_exactly_for_methods_with_few_fixed_levels():
    from methods import METHODS
    from utils.errors import ConfigError
    from engine.step import check_compile_support

    for setting, methods in METHODS.items():
        for name in methods:
            method, config = method_for(setting, name)
            if (setting, name) in COMPILABLE:
                check_compile_support(method, config)
                # Every training step must use one of the declared level settings.
                seen = {repr(method.train_levels(step, torch.Generator().manual_seed(step)))
                        for step in (0, 1, 2, 50, 99, 100, 101, 150, 400)}
                assert 1 <= len(seen) <= method.distinct_train_levels()
            else:
                with pytest.raises(ConfigError, match="--compile"):
                    check_compile_support(method, config)


def test_quantized_lcs_l_with_continuous_alpha_is_not_compilable(tmp_path):
    from utils.errors import ConfigError
    from engine.step import check_compile_support

    config_file = tmp_path / "continuous.yaml"
    config_file.write_text("discrete_alpha_map: false\n")
    method, config = method_for("quantized", "lcs_l", "--config", str(config_file))
    assert method.distinct_train_levels() is None
    with pytest.raises(ConfigError, match="quantized/lcs_l"):
        check_compile_support(method, config)


def test_cudnn_autotuning_is_off_for_structured_runs_only():
    from engine.step import configure_backends

    saved = torch.backends.cudnn.benchmark
    try:
        for setting, name, expected in (("structured_sparsity", "lcs_l", False), ("structured_sparsity", "lec", False),
                                        ("unstructured_sparsity", "lcs_l", True), ("quantized", "lcs_l", True)):
            method, _ = method_for(setting, name)
            configure_backends(method, torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is expected, (setting, name)
    finally:
        torch.backends.cudnn.benchmark = saved


def test_set_level_writes_every_layer_that_reads_a_level_also_in_copies():
    import copy

    from models import build_model
    from models.factory import LayerFactory
    from models.layers import Norm2d, SlimConv2d, set_level

    model = build_model("cpreresnet20", LayerFactory(norm_kind="IN", body="slim", line_norms=True), 10)
    set_level(model, alpha=0.3, width_factor=0.5, topk=None)
    convs = [m for m in model.modules() if isinstance(m, SlimConv2d)]
    norms = [m for m in model.modules() if isinstance(m, Norm2d)]
    assert len(convs) == 23 and len(norms) == 19
    assert all(m.width_factor == 0.5 and not hasattr(m, "alpha") for m in convs)
    assert all(m.alpha == 0.3 and not hasattr(m, "width_factor") for m in norms)
    assert not any(hasattr(m, "topk") for m in model.modules())
    twin = copy.deepcopy(model)
    set_level(twin, alpha=0.9, width_factor=None)
    assert all(m.alpha == 0.9 for m in twin.modules() if isinstance(m, Norm2d))
    assert all(m.width_factor == 0.5 for m in twin.modules() if isinstance(m, SlimConv2d))
    assert all(m.alpha == 0.3 for m in norms)


@pytest.mark.slow
def test_benchmark_names_the_fastest_flag_combination(cli, tiny_cifar):
    """--compare_flags: every combination of --amp and --channels_last measured in one run, the
    one with the least epoch time named, with its ratio to fp32."""
    result = cli(BENCHMARK, "--device", "cpu", "--data_dir", tiny_cifar, "--images", "16", "--batch_size", "16",
                 "--epochs", "1", "--threads", "1", "--settings", "quantized", "--compare_flags")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^quantized/lcs_l\s+(original-style|project .+?)\s+([\d.]+)\s+([\d.]+)\s", line)
        if match:
            rows[match.group(1)] = float(match.group(3))
    assert set(rows) == {"original-style", "project fp32", "project --channels_last", "project --amp",
                         "project --amp --channels_last"}, result.stdout
    projects = {name.removeprefix("project "): seconds for name, seconds in rows.items() if name != "original-style"}
    best = min(projects, key=projects.get)
    line = re.search(r"^  quantized: (.+) \(([\d.]+)x fp32, ([\d.]+)x the original-style loop\)$", result.stdout,
                     re.MULTILINE)
    assert line and line.group(1) == best, result.stdout
    assert float(line.group(2)) == pytest.approx(projects["fp32"] / projects[best], rel=0.02)
    assert re.search(rf"^  all settings: {re.escape(best)} \(", result.stdout, re.MULTILINE)
    assert "--amp changes the numerics (bfloat16 autocast)" in result.stdout


def test_benchmark_refuses_compare_flags_with_a_flag(cli):
    result = cli(BENCHMARK, "--compare_flags", "--amp")
    assert result.returncode == 2 and "--compare_flags: measures every combination" in result.stderr

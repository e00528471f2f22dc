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

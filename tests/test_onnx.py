"""ONNX export checked with ONNX Runtime (deploy.onnx_export), and benchmarks/deploy.py with
both runtimes. Skipped only where onnx/onnxruntime are not installed (CI installs them)."""

import os
import subprocess
import sys
import warnings

import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -r requirements-deploy.txt)")
pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -r requirements-deploy.txt)")

from deploy.onnx_export import compare, conv_kernels, export_onnx, session, write_checked  # noqa: E402
from models.layers import QuantConv2d  # noqa: E402
from utils import checkpoint as ckpt  # noqa: E402
from deploy.export import build_exported, export_model, main  # noqa: E402
from test_export import CASES, inputs, make_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each setting (and LEC) at two levels, less compressed first; quantized at 8 and 3 bits.
ONNX_CASES = [
    ("structured_sparsity", "lcs_l", (), (1.0, 0.5), None),
    ("structured_sparsity", "lec", ("--bn_calibration_images", "0"), (0.9, 0.4), None),
    ("unstructured_sparsity", "lcs_l", (), (0.5, 0.05), None),
    ("quantized", "lcs_l", ("--norm", "BN"), (8, 3), None),
    ("quantized", "target_bit_width", (), (8, 3), None)]


def post_relu_ranges(payload):
    """Activation ranges on every quantized conv, as training records them: from 0 after a ReLU,
    below 0 for the down-sampling convs (their input is a residual sum)."""
    for key, value in payload["model"].items():
        if key.endswith("act_range_ready"):
            value.fill_(True)
        elif key.endswith("act_min"):
            value.fill_(-0.5 if "downsample" in key else 0.0)
        elif key.endswith("act_max"):
            value.fill_(8.0)


@pytest.mark.parametrize("setting,method,flags,levels,alphas", ONNX_CASES,
                         ids=[f"{c[0].split('_')[0]}-{c[1]}{'-' + c[2][1] if c[2][:1] == ('--norm',) else ''}" for c in ONNX_CASES])
def test_onnx_runtime_reproduces_the_model(tmp_path, setting, method, flags, levels, alphas):
    path, payload, *_ = make_checkpoint(tmp_path, setting, method, flags)
    payload = ckpt.load(path)
    post_relu_ranges(payload)
    for level in levels:
        content = export_model(payload, level)
        out = str(tmp_path / f"{level}.onnx")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            lines = write_checked(content, out, count=64)
        # The user sees the project's words only (lcs_l's InstanceNorm made torch warn on valid input).
        assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
        model = build_exported(content)
        result = compare(session(out), model, inputs(count=32, size=32, seed=7))
        quantized = setting == "quantized"
        assert result["agreement"] >= (0.99 if quantized else 1.0), lines
        assert result["relative_difference"] <= (0.02 if quantized else 1e-4), lines
        graph = onnx.load(out).graph
        ops = {node.op_type for node in graph.node}
        assert ("QuantizeLinear" in ops) == quantized
        if quantized:
            weights = {t.name: t.data_type for t in graph.initializer}
            assert weights["layer1.0.conv1.weight_uint8"] == onnx.TensorProto.UINT8
        if setting == "unstructured_sparsity":
            assert "ONNX stores no sparse weights" in lines[-1]


def quantized_kernels(tmp_path, content, bits):
    """The kernels of the exported network's convs, and the op types of the optimised graph."""
    out = str(tmp_path / f"q{bits}.onnx")
    export_onnx(build_exported(content), content, out)
    optimized = str(tmp_path / f"q{bits}.optimized.onnx")
    kernels = conv_kernels(out, optimized)
    return out, kernels, [node.op_type for node in onnx.load(optimized).graph.node]


@pytest.mark.parametrize("norm,bit_widths", [("BN", range(3, 9)), ("GN", (3,))])
def test_every_quantized_conv_runs_as_an_integer_convolution(tmp_path, norm, bit_widths):
    """At every bit width 3..8, ONNX Runtime's optimised graph runs each of the 21 quantized
    convs as ConvInteger (the stem and the classifier stay float), and its logits match torch's.
    (Random GroupNorm networks amplify float rounding chaotically: their kernels are checked.)"""
    path, *_ = make_checkpoint(tmp_path, "quantized", "target_bit_width", ("--norm", norm))
    payload = ckpt.load(path)
    post_relu_ranges(payload)
    x = inputs(count=32, size=32, seed=3)
    for bits in bit_widths:
        content = export_model(payload, bits)
        out, kernels, ops = quantized_kernels(tmp_path, content, bits)
        model = build_exported(content)
        quantized = [name for name, module in model.named_modules() if isinstance(module, QuantConv2d)]
        assert len(quantized) == 21 and all(kernels.get(name) == "integer" for name in quantized), (bits, kernels)
        # The stem and the classifier (ONNX Runtime renames the stem when it fuses its ReLU).
        assert sorted(kind for name, kind in kernels.items() if name not in quantized) == ["float", "float"]
        assert ops.count("ConvInteger") == 21 and ops.count("Clip") == (21 if bits < 8 else 0)
        if norm == "BN":
            result = compare(session(out), model, x)
            assert result["agreement"] == 1.0 and result["relative_difference"] <= 0.01, (bits, result)


def test_onnx_cli_refuses_a_missing_directory(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", path, "--level", "0.5", "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--out" in err and "does not exist" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("runtime,setting,method,levels,rows", [
    ("torch", "structured_sparsity", "us", "0.5", ["| uncompressed", "| 0.5"]),
    ("onnxruntime", "quantized", "target_bit_width", "8", ["| float32", "| 8"])])
def test_benchmark_runs_with_both_runtimes(tmp_path, runtime, setting, method, levels, rows):
    path, *_ = make_checkpoint(tmp_path, setting, method)
    result = subprocess.run(
        [sys.executable, "benchmarks/deploy.py", "--checkpoint", path, "--levels", levels, "--repeats", "1",
         "--warmup", "0", "--batch_sizes", "1,2", "--threads", "1", "--runtime", runtime, "--switches", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith(("| uncompressed", "| float32", "| 0.5",
                                                                        "| 8"))] == rows
    assert f"runtime {runtime}" in result.stdout
    subspace = next(line for line in lines if line.startswith("subspace artefact:"))
    assert "x one float32 model" in subspace and "per-level files" in subspace and "level switch" in subspace
    if runtime == "onnxruntime":
        assert "CPU execution provider" in result.stdout and "int8-weight convs" in result.stdout

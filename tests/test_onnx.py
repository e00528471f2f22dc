"""ONNX export checked with ONNX Runtime (deploy.onnx_export), and benchmarks/deploy.py with
both runtimes. Skipped only where onnx/onnxruntime are not installed (CI installs them)."""

import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -r requirements-deploy.txt)")
pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -r requirements-deploy.txt)")

from deploy.formats.int_codes_onnx import sort_topologically  # noqa: E402
from deploy.onnx_export import (DeployError, conv_kernels, export_checked, export_onnx, validate,  # noqa: E402
                                write_checked)
from methods import METHODS  # noqa: E402
from models import build_model  # noqa: E402
from models.layers import QuantConv2d, set_level  # noqa: E402
from training_params import parse  # noqa: E402
from utils import checkpoint as ckpt  # noqa: E402
from deploy.compressed import build_exported, export_model, resolve_level  # noqa: E402
from deploy.export import main  # noqa: E402
from test_export import inputs, make_checkpoint  # noqa: E402
from test_export import refused as one_line_error  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ("BN", "GN", "IN")

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


def case_id(case):
    setting, method, flags = case[:3]
    return f"{setting.split('_')[0]}-{method}{'-' + flags[1] if flags[:1] == ('--norm',) else ''}"


@pytest.mark.parametrize("setting,method,flags,levels,alphas", ONNX_CASES, ids=[case_id(c) for c in ONNX_CASES])
def test_onnx_runtime_reproduces_the_model(tmp_path, setting, method, flags, levels, alphas):
    path, payload, *_ = make_checkpoint(tmp_path, setting, method, flags)
    payload = ckpt.load(path)
    post_relu_ranges(payload)
    for level in levels:
        content = export_model(payload, level)
        out = str(tmp_path / f"{level}.onnx")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            lines, _ = write_checked(content, out, count=64)
        # The user sees the project's words only (lcs_l's InstanceNorm made torch warn on valid input).
        assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
        model = build_exported(content)
        # Other images than the check's: the judgement of validate holds on them too.
        result = validate(out, model, content, inputs(count=32, size=32, seed=7))
        quantized = setting == "quantized"
        exact = "reproduce their integer arithmetic exactly" in lines[0]
        assert "identical predictions" in lines[0] and exact == quantized, lines
        if quantized:
            assert result["layers"]["first"] is None and result["layers"]["missing"] == [], result
        else:
            assert result["max_difference"] <= 1e-3, result
        graph = onnx.load(out).graph
        ops = {node.op_type for node in graph.node}
        assert ("QuantizeLinear" in ops) == quantized
        if quantized:
            # Weight codes on uint8 (ONNX Runtime's u8 x s8 kernels saturate on AVX2 without VNNI).
            weights = {t.name: t.data_type for t in graph.initializer}
            integer = [node for node in graph.node if node.op_type in ("ConvInteger", "QLinearConv")]
            assert len(integer) == 21 and all(
                weights[node.input[1 if node.op_type == "ConvInteger" else 3]] == onnx.TensorProto.UINT8
                for node in integer)
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
    convs with an integer kernel (the stem and the classifier stay float), and its logits match
    torch's: at 8 bits with BN, the 12 whose output goes through ReLU into the next conv (each
    block's first two) as QLinearConv, the 9 whose output a residual sum reads as ConvInteger;
    below 8 bits, and with a GroupNorm after each conv, all 21 as ConvInteger. (Random GroupNorm networks amplify float
    rounding chaotically: their kernels are checked.)"""
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
        fused = 12 if norm == "BN" and bits == 8 else 0
        assert (ops.count("QLinearConv"), ops.count("ConvInteger")) == (fused, 21 - fused), (bits, ops)
        assert ops.count("Clip") == (21 if bits < 8 else 0)
        if norm == "BN":
            validate(out, model, content, x)


# ResNet18 (ImageNet layout: strided 1x1 shortcut convs in a Sequential) and VGG19 (max pooling
# between convs): the quantized convs, the convs fused into QLinearConv at 8 bits with BN (those
# whose output goes through ReLU, and pooling, into the next conv), tiny inputs.
LARGE_MODELS = {"resnet18": (19, 8), "vgg19": (15, 14)}


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model_name", sorted(LARGE_MODELS))
def test_resnet18_and_vgg19_export_and_pass_the_check(tmp_path, tiny_imagenet, model_name, norm):
    flags = ("--model", model_name, "--norm", norm)
    if model_name == "resnet18":
        flags += ("--dataset", "imagenet", "--imagenet_dir", tiny_imagenet)
    path, *_ = make_checkpoint(tmp_path, "quantized", "target_bit_width", flags)
    payload = ckpt.load(path)
    post_relu_ranges(payload)
    quantized, fused = LARGE_MODELS[model_name]
    for bits in (8, 3):
        content = export_model(payload, bits)
        # The networks pool globally: a small size runs (ResNet18's InstanceNorm needs 2x2 at its end).
        content["input_size"] = 64 if model_name == "resnet18" else 32
        out = str(tmp_path / f"{bits}.onnx")
        lines, kernels = write_checked(content, out, count=4)
        assert "reproduce their integer arithmetic exactly" in lines[0], lines
        model = build_exported(content)
        names = [name for name, module in model.named_modules() if isinstance(module, QuantConv2d)]
        assert len(names) == quantized and all(kernels.get(name) == "integer" for name in names), kernels
        ops = [node.op_type for node in onnx.load(out).graph.node]
        expected = fused if norm == "BN" and bits == 8 and "exact form" not in " ".join(lines) else 0
        assert (ops.count("QLinearConv"), ops.count("ConvInteger")) == (expected, quantized - expected), lines


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
    """A table per thread count (1 and 2, timed in one round-robin), each level against the
    uncompressed model at the same count, and whether the CPU has int8 dot products."""
    path, *_ = make_checkpoint(tmp_path, setting, method)
    result = subprocess.run(
        [sys.executable, "benchmarks/deploy.py", "--checkpoint", path, "--levels", levels, "--repeats", "1",
         "--warmup", "0", "--batch_sizes", "1,2", "--threads", "1,2", "--runtime", runtime, "--switches", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith(("| uncompressed", "| float32", "| 0.5",
                                                                        "| 8", "1 thread", "2 threads"))] == \
        ["1 thread:", *rows, "2 threads:", *rows]
    assert sum(line.split(" | ")[3] == "1.00x" for line in lines if line.startswith(rows[0])) == 2
    assert "int8 dot products" in result.stdout and f"runtime {runtime}" in result.stdout
    subspace = next(line for line in lines if line.startswith("subspace artefact:"))
    assert "x one float32 model" in subspace and "per-level files" in subspace and "level switch" in subspace
    if runtime == "onnxruntime":
        assert "CPU execution provider" in result.stdout and "int8-weight convs" in result.stdout


# -- every quantized method x norm x bit width, barely trained and trained ------------------
QUANTIZED_METHODS = ("lcs_l", "lcs_p", "target_bit_width")
BIT_WIDTHS = tuple(range(3, 9))
# The trained model differs from the barely trained one in its classifier alone (fit_classifier):
# every conv, and so every code the check compares, is the same. What the trained model adds is
# confident logits: the logits' guard, and the fast form the check may refuse (8 bits only). Its
# ends of the range judge that, without re-checking the same convs at every bit width between.
TRAINED_BIT_WIDTHS = (3, 8)
CLASS_IMAGES = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(10))


def class_batch(count, seed):
    """(labels, images) of ten classes: a fixed random image per class plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return labels, CLASS_IMAGES[labels] + 0.3 * torch.randn(count, 3, 32, 32, generator=generator)


@torch.no_grad()
def fit_classifier(model, method):
    """The classifier fitted by least squares on the features at 8 bits: confident logits (a
    few units apart, mostly right) in a second instead of hundreds of training steps. The check
    images are among the fitted ones: after two steps an InstanceNorm network's features vary
    by 4 % between images, too little for a classifier fitted on others to be right on them."""
    set_level(model, resolve_level(method, 8)[0])
    features = []
    hook = model.fc.register_forward_pre_hook(lambda module, args: features.append(args[0].flatten(1)))
    labels, images = class_batch(200, seed=2)
    labels, images = torch.cat([labels, CHECK_LABELS]), torch.cat([images, CHECK_IMAGES])
    model(images)
    hook.remove()
    weight = torch.linalg.lstsq(features[0], 8.0 * F.one_hot(labels, 10).float(), driver="gelsd").solution.T
    for name in ("weight", "weight1"):
        if getattr(model.fc, name, None) is not None:
            getattr(model.fc, name).copy_(weight.view_as(model.fc.weight))


def two_steps(method_name, norm, save_dir):
    """(config, method, model): a cPreResNet20 after two SGD steps with activations quantized
    from the first (every quantized conv records its range; near-chance, nearly uniform logits,
    as after a short run)."""
    config, _ = parse("quantized", ["--method", method_name, "--norm", norm, "--save_dir", save_dir])
    method = METHODS["quantized"][method_name](config, 0)
    torch.manual_seed(0)
    model = build_model(config.model, method.layer_factory(), 10)
    method.bind(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for step in range(2):
        labels, images = class_batch(16, seed=100 + step)
        for levels in method.train_levels(step, generator):
            method.apply_levels(model, levels)
            F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return config, method, model.eval()


@pytest.fixture(scope="session")
def tiny_quantized(tmp_path_factory):
    """payload(method, norm, trained): the checkpoint payload of two_steps' model, its
    classifier fitted when `trained` (a copy: both payloads come from one two-step model), each
    built once per session."""
    save_dir = str(tmp_path_factory.mktemp("tiny_quantized"))
    models, payloads = {}, {}

    def payload(method_name, norm, trained):
        if (method_name, norm, trained) not in payloads:
            if (method_name, norm) not in models:
                models[method_name, norm] = two_steps(method_name, norm, save_dir)
            config, method, model = models[method_name, norm]
            if trained:
                model = copy.deepcopy(model)
                fit_classifier(model, method)
            payloads[method_name, norm, trained] = {
                "format": ckpt.FORMAT, "kind": "model", "setting": "quantized", "method": method_name,
                "model_name": config.model, "config": config.to_dict(),
                "model": {key: value.clone() for key, value in model.state_dict().items()},
                "epoch": 1, "global_step": 2}
        return payloads[method_name, norm, trained]
    return payload


# The check compares every code of every quantized conv on each image, and its cost grows with the
# images: 24 (formerly 48) judge every graph of the matrix, wrong ones refused, at half the cost.
CHECK_LABELS, CHECK_IMAGES = class_batch(24, seed=3)


def exported_graph(tmp_path, content, name="q.onnx"):
    out = str(tmp_path / name)
    export_onnx(build_exported(content), content, out)
    return out


@pytest.fixture(scope="session")
def tiny_quantized_graph(tiny_quantized, tmp_path_factory):
    """graph(method, norm, trained, bits): (the path of the export of tiny_quantized's model at
    `bits`, its check on CHECK_IMAGES, why the fast form was refused or None), made once per
    session as deploy.onnx_export.write_checked makes it (read it, do not change it). The accept and refuse tests of a
    method x norm run in one work unit (tests/conftest.py), so the refuse test reads the graphs
    the accept test made."""
    folder = tmp_path_factory.mktemp("tiny_quantized_graphs")
    cache = {}

    def graph(method, norm, trained, bits):
        key = method, norm, trained, bits
        if key not in cache:
            content = export_model(tiny_quantized(method, norm, trained), bits)
            path = str(folder / ("-".join(map(str, key)) + ".onnx"))
            cache[key] = (path, *export_checked(build_exported(content), content, path, CHECK_IMAGES, path))
        return cache[key]
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("method", QUANTIZED_METHODS)
def test_every_correct_quantized_graph_is_accepted(tiny_quantized, tiny_quantized_graph, method, norm):
    """The check accepts the export of a barely trained (near-chance) model at every bit width and
    of a trained one (right on most images at 8 bits) at both ends of the range, with every norm."""
    for trained in (False, True):
        payload = tiny_quantized(method, norm, trained)
        for bits in TRAINED_BIT_WIDTHS if trained else BIT_WIDTHS:
            if bits == 8:  # the two models are what they are said to be
                model = build_exported(export_model(payload, bits))
                with torch.no_grad():
                    accuracy = float((model(CHECK_IMAGES).argmax(1) == CHECK_LABELS).float().mean())
                assert accuracy >= 0.8 if trained else accuracy <= 0.4, (trained, accuracy)
            _, result, refused = tiny_quantized_graph(method, norm, trained, bits)
            layers = result["layers"]
            assert layers["first"] is None and layers["missing"] == [] and layers["layers"] == 21, layers
            # Rounding ties of the float input's codes, and those a QLinearConv's requantization
            # moves (the bias rounded to whole units of the sum; measured 2e-4 of the codes).
            code_ties = layers["ties"] - layers["requantization_ties"]
            assert 0 <= code_ties <= 1e-4 * layers["codes"] and 0 <= result["agreement"] <= 1, result
            assert layers["requantization_ties"] <= 1e-3 * layers["codes"], layers
            # At 8 bits the fast form (each block's first two convs fused, with BN) unless the check
            # refused it.
            fused = 12 if norm == "BN" and bits == 8 and refused is None else 0
            assert len(layers["fused"]) == fused, (refused, layers["fused"])
            # The barely trained model's nearly equal logits move little: its fast form always passes.
            assert trained or refused is None, refused


def test_a_shared_quantizer_clips_the_codes_of_every_conv_that_reads_them(tmp_path, tiny_quantized):
    """A block's first conv and its shortcut quantize the same input on the same grid, and the
    exporter shares one QuantizeLinear between them: below 8 bits both read clipped codes (the
    shortcut once read the unclipped ones, up to 7 codes off at 3 bits)."""
    content = export_model(tiny_quantized("lcs_l", "BN", False), 3)
    graph = onnx.load(exported_graph(tmp_path, content)).graph
    producers = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type in ("ConvInteger", "QLinearConv")]
    readers = {}
    for conv in convs:
        readers.setdefault(conv.input[0], []).append(conv.name)
    assert len(convs) == 21 and any(len(names) > 1 for names in readers.values()), readers
    assert all(producers[conv.input[0]].op_type == "Clip" for conv in convs)
    validate(exported_graph(tmp_path, content), build_exported(content), content, CHECK_IMAGES)


def test_a_fast_form_the_check_refuses_is_written_in_the_exact_form(tmp_path, tiny_quantized, monkeypatch):
    """Where the check refuses the QLinearConv form (here: a model tolerance of 0.03 spreads, which
    the exact form meets at 8 bits and the fast one, whose requantization ties move the trained
    model's logits by about 0.08, does not), write_checked writes every quantized conv as
    ConvInteger, checks that, and says so."""
    import deploy.formats.int_codes_onnx as form

    content = export_model(tiny_quantized("target_bit_width", "BN", True), 8)
    fast = str(tmp_path / "fast.onnx")
    lines, _ = write_checked(content, fast, data_dir=None, count=16)
    assert not any("exact form" in line for line in lines) and "12 QLinearConv" in lines[0], lines
    monkeypatch.setattr(form, "MODEL_TOLERANCE", 0.03)
    out = str(tmp_path / "q.onnx")
    lines, kernels = write_checked(content, out, count=16)
    assert "written in the exact form: the fast one was refused (" in lines[1], lines
    ops = [node.op_type for node in onnx.load(out).graph.node]
    assert (ops.count("QLinearConv"), ops.count("ConvInteger")) == (0, 21)
    assert sum(kind == "integer" for kind in kernels.values()) == 21


def without_clips(path):
    """The graph with its codes no longer clipped to the b-bit grid (activations on 8 bits)."""
    graph = onnx.load(path)
    for clip in [node for node in graph.graph.node if node.op_type == "Clip"]:
        for node in graph.graph.node:
            node.input[:] = [clip.input[0] if name == clip.output[0] else name for name in node.input]
        graph.graph.node.remove(clip)
    onnx.save(graph, path)


def with_dequantize_linear(path):
    """The integer sums scaled by an int32 DequantizeLinear instead of Cast and Mul: the form that
    ONNX Runtime's QDQ propagation breaks after a GroupNorm."""
    graph = onnx.load(path)
    nodes = graph.graph.node
    for cast in [node for node in nodes if node.op_type == "Cast" and node.name.endswith("_cast")]:
        mul = next(node for node in nodes if node.op_type == "Mul" and cast.output[0] in node.input)
        nodes.append(onnx.helper.make_node("DequantizeLinear", [cast.input[0], mul.input[1]], [mul.output[0]],
                                           name=cast.name + "_dq"))
        nodes.remove(cast)
        nodes.remove(mul)
    sort_topologically(graph.graph)
    onnx.save(graph, path)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("method", QUANTIZED_METHODS)
def test_every_wrong_quantized_graph_is_refused(tmp_path, tiny_quantized, tiny_quantized_graph, method, norm):
    """Graphs that compute something else are refused, on the barely trained model (whose nearly
    equal logits the former check could not judge): the codes and line norms of a neighbouring
    bit width, activations on the 8-bit grid below 8 bits, activations unquantized at 8 bits."""
    payload = tiny_quantized(method, norm, False)
    for bits in (8, 3):
        content = export_model(payload, bits)
        model = build_exported(content)
        neighbour = tiny_quantized_graph(method, norm, False, 7 if bits == 8 else 4)[0]
        if bits < 8:
            other_grid = str(tmp_path / "grid.onnx")
            shutil.copyfile(tiny_quantized_graph(method, norm, False, bits)[0], other_grid)
            without_clips(other_grid)
        else:
            unquantized = copy.deepcopy(content)
            unquantized["act_ranges"] = {"names": [], "min": torch.zeros(0), "max": torch.zeros(0)}
            other_grid = exported_graph(tmp_path, unquantized, "grid.onnx")
        for wrong in (neighbour, other_grid):
            with pytest.raises(DeployError, match="ONNX Runtime does not reproduce the model"):
                validate(wrong, model, content, CHECK_IMAGES, name=f"{method} {norm} {bits} bits {wrong}")


def weights_only(content):
    """The export with no activation range recorded (as before the activation delay ends): float
    convs of dequantized int8 weights."""
    content = copy.deepcopy(content)
    content["act_ranges"] = {"names": [], "min": torch.zeros(0), "max": torch.zeros(0)}
    return content


@pytest.mark.parametrize("norm", NORMS)
def test_a_weights_only_quantized_graph_is_judged_as_a_float_graph(tmp_path, tiny_quantized, norm):
    """With no input quantized, ONNX Runtime and torch differ only in the order of float
    operations, so every image must agree to FLOAT_TOLERANCE (as float graphs): the graph of the
    neighbouring bit width's weights is refused (the median-image tolerance of quantized graphs,
    0.5 spreads, let it pass)."""
    payload = tiny_quantized("lcs_l", norm, True)
    for bits, neighbour_bits in ((8, 7), (3, 4)):
        content = weights_only(export_model(payload, bits))
        model = build_exported(content)
        result = validate(exported_graph(tmp_path, content), model, content, CHECK_IMAGES)
        assert "layers" not in result and result["max_difference"] <= 1e-3, result
        neighbour = exported_graph(tmp_path, weights_only(export_model(payload, neighbour_bits)), "neighbour.onnx")
        with pytest.raises(DeployError, match="tolerance 0.001 for the largest"):
            validate(neighbour, model, content, CHECK_IMAGES)


def test_the_int32_dequantize_linear_form_is_refused_after_a_group_norm(tmp_path, tiny_quantized):
    """The cause of the refused LCS+L (GroupNorm) exports: ONNX Runtime's graph optimisation moves
    an int32 DequantizeLinear past the Reshape of the GroupNorm that follows and scrambles the
    result. The export scales with Cast and Mul; the other form is refused by the check."""
    content = export_model(tiny_quantized("lcs_l", "GN", False), 8)
    model = build_exported(content)
    out = exported_graph(tmp_path, content)
    validate(out, model, content, CHECK_IMAGES)
    with_dequantize_linear(out)
    assert "DequantizeLinear" in {node.op_type for node in onnx.load(out).graph.node}
    with pytest.raises(DeployError, match="does not reproduce"):
        validate(out, model, content, CHECK_IMAGES)


# -- ONNX and subspace writes: one line, exit status 2, nothing left behind -----------------
def export_argv(path, out, kind):
    """Arguments of an ONNX export or a subspace (`out` named with the suffix of the kind)."""
    if kind == "onnx":
        return ["--checkpoint", path, "--level", "0.5", "--format", "onnx", "--out", str(out), "--check_images", "8"]
    return ["--checkpoint", path, "--subspace", "--out", str(out)]


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in: read-only by its mode, or, for root (whom
    modes do not stop), sysfs, which refuses new files to everyone."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        (directory / "probe").touch()
    except OSError:
        yield directory
    else:
        (directory / "probe").unlink()
        with pytest.raises(OSError):  # else there is no directory to test with
            open("/sys/lcs_probe", "w").close()
        yield "/sys"
    directory.chmod(0o755)


@pytest.mark.parametrize("kind", ["onnx", "subspace"])
def test_write_to_an_unwritable_directory_is_one_line(tmp_path, capsys, unwritable_dir, kind):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    before = sorted(os.listdir(unwritable_dir))
    name = "model.onnx" if kind == "onnx" else "model.lcs.pt"
    err = one_line_error(capsys, export_argv(path, os.path.join(str(unwritable_dir), name), kind))
    assert f"{name}: could not be written (" in err
    assert sorted(os.listdir(unwritable_dir)) == before


@pytest.mark.parametrize("kind", ["onnx", "subspace"])
def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch, kind):
    """ENOSPC halfway through the file (simulated: the writer writes some bytes, then fails as a
    full file system does)."""
    import errno

    import deploy.onnx_export
    from utils import checkpoint

    def fill_then_fail(*args):
        with open(args[-1] if kind == "onnx" else args[0], "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "out" / ("model.onnx" if kind == "onnx" else "model.lcs.pt")
    out.parent.mkdir()
    out.write_bytes(b"previous")
    if kind == "onnx":
        monkeypatch.setattr(deploy.onnx_export, "export_onnx", fill_then_fail)
    else:
        monkeypatch.setattr(checkpoint, "_write_payload", fill_then_fail)
    err = one_line_error(capsys, export_argv(path, out, kind) + ["--force"])
    assert f"{out}: could not be written (No space left on device); the previous version, if any, is intact" in err
    assert os.listdir(out.parent) == [out.name] and out.read_bytes() == b"previous"


@pytest.mark.parametrize("kind", ["onnx", "subspace", "pt"])
def test_a_directory_as_out_is_one_line(tmp_path, capsys, kind):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    target = tmp_path / "target"
    target.mkdir()
    argv = (export_argv(path, target, kind) if kind != "pt"
            else ["--checkpoint", path, "--level", "0.5", "--out", str(target)])
    err = one_line_error(capsys, argv)
    assert f"--out {target}: is a directory; give the name of the file to write" in err
    assert os.listdir(target) == []


def test_onnx_and_pt_exports_get_the_same_file_mode(tmp_path):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    main(["--checkpoint", path, "--level", "0.5", "--out", str(tmp_path / "m.pt")])
    main(export_argv(path, tmp_path / "m.onnx", "onnx"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("m.pt", "m.onnx")}
    assert modes == {"m.pt": 0o666 & ~umask, "m.onnx": 0o666 & ~umask}


@pytest.mark.slow
def test_a_killed_onnx_export_leaves_a_temporary_the_next_write_removes(tmp_path):
    """SIGKILL while the ONNX file is being checked (a temporary beside --out): the temporary's
    name is the one utils.atomic removes, and the next export to that file removes it."""
    import signal
    import time

    from utils.atomic import TEMPORARY

    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = export_argv(path, out_dir / "model.onnx", "onnx")
    argv[-1] = "10000"  # a long check: time to see the temporary
    process = subprocess.Popen([sys.executable, "-m", "deploy.export", *argv], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.monotonic() + 600, []
    while not seen and process.poll() is None and time.monotonic() < deadline:
        seen = [name for name in os.listdir(out_dir) if TEMPORARY.match(name)]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert seen and TEMPORARY.match(seen[0])["name"] == "model.onnx", os.listdir(out_dir)
    assert not (out_dir / "model.onnx").exists()
    main(export_argv(path, out_dir / "model.onnx", "onnx"))
    assert os.listdir(out_dir) == ["model.onnx"]


def test_benchmark_check_errors_name_the_checkpoint_and_level(tmp_path, monkeypatch):
    """benchmarks/deploy.py exports into a temporary directory: a refused check names the
    checkpoint and the level, not that directory's file."""
    import deploy.onnx_export
    from deploy.measure import onnx_runners

    path, payload, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    content = export_model(ckpt.load(path), 0.5)
    real_compare = deploy.onnx_export.compare

    def far_off(*args, **kwargs):
        return dict(real_compare(*args, **kwargs), max_difference=1.0)
    monkeypatch.setattr(deploy.onnx_export, "compare", far_off)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(DeployError) as error:
        onnx_runners([("0.5", None, 0, content)], str(scratch), [1], path)
    assert str(error.value).startswith(f"{path} (level 0.5): ONNX Runtime does not reproduce the model")
    assert str(scratch) not in str(error.value) and os.listdir(scratch) == []

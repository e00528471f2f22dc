"""ONNX export of a compressed model at one level, and its check with ONNX Runtime.

    python -m deploy.export --checkpoint RUN/model_final.pt --level 8 --format onnx --out model.onnx

The network the export rebuilds is traced by torch.onnx and run by ONNX Runtime against the
torch model. A format whose network is more than its float convs (the quantized `int_codes`:
integer convolutions, checked conv by conv) names the module of its ONNX form
(deploy/formats/base.py, OnnxForm; deploy/formats/int_codes_onnx.py), loaded on first use:

* structured (and LEC): the narrower dense network.
* unstructured: the dense network with the pruned weights set to zero (ONNX has no sparse
  weight storage, so the file is as large as the uncompressed one; the format's note says so).
* quantized: integer convolutions (deploy/formats/int_codes_onnx.py).

onnx and onnxruntime are imported here only, when a function needs them
(requirements-deploy.txt); training never imports this module.
"""

import importlib
import json
import os
import warnings

import torch

from utils.atomic import atomic_write, remove_stale_temporaries, temporary_path
from utils.errors import OutputError, UserError
from deploy.compressed import build_exported, format_of

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Model metadata (metadata_props, values as JSON) an application reads with ONNX Runtime's
# session.get_modelmeta().custom_metadata_map: the input normalisation and the class names.
METADATA = ("preprocessing", "class_names")
OPTIMIZED = ".optimized"  # suffix of the optimised graph ONNX Runtime writes while checking


class DeployError(UserError):
    """onnx / onnxruntime missing, or an export that does not reproduce the model."""


def require_onnx():
    """(onnx, onnxruntime), or a one-line error naming the requirements file."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise DeployError(f"ONNX export needs onnx and onnxruntime ({error.name} is missing): "
                          f"pip install -r requirements-deploy.txt") from None
    return onnx, onnxruntime


# -- the format's ONNX form --------------------------------------------------------------
def onnx_form(content):
    """The module of the ONNX form of the export's format (its hooks: prepare, traceable,
    rewrite, judge, describe, reports_kernels), or None for the float network as traced."""
    name = format_of(content).onnx.module
    return importlib.import_module(name) if name else None


def reports_kernels(content):
    """Whether the export's convs are listed by the kernel ONNX Runtime runs them with."""
    form = onnx_form(content)
    return bool(form and form.reports_kernels(content))


# -- export ------------------------------------------------------------------------------
def export_onnx(model, content, path, exact=False):
    """Write the exported network (built from `content`) as an ONNX file at `path`; `exact`: in
    the form's exact rewrite (exact_rewrite, where the form has one) instead of its fast one."""
    onnx, _ = require_onnx()
    form = onnx_form(content)
    module = form.traceable(model, content) if form else model
    size = content["input_size"]
    dummy = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # InstanceNorm normalises with each image's own statistics in eval mode too, so the
        # exporter's "set to train=True" notice describes the right graph: nothing to act on.
        warnings.filterwarnings("ignore", message=r"ONNX export mode is set to TrainingMode\.EVAL, but operator "
                                                  r"'instance_norm'", category=UserWarning)
        torch.onnx.export(module, (dummy,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    graph = onnx.load(path)
    if form:
        (form.exact_rewrite if exact else form.rewrite)(graph, content)
    for key in METADATA:
        if content.get(key) is not None:
            graph.metadata_props.add(key=key, value=json.dumps(content[key]))
    onnx.save(graph, path)
    return path


# -- ONNX Runtime ------------------------------------------------------------------------
def session(path, threads=1, optimized_path=None):
    """A CPU ONNX Runtime session with `threads` intra-op threads (full graph optimisation;
    `optimized_path` receives the optimised graph, to inspect which kernels it runs)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # the warning about hardware-specific saved graphs is expected
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_session(onnx_session, images):
    return torch.from_numpy(onnx_session.run(None, {INPUT_NAME: images.numpy()})[0])


# How ONNX Runtime is judged against torch. Differences of logits are measured in units of the
# spread of the torch logits (the root mean square over images of their standard deviation over
# classes), a scale that does not collapse when a near-chance network's logits are nearly equal
# (its largest logit then measures their common offset, and its predictions noise). Float graphs
# differ from torch only in the order of float operations: every image must agree to
# FLOAT_TOLERANCE.
# (A format's form may judge otherwise: the quantized one, deploy/formats/int_codes_onnx.py.)
FLOAT_TOLERANCE = 1e-3      # float graphs: max over images of max |logit difference|, in spreads


@torch.no_grad()
def compare(onnx_session, model, images, batch_size=256):
    """ONNX Runtime against the torch model on `images`: the largest and the median per-image
    max |logit difference| in units of the spread of the torch logits, that spread, and the
    fraction of identical predictions."""
    differences, expected_all, agreements = [], [], []
    for batch in images.split(batch_size):
        expected, actual = model(batch), run_session(onnx_session, batch)
        differences.append((expected - actual).abs().amax(1))
        expected_all.append(expected)
        agreements.append((expected.argmax(1) == actual.argmax(1)).float())
    expected = torch.cat(expected_all)
    spread = max(float(expected.std(1).pow(2).mean().sqrt()) if expected.shape[1] > 1 else 0.0, 1e-12)
    per_image = torch.cat(differences) / spread
    return {"max_difference": float(per_image.max()), "typical_difference": float(per_image.median()),
            "spread": spread, "agreement": float(torch.cat(agreements).mean()), "images": len(images)}


def validate(path, model, content, images, name=None):
    """Check an ONNX file against the torch model at its level (see the tolerances above, and the
    format's ONNX form): the comparison with the model, with what the form adds (the quantized
    form: "layers", its layer by layer check), or a DeployError naming `name` (default: the path)."""
    result = compare(session(path), model, images)
    form = onnx_form(content)
    failed = form.judge(path, model, content, images, result) if form else None
    if failed is None:
        failed = not result["max_difference"] <= FLOAT_TOLERANCE  # also refuses NaN
    if failed:
        raise DeployError(f"{name or path}: ONNX Runtime does not reproduce the model "
                          f"({describe_agreement(result, content)})")
    return result


def export_checked(model, content, path, images, name):
    """Export to `path` and validate: (the comparison, None), or where the form has an exact
    rewrite and the check refuses the fast form, the exact form written and validated instead:
    (its comparison, why the fast form was refused)."""
    export_onnx(model, content, path)
    form = onnx_form(content)
    if not (form and hasattr(form, "exact_rewrite")):
        return validate(path, model, content, images, name=name), None
    try:
        return validate(path, model, content, images, name=name), None
    except DeployError as error:
        refused = str(error).split(": ONNX Runtime does not reproduce the model ", 1)[-1].strip("()")
    export_onnx(model, content, path, exact=True)
    return validate(path, model, content, images, name=name), refused


def describe_agreement(result, content):
    """The comparison in words: the figures judged, their tolerances, identical predictions."""
    model = (f"the torch model: median image {result['typical_difference']:.2g}, largest {result['max_difference']:.2g}"
             f" spreads of its logits ({result['spread']:.3g})")
    form = onnx_form(content)
    text = (form.describe(result, model) if form else None) or \
        f"logits against {model}, tolerance {FLOAT_TOLERANCE:g} for the largest"
    return f"{text}; {100 * result['agreement']:.1f} % identical predictions on {result['images']} images"


def conv_kernels(path, optimized_path):
    """{conv module name: the kernel ONNX Runtime runs it with} from the optimised graph:
    "integer" (QLinearConv, ConvInteger), "qdq-float" (a float conv of dequantized int8 weights:
    a quantized conv without a recorded input range), or "float"."""
    onnx, _ = require_onnx()
    session(path, optimized_path=optimized_path)
    graph = onnx.load(optimized_path).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    kernels = {}
    for node in graph.node:
        if node.op_type in ("QLinearConv", "ConvInteger"):
            kernels[module_name(node.name)] = "integer"
        elif node.op_type in ("Conv", "FusedConv"):
            fed = [producers.get(node.input[0]), producers.get(node.input[1])]
            kernels[module_name(node.name)] = "qdq-float" if fed[1] == "DequantizeLinear" else "float"
    return kernels



def module_name(node_name):
    """The module path of a conv node ("/layer1/layer1.0/conv1/Conv_token_6" -> "layer1.0.conv1";
    "/features/features.1/conv/conv.0/conv.0.0/Conv" -> "features.1.conv.0.0"): the exporter names
    scopes by attribute, and the items of a Sequential by the Sequential's scope and their index."""
    path, previous = [], None
    for part in node_name.strip("/").split("/")[:-1]:
        if previous is not None and part.startswith(previous + "."):
            path.append(part[len(previous) + 1:])
        elif "." in part:
            path = part.split(".")
        else:
            path.append(part)
        previous = part
    return ".".join(path)


# -- command line (python -m deploy.export --format onnx) ----------------------------------
def check_images(content, data_dir, count, seed=0):
    """Images to check an export on: `count` test images of CIFAR-10 under `data_dir`
    (normalised as in evaluation), else seeded random images of the model's input size."""
    if data_dir:
        from data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar10

        images, _ = load_cifar10(data_dir, train=False, subset=count, seed=seed)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return (images - mean) / std, f"{len(images)} CIFAR-10 test images from {data_dir}"
    size = content["input_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator), f"{count} random images"


def write_checked(content, path, data_dir=None, count=256, name=None):
    """Export `content` (a per-level export) to ONNX at `path`, check it with ONNX Runtime, and
    return (lines describing it, {conv module name: its kernel} as conv_kernels gives them, or {}
    where the format's form does not report kernels). The file is written through utils.atomic (a temporary file
    renamed once the check has passed): a failed write is an OutputError of one line, a failed
    check keeps its own DeployError (naming `name`, default the path), and neither leaves
    anything at `path` or beside it."""
    require_onnx()
    model = build_exported(content, path)
    form = onnx_form(content)
    if form:
        model = form.prepare(model, content)
    images, source = check_images(content, data_dir, count)
    checked = {}

    def write(temporary):
        checked["result"], checked["refused"] = export_checked(model, content, temporary, images, name or path)
        if reports_kernels(content):
            # ONNX Runtime writes its optimised graph to a file: a temporary of the same pattern.
            optimized = temporary_path(path + OPTIMIZED)
            try:
                checked["kernels"] = conv_kernels(temporary, optimized)
            finally:
                if os.path.exists(optimized):
                    os.remove(optimized)

    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), name=os.path.basename(path) + OPTIMIZED)
    atomic_write(path, write, failure=OutputError)
    result, kernels = checked["result"], checked.get("kernels", {})
    lines = [f"ONNX Runtime on {source}: {describe_agreement(result, content)}"]
    if checked["refused"]:
        lines.append(f"written in the exact form: the fast one was refused ({checked['refused']})")
    if kernels:
        counts = {kind: sum(1 for value in kernels.values() if value == kind) for kind in ("integer", "qdq-float")}
        lines.append(f"quantized convs: {counts['integer']} run as integer convolutions (QLinearConv or "
                     f"ConvInteger), {counts['qdq-float']} as float convolutions of dequantized int8 weights (no "
                     f"recorded input range)")
    note = format_of(content).onnx.note
    if note:
        lines.append(note)
    return lines, kernels

"""What an export format is: how the compressed model of one level is written, read back and
described (deploy/formats/<name>.py each make one; deploy/formats/__init__.py registers them)."""

from dataclasses import dataclass
from typing import Callable, Optional

from models.factory import dense_factory


def no_weights(content: dict) -> dict:
    return {}


def no_lines(content: dict) -> list:
    return []


def dense_layers(content: dict):
    """The layer factory of a network rebuilt with standard dense layers."""
    return dense_factory(content["norm"], content["num_groups"])


@dataclass(frozen=True)
class OnnxForm:
    """How a format's export is written as ONNX and judged (deploy/onnx_export.py). By default
    the network the export rebuilds, traced as it is, every image's logits as the torch model's
    to FLOAT_TOLERANCE. `module` names a module, loaded on the first ONNX export or check (so
    that training never imports graph code), with the hooks
      prepare(model, content) -> the network to trace and compare with;
      traceable(model, content) -> the module torch.onnx traces;
      rewrite(graph, content): the traced onnx.ModelProto, changed in place;
      judge(path, model, content, images, result) -> whether the graph fails, or None for the
        float rule (it may add its findings to `result`);
      describe(result, model_text) -> the judgement in words, or None;
      reports_kernels(content) -> whether the kernels ONNX Runtime runs the convs with are listed;
      exact_rewrite(graph, content), optional: a slower rewrite that the export writes where the
        check refuses the graph of `rewrite` (the quantized form: ConvInteger for QLinearConv).
    `note`: a line the export adds (what ONNX cannot store of the format)."""

    module: str = ""
    note: str = ""


@dataclass(frozen=True)
class ExportFormat:
    """One way of storing the compressed model of one level; Method.export_format names it.

    * export(model, method, num_classes, level, round_to[, float_weights]) -> (network to rebuild,
      its state, header entries): `model` is the training-time model set to `level` (given in
      the method's unit) and `network` the module the export rebuilds;
    * decode(content) -> {state key: tensor}: the weights the format stores apart from the
      packed dense tensors (bitmasks, integer codes), decoded once here;
    * factory(content) -> the layer factory that rebuilds the exported network;
    * describe(content) -> lines saying what the file stores (python -m deploy.export prints them);
    * subspace_codes(model, method, num_classes, state) -> {level: stored entries} that a subspace
      keeps instead of float weights (and removes from `state`), or None; subspace_entries(stored)
      -> the header entries of a level's export made from them;
    * onnx: its ONNX form (OnnxForm above);
    * check_tolerance: how far the rebuilt network's logits may be from the training-time model's
      at the level (deploy/verify.py), relative to the largest |logit| (at least 1). The formats
      of this project store the model exactly, so only float rounding is allowed.
    """

    name: str
    export: Callable[..., tuple]
    decode: Callable[[dict], dict] = no_weights
    factory: Callable[[dict], object] = dense_layers
    describe: Callable[[dict], list] = no_lines
    takes_round_to: bool = False
    float_weights: bool = False  # export(..., float_weights=True) stores the same model uncompressed
    subspace_codes: Optional[Callable[..., Optional[dict]]] = None
    subspace_entries: Optional[Callable[[dict], dict]] = None
    onnx: OnnxForm = OnnxForm()
    check_tolerance: float = 1e-4

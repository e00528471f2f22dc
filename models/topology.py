"""Topology of an unconverted network (plain torch.nn modules), read from one real forward pass.

`analyze(model, example_input)` runs the model once (eval mode, no gradients) and records, in
execution order, every nn.Conv2d / nn.Linear / norm module call as one node and every torch
function or tensor method called outside those modules as another, with the tensors each reads
and writes. torch.fx is not used: it cannot trace data-dependent Python (`if x.mean() > 0:`);
a real pass simply takes the branch the example input takes. From that record it answers what
converting the network to compressing layers needs: the convs/linears in order, the stem, the
classifier, the conv -> BatchNorm pairs that the quantized setting folds, the norms, what stays
dense, and whether width slimming (structured sparsity) is sound for it.

Width slimming: at width factor w every conv/linear except the classifier keeps its leading
max(1, round(C_out * w)) output channels; every conv, linear and norm takes the leading channels
of the tensor it receives (the stem keeps its 3 input channels, the classifier all its outputs);
a depthwise conv (groups == in_channels == out_channels) slims its groups with its channels.
Two tensors with the same full channel count therefore keep the same leading channels at every
width. Slimming is sound when every op that meets the channel dim of a slimmed tensor sees the
same leading channels at every width. Accepted:

- elementwise ops (relu, hardswish, sigmoid, dropout, clone, add, mul, ... and their in-place
  forms) whose slimmed operands have the same full channel count in the same dim, the other
  operands being scalars or of size 1 in that dim: residual adds, squeeze-and-excitation
  (global pool -> 1x1 convs -> sigmoid -> multiply), torchvision's stochastic depth (a random
  (N, 1, 1, 1) tensor times x); softmax along any dim;
- pooling and interpolation over the spatial dims of an NCHW tensor; reductions (a mean over the
  spatial dims keeps the channels; one over the channels leaves a tensor whose shape no longer
  depends on the width);
- reshapes that keep the channel dim whole, and those that flatten it with the dims after it
  (`flatten(x, 1)`, `view(N, -1)`): features stay channel-major, so a Linear reading them takes
  the leading channels' features (torchvision's VGG: AdaptiveAvgPool2d((7, 7)) + flatten +
  Linear); permutations, splits and indexing of other dims;
- BatchNorm2d, InstanceNorm2d, GroupNorm with 1 group or one group per channel over dim 1 of an
  NCHW tensor, LayerNorm over the features of an (N, C) tensor.

Refused, in ONE line "<module> (<op>): <why>; structured sparsity cannot slim it; unstructured
and quantized accept this model", for the first such op in execution order:

- concatenation along channels (DenseNet, Inception, ShuffleNet): the leading channels of the
  slimmed result are the first input's only, not the leading channels of each input;
- split / chunk / narrow / index along channels (ShuffleNet's split): a fixed channel boundary
  falls elsewhere in a slimmed tensor;
- reshapes, transposes and permutes that move the channel dim (channel shuffle, channels-last
  layout): slimming slices dim 1 of NCHW tensors; once channels sit elsewhere the leading
  entries of dim 1 are not the leading channels;
- grouped convs with 1 < groups < channels (ResNeXt, RegNet): the leading channels of a slimmed
  input do not fill whole groups, and the groups cannot follow the width;
- GroupNorm with 1 < groups < channels: slimmed widths are not multiples of its groups;
- matrix products between activations (attention): they sum over channels of one operand
  against positions or channels of another, which no leading-channel rule keeps aligned;
- per-channel parameters or constants outside conv/linear/norm modules used in arithmetic
  (ConvNeXt's layer scale), and functional convs/linears on loose parameters: no swapped layer
  slices them, so they keep the full channel count;
- norms over channels in channels-last layout (LayerNorm over the last dim of a 4-D tensor;
  torchvision's LayerNorm2d, a LayerNorm whose own forward permutes): the swapped norm slices
  dim 1, which there is not the channel dim;
- any op this module does not know: it refuses what it cannot prove rather than assume an
  unknown op is elementwise.

Ops whose inputs do not depend on the width (on the network input before the stem, on
parameters and constants alone, or after a reduction over channels) are always accepted.
`dense` lists, "<where>: <what>", what no swapped layer can compress: functional convs, linears
and matrix products on a weight that is a loose nn.Parameter, and loose parameters used in
arithmetic with activations.
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace
from math import prod
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

LAYER_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
REFUSAL_TAIL = "structured sparsity cannot slim it; unstructured and quantized accept this model"


@dataclass(frozen=True)
class Topology:
    """What converting a network needs to know (see the module docstring)."""

    order: tuple[str, ...]          # the nn.Conv2d / nn.Linear modules, in execution order
    stem: str                       # the first conv/linear executed
    classifier: str                 # the conv/linear whose output is the network output
    bn_after: dict[str, str]        # conv -> the BatchNorm2d that is the only reader of its output
    norms: tuple[str, ...]          # norm modules in execution order
    dense: tuple[str, ...]          # "<where>: <what>" for each thing no swapped layer compresses
    structured_refusal: Optional[str]  # None when width slimming is sound, else one line
    channels: Optional["ChannelGraph"] = None   # where slimmed channels flow (None when refused)


@dataclass(frozen=True)
class ChannelStep:
    """One op or module call that reads or writes slimmed tensors (a tensor is a Ref: (node,
    output)), for the slimming of arbitrary channel subsets (LEC on converted networks,
    models/slimming.py). Kinds:

    * "layer": a conv or linear that is not depthwise: `ins` are the channels it reads (its input
      columns), `out` the channels it writes (its output rows; None for the classifier);
    * "depthwise": a depthwise conv, channel c in -> channel c out;
    * "norm": a per-channel norm (BatchNorm2d, InstanceNorm2d, GroupNorm: every one becomes the
      method's norm in the conversion, LEC's is BatchNorm);
    * "op": a channel-wise op; `zero` says when an output channel is zero for every input:
      "same" (f(0) = 0 and its input's channel is), "all" (every slimmed operand's is), "any" (one
      operand's is: a product), "first" (the first operand's is: a quotient), "none" (unknown);
    * "mix": an op that combines channels (a reduction or softmax over them, a LayerNorm over
      features): the channels it reads cannot be removed without changing what it computes.
    """

    kind: str
    where: str
    ins: tuple
    out: Any = None
    zero: str = "none"


@dataclass(frozen=True)
class ChannelGraph:
    """The ChannelSteps in execution order and, per slimmed tensor, (channels, features per
    channel): a flattened tensor holds `features` consecutive entries per channel."""

    steps: tuple
    sizes: dict


# -- the trace ---------------------------------------------------------------------------------
# A reference to a tensor a node reads: (node index, output index) when a node produced it (node 0
# is the network input), the parameter's name for a model parameter, None for anything else
# (buffers, tensors made from nothing, e.g. torch.empty).
Ref = Any


@dataclass
class _Node:
    op: str                    # normalised op name ("mul", "cat"), or the module's class name
    where: str                 # the innermost module running (for a module node: itself)
    module: Optional[nn.Module] = None   # set for conv/linear/norm module calls
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)      # one Ref per tensor read, in argument order
    in_shapes: list = field(default_factory=list)
    out_shapes: list = field(default_factory=list)
    act: bool = False          # depends on the network input


def _tensors(value) -> list:
    """The tensors inside nested tuples, lists and dicts, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


_DUNDER_BINARY = {"add", "sub", "mul", "truediv", "floordiv", "div", "pow", "matmul", "mod", "and", "or"}


def _op_name(func) -> str:
    """torch.add, Tensor.add_, Tensor.__radd__ -> "add"; the x.T property -> "T"."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        name = func.__self__.__name__
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("i", "r") and name[1:] in _DUNDER_BINARY:
            name = name[1:]
        return "div" if name == "truediv" else name
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class _Recorder(TorchFunctionMode):
    """Records the forward pass as nodes. Module hooks keep the stack of running modules; inside
    a conv/linear/norm module nothing is recorded (the module is one node)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        super().__init__()
        self.root_name = type(model).__name__
        self.params = {id(p): name for name, p in model.named_parameters()}
        self.nodes = [_Node(op="input", where=self.root_name, out_shapes=[tuple(example_input.shape)], act=True)]
        self.producer = {id(example_input): (0, 0)}
        self.alive = [example_input]   # ids are only unique among live tensors: keep each one seen
        self.stack = []
        self.leaf_depth = 0
        self.pending = []              # the input (a list of 0 or 1 tensor) of each running leaf

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)   # the mode is off inside: the ops func calls are not seen
        if self.leaf_depth == 0:
            self._record_op(func, args, kwargs, out)
        return out

    def ref(self, tensor) -> Ref:
        if id(tensor) in self.producer:
            return self.producer[id(tensor)]
        return self.params.get(id(tensor))

    def _add(self, node: _Node, inputs: list, outputs: list) -> None:
        node.inputs = [self.ref(t) for t in inputs]
        node.in_shapes = [tuple(t.shape) for t in inputs]
        node.out_shapes = [tuple(t.shape) for t in outputs]
        node.act = node.act or any(isinstance(r, tuple) and self.nodes[r[0]].act for r in node.inputs)
        index = len(self.nodes)
        self.nodes.append(node)
        for k, tensor in enumerate(outputs):   # an in-place op's output is its input: it moves on
            self.producer[id(tensor)] = (index, k)
        self.alive += inputs + outputs

    def _record_op(self, func, args, kwargs, out) -> None:
        op = _op_name(func)
        outputs = [args[0]] if op == "setitem" else _tensors(out)
        if not outputs:
            return   # x.shape, bool(x), x.item(): nothing flows on
        where = self.stack[-1] if self.stack else self.root_name
        self._add(_Node(op=op, where=where, func=func, args=args, kwargs=kwargs),
                  _tensors((args, kwargs)), outputs)

    def pre_hook(self, name: str, leaf: bool):
        def hook(module, args, kwargs):
            self.stack.append(name)
            if leaf:
                if self.leaf_depth == 0:
                    self.pending.append(_tensors((args, kwargs))[:1])
                self.leaf_depth += 1
        return hook

    def post_hook(self, name: str, leaf: bool):
        def hook(module, args, output):
            self.stack.pop()
            if leaf:
                self.leaf_depth -= 1
                if self.leaf_depth == 0:
                    node = _Node(op=type(module).__name__, where=name, module=module)
                    self._add(node, self.pending.pop(), _tensors(output)[:1])
        return hook


def _trace(model: nn.Module, example_input: torch.Tensor) -> tuple[list, Ref, _Recorder]:
    recorder = _Recorder(model, example_input)
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            leaf = isinstance(module, LAYER_TYPES + NORM_TYPES)
            shown = name or recorder.root_name
            handles.append(module.register_forward_pre_hook(recorder.pre_hook(shown, leaf), with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook(shown, leaf), always_call=True))
        model.eval()
        with torch.no_grad(), recorder:
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    outputs = _tensors(output)
    if not outputs:
        raise ValueError(f"{recorder.root_name}: the forward pass returned no tensor")
    return recorder.nodes, recorder.ref(outputs[0]), recorder


# -- what each op does to the channel dim --------------------------------------------------------
class _Refuse(Exception):
    """The op cannot be slimmed soundly; the message says why."""


@dataclass(frozen=True)
class _Info:
    """What the width factor does to one tensor."""

    shape: tuple
    act: bool = False          # depends on the network input
    slim: bool = False         # its dim `cdim` shrinks with the width factor (leading channels)
    cdim: Optional[int] = None
    flat: int = 1              # consecutive features per channel in dim cdim (after a flatten)
    params: frozenset = frozenset()   # loose parameters it is computed from (act is False)

    def channels(self) -> str:
        count = self.shape[self.cdim] // self.flat
        per = f" x {self.flat} features" if self.flat > 1 else ""
        return f"{count} channels{per} in dim {self.cdim}"


ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "pow", "neg", "abs", "exp", "log",
    "sqrt", "rsqrt", "square", "reciprocal", "sign", "clamp", "clip", "clamp_min", "clamp_max", "maximum",
    "minimum", "where", "gt", "lt", "ge", "le", "eq", "ne", "relu", "relu6", "hardtanh", "hardswish",
    "hardsigmoid", "silu", "sigmoid", "tanh", "gelu", "elu", "selu", "celu", "leaky_relu", "mish", "softplus",
    "logsigmoid", "softsign", "threshold", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "softmax", "log_softmax", "normalize",
}
# Only the first tensor shapes the output (the others give a dtype or a device).
FIRST_ONLY = {
    "clone", "contiguous", "detach", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu",
    "cuda", "data", "requires_grad", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like",
}
REDUCE = {
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm", "argmax",
    "argmin", "all", "any", "median", "nansum", "nanmean",
}
POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "lp_pool1d",
    "lp_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "adaptive_max_pool2d_with_indices", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT"}
CAT = {"cat", "concat", "concatenate", "stack"}
# op -> position of its dim argument (keyword "dim", default 0)
SPLIT = {"split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2, "unsafe_split": 2,
         "unsafe_chunk": 2, "narrow": 1, "select": 1, "index_select": 1, "unbind": 1}
EXPAND = {"expand", "expand_as", "broadcast_to", "repeat"}
# Convs, linears and products of a weight with an activation: dense when the weight is loose.
FUNCTIONAL = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
    "bilinear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "scaled_dot_product_attention",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "embedding", "prelu",
}


# Ops whose output channel is zero wherever their (one slimmed) input's is: f(0) = 0, pooling,
# sums and extrema over positions, and the ops that only move entries.
ZERO_KEEPING = ({
    "relu", "relu6", "hardtanh", "hardswish", "silu", "gelu", "elu", "selu", "celu", "leaky_relu", "mish",
    "tanh", "neg", "abs", "square", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "detach", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "cpu", "cuda", "mean", "sum", "amax", "amin", "max", "min", "nansum", "nanmean",
    "getitem",
} | POOL | RESHAPE | PERMUTE | EXPAND | set(SPLIT)) - {"lp_pool1d", "lp_pool2d"}
CHANNEL_MIXING = {"softmax", "log_softmax", "normalize"}   # elementwise in shape, but across channels


def _arg(node: _Node, name: str, position: int, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def _same(x: _Info, shape: tuple, **changes) -> _Info:
    return replace(x, shape=shape, **changes)


def _elementwise(node: _Node, ins: list) -> list:
    """Broadcasting: slimmed operands must meet channel dim to channel dim with equal full
    counts; any other operand must be of size 1 (or absent) in that dim."""
    out = node.out_shapes[0]
    first = next(i for i in ins if i.slim)
    cdim = first.cdim + len(out) - len(first.shape)
    for i in ins:
        dim = cdim - (len(out) - len(i.shape))
        if i.slim:
            if dim != i.cdim or (i.shape[i.cdim], i.flat) != (first.shape[first.cdim], first.flat):
                raise _Refuse(f"combines {first.channels()} with {i.channels()}: "
                              "their leading channels differ at some widths")
        elif 0 <= dim < len(i.shape) and i.shape[dim] != 1:
            raise _Refuse(_fixed_operand(i, i.shape[dim]))
    return [_same(first, out, cdim=cdim)]


def _fixed_operand(i: _Info, size: int) -> str:
    if i.params:
        return (f"uses the per-channel parameter {', '.join(sorted(i.params))} ({size} entries along the channel "
                "dim) outside a conv/linear/norm module: no swapped layer slices it")
    if i.act:
        return f"combines a slimmed tensor with one of {size} channels that does not shrink with the width"
    return f"uses a constant of {size} entries along the channel dim, which slimming does not slice"


def _first_only(node: _Node, ins: list) -> list:
    if not ins[0].slim:   # e.g. c.type_as(x): x gives only a dtype
        return [_Info(shape=s, act=node.act) for s in node.out_shapes]
    return [_same(ins[0], s) for s in node.out_shapes]


def _reduce(node: _Node, ins: list) -> list:
    if len(ins) > 1:   # torch.max(a, b) is elementwise
        return _elementwise(node, ins)
    x = ins[0]
    ndim = len(x.shape)
    dims = _arg(node, "dim", 2 if node.op == "norm" else 1)
    if dims is None or not isinstance(dims, (int, tuple, list, torch.Size)):
        dims = range(ndim)
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)} if ndim else set()
    if x.cdim in dims:   # the channels are gone: the shape no longer depends on the width
        return [_Info(shape=s, act=x.act) for s in node.out_shapes]
    keep = len(node.out_shapes[0]) == ndim
    cdim = x.cdim if keep else x.cdim - sum(d < x.cdim for d in dims)
    return [_same(x, s, cdim=cdim) for s in node.out_shapes]


def _pool(node: _Node, ins: list) -> list:
    x = ins[0]
    if x.cdim != 1 or x.flat != 1 or len(x.shape) < 3:
        raise _Refuse(f"pools the trailing dims of {x.shape}, but the channels are in dim {x.cdim}")
    return [_same(x, s) for s in node.out_shapes]


def _reshape(node: _Node, ins: list) -> list:
    """Sound when the dims before the channels stay as they are and the channel dim stays whole,
    alone or flattened with every dim after it (channel-major features)."""
    x, out = ins[0], node.out_shapes[0]
    outer, size, inner = prod(x.shape[:x.cdim]), x.shape[x.cdim], prod(x.shape[x.cdim + 1:])
    for k in range(len(out)):
        if prod(out[:k]) != outer:
            continue
        if out[k] == size and prod(out[k + 1:]) == inner:
            return [_same(x, out, cdim=k)]
        if k == len(out) - 1 and out[k] == size * inner:
            return [_same(x, out, cdim=k, flat=x.flat * inner)]
    raise _Refuse(f"reshapes {tuple(x.shape)} (channels in dim {x.cdim}) to {tuple(out)}, "
                  "moving channels across dims (channel groups or shuffle)")


def _permute(node: _Node, ins: list) -> list:
    x = ins[0]
    # Apply the same op to a tensor of distinct sizes 2, 3, ...: its output shape is the permutation.
    probe = torch.empty([2 + d for d in range(len(x.shape))])
    moved = [s - 2 for s in node.func(probe, *node.args[1:], **node.kwargs).shape]
    if moved.index(x.cdim) != x.cdim:
        raise _Refuse(f"moves the channel dim from {x.cdim} to {moved.index(x.cdim)} "
                      "(channel shuffle or channels-last layout); slimming slices dim 1")
    return [_same(x, node.out_shapes[0])]


def _cat(node: _Node, ins: list) -> list:
    first = next(i for i in ins if i.slim)
    if len(ins) == 1:
        return [_same(first, node.out_shapes[0])]
    stack = node.op == "stack"
    dim = _arg(node, "dim", 1, 0) % (len(first.shape) + stack)
    if not stack and dim == first.cdim:
        raise _Refuse(f"concatenates {len(ins)} tensors along the channel dim: the leading channels of the "
                      "slimmed result are not the leading channels of each input")
    for i in ins:
        if not i.slim or (i.cdim, i.shape[i.cdim], i.flat) != (first.cdim, first.shape[first.cdim], first.flat):
            raise _Refuse(f"joins tensors whose channels do not all shrink alike ({first.channels()} and "
                          f"{i.channels() if i.slim else 'fixed channels'})")
    cdim = first.cdim + (stack and dim <= first.cdim)
    return [_same(first, node.out_shapes[0], cdim=cdim)]


def _split(node: _Node, ins: list) -> list:
    x = ins[0]
    if not x.slim:
        raise _Refuse(f"{node.op} with slimmed indices")
    dim = _arg(node, "dim", SPLIT[node.op], 0) % len(x.shape)
    if dim == x.cdim:
        raise _Refuse(f"{node.op} along the channel dim: a fixed channel boundary falls elsewhere "
                      "in a slimmed tensor")
    cdim = x.cdim - (node.op in ("select", "unbind") and dim < x.cdim)
    return [_same(x, s, cdim=cdim) for s in node.out_shapes]


def _getitem(node: _Node, ins: list) -> list:
    x, index = ins[0], node.args[1]
    if not x.slim:
        raise _Refuse("indexes with a slimmed tensor")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(it is Ellipsis for it in items):
        at = next(k for k, it in enumerate(items) if it is Ellipsis)
        taken = sum(it is not None and it is not Ellipsis for it in items)
        items[at:at + 1] = [slice(None)] * (len(x.shape) - taken)
    in_dim, out_dim, cdim = 0, 0, None
    for it in items:
        if it is None:
            out_dim += 1
            continue
        whole = isinstance(it, slice) and it.start is None and it.stop is None and it.step in (None, 1)
        if in_dim == x.cdim:
            if not whole:
                raise _Refuse(f"indexes the channel dim with {it!r}: a fixed channel position falls elsewhere "
                              "in a slimmed tensor")
            cdim = out_dim
        elif not isinstance(it, (slice, int)):
            raise _Refuse("advanced indexing of a slimmed tensor")
        in_dim += 1
        out_dim += isinstance(it, slice)
    if cdim is None:
        cdim = out_dim + x.cdim - in_dim
    return [_same(x, node.out_shapes[0], cdim=cdim)]


def _expand(node: _Node, ins: list) -> list:
    x, out = ins[0], node.out_shapes[0]
    cdim = x.cdim + len(out) - len(x.shape)
    if not x.slim or out[cdim] != x.shape[x.cdim]:
        raise _Refuse(f"{node.op} changes the channel count of a slimmed tensor")
    return [_same(x, out, cdim=cdim)]


def _functional(node: _Node, ins: list) -> list:
    params = sorted(set().union(*(i.params for i in ins)))
    if params:
        raise _Refuse(f"a functional {node.op} with the loose parameter {', '.join(params)}: no swapped layer "
                      "slices it, so it keeps every channel it was built for")
    raise _Refuse(f"{node.op} between activations (attention or a matrix product) mixes channels "
                  "that slimming cannot keep aligned")


def _setitem(node: _Node, ins: list) -> list:
    raise _Refuse("writes into part of a tensor, which slimming cannot follow")


_HANDLERS = {
    **dict.fromkeys(ELEMENTWISE, _elementwise), **dict.fromkeys(FIRST_ONLY, _first_only),
    **dict.fromkeys(REDUCE, _reduce), **dict.fromkeys(POOL, _pool), **dict.fromkeys(RESHAPE, _reshape),
    **dict.fromkeys(PERMUTE, _permute), **dict.fromkeys(CAT, _cat), **dict.fromkeys(SPLIT, _split),
    **dict.fromkeys(EXPAND, _expand), **dict.fromkeys(FUNCTIONAL, _functional),
    "getitem": _getitem, "setitem": _setitem,
}


def _module_output(node: _Node, x: _Info, classifier: str) -> _Info:
    """The output of a conv/linear/norm module call reading `x`; raises _Refuse."""
    m, out = node.module, node.out_shapes[0]
    if isinstance(m, nn.Conv2d):
        if x.slim and (x.cdim != 1 or x.flat != 1 or len(x.shape) != 4):
            raise _Refuse(f"reads its input channels from dim 1, but they are in dim {x.cdim}")
        if m.groups > 1 and not m.groups == m.in_channels == m.out_channels:
            raise _Refuse(f"a grouped conv ({m.groups} groups of {m.in_channels // m.groups} input channels): "
                          "the leading channels of a slimmed input do not fill whole groups")
        if m.groups > 1 and (not x.slim or node.where == classifier):
            raise _Refuse("a depthwise conv whose input channels do not shrink with its outputs")
        return _Info(shape=out, act=True, slim=node.where != classifier, cdim=1)
    if isinstance(m, nn.Linear):
        if x.slim and x.cdim != len(x.shape) - 1:
            raise _Refuse(f"reads features from the last dim, but the channels are in dim {x.cdim}")
        return _Info(shape=out, act=True, slim=node.where != classifier, cdim=len(out) - 1)
    if x.slim:
        _check_norm(m, x)
    return _same(x, out)


def _check_norm(m: nn.Module, x: _Info) -> None:
    ndim = len(x.shape)
    if isinstance(m, nn.LayerNorm):
        if type(m).forward is not nn.LayerNorm.forward:
            raise _Refuse("a LayerNorm with a forward of its own (as torchvision's LayerNorm2d, which permutes "
                          "to normalise channels in channels-last layout); the swapped norm slices dim 1")
        normalised = range(ndim - len(m.normalized_shape), ndim)
        if x.cdim in normalised and (len(normalised) > 1 or ndim > 2):
            layout = "channels-last layout" if len(normalised) == 1 else "channels and positions together"
            raise _Refuse(f"normalises {layout} (over dims {tuple(normalised)} of a {ndim}-D tensor); "
                          "the swapped norm slices dim 1")
        return
    if x.cdim != 1 or x.flat != 1:
        raise _Refuse(f"normalises dim 1, but the channels are in dim {x.cdim}")
    if isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels:
        raise _Refuse(f"GroupNorm with {m.num_groups} groups of {m.num_channels} channels: "
                      "slimmed widths are not multiples of its groups")


def _propagate(node: _Node, ins: list, classifier: str) -> list:
    """_Info of each output of `node`; raises _Refuse."""
    if node.module is not None:
        return [_module_output(node, ins[0] if ins else _Info(shape=()), classifier)]
    if not any(i.slim for i in ins):   # nothing here follows the width
        params = frozenset() if node.act else frozenset().union(*(i.params for i in ins))
        return [_Info(shape=s, act=node.act, params=params) for s in node.out_shapes]
    handler = _HANDLERS.get(node.op)
    if handler is None:
        raise _Refuse(f"an op this analysis does not know: it cannot prove that {node.op} keeps "
                      "the leading channels")
    return handler(node, ins)


# -- the answers -------------------------------------------------------------------------------------
def _classifier(nodes: list, output: Ref, root_name: str) -> str:
    """Walk back from the output through ops with one activation input (flatten, pooling,
    dropout, elementwise) to the conv/linear that produced it."""
    ref, node = output, None
    while isinstance(ref, tuple):
        node = nodes[ref[0]]
        if node.module is not None:
            if isinstance(node.module, LAYER_TYPES):
                return node.where
            break
        passing = RESHAPE | POOL | REDUCE | ELEMENTWISE | FIRST_ONLY
        reads = [r for r in node.inputs if isinstance(r, tuple) and nodes[r[0]].act]
        if node.op not in passing or len(reads) != 1:
            break
        ref = reads[0]
    came = f"{node.op} in {node.where}" if node else "no recorded op"
    raise ValueError(f"{root_name}: the output does not come from a Conv2d or Linear through flatten, pooling, "
                     f"dropout or elementwise ops (it comes from {came})")


def _bn_after(nodes: list, output: Ref) -> dict:
    readers = defaultdict(list)
    for index, node in enumerate(nodes):
        for ref in node.inputs:
            if isinstance(ref, tuple):
                readers[ref].append(index)
    readers[output].append(None)
    pairs, unfoldable = {}, set()
    for index, node in enumerate(nodes):
        if isinstance(node.module, nn.Conv2d):
            users = readers[(index, 0)]
            only = nodes[users[0]] if len(users) == 1 and users[0] is not None else None
            bn = only.where if only is not None and isinstance(only.module, nn.BatchNorm2d) else None
            if bn is None or pairs.get(node.where, bn) != bn:   # a conv called twice must agree
                unfoldable.add(node.where)
            pairs[node.where] = bn
    return {conv: bn for conv, bn in pairs.items() if conv not in unfoldable}


def _unique(names) -> tuple:
    return tuple(dict.fromkeys(names))


def _shape(value) -> str:
    return "(" + ", ".join(str(s) for s in value) + (",)" if len(value) == 1 else ")")


def _channel_steps(node: _Node, ins: list, outs: list, index: int) -> list:
    """The ChannelSteps of a node (none unless its inputs or outputs are slimmed; one per output
    of a split)."""
    reads = tuple(ref for ref, i in zip(node.inputs, ins) if i.slim)
    writes = [(index, k) for k, o in enumerate(outs) if o.slim]
    if not reads and not writes:
        return []
    out = writes[0] if writes else None
    m = node.module
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        return [ChannelStep("depthwise", node.where, reads, out)]
    if isinstance(m, LAYER_TYPES):
        return [ChannelStep("layer", node.where, reads, out)]
    if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
        return [ChannelStep("norm", node.where, reads, out)]
    if m is not None or out is None or len(writes) > 1 and node.op not in SPLIT:
        return [ChannelStep("mix", node.where, reads, out)]
    x = next(i for i in ins if i.slim)
    if node.op in CHANNEL_MIXING and _arg(node, "dim", 1) % len(x.shape) == x.cdim:
        return [ChannelStep("mix", node.where, reads, out)]
    return [ChannelStep("op", node.where, reads, ref, _zero_rule(node, ins)) for ref in writes]


def _zero_rule(node: _Node, ins: list) -> str:
    slimmed = [i.slim for i in ins]
    numbers = [a for a in list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "alpha"]
               if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if node.op in ("add", "sub", "cat", "concat", "concatenate", "stack"):
        return "all" if all(slimmed) and not any(numbers) else "none"
    if node.op == "mul":
        return "any"
    if node.op in ("div", "true_divide"):
        return "first" if slimmed[0] else "none"
    if node.op in ZERO_KEEPING:
        return "same" if sum(slimmed) == 1 else "all" if all(slimmed) else "none"
    return "none"


def analyze(model: nn.Module, example_input: torch.Tensor) -> Topology:
    """Run `model` once on `example_input` (eval mode, no gradients; its modes are restored) and
    return its topology. Raises ValueError when no conv/linear produces the output."""
    nodes, output, recorder = _trace(model, example_input)
    order = _unique(n.where for n in nodes if isinstance(n.module, LAYER_TYPES))
    if not order:
        raise ValueError(f"{recorder.root_name}: no nn.Conv2d or nn.Linear runs in the forward pass")
    classifier = _classifier(nodes, output, recorder.root_name)
    param_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    infos, dense, refusal, steps = {}, [], None, []
    for index, node in enumerate(nodes):
        if index == 0:
            infos[(0, 0)] = _Info(shape=node.out_shapes[0], act=True)
            continue
        ins = [infos[ref] if isinstance(ref, tuple) else
               _Info(shape=shape, params=frozenset([ref]) if ref else frozenset())
               for ref, shape in zip(node.inputs, node.in_shapes)]
        loose = sorted(set().union(*(i.params for i in ins)))
        if loose and any(i.act for i in ins) and node.module is None:
            verb = "on" if node.op in FUNCTIONAL else "with"
            names = ", ".join(f"{name} {_shape(param_shapes[name])}" for name in loose)
            dense.append(f"{node.where}: {node.op} {verb} loose parameter{'s' * (len(loose) > 1)} {names}")
        try:
            outs = _propagate(node, ins, classifier)
        except _Refuse as why:
            refusal = refusal or f"{node.where} ({node.op}): {why}; {REFUSAL_TAIL}"
            outs = [_Info(shape=s, act=True) for s in node.out_shapes]   # go on for `dense`
        for k, info in enumerate(outs):
            infos[(index, k)] = info
        if refusal is None:
            steps += _channel_steps(node, ins, outs, index)
    channels = None
    if refusal is None:
        sizes = {ref: (i.shape[i.cdim] // i.flat, i.flat) for ref, i in infos.items() if i.slim}
        channels = ChannelGraph(steps=tuple(steps), sizes=sizes)
    return Topology(
        order=order, stem=order[0], classifier=classifier, bn_after=_bn_after(nodes, output),
        norms=_unique(n.where for n in nodes if isinstance(n.module, NORM_TYPES)),
        dense=_unique(dense), structured_refusal=refusal, channels=channels)

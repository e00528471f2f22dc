"""The ONNX form of the `int_codes` format (quantized): integer convolutions, and the check that
judges each of them on its own. deploy/onnx_export.py loads this module when it writes or checks
an export of that format (deploy/formats/base.py, OnnxForm); training never imports it.

Each quantized conv quantizes its input at the recorded range (QuantizeLinear to uint8 codes
0..2^b-1; below 8 bits a Clip of the codes to the b-bit grid), and runs ConvInteger on those
codes and its weight codes (uint8, with their zero points), then scales the int32 sums once
(input scale x weight scale) and adds the folded BN bias in float. That is the fake-quantized
model's arithmetic with an exact integer sum; float operations in another order now and then
put an activation on the other side of a rounding boundary, and the check (judge) judges each
quantized conv on its own for that reason. Every bit width 3..8 runs the same kernels.

The fast form (the default at 8 bits, FAST_FORM_BITS): a conv whose output goes through ReLU
(and max pooling) straight into the next conv's QuantizeLinear (conv -> BN -> ReLU -> conv, with
BN folded) becomes one QLinearConv that writes the next conv's codes (requantized_conv): ONNX
Runtime's fast integer kernel. Its bias is rounded to whole units of the sum, so a few codes
near a rounding boundary move (about 2 in 10,000, counted by the check as requantization ties).
The convs whose float output is needed (a residual sum, a GroupNorm or InstanceNorm, the
classifier) stay ConvInteger. Below 8 bits, and where the check refuses the fast form, the export
writes the exact form (exact_rewrite: ConvInteger everywhere).

The traced graph is a QDQ graph (QuantizeLinear/DequantizeLinear pairs around each conv);
integer_convs rewrites it. An export stored with float weights is the plain float network;
it, and an export whose convs quantize no input (float convs of dequantized int8 weights), are
judged as every float graph is.
"""

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deploy.formats.int_codes import stored_codes
from deploy.onnx_export import INPUT_NAME, module_name, require_onnx
from models.layers import QuantConv2d
from models.quant import affine_params, grid_limits

# uint8 weight codes = int8 codes + this (ONNX Runtime's u8 x u8 ConvInteger is its fast one).
UINT8_SHIFT = 128


def integer(content):
    """Whether the export stores codes (else it holds float weights: the float network)."""
    return bool(content.get("quantized") and content["quantized"]["names"])


# -- the hooks deploy/onnx_export.py calls ----------------------------------------------------
def prepare(model, content):
    """The network to trace and to compare with."""
    return model if integer(content) else without_activation_quantization(model)


# The bit widths written in the fast form. Below 8 bits a requantization tie moves an activation
# by a whole coarse step, and the changes grow through the network: on a short real-data
# cPreResNet20 run (500 CIFAR-10 test images) the fast form gave 97.4 % identical predictions at
# 8 bits but 81.6 % at 5 and 69.4 % at 3 (the exact form: 99.6-100 %), although the bias was
# rounded to a 2^(8-b) times finer unit there.
FAST_FORM_BITS = (8,)


def rewrite(graph, content):
    """The traced QDQ graph (an onnx.ModelProto) with integer convolutions, in place: at 8 bits the
    fast form, QLinearConv wherever a conv's output goes through ReLU into the next conv's codes;
    below, the exact form (FAST_FORM_BITS)."""
    integer_convs(graph, content["num_bits"], fused=content["num_bits"] in FAST_FORM_BITS)


def exact_rewrite(graph, content):
    """The exact form: every quantized conv a ConvInteger with float output (no requantization
    ties); what deploy/onnx_export.py writes where the check refuses the fast form."""
    integer_convs(graph, content["num_bits"], fused=False)


def judge(path, model, content, images, result):
    """Whether the graph at `path` fails (result: deploy.onnx_export.compare's, to which the
    layer by layer check is added as "layers"); None (the float rule: every image within
    FLOAT_TOLERANCE) for a float network, and for one whose convs quantize no input (no range
    recorded yet, as before the activation delay ends): float convs of dequantized int8 weights,
    in which only the order of float operations differs (measured: within 1e-4 spreads, while
    the graph of the neighbouring bit width was within this form's 0.5-spread median tolerance)."""
    if not integer(content) or not (content.get("act_ranges") or {}).get("names"):
        return None
    layers = result["layers"] = check_layers(path, model, content, images)
    return not (not layers["missing"] and layers["worst_code"] == 0 and layers["worst_sum"] <= SUM_TOLERANCE
                and result["typical_difference"] <= MODEL_TOLERANCE)  # also refuses NaN


def describe(result, model_text):
    """The judgement in words (model_text: the logits against the torch model), or None."""
    layers = result.get("layers")
    if layers is None:
        return None
    if layers["missing"]:
        text = (f"{len(layers['missing'])} of {layers['layers']} quantized convs are no integer convolution "
                f"({', '.join(layers['missing'][:3])}{', ...' if len(layers['missing']) > 3 else ''})")
    elif layers["first"] is not None:
        text = (f"quantized convs differ from their integer arithmetic from {layers['first']} on: codes off by up "
                f"to {layers['worst_code']:g}, sums by up to {layers['worst_sum']:.3g} units (tolerance "
                f"{SUM_TOLERANCE:g})")
    else:
        text = (f"{layers['layers']} quantized convs reproduce their integer arithmetic exactly ("
                f"{layers['ties']} of {layers['codes']:,} codes on the other side of a rounding tie"
                + (f", {layers['requantization_ties']} of them moved by the requantization of the "
                   f"{len(layers['fused'])} QLinearConv" if layers["fused"] else "") + ")")
    return f"{text}; logits against {model_text}, tolerance {MODEL_TOLERANCE:g} for the median"


def reports_kernels(content):
    """Whether the export lists which kernels ONNX Runtime runs its quantized convs with."""
    return integer(content)


# -- the network as it is traced ----------------------------------------------------------
def weight_codes(content):
    """{conv name: (int8 codes, scale, zero point)} of a quantized export's stored codes (decoded
    by their format, deploy/formats/int_codes.py)."""
    return {name.rsplit(".", 1)[0]: (codes, float(scale), int(zero_point))
            for name, (codes, scale, zero_point) in stored_codes(content).items()}


class QDQConv2d(nn.Module):
    """A quantized conv of an exported model in the form that traces to a QDQ graph: weight codes
    dequantized, input quantized and dequantized, a BN norm folded into a bias. With `codes`
    None it is the float network (weights as stored, no quantization): the runtime baseline.

    Activation codes are uint8 on 0..2^b-1 (the signed b-bit code minus q_min, the zero point
    likewise): QuantizeLinear's saturation at 0 is the grid's lower end, and below 8 bits a
    Clip before it holds the upper end (integer_convs moves it after QuantizeLinear)."""

    def __init__(self, layer, num_bits, codes=None, integer=False):
        super().__init__()
        self.integer = integer  # the graph's integer arithmetic (a reference for the check), not QDQ
        self.top_code = 2 ** num_bits - 1
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.norm = None if layer.folds_bn else layer.norm
        with torch.no_grad():
            weight = layer.weight.detach().clone()
            scale = layer.fold_scale()
            bias = None if layer.bias is None else layer.bias.detach().clone()  # a converted network's conv bias
            if scale is not None:
                # BN(conv(x, W * s) / s + b) with s = gamma / sqrt(var + eps) is conv(x, W * s) + beta + (b - mean) * s.
                _, beta = layer.norm.affine()
                shift = -layer.norm.running_mean if bias is None else bias - layer.norm.running_mean
                bias = (beta + shift * scale).detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.quantized = codes is not None
        self.act = None
        if self.quantized:
            _, self.w_scale, self.w_zero_point = codes
            if bool(layer.act_range_ready):
                a_scale, a_zero_point = affine_params(layer.act_min, layer.act_max, num_bits)
                q_min, _ = grid_limits(num_bits)
                a_scale, a_zero_point = float(a_scale), int(a_zero_point) - q_min
                top = 2 ** num_bits - 1
                self.act = (a_scale, a_zero_point, None if num_bits == 8 else (top - a_zero_point) * a_scale)

    def integer_arithmetic(self, x):
        """What the rewritten graph (integer_convs) computes, in torch: input codes by division
        (as QuantizeLinear, where torch's fake-quant multiplies by the reciprocal), the integer
        sum exact (float64 holds it), scaled once in float32, the bias added in float32."""
        scale, zero_point, top = self.act
        codes = torch.clamp(torch.round(x / torch.tensor(scale)) + zero_point, 0, 255)
        if top is not None:
            codes = torch.clamp(codes, max=self.top_code)
        weight_codes = torch.round(self.weight / torch.tensor(self.w_scale, dtype=self.weight.dtype))
        sums = F.conv2d((codes - zero_point).double(), weight_codes.double(), None, self.stride, self.padding,
                        self.dilation, self.groups)
        out = sums.float() * (torch.tensor(scale) * torch.tensor(self.w_scale))
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return self.norm(out) if self.norm is not None else out

    def forward(self, x):
        if self.integer and self.act is not None:
            return self.integer_arithmetic(x)
        weight = self.weight
        if self.act is not None:
            scale, zero_point, top = self.act
            if top is not None:
                x = torch.clamp(x, max=top)
            x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
        if self.quantized:
            weight = torch.fake_quantize_per_tensor_affine(weight, self.w_scale, self.w_zero_point, -128, 127)
        out = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.norm(out) if self.norm is not None else out


def without_activation_quantization(model):
    """A quantized export stored with float weights becomes the plain float network (its ONNX
    form is the float32 baseline: no QuantizeLinear/DequantizeLinear at all)."""
    for module in model.modules():
        if isinstance(module, QuantConv2d):
            module.act_range_ready.fill_(False)
    return model


def traceable(model, content, integer=False):
    """The exported network with each quantized conv replaced by its QDQ form (a copy); with
    `integer`, by the integer arithmetic of the rewritten graph instead (not traceable: the
    reference the check compares ONNX Runtime with)."""
    codes = weight_codes(content)
    replacements = {name: QDQConv2d(module, content["num_bits"], codes.get(name), integer)
                    for name, module in model.named_modules() if isinstance(module, QuantConv2d)}
    if not replacements:
        return model
    traced = copy.deepcopy(model)
    for name, replacement in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(traced.get_submodule(parent_name), child, replacement)
    return traced.eval()


# -- the rewrite ---------------------------------------------------------------------------
def integer_convs(model, num_bits, fused=True):
    """Rewrite the traced QDQ graph in place so that every quantized conv computes in integers.

    A conv whose input is quantized (QuantizeLinear -> DequantizeLinear) becomes
    ConvInteger(input codes, weight codes, zero points) -> Cast to float -> Mul by input scale x
    weight scale -> Add the float bias: the exact integer sum of the codes, scaled once, as the
    fake-quantized model computes it in float. Below 8 bits the Clip that holds the b-bit grid's
    upper end moves from the float input to the uint8 codes. Weight codes are stored as uint8
    (signed code + 128), whose ConvInteger kernel is the fast one in ONNX Runtime. A conv whose
    input is not quantized (no recorded range) keeps a float conv of its dequantized int8 codes.
    With `fused`, a ConvInteger that requantized_conv can fuse becomes a QLinearConv."""
    import onnx
    from onnx import helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def constant(name):
        return constant_value(name, initializers, producers)

    def add_constant(array, name):
        return add_initializer(graph, array, name)

    codes_of = {}  # QuantizeLinear name -> its codes on the b-bit grid
    fusable = []   # the ConvInteger nodes made, for requantized_conv
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        weight_dq = producers.get(conv.input[1])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            continue
        weight_q = producers[weight_dq.input[0]]
        weight, w_scale, w_zero_point = (constant(name) for name in weight_q.input)
        # The stored weights are dequantized codes, so weight / scale is within rounding of an integer.
        codes = ((weight / w_scale).round() + w_zero_point.astype("int32")).clip(-128, 127).astype("int32")
        stem = weight_q.input[0]
        graph.node.remove(weight_q)
        input_dq = producers.get(conv.input[0])
        if input_dq is None or input_dq.op_type != "DequantizeLinear":
            weight_dq.input[0] = add_constant(codes.astype(np.int8), stem + "_int8")
            continue
        input_q = producers[input_dq.input[0]]
        x_scale, x_zero_point = constant(input_q.input[1]), input_q.input[2]
        if input_q.name not in codes_of:
            # The exporter shares one QuantizeLinear (and Clip) between convs that quantize the same
            # input on the same grid (a block's first conv and its shortcut): clip its codes once.
            clip = producers.get(input_q.input[0])
            codes_of[input_q.name] = input_q.output[0]
            if clip is not None and clip.op_type == "Clip":
                input_q.input[0] = clip.input[0]
                codes_of[input_q.name] = conv.name + "_codes"
                top = add_constant(np.uint8(2 ** num_bits - 1), conv.name + "_top")
                graph.node.append(helper.make_node("Clip", [input_q.output[0], "", top], [codes_of[input_q.name]],
                                                   name=conv.name + "_clip"))
        x_codes = codes_of[input_q.name]
        w_codes = add_constant((codes + UINT8_SHIFT).astype(np.uint8), stem + "_uint8")
        w_zero = add_constant(np.uint8(int(w_zero_point) + UINT8_SHIFT), stem + "_zero_point")
        scale = add_constant(np.float32(x_scale * w_scale), conv.name + "_scale")
        out = conv.name + "_out"
        # Cast and Mul, not an int32 DequantizeLinear: ONNX Runtime's QDQ propagation moves a
        # DequantizeLinear past the Reshape of a following GroupNorm and scrambles its output
        # (onnxruntime 1.32: 26 % identical predictions on a GroupNorm network at 8 bits).
        nodes = [helper.make_node("ConvInteger", [x_codes, w_codes, x_zero_point, w_zero], [out + "_int32"],
                                  name=conv.name, **{a.name: helper.get_attribute_value(a) for a in conv.attribute}),
                 helper.make_node("Cast", [out + "_int32"], [out + "_float"], name=conv.name + "_cast",
                                  to=onnx.TensorProto.FLOAT),
                 helper.make_node("Mul", [out + "_float", scale], [out + "_scaled"], name=conv.name + "_scale")]
        if len(conv.input) > 2 and conv.input[2]:
            bias = add_constant(constant(conv.input[2]).reshape(1, -1, 1, 1).astype(np.float32), conv.name + "_bias")
            nodes.append(helper.make_node("Add", [out + "_scaled", bias], [out + "_biased"], name=conv.name + "_add"))
        nodes[-1].output[0] = conv.output[0]
        graph.node.remove(conv)
        graph.node.extend(nodes)
        fusable.append((nodes, float(x_scale), float(w_scale)))
    remove_unused(graph)  # the float Clips moved after QuantizeLinear, which the fusion follows
    for nodes, x_scale, w_scale in fusable if fused else ():
        requantized_conv(graph, nodes, x_scale, w_scale)
    remove_unused(graph)
    sort_topologically(graph)


def constant_value(name, initializers, producers):
    """The value of a constant tensor of the graph (an initializer or a Constant node's), or None."""
    from onnx import numpy_helper

    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    return None if node is None or node.op_type != "Constant" else numpy_helper.to_array(node.attribute[0].t)


def add_initializer(graph, array, name):
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def requantizing_chain(graph, tensor, initializers, producers):
    """The nodes from `tensor` (a conv's float output) to the QuantizeLinear of the next conv's
    input, through Relu and MaxPool only, each the only reader of the one before: [..., the
    QuantizeLinear], or None where the float output is needed (another reader, another op)."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    chain = []
    while len(consumers.get(tensor, [])) == 1 and tensor not in outputs:
        node = consumers[tensor][0]
        if node.op_type not in ("Relu", "MaxPool", "QuantizeLinear"):
            return None
        chain.append(node)
        if node.op_type == "QuantizeLinear":
            constants = [constant_value(name, initializers, producers) for name in node.input[1:]]
            return chain if all(value is not None for value in constants) else None
        tensor = node.output[0]
    return None


def requantized_conv(graph, nodes, x_scale, w_scale):
    """Fuse a ConvInteger whose float output goes, through ReLU and max pooling only, into the
    next conv's QuantizeLinear (a conv -> BN -> ReLU [-> pool] -> conv chain) into one QLinearConv
    that writes the next conv's input codes: ONNX Runtime's fast integer kernel (NHWC, int8 dot
    products where the CPU has them). Its requantization differs from the float chain in two
    ways: the bias is rounded to whole units of the sum (x scale x weight scale; at most half a
    unit), and the sum is scaled by one float32 multiplier; a code moves only where the float
    value lies within that much of a rounding boundary (check_layers counts these requantization
    ties). ReLU is the saturation at the zero point (a Clip of the codes where it is not 0), max
    pooling commutes with the monotone rounding and runs on the codes. Any other consumer (a
    residual sum, a GroupNorm or InstanceNorm, the classifier) needs the float output: the
    ConvInteger stays."""
    from onnx import helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    conv, bias_node = nodes[0], (nodes[3] if len(nodes) > 3 else None)
    chain = requantizing_chain(graph, nodes[-1].output[0], initializers, producers)
    if chain is None:
        return
    *chain, quantize = chain

    def add_constant(array, name):
        return add_initializer(graph, array, name)

    y_zero = int(constant_value(quantize.input[2], initializers, producers))
    # uint8 weights, not int8: ONNX Runtime's u8 x s8 kernels on AVX2 without VNNI add pairs of
    # products in int16 (VPMADDUBSW) and saturate (measured on an AMD EPYC: a 1x1 conv of 64
    # channels of codes 255 and weights 127 gave 105 codes for 207), and the codes less a nonzero
    # zero point do not fit int8 anyway.
    w_codes, w_zero = conv.input[1], conv.input[3]
    unit = np.float64(np.float32(x_scale) * np.float32(w_scale))
    stem = conv.name + "_q"

    inputs = [conv.input[0], add_constant(np.float32(x_scale), stem + "_x_scale"), conv.input[2],
              w_codes, add_constant(np.float32(w_scale), stem + "_w_scale"), w_zero,
              quantize.input[1], quantize.input[2]]
    if bias_node is not None:
        bias = constant_value(bias_node.input[1], initializers, producers).astype(np.float64).ravel()
        inputs.append(add_constant(np.round(bias / unit).astype(np.int32), stem + "_bias"))
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    fused = [helper.make_node("QLinearConv", inputs, [stem + "_codes"], name=conv.name, **attributes)]
    for node in chain:
        previous = fused[-1].output[0]
        if node.op_type == "Relu" and y_zero == 0:
            continue  # QLinearConv saturates at code 0
        if node.op_type == "Relu":
            fused.append(helper.make_node("Clip", [previous, quantize.input[2]], [node.name + "_codes"],
                                          name=node.name))
        else:
            fused.append(helper.make_node("MaxPool", [previous], [node.name + "_codes"], name=node.name,
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    fused[-1].output[0] = quantize.output[0]
    for node in [*nodes, *chain, quantize]:
        graph.node.remove(node)
    graph.node.extend(fused)


def remove_unused(graph):
    """Drop nodes and initializers nothing reads (what the rewrite replaced)."""
    outputs = {output.name for output in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(name in read for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)


def sort_topologically(graph):
    """Nodes appended by the rewrite go before their consumers (ONNX requires that order)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    pending, ordered = list(range(len(nodes))), []
    while pending:
        ready = [index for index in pending if all(name in available for name in nodes[index].input)]
        assert ready, "the graph has a cycle"
        for index in ready:
            ordered.append(nodes[index])
            available.update(nodes[index].output)
        done = set(ready)  # by position: comparing the nodes themselves compared whole protobufs
        pending = [index for index in pending if index not in done]
    del graph.node[:]
    graph.node.extend(ordered)


# -- the check -----------------------------------------------------------------------------
# Judged against torch as float graphs are (deploy/onnx_export.py), but not by the logits alone.
# A quantized graph cannot be judged by its logits alone. Float operations in another order
# (a GroupNorm's mean, a residual sum) now and then put an activation one quantization step
# away; the step changes the next layer's sums, more codes move, and the difference grows layer
# by layer, chaotically: on a barely trained GroupNorm network at 8 bits one code in a million
# moves in the fourth conv's input, seven in a hundred in the last, and the median image's
# logits move by up to a fifth of their spread, more than a graph whose activations are not
# quantized at all (measured: 0.03-0.04). So each quantized conv is checked on its own, from
# the graph's own values: the codes QuantizeLinear (and below 8 bits the Clip) made of the
# conv's float input must be those of the level's activation grid (the same division and
# round-half-to-even; only a value within CODE_TIE of a rounding boundary may land on its other
# side), and the conv's output must be the exact integer sum of those codes with the level's
# weight codes, scaled and biased in float32 (within SUM_TOLERANCE of one unit of the sum). A
# QLinearConv's output codes must be those of that sum, biased in float64, on the next conv's
# grid (only a value within CODE_TIE plus half a unit of the sum of a rounding boundary may land
# on its other side: a requantization tie), and the conv that reads them sees them clipped to
# its b bits. Every quantized conv of the model must be one ConvInteger or QLinearConv of the
# graph. A graph with the codes
# of another bit width, activations on another grid, unclipped or unquantized, is off by whole
# codes and units. The logits are then compared with the torch model's, median image within
# MODEL_TOLERANCE spreads: a guard against a mistake between the convs (norms, residual sums);
# identical predictions are reported beside, never judged.
MODEL_TOLERANCE = 0.5       # quantized: median over images of max |logit difference| to the torch model
CODE_TIE = 1e-4             # quantized: |input / scale - (n + 0.5)| below which either code is right
SUM_TOLERANCE = 0.25        # quantized: |output difference| in units of the sum (+ float32 rounding)
LAYER_BATCH = 16            # images per run of the instrumented graph (its intermediates are large)


def instrumented(path):
    """The graph at `path` with what check_layers reads of each integer conv (ConvInteger or
    QLinearConv) as graph outputs: ({module name: (float input or None, input codes, output,
    (output scale, output zero point) of a QLinearConv or None)}, serialized model). The float
    input is None where the codes are a QLinearConv's output (judged as that conv's output)."""
    onnx, _ = require_onnx()
    graph = onnx.load(path)
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    consumers = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = {}
    for conv in (node for node in graph.graph.node if node.op_type in ("ConvInteger", "QLinearConv")):
        codes = conv.input[0]
        source = producers.get(codes)
        while source is not None and source.op_type not in ("QuantizeLinear", "QLinearConv"):
            source = producers.get(source.input[0])
        if source is None:
            continue
        x = source.input[0] if source.op_type == "QuantizeLinear" else None
        if conv.op_type == "QLinearConv":
            requant = tuple(float(constant_value(name, initializers, producers)) for name in conv.input[6:8])
            layers[module_name(conv.name)] = (x, codes, conv.output[0], requant)
            continue
        # The output: through the integer sum's scaling (Cast, Mul or DequantizeLinear) and bias.
        output = conv.output[0]
        while len(consumers.get(output, [])) == 1 and consumers[output][0].op_type in (
                "Cast", "Mul", "DequantizeLinear", "Add") and output not in {o.name for o in graph.graph.output}:
            nxt = consumers[output][0]
            if nxt.op_type == "Add" and producers.get(nxt.input[1]) is not None:
                break  # a residual sum, not the conv's bias
            output = nxt.output[0]
        layers[module_name(conv.name)] = (x, codes, output, None)
    known = {o.name for o in graph.graph.output}
    for names in layers.values():
        for name in names[:3]:
            if name is not None and name not in known:
                graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                known.add(name)
    return layers, graph.SerializeToString()


@torch.no_grad()
def check_layers(path, model, content, images):
    """Each quantized conv of the graph at `path` against the integer arithmetic of the exported
    model's layer, from the graph's own values (see above): {"layers": number checked,
    "ties": codes on the other side of a rounding boundary, "requantization_ties": those of them
    a QLinearConv's requantization moved, "codes": codes checked, "worst_code": largest |code
    difference| beyond ties, "worst_sum": largest output difference in units of the sum,
    "missing": quantized convs that are no integer convolution, "fused": those run as QLinearConv,
    "first": the first layer off}."""
    _, ort = require_onnx()
    references = {name: module for name, module in traceable(model, content, integer=True).named_modules()
                  if isinstance(module, QDQConv2d) and module.act is not None}
    layers, serialized = instrumented(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    onnx_session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in onnx_session.get_outputs()]
    result = {"layers": len(references), "ties": 0, "requantization_ties": 0, "codes": 0, "worst_code": 0.0,
              "worst_sum": 0.0, "missing": sorted(set(references) - set(layers)),
              "fused": sorted(name for name in references if name in layers and layers[name][3] is not None),
              "first": None}
    # Per layer, once: the weight codes (as QDQConv2d.integer_arithmetic rounds them), the
    # largest sum of |weight codes| of an output channel, the bias in float64.
    weights = {}
    for name, reference in references.items():
        weight = torch.round(reference.weight / torch.tensor(reference.w_scale, dtype=reference.weight.dtype))
        bias = torch.zeros(1, 1, 1, 1, dtype=torch.float64) if reference.bias is None \
            else reference.bias.double().reshape(1, -1, 1, 1)
        weights[name] = (weight, float(weight.abs().flatten(1).sum(1).max()), bias)
    for batch in images.split(LAYER_BATCH):
        values = dict(zip(names, onnx_session.run(None, {INPUT_NAME: batch.numpy()})))
        for name, reference in references.items():
            if name not in layers:
                continue
            x_name, codes_name, output_name, requant = layers[name]
            codes, output = torch.from_numpy(values[codes_name]).float(), torch.from_numpy(values[output_name])
            scale, zero_point, _ = reference.act
            worst_code = 0.0
            top = min(255, reference.top_code)
            if x_name is not None:
                worst_code = judge_codes(torch.from_numpy(values[x_name]) / torch.tensor(scale), codes, zero_point,
                                         top, result)
            else:  # a QLinearConv's output codes, judged there, clipped to this grid's b bits
                worst_code = float((codes - top).clamp(min=0).max())
            unit = scale * reference.w_scale
            weight, weight_bound, bias = weights[name]
            # float32 sums integers exactly while every partial sum stays below 2^24; else float64.
            shifted = codes - zero_point
            dtype = torch.float32 if weight_bound * float(shifted.abs().max()) < 2 ** 24 else torch.float64
            sums = F.conv2d(shifted.to(dtype), weight.to(dtype), None, reference.stride, reference.padding,
                            reference.dilation, reference.groups).double()
            if requant is not None:
                # The output codes on the next conv's grid; the bias rounded to whole units of the
                # sum moves a value by up to half a unit, so a code within that of a boundary may move.
                y_scale, y_zero = requant
                ties = result["ties"]
                worst_code = max(worst_code, judge_codes(
                    (sums * unit + bias) / y_scale, output.float(), y_zero, 255, result, 0.5 * unit / y_scale)
                    if output.shape == sums.shape else float("inf"))
                result["requantization_ties"] += result["ties"] - ties
                worst_sum = 0.0
            else:
                rounding = 4 * torch.finfo(torch.float32).eps * (sums.abs() + bias.abs() / unit)
                worst_sum = float(((output.double() - (sums * unit + bias)).abs() / unit - rounding).max()) \
                    if output.shape == sums.shape else float("inf")
            if result["first"] is None and (worst_code > 0 or worst_sum > SUM_TOLERANCE):
                result["first"] = name
            result["worst_code"] = max(result["worst_code"], worst_code)
            result["worst_sum"] = max(result["worst_sum"], worst_sum)
    return result


def judge_codes(exact, codes, zero_point, top, result, shift=0.0):
    """Codes against round(exact) + zero_point on 0..top (exact: the value in units of the grid):
    counts them, and the codes one step off within CODE_TIE (relative, at least 1) plus `shift`
    (absolute, in codes) of a rounding boundary, into `result`; returns the largest difference
    beyond those ties."""
    expected = torch.clamp(torch.round(exact) + zero_point, 0, top)
    result["codes"] += codes.numel()
    if not bool((codes != expected).any()):  # rare in a correct graph: judge the ties only then
        return 0.0
    off = (codes - expected).abs()
    tie = (off == 1) & ((exact - exact.floor() - 0.5).abs() <= CODE_TIE * exact.abs().clamp(min=1) + shift)
    result["ties"] += int(tie.sum())
    return float(torch.where(tie, 0.0, off).max())

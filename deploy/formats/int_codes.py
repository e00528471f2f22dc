"""Export format `int_codes` (quantized): the body conv weights (after the BN fold) as integer
codes bit-packed at b bits with their per-tensor scale and zero point (`quantized`), and the
recorded activation ranges (`act_ranges`); rebuilt with frozen quantized convs that use their
stored weights as they are. Here alone are the codes written and decoded (the format's ONNX form,
deploy/formats/int_codes_onnx.py, takes them from stored_codes)."""

import math

import torch

from deploy.formats.base import ExportFormat, OnnxForm
from deploy.packing import concat, pack_bits, unpack_bits
from deploy.state import effective_state
from models import build_model, model_args
from models.factory import frozen_quant_factory
from models.layers import QuantMixin, set_level
from models.quant import dequantize, grid_limits, quantize_tensor_to_int

FLOAT_BITS = 32


def export(model, method, num_classes, level, round_to, float_weights=False):
    """The codes at the bit width `level`; `float_weights` stores the quantized weights as float32
    values instead (the same model, uncompressed)."""
    num_bits, config = int(level), method.config
    frozen = build_model(config.model, frozen_quant_factory(config.norm, num_bits, method.norm_groups(config)),
                         num_classes, **model_args(config), initialize=False)
    state = effective_state(model)
    q_min, _ = grid_limits(num_bits)
    names, shapes, codes, scales, zero_points = [], [], [], [], []
    act_names, act_min, act_max = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, QuantMixin):
            continue
        folded, _ = module.folded_weight()
        layer_codes, scale, zero_point = quantize_tensor_to_int(folded, num_bits)
        weight = dequantize(layer_codes, scale, zero_point)
        assert torch.equal(weight, module.quantized_weight()[0]), f"{name}: codes do not reproduce the fake-quant"
        if float_weights:
            state[f"{name}.weight"] = weight
        else:
            del state[f"{name}.weight"]
            names.append(f"{name}.weight")
            shapes.append(list(folded.shape))
            codes.append((layer_codes - q_min).flatten().cpu())
            scales.append(scale.cpu())
            zero_points.append(zero_point.cpu())
        if bool(module.act_range_ready):
            act_names.append(name)
            act_min.append(module.act_min.float().cpu())
            act_max.append(module.act_max.float().cpu())
    quantized = {"names": names, "shapes": shapes, "codes": pack_bits(concat(codes), num_bits),
                 "scales": concat(scales), "zero_points": concat(zero_points, torch.int32)}
    act_ranges = {"names": act_names, "min": concat(act_min), "max": concat(act_max)}
    return frozen, state, {"quantized": quantized, "act_ranges": act_ranges, "num_bits": num_bits}


def stored_codes(content):
    """{weight name: (signed integer codes in the weight's shape, scale, zero point)} of the convs
    an export stores as codes ({} for one stored with float weights)."""
    quantized = content.get("quantized") or {"names": []}
    if not quantized["names"]:
        return {}
    counts = [math.prod(shape) for shape in quantized["shapes"]]
    q_min, _ = grid_limits(content["num_bits"])
    codes = unpack_bits(quantized["codes"], content["num_bits"], sum(counts)) + q_min
    return {name: (layer_codes.view(shape), scale, zero_point) for name, shape, layer_codes, scale, zero_point
            in zip(quantized["names"], quantized["shapes"], codes.split(counts), quantized["scales"],
                   quantized["zero_points"])}


def decode(content):
    """The stored weights as the frozen quantized convs read them, and their activation ranges."""
    state = {name: dequantize(codes, scale, zero_point) for name, (codes, scale, zero_point)
             in stored_codes(content).items()}
    ranges = content.get("act_ranges")
    if ranges:
        for name, low, high in zip(ranges["names"], ranges["min"], ranges["max"]):
            state.update({f"{name}.act_min": low, f"{name}.act_max": high,
                          f"{name}.act_range_ready": torch.tensor(True)})
    return state


def factory(content):
    """Frozen quantized convs at the export's bit width."""
    return frozen_quant_factory(content["norm"], content["num_bits"], content["num_groups"])


def describe(content):
    ranges = len(content["act_ranges"]["names"])
    return [f"{len(content['quantized']['names'])} convs stored as {content['num_bits']}-bit codes; activation "
            f"ranges recorded for {ranges} of them" + ("" if ranges else " (activations are not quantized, as in "
                                                        "the run's evaluation)")]


def subspace_codes(model, method, num_classes, state):
    """Per bit width, the quantized convs' codes (as the per-level export stores them), when
    they take fewer bits than the float weights; the stored float weights are then dropped
    from `state`. None otherwise."""
    endpoints = 2 if any(layer.on_line for layer in model.modules() if isinstance(layer, QuantMixin)) else 1
    levels = method.level_range(method.config)
    bit_widths = list(range(int(levels.low), int(levels.high) + 1))
    if sum(bit_widths) >= FLOAT_BITS * endpoints:
        return None
    codes = {}
    for bits in bit_widths:
        set_level(model, method.export_level(method.export_point(bits)))
        codes[bits] = export(model, method, num_classes, bits, None)[2]["quantized"]
    for name, module in model.named_modules():
        if isinstance(module, QuantMixin):
            state.pop(f"{name}.weight")
            state.pop(f"{name}.weight1", None)
    return codes


def subspace_entries(codes):
    """The export entries of one bit width's stored codes."""
    return {"quantized": codes}


FORMAT = ExportFormat("int_codes", export, decode=decode, factory=factory, describe=describe, float_weights=True,
                      subspace_codes=subspace_codes, subspace_entries=subspace_entries,
                      onnx=OnnxForm("deploy.formats.int_codes_onnx"))

"""Export format `topk` (unstructured): the weights at alpha masked to their TopK; each body conv
whose bitmask plus kept values is smaller than the dense tensor is stored that way (`sparse`)."""

import math

import torch

from deploy.formats.base import ExportFormat, OnnxForm
from deploy.packing import concat, pack_bits, unpack_bits, unpack_tensors
from deploy.state import effective_state
from models import build_model, model_args
from models.factory import dense_factory
from models.layers import TopKMixin


def export(model, method, num_classes, level, round_to):
    config = method.config
    dense = build_model(config.model, dense_factory(config.norm, method.norm_groups(config)), num_classes,
                        **model_args(config), initialize=False)
    state = effective_state(model)
    names, shapes, masks, values = [], [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, TopKMixin):
            continue
        mask = module.mask().bool()
        kept = int(mask.sum())
        # A bitmask plus the kept values only pays off below about 97 % density.
        if 32 * kept + mask.numel() >= 32 * mask.numel():
            continue
        weight = state.pop(f"{name}.weight")
        names.append(f"{name}.weight")
        shapes.append(list(mask.shape))
        masks.append(mask.flatten().cpu())
        values.append(weight[mask].float().cpu())
    sparse = {"names": names, "shapes": shapes, "mask": pack_bits(concat(masks, torch.bool), 1),
              "values": concat(values)}
    return dense, state, {"sparse": sparse}


def decode(content):
    """The dense weights of the convs stored as bitmask + kept values."""
    sparse = content.get("sparse")
    if not sparse:
        return {}
    counts = [math.prod(shape) for shape in sparse["shapes"]]
    mask = unpack_bits(sparse["mask"], 1, sum(counts)).bool()
    flat = torch.zeros(sum(counts), dtype=sparse["values"].dtype)
    flat[mask] = sparse["values"]
    return unpack_tensors({"names": sparse["names"], "shapes": sparse["shapes"], "values": flat})


def describe(content):
    sparse = content["sparse"]
    return [f"{len(sparse['names'])} convs stored as bitmask + kept values ({sparse['values'].numel():,} weights kept)"]


# ONNX has no counterpart of the bitmask-plus-values storage.
FORMAT = ExportFormat("topk", export, decode=decode, describe=describe,
                      onnx=OnnxForm(note="ONNX stores no sparse weights: pruned weights are zeros in dense tensors"))

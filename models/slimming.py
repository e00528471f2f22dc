"""Physical channel pruning of LEC (network slimming), SPEC 3.5.

A global threshold on |gamma| of all norm layers picks the channels to keep; the network is
then rebuilt narrower (channel spec -> constructor) and the kept weights copied in. Unlike
the original, a layer always keeps at least its largest-|gamma| channel, so no evaluation
ever meets an empty layer.
"""

import torch
import torch.nn as nn

from models import build_model
from models.factory import dense_factory
from models.layers import ChannelSelection, Norm2d


@torch.no_grad()
def lec_keep_masks(model, fraction):
    """Boolean keep-masks per norm layer for a kept fraction of all norm channels.

    threshold = sorted(|gamma|)[int(N * (1 - fraction))]; a channel survives when
    |gamma| > threshold (strictly, so fraction 1.0 still drops the smallest channel, as in
    the original). Returns (masks, names of layers where the one-channel floor applied).
    """
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, Norm2d)]
    gammas = torch.cat([m.weight.detach().abs().flatten() for _, m in norms])
    threshold = gammas.sort().values[int(gammas.numel() * (1 - fraction))]
    masks, floored = {}, []
    for name, module in norms:
        magnitude = module.weight.detach().abs()
        keep = magnitude > threshold
        if not keep.any():
            keep[magnitude.argmax()] = True
            floored.append(name)
        masks[name] = keep
    return masks, floored


def _indices(mask):
    return mask.nonzero().flatten()


def _cpreresnet_plan(model, masks):
    """Block norms followed by a selection (bn1, final bn) stay whole and set the selection;
    bn2/bn3 are slimmed; each block's last conv and the down-sampling convs keep their width."""
    widths, selected, plan = {}, {}, {}
    for stage in ("layer1", "layer2", "layer3"):
        for index in range(len(getattr(model, stage))):
            b = f"{stage}.{index}"
            keep1, keep2, keep3 = masks[f"{b}.bn1"], _indices(masks[f"{b}.bn2"]), _indices(masks[f"{b}.bn3"])
            selected[f"{b}.select"] = int(keep1.sum())
            widths[f"{b}.conv1"], widths[f"{b}.conv2"] = len(keep2), len(keep3)
            plan.update({f"{b}.bn1": ("whole", keep1), f"{b}.select": ("select", keep1),
                         f"{b}.conv1": (keep2, _indices(keep1)), f"{b}.bn2": keep2,
                         f"{b}.conv2": (keep3, keep2), f"{b}.bn3": keep3, f"{b}.conv3": (None, keep3)})
    final = masks["bn"]
    selected["select"] = int(final.sum())
    plan.update({"bn": ("whole", final), "select": ("select", final), "fc": (None, _indices(final))})
    return widths, selected, plan


def _vgg_plan(model, masks):
    widths, plan, previous = {}, {}, None
    for index in range(len(model.convs)):
        keep = _indices(masks[f"norms.{index}"])
        widths[f"convs.{index}"] = len(keep)
        plan[f"convs.{index}"] = (keep, previous)
        plan[f"norms.{index}"] = keep
        previous = keep
    plan["classifier"] = (None, previous)
    return widths, {}, plan


LEC_PLANS = {"cpreresnet20": _cpreresnet_plan, "vgg19": _vgg_plan}


def take(tensor, out_index=None, in_index=None):
    """Rows `out_index` and columns `in_index` of a weight (None keeps all)."""
    if out_index is not None:
        tensor = tensor.index_select(0, out_index.to(tensor.device))
    if in_index is not None:
        tensor = tensor.index_select(1, in_index.to(tensor.device))
    return tensor


@torch.no_grad()
def _copy_norm(source, target, entry):
    if isinstance(entry, tuple):  # ("whole", keep): all channels, pruned ones zeroed
        keep = entry[1].to(source.weight.dtype)
        target.weight.copy_(source.weight * keep)
        target.bias.copy_(source.bias * keep)
        index = None
    else:
        index = entry
        target.weight.copy_(take(source.weight, index))
        target.bias.copy_(take(source.bias, index))
    if source.kind == "BN":
        target.running_mean.copy_(take(source.running_mean, index))
        target.running_var.copy_(take(source.running_var, index))


@torch.no_grad()
def lec_slim(model, model_name, num_classes, fraction):
    """The slimmed standard-layer network for `fraction` of norm channels kept, and a dict
    with where the one-channel floor applied and the channel spec (`widths`, `selected`)
    that rebuilds the slimmed network."""
    masks, floored = lec_keep_masks(model, fraction)
    widths, selected, plan = LEC_PLANS[model_name](model, masks)
    norm_kind = next(m.kind for m in model.modules() if isinstance(m, Norm2d))
    slim = build_model(model_name, dense_factory(norm_kind), num_classes, widths=widths, selected=selected)
    slim.to(next(model.parameters()).device)
    source = dict(model.named_modules())
    for name, target in slim.named_modules():
        entry = plan.get(name)
        if isinstance(target, nn.Conv2d):
            out_index, in_index = entry if entry is not None else (None, None)
            target.weight.copy_(take(source[name].weight, out_index, in_index))
        elif isinstance(target, Norm2d):
            _copy_norm(source[name], target, entry)
        elif isinstance(target, ChannelSelection) and entry is not None:
            target.indexes.copy_(entry[1].to(target.indexes.dtype))
    slim.eval()
    return slim, {"floored_layers": floored, "widths": widths, "selected": selected}

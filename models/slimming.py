"""Physical channel pruning of LEC (network slimming), SPEC 3.5.

A global threshold on |gamma| of all norm layers picks the channels to keep; the network is
then rebuilt narrower (channel spec -> constructor) and the kept weights copied in. Unlike
the original, a layer always keeps at least its largest-|gamma| channel, so no evaluation
ever meets an empty layer.

cPreResNet20 and VGG19 have their plans written by hand, as the original's. A converted network
(models/convert.py) gets its plan from its topology (models/topology.py ChannelGraph), by one
rule that gives the hand plans on those two networks: a norm's pruned channels have gamma and
beta set to zero (its output there is zero for every input); then everything that only carries
those zeros is removed, so the slimmed network computes exactly what the zeroed one does:

* zeros travel through the ops that keep them (ReLU-like f(0) = 0, pooling, reshapes, a sum of
  zeros, a product with a zero, a depthwise conv without bias, ...);
* a *channel space* is a set of tensors whose channels are tied one to one (a residual add, a
  depthwise conv, a norm, an elementwise op join them; a conv or linear starts a new one). A
  channel is removed from its whole space (the rows of the layers writing it, the norms and
  depthwise convs on it, the columns of the layers reading it) when every layer reading the
  space sees a zero there and no op combines the space's channels (a reduction or softmax over
  them); a space keeps at least one channel;
* a layer that reads zeros which its space keeps (other readers see values there: a
  pre-activation norm on a residual stream) drops those columns and selects the rest of its
  input first (`pick`, models/layers.py PickMixin; network slimming's channel selection).
"""

import copy
from functools import reduce

import torch
import torch.nn as nn

from models import build_model
from models.factory import dense_factory
from models.layers import ChannelSelection, Norm2d
from utils.errors import ConfigError


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


# -- converted networks: the plan from the topology ---------------------------------------------
def _spaces(graph):
    """(find, mixed): find(ref) names the channel space of a slimmed tensor; `mixed` holds the
    spaces whose channels some op combines."""
    parent = {ref: ref for ref in graph.sizes}

    def find(ref):
        while parent[ref] != ref:
            parent[ref] = parent[parent[ref]]
            ref = parent[ref]
        return ref
    for step in graph.steps:
        if step.kind != "layer":
            refs = [*step.ins, *([step.out] if step.out is not None else [])]
            for ref in refs[1:]:
                parent[find(ref)] = find(refs[0])
    mixed = {find(ref) for step in graph.steps if step.kind == "mix" for ref in step.ins}
    return find, mixed


def _zeros(graph, masks, modules):
    """{tensor: bool per channel}: where the tensor is zero for every input once each norm's
    pruned channels have zero gamma and beta."""
    rules = {"same": lambda z: z[0], "all": lambda z: reduce(torch.logical_and, z),
             "any": lambda z: reduce(torch.logical_or, z), "first": lambda z: z[0]}
    zero = {}
    for step in graph.steps:
        if step.out is None:
            continue
        none = torch.zeros(graph.sizes[step.out][0], dtype=torch.bool)
        if step.kind == "depthwise":
            bias = modules[step.where].bias
            zero[step.out] = zero[step.ins[0]] & (bias.detach().cpu() == 0 if bias is not None else True)
        elif step.kind == "norm" and step.where in masks:
            zero[step.out] = ~masks[step.where].cpu()
        elif step.kind == "op" and step.zero in rules:
            zero[step.out] = rules[step.zero]([zero[ref] for ref in step.ins])
        else:
            zero[step.out] = none
    return zero


def _features(channels, flat):
    """Entries of a flattened tensor (`flat` per channel) holding `channels`."""
    return (channels[:, None] * flat + torch.arange(flat)).flatten() if flat > 1 else channels


def converted_plan(graph, masks, modules):
    """{module: entry} for a converted network (see the module docstring): a layer's
    (rows or None, columns or None, pick or None), a depthwise conv's or a norm's kept channels
    (a norm's with the bool mask of those it zeroes)."""
    find, mixed = _spaces(graph)
    zero = _zeros(graph, masks, modules)
    removable = {}
    for step in graph.steps:
        if step.kind == "layer" and step.ins:
            space = find(step.ins[0])
            seen = zero[step.ins[0]]
            removable[space] = removable[space] & seen if space in removable else seen
    kept = {}

    def keep(ref):
        space = find(ref)
        if space not in kept:
            gone = removable.get(space) if space not in mixed else None
            channels = graph.sizes[ref][0]
            index = torch.arange(channels) if gone is None else (~gone).nonzero().flatten()
            kept[space] = index if len(index) else torch.arange(1)
        return kept[space]

    plan = {}
    for step in graph.steps:
        if step.kind == "layer":
            rows = keep(step.out) if step.out is not None else None
            columns = pick = None
            if step.ins:
                ref = step.ins[0]
                flat, space_keep = graph.sizes[ref][1], keep(ref)
                used = ~zero[ref][space_keep]
                if not used.any():
                    used[0] = True   # the layer reads only zeros: one column keeps it a layer
                columns = _features(space_keep[used], flat)
                if not used.all():
                    pick = _features(used.nonzero().flatten(), flat)
            entry = (rows, columns, pick)
        elif step.kind == "depthwise":
            entry = keep(step.out)
        elif step.kind == "norm" and step.where in masks:
            index = keep(step.out)
            entry = (index, ~masks[step.where].cpu()[index])
        else:
            continue
        if step.where in plan and not _same_entry(plan[step.where], entry):
            raise ConfigError(f"--method lec: {step.where} is called twice on channels that slim differently")
        plan[step.where] = entry
    return plan


def _same_entry(a, b):
    if isinstance(a, torch.Tensor) or a is None:
        return (a is None and b is None) or (isinstance(b, torch.Tensor) and torch.equal(a, b))
    return len(a) == len(b) and all(_same_entry(x, y) for x, y in zip(a, b))


@torch.no_grad()
def slim_converted(model, masks):
    """(slimmed copy of a converted dense model, {module: shape} and {layer: picks} that
    rebuild it with models.convert.narrow)."""
    from models.convert import narrow

    graph = model.conversion.channels
    modules = dict(model.named_modules())
    plan = converted_plan(graph, masks, modules)
    shapes, picks = {}, {}
    for name, entry in plan.items():
        module = modules[name]
        if isinstance(module, Norm2d):
            shapes[name] = [len(entry[0])]
        elif isinstance(entry, torch.Tensor):   # depthwise
            shapes[name] = [len(entry), len(entry)]
        else:
            rows, columns, pick = entry
            conv = isinstance(module, nn.Conv2d)
            shapes[name] = [(module.in_channels if conv else module.in_features) if columns is None else len(columns),
                            (module.out_channels if conv else module.out_features) if rows is None else len(rows)]
            if pick is not None:
                picks[name] = len(pick)
    slim = copy.deepcopy(model)
    narrow(slim, shapes, picks)
    device = next(model.parameters()).device
    slim.to(device)
    for name, entry in plan.items():
        source, target = modules[name], slim.get_submodule(name)
        if isinstance(source, Norm2d):
            index, zeroed = entry
            _copy_norm(source, target, index)
            target.weight[zeroed.to(device)] = 0
            target.bias[zeroed.to(device)] = 0
            continue
        rows, columns, pick = (entry, None, None) if isinstance(entry, torch.Tensor) else entry
        target.weight.copy_(take(source.weight, rows, columns))
        if source.bias is not None:
            target.bias.copy_(take(source.bias, rows))
        if pick is not None:
            target.pick.copy_(pick)
    slim.eval()
    return slim, shapes, picks


@torch.no_grad()
def lec_slim(model, model_name, num_classes, fraction):
    """The slimmed standard-layer network for `fraction` of norm channels kept, and a dict
    with where the one-channel floor applied and the channel spec (`widths`, `selected`)
    that rebuilds the slimmed network (a converted network's: its layers' shapes and picks)."""
    masks, floored = lec_keep_masks(model, fraction)
    if model_name not in LEC_PLANS:
        slim, shapes, picks = slim_converted(model, masks)
        return slim, {"floored_layers": floored, "widths": shapes, "selected": picks}
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

"""Any PyTorch CNN made compressible: build it, analyse it, swap its layers.

A network not written here (`torchvision.<builder>`, `timm.<name>`, `package.module:callable`;
utils/model_spec.py) is built by its own code, then converted in place (a module swap, as
torchao's `quantize_` and Brevitas' layerwise quantization do): every `nn.Conv2d` and
`nn.Linear` becomes the setting's layer from the method's LayerFactory (slimmable, TopK,
quantized; on a line for LCS+L), bias, groups and dilation kept; every BatchNorm2d / GroupNorm /
InstanceNorm2d becomes the method's norm (IN, BN or GN as `--norm` says).

Roles follow the original's builders: the first conv or linear executed is the stem and the one
whose output is the network's output the classifier; neither is compressed (a slimmable stem
keeps its 3 inputs, a slimmable classifier its outputs). Every other conv and linear is. In the
quantized setting a conv that feeds a BatchNorm directly (and nothing else) carries that norm
inside, as the quantized layers of the three networks do; the BatchNorm's place becomes a no-op.

GroupNorm takes the configs' 32 groups where 32 divides the channels, else the largest divisor
of the channel count below 32 (a count GroupNorm can split evenly; 24 channels: 24 groups).

Both endpoints of a line are drawn by the network's own initialisation (the builder is called
twice, the second model's weights become endpoint 1), so a converted network starts as its
authors intended, twice over.
"""

import importlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from models.factory import QUANT_BODIES
from models.init import random_init_skipped
from models.layers import NoOp
from models.topology import Topology, analyze
from utils.errors import ConfigError
from utils.model_spec import ModelSpec

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)
LAYER_TYPES = (nn.Conv2d, nn.Linear)
MAX_GROUPS = 32


@dataclass(frozen=True)
class Conversion:
    """What a conversion did, for the run's header and the tests."""

    convs: tuple           # compressed convs, in execution order
    linears: tuple         # compressed linears
    stem: str
    stem_kind: str         # "conv" or "linear"
    classifier: str
    folded_norms: tuple    # quantized: BatchNorms carried inside the conv before them
    dense: tuple           # what no swapped layer compresses ("where: what")
    notes: tuple = ()      # further lines for the run's header
    channels: Any = None   # the topology's ChannelGraph (LEC's slimming plan reads it)

    def header(self) -> str:
        line = (f"{len(self.convs)} convs and {len(self.linears)} linears compressed; dense: stem "
                f"{self.stem_kind} ({self.stem}), classifier ({self.classifier})")
        if self.dense:
            line += "; also dense: " + "; ".join(self.dense)
        return "\n".join((line, *self.notes))


def group_count(channels: int, preferred: int = MAX_GROUPS) -> int:
    """GroupNorm groups for `channels`: `preferred` where it divides them, else the largest
    divisor below it (GroupNorm needs equal groups)."""
    if channels % preferred == 0:
        return preferred
    return max(d for d in range(1, min(channels, preferred) + 1) if channels % d == 0)


def build_external(spec: ModelSpec, model_kwargs: dict, num_classes: int):
    """The network `spec` names, built by its own code with `num_classes` outputs."""
    kwargs = dict(model_kwargs or {})
    what = f"--model {spec.source}.{spec.target}" if spec.source != "callable" else f"--model {spec.target}"
    try:
        if spec.source == "torchvision":
            import torchvision.models as tv
            names = tv.list_models(module=tv)
            if spec.target not in names:
                raise ConfigError(f"{what}: torchvision has no classification builder {spec.target!r} "
                                  f"(e.g. {', '.join(n for n in ('resnet18', 'mobilenet_v2', 'efficientnet_b0'))})")
            model = tv.get_model(spec.target, weights=None, num_classes=num_classes, **kwargs)
        elif spec.source == "timm":
            try:
                import timm
            except ImportError:
                raise ConfigError(f"{what}: timm is not installed (pip install timm)") from None
            if not timm.is_model(spec.target):
                raise ConfigError(f"{what}: timm has no model {spec.target!r}")
            model = timm.create_model(spec.target, pretrained=False, num_classes=num_classes, **kwargs)
        else:
            module_name, _, function_name = spec.target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                raise ConfigError(f"{what}: cannot import {module_name} ({error})") from None
            builder = getattr(module, function_name, None)
            if not callable(builder):
                raise ConfigError(f"{what}: {module_name} has no callable {function_name}")
            model = builder(num_classes=num_classes, **kwargs)
    except TypeError as error:  # an argument the builder does not take
        raise ConfigError(f"{what}: the builder refused its arguments ({error}); check --model_kwargs") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what}: the builder returned {type(model).__name__}, not an nn.Module")
    return model


def convert(model: nn.Module, factory, topology: Topology, endpoint1: nn.Module = None) -> Conversion:
    """Swap `model`'s layers in place for the factory's (see the module docstring). `endpoint1`
    is a second build of the same network whose weights become endpoint 1 of line layers."""
    quantized = factory.body in QUANT_BODIES
    modules = dict(model.named_modules())
    others = dict(endpoint1.named_modules()) if endpoint1 is not None else {}
    roles = {topology.stem: "stem", topology.classifier: "classifier"}
    # conv name -> the BatchNorm it carries inside (quantized body convs only)
    carried = {conv: bn for conv, bn in topology.bn_after.items() if quantized and conv not in roles}
    convs, linears = [], []
    for name in topology.order:
        module, role = modules[name], roles.get(name, "body")
        _check_swappable(name, module, LAYER_TYPES)
        if isinstance(module, nn.Conv2d):
            new = _conv(factory, name, module, role, modules.get(carried.get(name)))
            convs.append(name)
        else:
            new = factory.linear(module.in_features, module.out_features, bias=module.bias is not None, role=role)
            linears.append(name)
        _copy_layer(new, module, others.get(name))
        if name in carried:
            _copy_norm(new.norm, modules[carried[name]], others.get(carried[name]))
        _set_module(model, name, new)
    folded = set(carried.values())
    for name in topology.norms:
        module = modules[name]
        if not isinstance(module, NORM_TYPES):
            continue  # LayerNorm and other norms stay as they are (the topology decides whether that is sound)
        _check_swappable(name, module, NORM_TYPES)
        if name in folded:
            _set_module(model, name, NoOp())
            continue
        channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
        new = replace(factory, num_groups=_groups(factory, channels)).norm(channels, role="stem")
        _copy_norm(new, module, others.get(name))
        _set_module(model, name, new)
    body = [name for name in topology.order if name not in roles]
    return Conversion(convs=tuple(n for n in convs if n in body), linears=tuple(n for n in linears if n in body),
                      stem=topology.stem, stem_kind="conv" if topology.stem in convs else "linear",
                      classifier=topology.classifier, folded_norms=tuple(sorted(folded)), dense=tuple(topology.dense),
                      channels=topology.channels)


def _conv(factory, name, module, role, carried_norm):
    if module.padding_mode != "zeros":
        raise ConfigError(f"--model: {name} pads with {module.padding_mode!r}; the compressing convs pad with "
                          f"zeros only")
    if carried_norm is not None:
        factory = replace(factory, num_groups=_groups(factory, module.out_channels))
    return factory.conv(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                        role=role, groups=module.groups, dilation=module.dilation, bias=module.bias is not None,
                        norm_inside=carried_norm is not None)


def _groups(factory, channels):
    return group_count(channels, factory.num_groups) if factory.norm_kind == "GN" else factory.num_groups


def _check_swappable(name, module, bases):
    """A subclass that computes its own forward (timm's same-padding conv, say) would silently
    lose that computation in the swap: refused, never replaced by the plain layer."""
    base = next(b for b in bases if isinstance(module, b))
    if type(module).forward is not base.forward:
        raise ConfigError(f"--model: {name} is a {type(module).__name__}, a {base.__name__} with a forward of its "
                          f"own; it cannot be swapped for a compressing layer without changing what it computes")


@torch.no_grad()
def _copy_layer(new, old, second):
    new.weight.copy_(old.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    if getattr(new, "weight1", None) is not None:
        source = second if second is not None else old
        new.weight1.copy_(source.weight)
        if old.bias is not None:
            new.bias1.copy_(source.bias)


@torch.no_grad()
def _copy_norm(new, old, second):
    """Affine parameters where the old norm has them; BatchNorm's running statistics into a
    BatchNorm. What does not map (statistics into IN or GN) is not taken."""
    if getattr(old, "weight", None) is not None:
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
        if getattr(new, "weight1", None) is not None:
            source = second if second is not None and second.weight is not None else old
            new.weight1.copy_(source.weight)
            new.bias1.copy_(source.bias)
    if new.kind == "BN" and getattr(old, "running_mean", None) is not None:
        new.running_mean.copy_(old.running_mean)
        new.running_var.copy_(old.running_var)


def _set_module(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def example_input(input_size: int) -> torch.Tensor:
    """The image the topology is traced on (two images: BatchNorm in training needs more than one
    value per channel, and some networks check the batch)."""
    return torch.zeros(2, 3, input_size, input_size)


def build_converted(spec: ModelSpec, model_kwargs: dict, factory, num_classes: int, input_size: int,
                    init_from: str = None):
    """(converted model, Conversion): build, analyse, refuse what the setting cannot compress,
    convert. With `init_from` (a file of the unconverted network's weights) both ends of a line
    start there."""
    model, topology = _built_and_checked(spec, model_kwargs, factory, num_classes, input_size, init_from)
    lines = factory.line_convs or factory.line_norms
    endpoint1 = build_external(spec, model_kwargs, num_classes) if lines and init_from is None else None
    conversion = convert(model, factory, topology, endpoint1)
    if init_from is not None:
        conversion = replace(conversion, notes=conversion.notes + (untaken_note(model, factory),))
    return model, conversion


def check_convertible(spec: ModelSpec, model_kwargs: dict, factory, num_classes: int, input_size: int,
                      init_from: str = None) -> None:
    """build_converted's refusals (the builder and its arguments, --init_from, a topology the
    method cannot slim, instance norm on 1x1 maps) on a throwaway build, the random state
    restored: a run asks this before it reads any data, so that a refused network is answered in
    seconds, and then draws the weights it would have drawn without it."""
    with random_init_skipped():  # its weights are never used
        _built_and_checked(spec, model_kwargs, factory, num_classes, input_size, init_from)


def _built_and_checked(spec, model_kwargs, factory, num_classes, input_size, init_from):
    """(unconverted model, Topology), after the refusals. Structured methods (slimmable layers,
    or LEC's channel pruning) need a topology that channel slimming can follow."""
    model = build_external(spec, model_kwargs, num_classes)
    if init_from is not None:
        load_unconverted_weights(model, init_from)
    image = example_input(input_size)
    topology = analyze(model, image)
    if (factory.body == "slim" or factory.prunes_channels) and topology.structured_refusal:
        raise ConfigError(f"--model {spec_text(spec)}: {topology.structured_refusal}")
    if factory.norm_kind == "IN":
        _check_instance_norm_positions(model, image, spec)
    return model, topology


def load_unconverted_weights(model: nn.Module, path: str) -> None:
    """The weights in `path` (a state_dict, or a checkpoint holding one under "state_dict" or
    "model"; a DDP "module." prefix dropped) into the unconverted `model`; one line naming the
    first key or shape that does not fit."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for files that are no checkpoint
        raise ConfigError(f"--init_from {path}: not a readable weights file "
                          f"({(str(error).strip().splitlines() or [type(error).__name__])[0][:120]})") from None
    if isinstance(payload, dict):
        payload = payload.get("state_dict", payload.get("model", payload))
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ConfigError(f"--init_from {path}: holds no state_dict (a mapping of names to tensors)")
    state = {key.removeprefix("module."): value for key, value in payload.items()}
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        which = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the network does not"
        raise ConfigError(f"--init_from {path}: does not fit the network ({which}; {len(missing)} missing, "
                          f"{len(unexpected)} unexpected keys)")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ConfigError(f"--init_from {path}: {key} has shape {tuple(value.shape)}, the network's "
                              f"{tuple(own[key].shape)}")
    model.load_state_dict(state)


def untaken_note(model: nn.Module, factory) -> str:
    """What --init_from could not carry over into the method's norms."""
    if factory.norm_kind == "BN":
        return "from --init_from: every weight; BatchNorm affine parameters and running statistics"
    return (f"from --init_from: every weight and the norms' affine parameters; BatchNorm running statistics are "
            f"not taken ({factory.norm_kind} normalises with each input's own statistics)")


@torch.no_grad()
def _check_instance_norm_positions(model, image, spec):
    """Instance norm normalises each channel over its positions: a norm that sees a 1x1 map at
    this input size cannot train (torch refuses it), so say so before anything is written."""
    sizes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            sizes.setdefault(name, tuple(inputs[0].shape[2:]))
        return hook
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        model(image)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    single = [name for name, size in sizes.items() if size and all(s == 1 for s in size)]
    if single:
        raise ConfigError(f"--norm IN: {spec_text(spec)}'s {single[0]} normalises a 1x1 map at "
                          f"{image.shape[-1]}x{image.shape[-1]} inputs and instance norm needs more than one "
                          f"position; use --norm BN or GN, or larger images")


# -- a narrower copy (the per-level structured export) -------------------------------------
@torch.no_grad()
def layer_shapes(model: nn.Module, input_size: int) -> dict:
    """{layer name: [C_in, C_out]} of every slimmable conv and linear, and {norm name: [C]}, as a
    converted slimmable model at its current width uses them (one forward pass on a blank image:
    a layer's inputs are whatever its producer keeps, which only the network's own code knows)."""
    from models.layers import Norm2d, SlimMixin

    shapes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            channels = inputs[0].shape[module.channel_dim if isinstance(module, SlimMixin) else 1]
            shapes[name] = list(module.active_channels(channels)) if isinstance(module, SlimMixin) else [channels]
        return hook
    for name, module in model.named_modules():
        if isinstance(module, (SlimMixin, Norm2d)):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        model(example_input(input_size)[:1].to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def narrow(model: nn.Module, shapes: dict, picks: dict = None) -> None:
    """Replace the layers `shapes` names (a dense converted model's Conv2d, Linear and Norm2d) by
    copies with those channel counts, in place: the physically narrower network of one width (or
    of one LEC fraction). `picks` ({layer: count}, LEC) names the layers that read only `count`
    of their input's channels (models/layers.py PickMixin)."""
    from models.layers import Conv2d, Linear, Norm2d, PickedConv2d, PickedLinear

    picks = picks or {}
    for name, shape in shapes.items():
        old = model.get_submodule(name)
        picked = (picks[name],) if name in picks else ()
        if isinstance(old, nn.Conv2d):
            c_in, c_out = shape
            depthwise = old.groups > 1
            new = (PickedConv2d if picked else Conv2d)(
                *picked, c_in, c_out, old.kernel_size, old.stride, old.padding, groups=c_out if depthwise else 1,
                dilation=old.dilation, bias=old.bias is not None)
        elif isinstance(old, nn.Linear):
            new = (PickedLinear if picked else Linear)(*picked, shape[0], shape[1], bias=old.bias is not None)
        else:
            assert isinstance(old, Norm2d) and old.kind != "GN", f"{name}: no narrower copy of {old}"
            new = Norm2d(old.kind, shape[0], eps=old.eps, momentum=old.momentum)
        _set_module(model, name, new)


def spec_text(spec: ModelSpec) -> str:
    return spec.target if spec.source in ("callable", "registered") else f"{spec.source}.{spec.target}"

"""Model registry and measurement helpers."""

import torch
import torch.nn as nn

from models.cpreresnet import CPreResNet
from models.init import random_init_skipped
from models.resnet import ResNet18
from models.vgg import VGG19

MODELS = {
    "cpreresnet20": CPreResNet,
    "resnet18": ResNet18,
    "vgg19": VGG19,
}


def build_model(name, factory, num_classes, widths=None, selected=None, model_kwargs=None, input_size=32,
                init_from=None, initialize=True):
    """Build a registered network from a layer factory (and an optional channel spec), or build
    a network written elsewhere (`torchvision.<builder>`, `timm.<name>`, `package.module:callable`)
    and convert it for the factory (models/convert.py; `model.conversion` says what was converted),
    from the weights in the file `init_from` if given. `initialize=False`: no random weights
    drawn and the random state untouched, for a caller that loads every weight next."""
    if not initialize:
        with random_init_skipped():
            return build_model(name, factory, num_classes, widths, selected, model_kwargs, input_size, init_from)
    if name in MODELS:
        kwargs = {"widths": widths}
        if selected:
            kwargs["selected"] = selected
        return MODELS[name](factory, num_classes=num_classes, **kwargs)
    from models.convert import build_converted, narrow
    from utils.model_spec import parse_model_spec

    model, conversion = build_converted(parse_model_spec(name, MODELS), model_kwargs, factory, num_classes,
                                        input_size, init_from=init_from)
    if widths:  # a per-level structured or LEC export: {layer: [c_in, c_out] or [channels]}, {layer: picks}
        narrow(model, widths, selected)
    model.conversion = conversion
    return model


def check_network(config, factory, num_classes: int, init_from=None) -> None:
    """For a network written elsewhere, the refusals its conversion would make (models/convert.py
    check_convertible), asked before a run reads its data; nothing for a registered network."""
    if config.model in MODELS:
        return
    from models.convert import check_convertible
    from utils.model_spec import parse_model_spec

    check_convertible(parse_model_spec(config.model, MODELS), config.model_kwargs, factory, num_classes,
                      model_args(config)["input_size"], init_from)


def model_args(config) -> dict:
    """The build_model arguments of a run's network beyond its name (a converted network's
    builder arguments and the input size its topology is traced at), from a Config."""
    return {"model_kwargs": getattr(config, "model_kwargs", None), "input_size": config.input_size or 224}


def count_parameters(model):
    """Every parameter, frozen ones (channel-selection indexes) included, as in the original."""
    return sum(p.numel() for p in model.parameters())


def conv_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def profile_convs(model, input_size, device=None):
    """Run one image through `model` at its current level and record, per conv, the input and
    output channels it used and its output size. Returns {name: dict}."""
    records, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            c_in = inputs[0].shape[1]
            if hasattr(module, "active_channels"):
                c_in, c_out = module.active_channels(c_in)
            else:
                c_out = output.shape[1]
            kh, kw = module.kernel_size
            records[name] = {"c_in": c_in, "c_out": c_out, "k": kh * kw,
                             "out_hw": output.shape[2] * output.shape[3],
                             "c_in_max": module.in_channels, "c_out_max": module.out_channels,
                             "full_numel": module.weight.numel()}
        return record

    for name, module in conv_modules(model):
        hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = device or next(model.parameters()).device
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return records


def channel_spec(model, input_size):
    """{conv name: output channels} of a model at its current level (a slimmable network at a
    width): the `widths` spec that builds the equivalent dense network with build_model."""
    return {name: record["c_out"] for name, record in profile_convs(model, input_size).items()}


def channels_at(model, width_factor):
    """{conv name: output channels} of a slimmable model at `width_factor`, from the layers alone
    (channel_spec measures the same with a forward pass at the model's current level)."""
    return {name: module.out_channels_at(width_factor) for name, module in conv_modules(model)}


def conv_macs(records):
    """Multiply-accumulates of the convs for one image (the classifier included)."""
    return sum(r["c_in"] * r["c_out"] * r["k"] * r["out_hw"] for r in records.values())

"""Export format `channels` (structured slimmable methods): the leading channels each layer keeps
at the width factor, stored as a physically narrower dense network: its channel spec (`widths`,
as the model constructors take it) and its weights (line norms resolved at alpha)."""

import math

from deploy.formats.base import ExportFormat
from deploy.state import effective_state
from models import build_model, channels_at, model_args
from models.convert import layer_shapes
from models.factory import dense_factory
from utils.errors import ConfigError


def round_up_widths(widths, full_widths, multiple):
    """Each width rounded up to a multiple of `multiple`, never above the layer's full width."""
    return {name: min(full_widths[name], math.ceil(width / multiple) * multiple)
            for name, width in widths.items()}


def leading(tensor, shape):
    """The leading block of `tensor` with `shape` (the channels a slimmable layer keeps)."""
    return tensor[tuple(slice(0, size) for size in shape)]


def export(model, method, num_classes, level, round_to):
    """The dense network of the width factor `level` (widths rounded up to `round_to`). A
    converted network's channel spec is every layer's [C_in, C_out] (its norms' [C]), measured
    at the width (models.convert.layer_shapes): only its own code knows which layer feeds which."""
    config = method.config
    if getattr(model, "conversion", None) is not None:
        if round_to:
            raise ConfigError(f"--round_to {round_to}: not for a converted network ({config.model}): rounding "
                              f"a layer's outputs changes the inputs of layers only its own code knows")
        widths = layer_shapes(model, model_args(config)["input_size"])
    else:
        widths = channels_at(model, level)
    if round_to:
        full = {name: module.out_channels for name, module in model.named_modules() if name in widths}
        widths = round_up_widths(widths, full, round_to)
    dense = build_model(config.model, dense_factory(config.norm), num_classes, widths=widths, **model_args(config),
                        initialize=False)
    source = effective_state(model)
    state = {key: leading(source[key], target.shape) for key, target in dense.state_dict().items()}
    return dense, state, {"widths": widths, "selected": None}


def describe(content):
    # A converted network's spec holds [C_in, C_out] per conv and linear (its outputs are the
    # channels kept) and [C] per norm (the same channels again, left out here).
    lines = ["channels: " + ", ".join(f"{name} {width[-1] if isinstance(width, list) else width}"
                                      for name, width in content["widths"].items()
                                      if not isinstance(width, list) or len(width) == 2)]
    if content["round_to"]:
        lines.append(f"widths rounded up to multiples of {content['round_to']} (at most the full width): this "
                     f"network has more channels than the model at width {content['level']:g}, so its outputs "
                     f"are not comparable with that level's evaluation")
    return lines


FORMAT = ExportFormat("channels", export, describe=describe, takes_round_to=True)

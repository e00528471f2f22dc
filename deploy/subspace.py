"""One file for a whole trained subspace; the level is picked on the device at run time.

    python -m utils.export --checkpoint RUN/model_final.pt --subspace --out model.lcs.pt

    from deploy import load_subspace
    sub = load_subspace("model.lcs.pt")
    sub.levels, sub.level_range        # the run's evaluation grid, the levels it accepts
    model = sub.at(0.5)                # a plain nn.Module in eval mode, at width 0.5

What the file holds (plain data, readable with weights_only=True), without the training
machinery (no optimiser, RNG states or counters):

* the training-time network's weights once: for structured methods the full-width convs and
  the norms (both endpoints for LCS+L's line norms; LEC's slimming plan for a level is computed
  from the stored gammas at load, as the run's evaluation does); for unstructured methods the
  weights (both endpoints for LCS+L);
* quantized: each quantized conv as integer codes per bit width when all bit widths' codes
  together take fewer bits than its float weights (LCS+L: 3+4+...+8 = 33 bits per weight
  instead of 2 x 32 for the endpoints), else its float weights.

`sub.at(level)` resolves the level as the per-level export does. The training-time network
is built once at load; a slimmable one (structured width factors) serves every level in place,
so a switch copies nothing. For the other methods `at` builds the network the per-level export
would hold (LEC slimmed, TopK-masked weights, quantized weights decoded from their codes).
Either way the logits equal those of the training-time model at that level.
"""

import torch.nn as nn

from methods import METHODS
from models import build_model
from models.layers import QuantConv2d, SlimConv2d, set_level
from training_params import Config
from utils.errors import CheckpointError, ConfigError
from utils.export import (build_exported, export_at, level_range, num_classes_of, pack_tensors, read_export,
                          resolve_level, save_export, training_model, unpack_tensors)

FORMAT = "lcs-subspace"
VERSION = 1
FLOAT_BITS = 32


def stored_levels(config):
    """Every level a quantized subspace can be asked for (integer bit widths)."""
    low, high = level_range(config)
    return list(range(int(low), int(high) + 1))


def _quantized_codes(model, config, num_classes, state):
    """Per bit width, the quantized convs' codes (as the per-level export stores them), when
    they take fewer bits than the float weights; the stored float weights are then dropped."""
    endpoints = 2 if any(layer.on_line for layer in model.modules() if isinstance(layer, QuantConv2d)) else 1
    bit_widths = stored_levels(config)
    if sum(bit_widths) >= FLOAT_BITS * endpoints:
        return None
    codes = {bits: export_at(model, config, num_classes, bits)["quantized"] for bits in bit_widths}
    for name, module in model.named_modules():
        if isinstance(module, QuantConv2d):
            state.pop(f"{name}.weight")
            state.pop(f"{name}.weight1", None)
    return codes


# Per setting, the levels stored as codes instead of float weights (settings absent: none).
CODE_STORAGE = {"quantized": _quantized_codes}


def make_subspace(payload, path="checkpoint"):
    """The subspace artefact (a dict of plain data) of a checkpoint payload."""
    model, config = training_model(payload, path)
    num_classes = num_classes_of(payload["model"])
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    store_codes = CODE_STORAGE.get(config.setting)
    codes = store_codes(model, config, num_classes, state) if store_codes else None
    method = METHODS[config.setting][config.method](config, None)
    return {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "num_classes": num_classes,
            "levels": [point.level for point in method.eval_points()], "weights": pack_tensors(state),
            "codes": codes}


def save_subspace(path, content):
    save_export(path, content)


class Subspace:
    """A loaded subspace artefact: `levels`, `level_range` and `at(level)`."""

    def __init__(self, content, path):
        self.path = path
        self.config = Config(**content["config"])
        self.num_classes = content["num_classes"]
        self.levels = list(content["levels"])
        self.level_range = level_range(self.config)
        self.codes = content["codes"]
        self.model_input_size = self.config.input_size or 224
        method = METHODS[self.config.setting][self.config.method](self.config, None)
        self.model = build_model(self.config.model, method.layer_factory(), self.num_classes)
        stored = unpack_tensors(content["weights"])
        missing, unexpected = self.model.load_state_dict(stored, strict=False)
        # Only the weights stored as codes may be missing (their float values are never read).
        coded = {name for group in (self.codes or {}).values() for name in group["names"]}
        if unexpected or any(key.rsplit(".", 1)[0] + ".weight" not in coded for key in missing):
            raise CheckpointError(f"{path}: damaged subspace (missing {missing[:3]}, unexpected {unexpected[:3]})")
        method.bind(self.model)
        self.model.eval()
        self.in_place = any(isinstance(module, SlimConv2d) for module in self.model.modules())

    def content_at(self, level):
        """The per-level export content (as utils.export writes it) of `level`."""
        try:
            content = export_at(self.model, self.config, self.num_classes, level)
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None
        if self.codes:
            content["quantized"] = self.codes[int(level)]
        return content

    def at(self, level):
        """The network at `level`, an nn.Module in eval mode. A slimmable network (structured
        width factors) is shared by all levels: the module returned sets its level before each
        forward, so a switch copies nothing. Other methods get the level's compressed network
        built (as the per-level export would be)."""
        if self.in_place:
            try:
                levels, _ = resolve_level(self.config, level)
            except ConfigError as error:
                raise ConfigError(f"{self.path}: {error}") from None
            return LevelView(self.model, levels)
        return build_exported(self.content_at(level), self.path)


class LevelView(nn.Module):
    """A shared slimmable network at one level (set before every forward)."""

    def __init__(self, network, levels):
        super().__init__()
        self.network = network
        self.levels = levels
        self.eval()

    def forward(self, x):
        set_level(self.network, **self.levels)
        return self.network(x)


def load_subspace(path):
    content = read_export(path, FORMAT, VERSION, "subspace artefact", "python -m utils.export --subspace")
    return Subspace(content, path)


def describe(content, size_bytes):
    config = content["config"]
    stored = f"codes for {len(content['codes'])} bit widths" if content["codes"] else "float weights"
    return (f"{config['setting']}/{config['method']} {config['model']}: subspace with {stored}, "
            f"{size_bytes / 1024:.1f} KiB; levels {', '.join(f'{level:g}' for level in content['levels'])}")

"""One file for a whole trained subspace; the level is picked on the device at run time.

    python -m deploy.export --checkpoint RUN/model_final.pt --subspace --out model.lcs.pt

    from deploy import load_subspace
    sub = load_subspace("model.lcs.pt")
    sub.levels, sub.level_range        # the run's evaluation grid, the levels it accepts
    model = sub.at(0.5)                # a plain nn.Module in eval mode, at width 0.5
    sub.preprocessing, sub.class_names # input normalisation and class names (deploy.compressed)

What the file holds (plain data, readable with weights_only=True), without the training
machinery (no optimiser, RNG states or counters):

* the training-time network's weights once: for structured methods the full-width convs and
  the norms (both endpoints for LCS+L's line norms; LEC's slimming plan for a level is computed
  from the stored gammas at load, as the run's evaluation does); for unstructured methods the
  weights (both endpoints for LCS+L);
* quantized: each quantized conv as integer codes per bit width when all bit widths' codes
  together take fewer bits than its float weights (LCS+L: 3+4+...+8 = 33 bits per weight
  instead of 2 x 32 for the endpoints), else its float weights;
* runs whose evaluations re-estimated BN statistics (`bn_calibration_images` > 0: LEC by
  default): the re-estimated statistics of every level of the run's evaluation grid, computed
  at export on the run's training images (`--data_dir`), as the per-level export computes them.
  Such a subspace gives only those levels: another level would need training images on the
  device.

`sub.at(level)` resolves the level as the per-level export does. The training-time network
is built once at load; a slimmable one (structured width factors) serves every level in place,
so a switch copies nothing. For the other methods `at` builds the network the per-level export
would hold (LEC slimmed, TopK-masked weights, quantized weights decoded from their codes).
Either way the logits equal those of the training-time model at that level. With stored BN
statistics `at` builds the level's network and loads that level's statistics into it.

`load_subspace` checks every stored tensor, and the checksum `save_subspace` writes over them,
before it builds anything (deploy/subspace_schema.py); a damaged file is one CheckpointError line.
"""

import numbers
from typing import Optional

import torch
import torch.nn as nn

from deploy.compressed import (build_exported, export_at, input_metadata, level_range, num_classes_of,
                               read_export, read_input_metadata, resolve_level, save_export, training_model)
from deploy.formats import FORMATS
from deploy.packing import pack_tensors, unpack_tensors
from deploy.subspace_schema import (BN_STATISTICS, check_against_model, check_checksum, check_layout, check_levels,
                                    checksum)
from methods import METHODS, config_from_dict
from models import build_model, model_args
from models.layers import SlimMixin, set_level
from utils import checkpoint_schema as schema
from utils.errors import CheckpointError, ConfigError, one_line, shown

FORMAT = "lcs-subspace"
VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: written before the checksum (deploy/subspace_schema.py), read unchecked


def calibrated(method):
    """Whether the per-level export of the method's run re-estimates BN statistics."""
    return method.bn_at_evaluation(method.config).calibration_images > 0


def _bn_statistics(model, method, num_classes, levels, data_dir):
    """Per level, the BN statistics its per-level export re-estimates (packed), in `levels` order."""
    statistics = []
    for level in levels:
        state = unpack_tensors(export_at(model, method, num_classes, level, data_dir=data_dir)["dense"])
        statistics.append(pack_tensors({key: value for key, value in state.items()
                                        if key.rsplit(".", 1)[-1] in BN_STATISTICS}))
    return statistics


def make_subspace(payload: dict, path: str = "checkpoint", data_dir: Optional[str] = None) -> dict:
    """The subspace artefact (a dict of plain data) of a checkpoint payload. A run that
    re-estimated BN statistics at evaluation needs its training images in `data_dir`."""
    schema.check_model(payload, path)  # tensors only, all finite: what load_subspace accepts
    model, method = training_model(payload, path)
    num_classes = num_classes_of(payload["model"])
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    store_codes = FORMATS[method.export_format].subspace_codes
    codes = store_codes(model, method, num_classes, state) if store_codes else None
    levels = [point.level for point in method.eval_points()]
    statistics = (_bn_statistics(model, method, num_classes, levels, data_dir) if calibrated(method)
                  else None)
    content = {"format": FORMAT, "version": VERSION, "config": method.config.to_dict(), "num_classes": num_classes,
               "levels": levels, "weights": pack_tensors(state), "codes": codes, "bn_statistics": statistics,
               **input_metadata(method.config)}
    # With its checksum, the content loads as it will from the file (Subspace(content)), so the
    # export can check it against the training-time model before writing it.
    return dict(content, checksum=checksum(content))


def save_subspace(path: str, content: dict) -> None:
    """Write `content` (make_subspace's) to `path` atomically, with the checksum of its tensors."""
    save_export(path, dict(content, checksum=checksum(content)))


def _packed(value):
    """Tensors as pack_tensors stores them: names, shapes and one flat buffer."""
    return (isinstance(value, dict) and isinstance(value.get("names"), list) and isinstance(value.get("shapes"), list)
            and isinstance(value.get("values"), torch.Tensor) and len(value["names"]) == len(value["shapes"]))


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_CODES = ("names", "shapes", "codes", "scales", "zero_points")

# What a subspace file stores: key -> (valid(value), what it must be).
STORED = {
    "config": (lambda value: isinstance(value, dict) and isinstance(value.get("setting"), str)
               and isinstance(value.get("method"), str), "the run's config (a mapping with setting and method)"),
    "num_classes": (lambda value: isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    "a positive number of classes"),
    "levels": (lambda value: isinstance(value, list) and bool(value) and all(_number(level) for level in value),
               "a non-empty list of levels"),
    "weights": (_packed, "packed tensors (names, shapes, values)"),
    "codes": (lambda value: value is None or (isinstance(value, dict) and all(
        isinstance(group, dict) and all(key in group for key in _CODES) for group in value.values())),
        "None or integer codes per bit width"),
    "bn_statistics": (lambda value: value is None or (isinstance(value, list)
                                                      and all(_packed(group) for group in value)),
                      "None or packed BN statistics per level"),
}


def check_content(content, path):
    """CheckpointError of one line naming `path` and the first stored key that is missing or
    not what this code reads (a damaged file, or one of another program)."""
    for key, (valid, expected) in STORED.items():
        if key not in content:
            raise CheckpointError(f"{path}: damaged subspace artefact: {key} is missing, expected {expected}")
        if not valid(content[key]):
            raise CheckpointError(f"{path}: damaged subspace artefact: {key} is {shown(content[key])}, "
                                  f"expected {expected}")
    config = content["config"]
    methods = METHODS.get(config["setting"])
    if methods is None:
        raise CheckpointError(f"{path}: its config names setting {shown(config['setting'])}; this project has "
                              f"{', '.join(METHODS)}")
    if config["method"] not in methods:
        raise CheckpointError(f"{path}: its config names method {shown(config['method'])} of setting "
                              f"{config['setting']}; this project has {', '.join(methods)}")


class Subspace:
    """A loaded subspace artefact: `levels`, `level_range` and `at(level)`."""

    def __init__(self, content: dict, path: str):
        check_content(content, path)
        check_layout(content, path)
        check_checksum(content, path, content.get("version"))
        try:
            self._build(content, path)
        except CheckpointError:
            raise
        except (ConfigError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            # Keys of the right type whose values do not fit together (a damaged or edited file).
            raise CheckpointError(f"{path}: damaged subspace artefact ({type(error).__name__}: "
                                  f"{one_line(error)[:200]})") from None

    def _build(self, content, path):
        self.path = path
        self.config = config_from_dict(content["config"])
        method = self.method = METHODS[self.config.setting][self.config.method](self.config, None)
        self.num_classes = content["num_classes"]
        self.levels = list(content["levels"])
        self.level_range = level_range(method)
        check_levels(content, path, method, calibrated(method))
        self.codes = content["codes"]
        self.bn_statistics = content.get("bn_statistics")
        self.model_input_size = self.config.input_size or 224
        self.preprocessing, self.class_names = read_input_metadata(content, path, "subspace artefact")
        self.model = build_model(self.config.model, method.layer_factory(), self.num_classes,
                                 **model_args(self.config))
        check_against_model(content, path, self.model)
        stored = unpack_tensors(content["weights"])
        missing, unexpected = self.model.load_state_dict(stored, strict=False)
        # Only the weights stored as codes may be missing (their float values are never read).
        coded = {name for group in (self.codes or {}).values() for name in group["names"]}
        if unexpected or any(key.rsplit(".", 1)[0] + ".weight" not in coded for key in missing):
            raise CheckpointError(f"{path}: damaged subspace (missing {missing[:3]}, unexpected {unexpected[:3]})")
        method.bind(self.model)
        self.model.eval()
        self.in_place = any(isinstance(module, SlimMixin) for module in self.model.modules())

    def stored_level(self, level: float) -> int:
        """The index of `level` among the levels whose BN statistics are stored; ConfigError
        naming those levels for any other."""
        for index, stored in enumerate(self.levels):
            if abs(float(level) - stored) <= 1e-9:
                return index
        raise ConfigError(f"{self.path}: at(level): level {level:g} is not stored; this run evaluated with BN "
                          f"statistics re-estimated per level, and the subspace holds them for levels "
                          f"{', '.join(f'{stored:g}' for stored in self.levels)} only")

    def content_at(self, level: float) -> dict:
        """The per-level export content (as deploy.export writes it) of `level`; with stored BN
        statistics, those of the level (the re-estimation itself needs training images)."""
        statistics = unpack_tensors(self.bn_statistics[self.stored_level(level)]) if self.bn_statistics else None
        try:
            content = export_at(self.model, self.method, self.num_classes, level, bn_statistics=statistics)
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None
        if self.codes:
            content.update(FORMATS[self.method.export_format].subspace_entries(self.codes[int(level)]))
        return content

    def at(self, level: float) -> nn.Module:
        """The network at `level`, an nn.Module in eval mode. A slimmable network (structured
        width factors) is shared by all levels: the module returned sets its level before each
        forward, so a switch copies nothing. Other methods get the level's compressed network
        built (as the per-level export would be), as do levels with stored BN statistics."""
        level = self.checked_level(level)
        if self.in_place and not self.bn_statistics:
            levels, _ = resolve_level(self.method, level)
            return LevelView(self.model, levels)
        return build_exported(self.content_at(level), self.path)

    def checked_level(self, level) -> float:
        """`level` as a float; ConfigError naming at(level) unless it is a number in the range
        of the file's method."""
        levels = self.method.level_range(self.config)
        if not isinstance(level, numbers.Real) or isinstance(level, bool):
            raise ConfigError(f"{self.path}: at(level): level must be a number, got {shown(level)} (a "
                              f"{type(level).__name__}); this {self.config.setting}/{self.config.method} subspace "
                              f"gives {levels.describe()}")
        if float(level) not in levels:
            raise ConfigError(f"{self.path}: at(level): level {float(level):g} is outside what this "
                              f"{self.config.setting}/{self.config.method} subspace gives: {levels.describe()}")
        return float(level)


class LevelView(nn.Module):
    """A shared slimmable network at one level (set before every forward)."""

    def __init__(self, network, levels):
        super().__init__()
        self.network = network
        self.levels = levels
        self.eval()

    def forward(self, x):
        set_level(self.network, self.levels)
        return self.network(x)


def load_subspace(path: str) -> "Subspace":
    content = read_export(path, FORMAT, READ_VERSIONS, "subspace artefact", "python -m deploy.export --subspace")
    return Subspace(content, path)


def describe(content: dict, size_bytes: int) -> str:
    config = content["config"]
    stored = f"codes for {len(content['codes'])} bit widths" if content["codes"] else "float weights"
    if content.get("bn_statistics"):
        stored += ", BN statistics re-estimated per level"
    return (f"{config['setting']}/{config['method']} {config['model']}: subspace with {stored}, "
            f"{size_bytes / 1024:.1f} KiB; levels {', '.join(f'{level:g}' for level in content['levels'])}")

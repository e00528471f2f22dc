"""What every training method provides: the strategy interface the engine is written against,
and the class-level knowledge the command line and export read (keys, flags, levels).

A method is a small strategy object: which layers the network is built from, which levels to
run in each training step, which regulariser to add, which grid to evaluate and what to report
about a level. Its class also owns everything else about it: its config keys and their
defaults, its flags and how they map onto keys, its validation, the unit and range of its
levels and how a level is exported. A setting (structured_sparsity, unstructured_sparsity,
quantized) is a Method subclass that holds what its methods share; a method adds only what
differs. Keys and flags are collected along the class hierarchy, so a mixin (e.g. the line
of LCS+L) brings its own.

The modules of methods/ import torch and models/ inside the functions that train, evaluate
or export: the command line reads the classes' keys and flags, and checks a command and its
YAML files, before torch is imported (which takes seconds).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from methods.config import COMMON_KEYS, Checks, Config, Key
from methods.levels import cosine_squared, warmup_iterations
from utils.errors import ConfigError

if TYPE_CHECKING:  # torch and the layers are imported only where a method trains or evaluates
    import torch

    from models.factory import LayerFactory
    from models.layers import Level

# Where the BN statistics of an evaluated network come from (BNAtEvaluation.source).
RUNNING = "running"            # the running statistics the network holds
CALIBRATED = "calibrated"      # re-estimated on a fixed, seeded subset of training images
TEST_BATCH = "test_batch"      # each test batch's own (the original LEC's evaluation; transductive)


@dataclass(frozen=True)
class BNAtEvaluation:
    """How the BN statistics of an evaluated (and exported) network are made, as the method
    answers it (Method.bn_at_evaluation): the engine, the export and the subspace follow the
    answer, and data/ provides `calibration_images` training images when there are any."""

    source: str = RUNNING
    calibration_images: int = 0

    def __post_init__(self):
        assert self.source in (RUNNING, CALIBRATED, TEST_BATCH), f"unknown BN statistics source {self.source!r}"
        assert (self.source == CALIBRATED) == (self.calibration_images > 0), \
            f"{self.source}: calibration images {self.calibration_images}"

    @property
    def test_batch(self) -> bool:
        return self.source == TEST_BATCH


@dataclass(frozen=True)
class LevelUnit:
    """The unit of a method's levels, wherever a user or a file sees one: `name` in metrics rows,
    results.csv and exports, `label` on plot axes and in the meaning of --level, `scale` of the
    plot axis, `type` of a level (int for bit widths). `legacy_names`: names runs of earlier
    versions recorded for this unit (read as `name`)."""

    name: str
    label: str
    scale: str = "linear"         # "linear" or "log"
    type: type = float
    legacy_names: tuple = ()

    def __post_init__(self):
        assert self.scale in ("linear", "log"), f"{self.name}: axis scale {self.scale!r}"

    @property
    def axis_label(self) -> str:
        return self.label + (" (log scale)" if self.scale == "log" else "")


@dataclass(frozen=True)
class EvalPoint:
    """One point of the evaluation grid: the level in the setting's unit, and alpha for LCS+L."""

    level: float
    alpha: Optional[float] = None


@dataclass(frozen=True)
class Flag:
    """A command-line flag and the config keys it sets. A method may use the flag when it has
    all of `keys`; for the others the flag is refused, naming the methods that take it.
    `to_values(value)` turns the parsed value into {key: value} (default: keys[0] = value)."""

    name: str
    keys: tuple
    help: str
    type: Any = None
    aliases: tuple = ()
    metavar: Optional[str] = None
    to_values: Optional[Callable] = None
    switch: bool = False  # an on/off flag without a value (store_true)

    @property
    def dest(self):
        return self.name.lstrip("-")

    def add_to(self, parser, users=None):
        """Add the flag to a setting's parser; `users`: the methods that take it, when not all do."""
        text = self.help
        if users and text != argparse.SUPPRESS:
            text += f" [{', '.join(users)}]"
        if self.switch:
            parser.add_argument(self.name, *self.aliases, dest=self.dest, action="store_true", default=None,
                                help=text)
        else:
            parser.add_argument(self.name, *self.aliases, dest=self.dest, type=self.type, metavar=self.metavar,
                                help=text)

    def values(self, value):
        return self.to_values(value) if self.to_values else {self.keys[0]: value}


@dataclass(frozen=True)
class LevelRange:
    """The levels a method can evaluate and export, in its setting's unit."""

    low: float
    high: float
    what: str                   # "width factors", "TopK fractions", "bit widths", ...
    low_open: bool = False
    integer: bool = False
    note: str = ""              # where the bounds come from, e.g. "the trained width_factor_limits"

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if self.integer and not float(value).is_integer():
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self) -> str:
        if self.integer:
            text = f"integer {self.what} in {self.low:g}..{self.high:g}"
        else:
            text = f"{self.what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"{text} ({self.note})" if self.note else text


def collect(cls, attribute):
    """A dict class attribute merged along the MRO: base classes first, subclasses win."""
    merged = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get(attribute, {}))
    return merged


# A grid larger than this is a mistake (each point is a pass over the test set).
MAX_GRID_POINTS = 256


class Method:
    setting: Optional[str] = None  # the setting's name (its registry key)
    name: Optional[str] = None     # the method's name (--method)
    level_unit: LevelUnit = None  # the unit of its levels (metrics, plots, exports, --level)
    script = None            # the setting's training script
    description = ""         # the setting's --help description
    own_keys = {}            # config keys this class adds: {name: Key}
    own_flags = ()           # flags this class adds
    own_evaluation_keys = ("eval_param_grid",)  # keys --eval_only may change (how to evaluate, not what)
    legacy_keys = {}         # keys of configs written by earlier versions, converted by upgrade()
    refused_flags = {}       # {flag name: why this method refuses it}
    norms = ("IN", "BN", "GN")
    export_format: Optional[str] = None  # how deploy/ stores an export (a key of deploy.formats.FORMATS)
    # When --compile may be used (training draws few distinct levels; see distinct_train_levels):
    # None never, "" always, else the condition ("with discrete_alpha_map").
    compiles_when: Optional[str] = None
    deploy_levels = ()       # levels the deploy benchmark compares by default
    # A per-target baseline trains one model per level: the config key of the level it trained
    # (topk, num_bits, width_factor); its own point of the paper's curves is that level.
    target_key: Optional[str] = None
    # cuDNN autotuning times every kernel for each new input shape; off where almost every
    # step meets new shapes (slimmable widths, LEC's slimmed networks).
    cudnn_benchmark = True

    # -- class-level knowledge: keys, flags, levels, validation --------------------------
    @classmethod
    def config_keys(cls) -> dict[str, Key]:
        """Every key of this method's config: the common ones, then the setting's and its own."""
        return {**COMMON_KEYS, **collect(cls, "own_keys")}

    @classmethod
    def flags(cls) -> dict[str, Flag]:
        """{flag name: Flag} of the setting and the method (the setting's parser adds the flags
        of all its methods)."""
        return {flag.name: flag for klass in reversed(cls.__mro__) for flag in klass.__dict__.get("own_flags", ())}

    @classmethod
    def has_key(cls, key: str) -> bool:
        return key in cls.config_keys()

    @classmethod
    def evaluation_keys(cls) -> set[str]:
        return {key for klass in cls.__mro__ for key in klass.__dict__.get("own_evaluation_keys", ())}

    @classmethod
    def uses_flag(cls, flag: Flag) -> bool:
        return flag.name not in cls.refused_flags and set(flag.keys) <= set(cls.config_keys())

    @classmethod
    def file_keys(cls) -> dict[str, Key]:
        """Keys a YAML file or checkpoint config may hold for this method (legacy ones included)."""
        return {**cls.config_keys(), **collect(cls, "legacy_keys")}

    @classmethod
    def flag_values(cls, args: argparse.Namespace, siblings: dict[str, type[Method]],
                    skip: Iterable[str] = ()) -> list[tuple[str, Any, str]]:
        """[(key, value, source)] from the flags given in `args` (but those in `skip`, which the
        caller maps itself); ConfigError for a flag this method does not use (naming the
        `siblings` of the setting that do)."""
        entries = []
        for flag in cls.setting_flags(siblings).values():
            value = getattr(args, flag.dest, None)
            if value is None or flag.name in skip:
                continue
            cls.check_flag_used(flag, siblings)
            entries += [(key, v, flag.name) for key, v in flag.values(value).items()]
        return entries

    @classmethod
    def setting_flags(cls, siblings: dict[str, type[Method]]) -> dict[str, Flag]:
        flags = {}
        for method in siblings.values():
            flags.update(method.flags())
        return flags

    @classmethod
    def check_flag_used(cls, flag: Flag, siblings: dict[str, type[Method]]) -> None:
        if flag.name in cls.refused_flags:
            raise ConfigError(f"{flag.name}: {cls.refused_flags[flag.name]}")
        if not cls.uses_flag(flag):
            users = [name for name, method in siblings.items() if method.uses_flag(flag)]
            raise ConfigError(f"{flag.name}: not used by --method {cls.name} (only by {', '.join(users)})")

    @classmethod
    def upgrade(cls, values: dict[str, Any], sources: dict[str, str]) -> None:
        """Convert keys of earlier versions (legacy_keys) in merged config values, in place."""

    @classmethod
    def complete(cls, config: Config) -> None:
        """Fill values that follow from others (after merging, before validation)."""

    @classmethod
    def level_range(cls, config: Config) -> LevelRange:
        """The LevelRange of this method for `config`."""
        raise NotImplementedError

    @classmethod
    def bn_at_evaluation(cls, config: Config) -> BNAtEvaluation:
        """How the BN statistics of an evaluated network are made (default: running statistics)."""
        return BNAtEvaluation()

    @classmethod
    def warmup_iterations_for(cls, config: Config, num_train: int) -> Optional[int]:
        """The warmup in training steps for `num_train` training images (None: no warmup)."""
        return None

    @classmethod
    def norm_groups(cls, config: Config) -> int:
        """GroupNorm groups of the networks this method builds (32 where GN is not used)."""
        return 32

    @classmethod
    def validate(cls, config: Config, checks: Checks) -> None:
        """Every check of this setting and method; ConfigError (via `checks`) on the first failure."""
        for key, spec in collect(cls, "own_keys").items():
            checks.require(not spec.required or getattr(config, key) is not None, key,
                           f"{cls.setting}/{cls.name} needs '{key}' (set it in the YAML or with its flag)")
        checks.require(config.norm in cls.norms, "norm", f"{cls.setting}/{cls.name} takes {' or '.join(cls.norms)}, "
                                                         f"got {config.norm}")
        cls.validate_setting(config, checks)
        grid = config.eval_param_grid
        checks.require(isinstance(grid, list) and len(grid) > 0, "eval_param_grid", "the evaluation grid is empty")
        checks.require(len(grid) <= MAX_GRID_POINTS, "eval_param_grid",
                       f"at most {MAX_GRID_POINTS} values, got {len(grid)}")
        levels = cls.level_range(config)
        for value in grid:
            checks.require(value in levels, "eval_param_grid",
                           f"{cls.setting}/{cls.name} evaluates {levels.describe()}, got {value}")

    @classmethod
    def check_export_level(cls, config: Config, level: float) -> None:
        """ConfigError naming --level when `level` lies outside what this method's checkpoints
        of `config` can export (asked before torch is imported, and by export_point)."""
        levels = cls.level_range(config)
        if level not in levels:
            raise ConfigError(f"--level {level:g}: {cls.setting}/{cls.name} checkpoints export {levels.describe()}")

    @classmethod
    def validate_setting(cls, config: Config, checks: Checks) -> None:
        """Checks of the setting's and method's own keys, before the grid is checked against
        the level range (which may be built from them)."""

    # -- the strategy ---------------------------------------------------------------------
    def __init__(self, config: Config, warmup_iterations: Optional[int] = None):
        self.config = config
        self.warmup_iterations = warmup_iterations

    def layer_factory(self) -> LayerFactory:
        raise NotImplementedError

    def bind(self, model: torch.nn.Module) -> None:
        """Called once with the built model (before training or evaluation)."""

    def train_levels(self, step: int, generator: torch.Generator) -> list[Level]:
        """The Levels of the forward passes of one training step (one per forward)."""
        raise NotImplementedError

    def apply_levels(self, model: torch.nn.Module, level: Level) -> None:
        """Set a Level on the model before a forward pass."""
        from models.layers import set_level
        set_level(model, level)

    def distinct_train_levels(self) -> Optional[int]:
        """How many different level settings training runs (None: a new one at almost every
        step). torch.compile builds a graph per setting, so --compile needs a small number."""
        return None

    def regularizer(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """An extra loss term for this step, or None."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        """Gradient edits between backward and the optimiser step."""

    # -- levels, evaluation and export ------------------------------------------------------
    def alpha_of(self, level: float) -> Optional[float]:
        """The line coordinate of a level (LCS+L only; None for every other method)."""
        return None

    def eval_points(self) -> list[EvalPoint]:
        unit = self.level_unit.type
        return [EvalPoint(level=unit(v), alpha=self.alpha_of(unit(v))) for v in self.config.eval_param_grid]

    def eval_levels(self, point: EvalPoint, step: Optional[int]) -> Level:
        """The Level of the layers for an evaluation point at training step `step`."""
        raise NotImplementedError

    def eval_model(self, model: torch.nn.Module, point: EvalPoint) -> tuple[torch.nn.Module, dict]:
        """The network to evaluate at `point` and extra metrics (LEC slims it)."""
        return model, {}

    def compression_metrics(self, model: torch.nn.Module, input_size: int) -> dict:
        """Metrics of the model at its current level (sparsity, bits, MACs, ...)."""
        return {}

    def export_point(self, level: float) -> EvalPoint:
        """The EvalPoint of an export level, or ConfigError naming --level when the level lies
        outside what this method's checkpoints can export."""
        self.check_export_level(self.config, level)
        level = self.level_unit.type(level)
        return EvalPoint(level=level, alpha=self.alpha_of(level))

    def export_level(self, point: EvalPoint) -> Level:
        """The Level of the layers at which an export is taken (the level of its final evaluation)."""
        return self.eval_levels(point, step=None)


class LineMethod:
    """LCS+L: two endpoints per line layer and the cos^2 penalty between them (SPEC 3.7).
    Alpha lives only here: a level (in the setting's unit) maps to alpha with alpha_of()."""

    line = True
    own_keys = {"beta": Key("float?", 1.0, "weight of the cos^2 line penalty")}
    legacy_keys = {"alpha_grid": Key("floats?", None, "LCS+L evaluation grid in alpha (before level units)",
                                     replaces="eval_param_grid")}
    # Regularise the conv weights on the line (unstructured, quantized) or the norm gammas
    # (structured, where only the norms are on the line).
    regularize_norms = False

    def regularizer(self, model):
        import torch.nn as nn

        pairs = []
        for module in model.modules():
            if getattr(module, "weight1", None) is None:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)) or self.regularize_norms:
                pairs.append((module.weight, module.weight1))
        if not pairs:
            return None
        return self.config.beta * cosine_squared(pairs)

    @classmethod
    def upgrade(cls, values, sources):
        """Configs written before grids were in level units hold `alpha_grid`: its levels."""
        if "alpha_grid" not in values:
            return
        alphas, source = values.pop("alpha_grid"), sources.pop("alpha_grid")
        if alphas is not None and "eval_param_grid" not in values:
            values["eval_param_grid"] = [cls.level_of_alpha(alpha, values) for alpha in alphas]
            sources["eval_param_grid"] = source

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.non_negative("beta", config.beta)


class WarmupMethod(Method):
    """Settings with a warmup (unstructured: the TopK decay; quantized: activations unquantized)
    and GroupNorm. Their networks are evaluated with their BN running statistics: the
    structured setting's flags for re-estimating them are accepted only to be refused."""

    own_flags = (Flag("--bn_calibration_images", ("bn_calibration_images",), argparse.SUPPRESS, type=int),
                 Flag("--lec_test_batch_statistics", ("lec_test_batch_statistics",), argparse.SUPPRESS,
                      switch=True))

    @classmethod
    def check_flag_used(cls, flag, siblings):
        if flag.name in ("--bn_calibration_images", "--lec_test_batch_statistics"):
            raise ConfigError(f"{flag.name}: only train_structured.py re-estimates BN statistics; {cls.setting} "
                              f"networks are evaluated with their running statistics")
        super().check_flag_used(flag, siblings)

    own_keys = {
        "warmup_budget": Key("float?", 80.0, "percent of all iterations (unstructured, quantized)", required=False),
        "num_groups": Key("int?", None, "GroupNorm groups (32; min(C, groups) per layer)", required=False),
    }

    @classmethod
    def complete(cls, config):
        super().complete(config)
        if config.norm == "GN" and config.num_groups is None:
            config.num_groups = 32

    @classmethod
    def warmup_iterations_for(cls, config, num_train):
        budget = config.warmup_budget
        return warmup_iterations(budget, config.epochs, num_train, config.batch_size) if budget else None

    @classmethod
    def norm_groups(cls, config):
        return config.num_groups or 32

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.require(config.warmup_budget is not None, "warmup_budget", "must be a percentage in (0, 100], got null")
        checks.in_range("warmup_budget", config.warmup_budget, 0, 100, low_open=True,
                        what="the warmup budget (percent)")
        if config.norm == "GN":
            # Every norm of the three networks has a power-of-two channel count.
            groups = config.num_groups
            checks.require(groups >= 1 and groups & (groups - 1) == 0, "num_groups",
                           f"must be a power of two (it must divide the channel counts), got {groups}")

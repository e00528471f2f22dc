"""The run configuration: typed keys, each declared once by its owner, and the checks on them.

The keys every run has are declared here (COMMON_KEYS); a setting or method declares its own
keys (`Method.own_keys`) with their type, default and meaning. A Config holds exactly the keys
of its setting and method, so an unknown key is refused wherever a config is read.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional

from utils.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """A config key: `kind` is its YAML type (int, float, bool, str, floats, ints; a trailing
    '?' allows null), `default` its value when neither YAML, file nor flag sets it."""

    kind: str
    default: Any = None
    doc: str = ""
    required: bool = True  # a method's key must not be null once merged (common keys are checked one by one)
    replaces: Optional[str] = None  # a legacy key: the key it stands for (set by a file, it overrides that key)

    def accepts(self, value):
        return _type_ok(self.kind, value)

    def describe_kind(self):
        return KIND_WORDS[self.kind.rstrip("?")]


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "floats": "a list of numbers", "ints": "a list of integers", "map": "a mapping of names to values"}


def _type_ok(kind, value):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        return optional
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "map":
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if kind in ("floats", "ints"):
        return isinstance(value, list) and all(_type_ok(kind[:-1], v) for v in value)
    raise AssertionError(kind)


COMMON_KEYS = {
    "model": Key("str", "cpreresnet20", "cpreresnet20, resnet18 or vgg19; or torchvision.<builder>, timm.<name>, "
                                         "package.module:callable (converted, see docs/own_network.md)"),
    "model_kwargs": Key("map?", None, "arguments of a converted network's builder (e.g. width_mult: 0.5)"),
    "init_from": Key("str?", None, "weights of the unconverted network to start from (a state_dict file)"),
    "dataset": Key("str", "cifar10", "cifar10 or imagenet"),
    "norm": Key("str", None, "IN, BN or GN"),
    "epochs": Key("int", 200),
    "batch_size": Key("int", 128, "global batch (split over processes under torchrun)"),
    "test_freq": Key("int", 20, "evaluate and checkpoint every N epochs"),
    "learning_rate": Key("float", 0.01),
    "momentum": Key("float", 0.9),
    "weight_decay": Key("float", 5e-4),
    "save_root": Key("str", "saved_models", "<save_root>/<method>/<model>/<dataset>/<norm> is the default save_dir"),
    "save_dir": Key("str?"),
    "eval_param_grid": Key("floats?", None, "evaluation grid in the setting's level unit"),
    "data_dir": Key("str", "./data"),
    "imagenet_dir": Key("str?"),
    "image_size": Key("int?", None, "ImageNet crop size (224)"),
    "seed": Key("int", 0),
    "device": Key("str", "auto"),
    "num_workers": Key("int?"),
    "train_subset": Key("int?"),
    "test_subset": Key("int?"),
    "data_pipeline": Key("str", "auto", "auto, tensor or dataloader"),
    "amp": Key("bool", False),
    "channels_last": Key("bool", False),
    "compile": Key("bool", False),
    "threads": Key("int?", None, "CPU threads per process (null: chosen at start, see --threads)"),
    "eval_at_start": Key("bool", True, "evaluate the grid before the first training step (epoch 0)"),
    "run_id": Key("str?", None, "the run's identity, new at each run's start (engine.run_dir), kept in its "
                                "checkpoints"),
    "tensorboard": Key("bool", False, "TensorBoard curves in <save_dir>/tensorboard (engine/board.py)"),
}


class Config:
    """A resolved run configuration: `setting`, `method` and one attribute per key of
    `keys` (COMMON_KEYS plus the method's). `to_dict()` is what config.yaml and checkpoints
    hold."""

    def __init__(self, setting, method, keys, values=None):
        self.__dict__["_keys"] = dict(keys)
        self.__dict__.update(setting=setting, method=method)
        for key, spec in keys.items():
            self.__dict__[key] = spec.default
        for key, value in (values or {}).items():
            setattr(self, key, value)

    def __setattr__(self, key, value):
        assert key in self._keys or key in ("setting", "method"), f"{key!r} is not a key of this config"
        self.__dict__[key] = value

    def get(self, key, default=None):
        """The value of `key`, or `default` for a key this setting and method do not have."""
        return self.__dict__[key] if key in self._keys else default

    def has(self, key):
        return key in self._keys

    def replaced(self, **changes):
        """A copy with some values changed."""
        values = {key: value for key, value in self.to_dict().items() if key not in ("setting", "method")}
        return Config(self.setting, self.method, self._keys, {**values, **changes})

    def to_dict(self):
        return {"setting": self.setting, "method": self.method, **{key: self.__dict__[key] for key in self._keys}}

    def __eq__(self, other):
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Config({self.to_dict()})"

    @property
    def input_size(self):
        return 32 if self.dataset == "cifar10" else self.image_size


class Checks:
    """Validation helpers whose errors name where a value came from (a flag, a file and key,
    or the key itself): one line, the bad value and what is allowed."""

    def __init__(self, sources):
        self.sources = sources

    def source(self, key):
        return self.sources.get(key, f"'{key}'")

    def given_as_flag(self, key):
        return self.sources.get(key) == f"--{key}"

    def require(self, condition, key, message):
        if not condition:
            raise ConfigError(f"{self.source(key)}: {message}")

    def in_range(self, key, value, low, high, low_open=False, what="values"):
        ok = isinstance(value, (int, float)) and (low < value if low_open else low <= value) and value <= high
        bracket = "(" if low_open else "["
        self.require(ok, key, f"{what} must be in {bracket}{low}, {high}], got {value}")

    def non_negative(self, key, value):
        self.require(value is None or (math.isfinite(value) and value >= 0), key,
                     f"must be a finite number >= 0, got {value}")

"""Property test: random flags and random --config files never crash the parsers.

Every command line either validates into a config the training code can use, or fails with a
usage error: a UserError with exit status 2 and a one-line message, or argparse's one-line
error and SystemExit(2). Any other exception is a validation gap. Runs in-process
(training_params.parse) with a fixed hypothesis seed, so CI sees the same examples each time.
"""

import argparse
import contextlib
import io
import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

import training_params
from methods import METHODS
from utils.errors import UserError

SETTINGS = tuple(training_params.SCRIPTS)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])



@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """An existing directory, a YAML file and a missing path (the parsers only look at them)."""
    root = tmp_path_factory.mktemp("fuzz_flags")
    (root / "dir").mkdir()
    (root / "file.yaml").write_text("epochs: 3\n")
    return {"root": str(root), "dir": str(root / "dir"), "file": str(root / "file.yaml"),
            "missing": str(root / "missing")}

# Mostly plausible values, sometimes garbage: the plausible ones reach the validator, whose
# combinations are where gaps hide.
GARBAGE = st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "1e-4", "abc", "", "1,2", "0x10", "1_000"])
INTEGERS = st.one_of(st.integers(1, 300).map(str), st.integers(-3, 300).map(str), st.sampled_from(["3", "8"]),
                     GARBAGE)
FLOATS = st.one_of(st.floats(0, 1).map(repr), st.floats(-2, 120, allow_nan=False).map(repr),
                   st.sampled_from(["0.5", "1", "80", "1e-4"]), st.floats().map(repr), GARBAGE)
LIST_ITEMS = st.one_of(st.floats(0, 1), st.sampled_from([0.25, 0.5, 1.0]), st.integers(3, 8),
                       st.floats(-0.5, 1.5, allow_nan=False), st.integers(0, 10), st.sampled_from(["nan", "x", ""]))
LISTS = st.one_of(st.lists(LIST_ITEMS, min_size=1, max_size=4).map(lambda items: ",".join(map(str, items))),
                  GARBAGE)
PATH_FLAGS = {"imagenet_dir", "data_dir", "save_dir", "config", "checkpoint", "resume"}


def value_strategy(action, places):
    """Values for one flag, from what its argparse action accepts (plus mistakes)."""
    if action.choices:
        return st.one_of(st.sampled_from(list(action.choices)), st.sampled_from(["bogus", ""]))
    if action.dest in PATH_FLAGS:
        return st.sampled_from([places["dir"], places["file"], places["missing"], "", "./data"])
    if action.type is int:
        return INTEGERS
    if action.type is float:
        return FLOATS
    if action.type is not None:  # comma-separated lists
        return LISTS
    return st.text(max_size=8)


def flag_strategy(setting, places):
    """Lists of (flag, value or None) pairs over every flag of the setting's parser."""
    options = []
    for action in training_params.build_parser(setting)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            options.append(st.just([flag]))
        elif action.nargs == "?":
            options.append(st.one_of(st.just([flag]), value_strategy(action, places).map(lambda v, f=flag: [f, v])))
        else:
            options.append(value_strategy(action, places).map(lambda v, f=flag: [f, v]))
    return st.lists(st.one_of(options), max_size=4).map(lambda pairs: [item for pair in pairs for item in pair])


def parse_outcome(setting, argv):
    """('ok', config) or ('usage', message) for a command line; any other exception propagates."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            config, _ = training_params.parse(setting, argv)
    except SystemExit as stop:
        assert stop.code == 2, (argv, stop.code)
        return "usage", stderr.getvalue()
    except UserError as error:
        assert error.exit_code == 2, (argv, error)
        return "usage", str(error)
    return "ok", config


def check_outcome(seen, outcome, value):
    """A valid config must be usable, a usage error must be one line."""
    seen[outcome] += 1
    if outcome == "ok":
        assert_usable(value)
    else:
        lines = value.strip().splitlines()
        assert len(lines) == 1 and ": " in lines[0], value


def assert_usable(config):
    """What the training code relies on, checked independently of the validator."""
    assert config.epochs >= 1 and config.batch_size >= 1 and config.test_freq >= 1
    assert math.isfinite(config.learning_rate) and config.learning_rate >= 0
    assert 0 <= config.momentum < 1 and math.isfinite(config.weight_decay) and config.weight_decay >= 0
    assert 0 <= config.seed < 2**32 and config.num_workers >= 0
    assert config.save_dir
    assert os.path.isdir(config.data_dir) or os.path.normpath(config.data_dir) == "data"
    if config.get("warmup_budget") is not None:
        assert 0 < config.warmup_budget <= 100
    method = METHODS[config.setting][config.method](config, warmup_iterations=10)
    method.layer_factory()
    levels = method.train_levels(0, torch.Generator().manual_seed(0))
    assert levels
    for point in method.eval_points():
        method.eval_levels(point, 0)
        if config.setting == "quantized":
            assert 3 <= point.level <= 8
        else:
            assert 0 < point.level <= 1


@pytest.mark.parametrize("setting", SETTINGS)
def test_random_flags_validate_or_fail_with_a_usage_error(setting, places):
    seen = {"ok": 0, "usage": 0}

    @FUZZ
    @given(argv=flag_strategy(setting, places))
    def check(argv):
        check_outcome(seen, *parse_outcome(setting, argv))

    check()
    assert seen["ok"] > 0 and seen["usage"] > 0, seen  # the examples reach both outcomes


YAML_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(),
                        st.text(max_size=6), st.lists(st.floats(-0.5, 1.5), max_size=4),
                        st.lists(st.integers(0, 10), max_size=4), st.sampled_from(["1e-4", "lcs_l", "IN"]))
NAMES = {"model": ["cpreresnet20", "resnet18", "vgg19"], "dataset": ["cifar10", "imagenet"], "norm": ["IN", "BN", "GN"],
         "device": ["auto", "cpu"], "data_pipeline": ["auto", "tensor", "dataloader"],
         "width_factor_sampling_method": ["sandwich", "point"],
         "method": sorted({m for s in METHODS.values() for m in s}),
         "setting": list(SETTINGS)}


def plausible_value(key, a_dir):
    """A value of the key's type, in or near its usual range."""
    if key in NAMES:
        return st.sampled_from(NAMES[key])
    keys = training_params.all_keys()
    kind = keys[key].kind if key in keys else "str"
    base = {"int": st.integers(1, 300), "float": st.one_of(st.floats(0, 1), st.sampled_from([80.0, 1.0e-4])),
            "bool": st.booleans(), "str": st.sampled_from([a_dir, "runs"]),
            "floats": st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.25, 0.5, 1.0])), min_size=1, max_size=4),
            "ints": st.lists(st.integers(3, 8), min_size=1, max_size=4),
            "map": st.dictionaries(st.sampled_from(["width_mult", "dropout", "num_classes", "not a name"]),
                                   st.one_of(st.floats(0, 1), st.booleans(), st.text(max_size=5)), max_size=2),
            }[kind.rstrip("?")]
    return st.one_of(base, st.none()) if kind.endswith("?") else base


def yaml_entries(setting, a_dir):
    """Up to three keys, mostly ones the setting's default method reads, with plausible or
    arbitrary values."""
    keys = st.one_of(st.sampled_from(sorted(training_params.allowed_keys(setting, "lcs_l"))),
                     st.sampled_from(sorted(training_params.all_keys()) + ["bogus_key", "setting", "method"]))
    entry = keys.flatmap(lambda key: st.one_of(plausible_value(key, a_dir), YAML_VALUES)
                         .map(lambda value: (key, value)))
    return st.lists(entry, max_size=3).map(dict)


@pytest.mark.parametrize("setting", SETTINGS)
def test_random_config_files_validate_or_fail_with_a_usage_error(setting, places):
    seen = {"ok": 0, "usage": 0}
    path = os.path.join(places["root"], f"{setting}.yaml")

    @FUZZ
    @given(entries=yaml_entries(setting, places["dir"]))
    def check(entries):
        with open(path, "w") as handle:
            yaml.safe_dump(entries, handle)
        check_outcome(seen, *parse_outcome(setting, ["--config", path, "--data_dir", places["dir"],
                                                     "--save_dir", os.path.join(places["root"], "run")]))

    check()
    assert seen["ok"] > 0 and seen["usage"] > 0, seen

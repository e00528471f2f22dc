"""Each method owns its knowledge: flags, keys, grid, level range and export resolution come
from the method's class, and a new method plugs in with its class, its YAML and one registry
entry (here a method defined in this file, registered for the test only)."""

import os
import shutil

import pytest
import yaml

import training_params
from cli_helpers import micro_cifar  # noqa: F401 (a fixture)
from cli_helpers import assert_ok, read_metrics, run_script
from deploy.compressed import export_model, resolve_level, uncompressed_level
from methods import METHODS, SETTINGS
from methods.base import Flag, LevelRange
from methods.config import Key
from methods.structured import StructuredMethod
from models import build_model
from models.factory import LayerFactory
from models.layers import Level, set_level
from utils import checkpoint as ckpt
from utils.errors import ConfigError

REGISTRY = [(setting, name) for setting, methods in METHODS.items() for name in methods]
IDS = [f"{s}-{n}" for s, n in REGISTRY]
# A value argparse accepts for each flag type (the method decides whether it may use it).
SAMPLE_VALUES = {"float": "0.5", "int": "4", "list": "4"}


def default_method(setting, name, warmup=100):
    config, _ = training_params.parse(setting, ["--method", name])
    return METHODS[setting][name](config, warmup)


def flag_argv(flag):
    """The flag with a value argparse accepts (the method decides whether it may use it)."""
    return [flag.name] if flag.switch else [flag.name, SAMPLE_VALUES[getattr(flag.type, "__name__", "float")]]


@pytest.mark.parametrize("setting, name", REGISTRY, ids=IDS)
def test_flags_come_from_the_method(setting, name):
    cls = METHODS[setting][name]
    assert (cls.setting, cls.name) == (setting, name) and issubclass(cls, SETTINGS[setting])
    parser_flags = {option for action in training_params.build_parser(setting)._actions
                    for option in action.option_strings}
    for flag in SETTINGS[setting].setting_flags(METHODS[setting]).values():
        assert flag.name in parser_flags
        if cls.uses_flag(flag):
            assert set(flag.keys) <= set(cls.config_keys())
            continue
        with pytest.raises(ConfigError) as error:
            training_params.parse(setting, ["--method", name, *flag_argv(flag)])
        assert str(error.value).startswith(f"{flag.name}: "), str(error.value)
    for flag in cls.flags().values():
        assert flag.name in parser_flags


@pytest.mark.parametrize("setting, name", REGISTRY, ids=IDS)
def test_yaml_grid_and_levels_come_from_the_method(setting, name):
    cls = METHODS[setting][name]
    with open(training_params.method_yaml_path(setting, name)) as handle:
        assert set(yaml.safe_load(handle)) <= set(cls.config_keys())
    method = default_method(setting, name)
    levels = cls.level_range(method.config)
    grid = method.config.eval_param_grid
    assert grid and all(value in levels for value in grid)
    points = method.eval_points()
    assert [p.level for p in points] == grid                         # in the setting's unit, as given
    assert all(type(p.level) is cls.level_unit.type for p in points)
    assert all((p.alpha is None) == (method.alpha_of(p.level) is None) for p in points)
    assert all(isinstance(method.eval_levels(p, 0), Level) for p in points)


@pytest.mark.parametrize("setting, name", REGISTRY, ids=IDS)
def test_export_resolution_comes_from_the_method(setting, name):
    method = default_method(setting, name)
    levels = method.level_range(method.config)
    assert uncompressed_level(method) == levels.high
    level, alpha = resolve_level(method, levels.high)
    assert isinstance(level, Level) and alpha == method.alpha_of(method.level_unit.type(levels.high))
    model = build_model("cpreresnet20", method.layer_factory(), 10)
    set_level(model, level)                            # the layers take it
    for outside in (levels.high + 1, levels.low - 0.5):
        with pytest.raises(ConfigError, match=f"--level {outside:g}: {setting}/{name} checkpoints export"):
            resolve_level(method, outside)


def test_a_misspelt_level_field_is_an_error():
    model = build_model("cpreresnet20", LayerFactory(norm_kind="BN", body="slim"), 10)
    with pytest.raises(TypeError):
        set_level(model, width_factr=0.5)
    with pytest.raises(TypeError):
        Level(width_factr=0.5)


# -- a method defined here plugs in ------------------------------------------------------------------
class ThinWidth(StructuredMethod):
    """Trains one slimmable network at `thin_width` and evaluates widths up to it."""

    name = "thin_width"
    own_keys = {"thin_width": Key("float?", 0.3, "the width trained")}
    own_flags = (Flag("--thin_width", ("thin_width",), "the width trained (thin_width)", type=float),)

    @classmethod
    def level_range(cls, config):
        return LevelRange(0, config.thin_width, "width factors", low_open=True, note="at most thin_width")

    def train_levels(self, step, generator):
        return [Level(width_factor=self.config.thin_width)]


@pytest.fixture
def thin_width(tmp_path, monkeypatch):
    """ThinWidth registered (one entry in the registry) with its YAML, for this test only."""
    configs = tmp_path / "configs"
    shutil.copytree(training_params.CONFIG_ROOT, configs)
    (configs / "structured_sparsity" / "thin_width.yaml").write_text(
        "norm: BN\nlearning_rate: 0.1\nthin_width: 0.5\neval_param_grid: [0.5, 0.25]\n")
    monkeypatch.setattr(training_params, "CONFIG_ROOT", str(configs))
    monkeypatch.setitem(METHODS["structured_sparsity"], "thin_width", ThinWidth)
    return ThinWidth


def test_a_new_method_plugs_in(thin_width, micro_cifar, tmp_path):
    setting = "structured_sparsity"
    help_text = training_params.build_parser(setting).format_help()
    assert "thin_width" in help_text and "--thin_width" in help_text
    config, _ = training_params.parse(setting, ["--method", "thin_width", "--thin_width", "0.4",
                                                "--eval_width_factors", "0.4,0.2"])
    assert (config.thin_width, config.eval_param_grid, config.norm) == (0.4, [0.4, 0.2], "BN")
    with pytest.raises(ConfigError, match=r"--thin_width: not used by --method us \(only by thin_width\)"):
        training_params.parse(setting, ["--method", "us", "--thin_width", "0.4"])
    with pytest.raises(ConfigError, match=r"--eval_width_factors: .* \(0, 0.5\] \(at most thin_width\), got 0.9"):
        training_params.parse(setting, ["--method", "thin_width", "--eval_width_factors", "0.9"])
    # trains, evaluates and records its grid with the setting's loop and files
    save_dir = tmp_path / "run"
    assert_ok(run_script("train_structured.py", "--method", "thin_width", "--data_dir", micro_cifar,
                         "--epochs", 1, "--save_dir", save_dir))
    rows = read_metrics(save_dir)
    assert {(row["method"], row["level_name"]) for row in rows} == {("thin_width", "width_factor")}
    assert [row["level"] for row in rows if row["final"]] == [0.5, 0.25]
    # and exports through its level range
    payload = ckpt.load(os.path.join(save_dir, "model_final.pt"))
    content = export_model(payload, 0.25)
    assert (content["method"], content["level"], content["alpha"]) == ("thin_width", 0.25, None)
    assert content["widths"]["layer1.0.conv1"] == 4                 # round(16 * 0.25)
    with pytest.raises(ConfigError, match="--level 0.75: structured_sparsity/thin_width checkpoints export "
                                          "width factors in"):
        export_model(payload, 0.75)


def test_the_class_level_interface_is_annotated():
    """Every public classmethod of Method (its schema: keys, flags, levels, validation) says the
    types it takes and returns, resolvable without torch (methods/ imports it only to train)."""
    import inspect
    import typing

    from methods.base import Method

    classmethods = [name for name, value in vars(Method).items()
                    if isinstance(value, classmethod) and not name.startswith("_")]
    assert {"flag_values", "setting_flags", "complete", "validate_setting", "upgrade"} <= set(classmethods)
    for name in classmethods:
        function = getattr(Method, name)
        hints = typing.get_type_hints(function)
        parameters = [p for p in inspect.signature(function).parameters if p != "cls"]
        missing = [p for p in parameters + ["return"] if p not in hints]
        assert not missing, f"Method.{name}: no annotation for {missing}"

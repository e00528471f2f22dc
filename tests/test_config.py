"""training_params: merge order and flag mappings of SPEC 1.2, the per-model/per-dataset
table, the default save_dir, the config.yaml round trip and YAML errors."""

import os

import pytest
import yaml

from methods import METHODS
from training_params import parse
from utils.errors import ConfigError

REGISTRY = [(setting, name) for setting, methods in METHODS.items() for name in methods]
# Parsing only checks that the ImageNet directory exists; no data is read.
IMAGENET = ["--dataset", "imagenet", "--imagenet_dir", os.path.dirname(os.path.abspath(__file__))]


def config_of(setting, *argv):
    config, _ = parse(setting, list(argv))
    return config


def write(tmp_path, text, name="extra.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- merge order: YAML < per-model/dataset table < --config file < flags ---------------------------
def test_yaml_values():
    c = config_of("unstructured_sparsity")
    assert (c.method, c.norm, c.learning_rate, c.epochs, c.warmup_budget) == ("lcs_l", "GN", 0.1, 200, 80)
    assert c.alpha_sampling == [0.025, 1.0, 0.5]
    assert c.num_groups == 32
    assert config_of("quantized", "--method", "target_bit_width").num_bits == 6


def test_table_overrides_the_yaml_on_imagenet():
    c = config_of("unstructured_sparsity", "--model", "resnet18", *IMAGENET)
    # resnet18 / imagenet: 90 epochs, test every epoch, batch 128, momentum 0.9, weight decay 5e-5
    assert (c.epochs, c.test_freq, c.batch_size, c.momentum, c.weight_decay) == (90, 1, 128, 0.9, 5e-5)
    # learning rate and warmup budget are not in the table: the YAML values stay
    assert (c.learning_rate, c.warmup_budget) == (0.1, 80)
    q = config_of("quantized", "--model", "resnet18", *IMAGENET)
    assert (q.learning_rate, q.warmup_budget, q.epochs) == (0.025, 80, 90)


def test_vgg19_imagenet_batch_size():
    c = config_of("structured_sparsity", "--method", "us", "--model", "vgg19", *IMAGENET)
    assert (c.epochs, c.test_freq, c.batch_size, c.weight_decay) == (90, 1, 256, 5e-5)
    # on CIFAR-10 VGG19 gets the CIFAR defaults
    assert config_of("structured_sparsity", "--method", "us", "--model", "vgg19").batch_size == 128


def test_config_file_overrides_the_table_and_flags_override_the_file(tmp_path):
    path = write(tmp_path, "epochs: 7\nweight_decay: 1.0e-3\nlearning_rate: 0.5\n")
    c = config_of("unstructured_sparsity", "--model", "resnet18", *IMAGENET, "--config", path)
    assert (c.epochs, c.weight_decay, c.learning_rate) == (7, 1e-3, 0.5)
    assert c.test_freq == 1                                            # still from the table
    c = config_of("unstructured_sparsity", "--model", "resnet18", *IMAGENET, "--config", path,
                  "--epochs", "3", "--learning_rate", "0.2")
    assert (c.epochs, c.weight_decay, c.learning_rate) == (3, 1e-3, 0.2)


def test_flags_override_the_yaml():
    c = config_of("structured_sparsity", "--norm", "BN", "--batch_size", "32", "--momentum", "0.5",
                  "--weight_decay", "0.001", "--test_freq", "4", "--epochs", "12")
    assert (c.norm, c.batch_size, c.momentum, c.weight_decay, c.test_freq, c.epochs) == ("BN", 32, 0.5, 0.001, 4, 12)


# -- flag -> config mappings (SPEC 1.2) ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["lcs_l", "lcs_p"])
def test_topk_bounds_and_grid(method):
    c = config_of("unstructured_sparsity", "--method", method, "--topk_lower_bound", "0.005",
                  "--topk_upper_bound", "0.05", "--eval_topk_grid", "0.005,0.01,0.05")
    assert c.alpha_sampling == [0.005, 0.05, 0.5]
    assert c.eval_param_grid == [0.005, 0.01, 0.05]


def test_target_topk_flags():
    c = config_of("unstructured_sparsity", "--method", "target_topk", "--topk", "0.5", "--eval_topk_grid", "0.1,0.5",
                  "--warmup_budget", "50")
    assert (c.topk, c.eval_param_grid, c.warmup_budget) == (0.5, [0.1, 0.5], 50)


@pytest.mark.parametrize("flag", ["--eval_width_factors", "--list"])
def test_structured_lcs_l_grid_is_in_widths_and_alpha_stays_inside_the_method(flag):
    c = config_of("structured_sparsity", flag, "1.0,0.625,0.25")
    assert c.eval_param_grid == [1.0, 0.625, 0.25] and not c.has("alpha_grid")
    assert [p.alpha for p in METHODS[c.setting][c.method](c).eval_points()] == pytest.approx([1.0, 0.5, 0.0])
    c = config_of("structured_sparsity", "--width_factor_limits", "0.5,1.0", flag, "1.0,0.75,0.5")
    assert c.width_factor_limits == [0.5, 1.0]
    assert [p.alpha for p in METHODS[c.setting][c.method](c).eval_points()] == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize("method", ["us", "lcs_p", "ns"])
def test_structured_widths_stay_widths(method):
    c = config_of("structured_sparsity", "--method", method, "--eval_width_factors", "1.0,0.5")
    assert c.eval_param_grid == [1.0, 0.5]


def test_structured_sampling_flags():
    c = config_of("structured_sparsity", "--method", "us", "--width_factor_limits", "0.5,1.0",
                  "--width_factor_samples", "6", "--eval_width_factors", "1.0,0.5")
    assert (c.width_factor_limits, c.width_factor_samples) == ([0.5, 1.0], 6)
    c = config_of("structured_sparsity", "--method", "ns", "--width_factors_list", "1.0,0.5")
    assert c.width_factors_list == [1.0, 0.5]


@pytest.mark.parametrize("limits, alphas", [
    ("3,8", [0.166, 0.333, 0.499, 0.666, 0.833, 1.0]),   # the original's grid (SPEC 2.3)
    ("4,6", [0.333, 0.666, 1.0]),
    ("3,4", [0.499, 1.0]),
])
def test_quantized_lcs_l_bit_width_limits(limits, alphas):
    c = config_of("quantized", "--bit_width_limits", limits)
    low, high = map(int, limits.split(","))
    assert (c.min_bits, c.max_bits) == (low, high)
    assert c.eval_param_grid == list(range(low, high + 1))       # every bit width of the range
    assert [p.alpha for p in METHODS[c.setting][c.method](c).eval_points()] == alphas


def test_quantized_lcs_l_eval_bit_widths_stay_bit_widths():
    assert config_of("quantized", "--eval_bit_widths", "3,5,8").eval_param_grid == [3, 5, 8]
    c = config_of("quantized", "--bit_width_limits", "4,6", "--eval_bit_widths", "4,6")
    assert c.eval_param_grid == [4, 6]


def test_quantized_lcs_p_limits_and_grid():
    c = config_of("quantized", "--method", "lcs_p", "--bit_width_limits", "4,6")
    assert (c.min_bits, c.max_bits, c.eval_param_grid) == (4, 6, [4, 5, 6])
    c = config_of("quantized", "--method", "lcs_p", "--bit_width_limits", "4,6", "--eval_bit_widths", "4,5")
    assert c.eval_param_grid == [4, 5]


def test_target_bit_width_flags():
    c = config_of("quantized", "--method", "target_bit_width", "--bit_width", "5", "--eval_bit_widths", "3,4")
    assert (c.num_bits, c.eval_param_grid) == (5, [3, 4])


# -- save_dir ---------------------------------------------------------------------------------------
def test_default_save_dir_rule():
    # <save root of the YAML>/<method>/<model>/<dataset>/<norm>
    assert config_of("unstructured_sparsity").save_dir == os.path.join(
        "saved_models", "unstructured_sparsity", "lcs_l", "cpreresnet20", "cifar10", "GN")
    assert config_of("structured_sparsity", "--method", "us", "--norm", "IN").save_dir == os.path.join(
        "saved_models", "structured_sparsity", "us", "cpreresnet20", "cifar10", "IN")
    assert config_of("quantized", "--method", "lcs_p", "--model", "resnet18", *IMAGENET).save_dir == os.path.join(
        "saved_models", "quantized", "lcs_p", "resnet18", "imagenet", "GN")


def test_save_dir_flag_is_used_as_given(tmp_path):
    assert config_of("quantized", "--save_dir", str(tmp_path / "run")).save_dir == str(tmp_path / "run")


# -- config.yaml round trip --------------------------------------------------------------------------
EXTRA_FLAGS = {
    "structured_sparsity": ["--epochs", "3", "--seed", "5", "--train_subset", "64"],
    "unstructured_sparsity": ["--epochs", "3", "--warmup_budget", "40", "--norm", "BN"],
    "quantized": ["--epochs", "3", "--learning_rate", "0.0001", "--norm", "IN"],
}


@pytest.mark.parametrize("setting, name", REGISTRY, ids=[f"{s}-{n}" for s, n in REGISTRY])
def test_config_yaml_round_trip(tmp_path, setting, name):
    config = config_of(setting, "--method", name, *EXTRA_FLAGS[setting])
    # written the way a run writes <save_dir>/config.yaml
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    path = write(tmp_path, text, "config.yaml")
    assert config_of(setting, "--config", path) == config


def test_imagenet_config_yaml_round_trip(tmp_path):
    config = config_of("quantized", "--method", "lcs_p", "--model", "resnet18", *IMAGENET, "--learning_rate", "1e-5")
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    assert "weight_decay: 5.0e-05" in text                   # a float PyYAML reads back as a float
    path = write(tmp_path, text, "config.yaml")
    assert config_of("quantized", "--config", path) == config


def test_config_file_of_another_setting_is_refused(tmp_path):
    config = config_of("quantized")
    path = write(tmp_path, yaml.safe_dump(config.to_dict()), "config.yaml")
    with pytest.raises(ConfigError, match="quantized"):
        config_of("structured_sparsity", "--config", path)


# -- YAML errors: one line naming the file and the key --------------------------------------------------
def config_error(tmp_path, text, setting="unstructured_sparsity", *argv):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        config_of(setting, *argv, "--config", path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(path)
    return message


def test_unknown_key(tmp_path):
    message = config_error(tmp_path, "learning_rte: 0.1\n")
    assert "unknown key 'learning_rte'" in message


def test_key_not_used_by_the_method(tmp_path):
    message = config_error(tmp_path, "topk: 0.5\n", "structured_sparsity")
    assert "'topk'" in message and "structured_sparsity/lcs_l" in message
    message = config_error(tmp_path, "warmup_budget: 50\n", "structured_sparsity")
    assert "'warmup_budget'" in message


def test_number_written_as_1e_minus_4_is_explained(tmp_path):
    message = config_error(tmp_path, "weight_decay: 1e-4\n")
    assert "'weight_decay'" in message and "1.0e-4" in message


@pytest.mark.parametrize("text, key", [("epochs: ten\n", "epochs"), ("epochs: 2.5\n", "epochs"),
                                       ("alpha_grid: 0.5\n", "alpha_grid"), ("beta: [1.0]\n", "beta"),
                                       ("epochs: true\n", "epochs")])
def test_wrong_type(tmp_path, text, key):
    message = config_error(tmp_path, text)
    assert f"'{key}'" in message and "must be" in message


@pytest.mark.parametrize("text, line", [("epochs: 3\nmomentum: 0.9: 1\n", 2),
                                        ("epochs: 3\nmomentum: 0.9\n\tweight_decay: 1\n", 3)])
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, line):
    message = config_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'extra.yaml'}:{line}: YAML syntax error")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config_of("quantized", "--config", str(tmp_path / "absent.yaml"))

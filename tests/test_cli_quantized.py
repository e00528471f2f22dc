"""train_quantized.py end to end on tiny image folders: every method x norm, the three models,
evaluations before and after the activation delay, --help and the refused values (issue 4)."""

import pytest

from cli_helpers import micro_cifar  # noqa: F401 (a fixture)
from cli_helpers import (COMMON_SPEC_FLAGS, NEW_FLAGS, acceptance_args, assert_help_documents, assert_ok,
                         assert_refused, check_run, evaluations, read_config, run_script, run_subprocess)

SCRIPT = "train_quantized.py"
SETTING = "quantized"
BITS = [3, 4, 5, 6, 7, 8]
# configs/quantized/lcs_l.yaml (SPEC 2.3); 0.499 lies in [2/6, 3/6]: 5 bits.
YAML_ALPHAS = [0.166, 0.333, 0.499, 0.666, 0.833, 1.0]
DEFAULT_NORM = {"lcs_l": "GN", "lcs_p": "GN", "target_bit_width": "BN"}
SPEC_FLAGS = COMMON_SPEC_FLAGS + ("--bit_width", "--eval_bit_widths", "--bit_width_limits", "--warmup_budget")


def assert_not_degenerate(rows):
    """Inputs are not all mapped to the same logits. The original's pre-warmup evaluation fed
    zeros to every quantized conv: every input then gets the same logits, independent of the
    bit width, so all levels report one loss (this check fails for every method here when
    the layer is made to do that). For lcs_l the level also moves the point on the line, so
    the check is sharpest before training, when the endpoints' norm parameters agree."""
    assert len({round(row["loss"], 9) for row in rows}) > 1, [row["loss"] for row in rows]


def test_script_runs_lcs_l_and_writes_its_outputs(micro_cifar, tmp_path):
    """The real script as a child process: the default method and norm, its whole grid. The
    one training step comes before the end of the warmup (W = ceil(0.8 * 20 / 128) = 1), so
    both evaluations run with unquantized activations."""
    save_dir = tmp_path / "run"
    result = run_subprocess(SCRIPT, *acceptance_args("lcs_l", micro_cifar, save_dir))
    assert_ok(result)
    rows = check_run(save_dir, setting=SETTING, method="lcs_l", norm="GN", levels=BITS, alphas=YAML_ALPHAS)
    for group in evaluations(rows):
        assert all(row["act_quant"] is False for row in group)
        assert_not_degenerate(group)
    assert "Final evaluation" in result.stdout


@pytest.mark.parametrize("method, norm", [("lcs_l", "BN"), ("lcs_l", "IN"), ("lcs_p", "GN"), ("lcs_p", "BN"),
                                          ("lcs_p", "IN"), ("target_bit_width", "GN"),
                                          ("target_bit_width", "BN"), ("target_bit_width", "IN")])
def test_every_method_and_norm(micro_cifar, tmp_path, method, norm):
    """The acceptance command for every method x norm: the YAML's grid with the method's
    default norm, 3 and 8 bits with the others."""
    save_dir = tmp_path / "run"
    if norm == DEFAULT_NORM[method]:
        extra, levels = (), BITS
    else:
        extra, levels = ("--norm", norm, "--eval_bit_widths", "3,8"), [3, 8]
    assert_ok(run_script(SCRIPT, *acceptance_args(method, micro_cifar, save_dir), *extra))
    alphas = None
    if method == "lcs_l":  # --eval_bit_widths maps to the alphas of SPEC 1.2's grid rule
        alphas = [0.166, 1.0] if extra else YAML_ALPHAS
    rows = check_run(save_dir, setting=SETTING, method=method, norm=norm, levels=levels, alphas=alphas)
    for group in evaluations(rows):
        assert_not_degenerate(group)
    assert all(("bn_stats" in row) == (norm == "BN") for row in rows)


@pytest.mark.parametrize("method", ["lcs_l", "lcs_p", "target_bit_width"])
def test_evaluations_before_and_after_the_activation_delay(micro_cifar, tmp_path, method):
    """20 images in batches of 10 for 2 epochs, warmup 50 %: W = ceil(0.5 * 2 * 20 / 10) = 2
    steps. The evaluations at epochs 0 and 1 (after 0 and 2 steps) come before any step with
    quantized activations; the final one (after 4 steps) after."""
    save_dir = tmp_path / "run"
    result = run_script(SCRIPT, "--method", method, "--data_dir", micro_cifar, "--epochs", 2, "--test_freq", 1,
                        "--batch_size", 10, "--warmup_budget", 50, "--eval_bit_widths", "3,8",
                        "--save_dir", save_dir)
    assert_ok(result)
    rows = check_run(save_dir, setting=SETTING, method=method, norm=DEFAULT_NORM[method], levels=[3, 8],
                     alphas=[0.166, 1.0] if method == "lcs_l" else None, evaluated_epochs=(0, 1, 2))
    groups = evaluations(rows)
    assert [group[0]["step"] for group in groups] == [0, 2, 4]
    assert [[row["act_quant"] for row in group] for group in groups] == [[False, False], [False, False],
                                                                         [True, True]]
    for group in groups:
        assert_not_degenerate(group)
    assert "unquantized (before warmup end)" in result.stdout


@pytest.mark.parametrize("model, method, data", [
    ("resnet18", "lcs_l", "imagenet"),
    ("vgg19", "target_bit_width", "imagenet"),
    ("vgg19", "lcs_p", "cifar10"),
])
def test_other_models(micro_cifar, tiny_imagenet, tmp_path, model, method, data):
    """ResNet18 (40x40) and VGG19 (32x32) on ImageNet-layout images, VGG19 on CIFAR-10 too. The bit
    range 4..6 gives lcs_l the alpha grid 1/3, 2/3, 1 and lcs_p the evaluation grid 4, 5, 6
    (SPEC 1.2)."""
    save_dir = tmp_path / "run"
    if data == "imagenet":
        # ResNet18 needs more than 32 pixels: its last feature map must exceed 1x1.
        size = 40 if model == "resnet18" else 32
        data_args = ("--dataset", "imagenet", "--imagenet_dir", tiny_imagenet, "--image_size", size)
    else:
        data_args = ("--data_dir", micro_cifar)
    grid_args = ("--eval_bit_widths", "3,8") if method == "target_bit_width" else ("--bit_width_limits", "4,6")
    result = run_script(SCRIPT, "--method", method, "--model", model, *data_args, "--epochs", 1,
                        "--batch_size", 8, "--train_subset", 8, "--test_subset", 8, "--num_workers", 0,
                        *grid_args, "--save_dir", save_dir)
    assert_ok(result)
    levels = [3, 8] if method == "target_bit_width" else [4, 5, 6]
    rows = check_run(save_dir, setting=SETTING, method=method, norm=DEFAULT_NORM[method], levels=levels,
                     alphas=[0.333, 0.666, 1.0] if method == "lcs_l" else None, model=model, dataset=data,
                     num_images=8)
    for group in evaluations(rows):
        assert_not_degenerate(group)
    if method != "target_bit_width":
        assert (read_config(save_dir)["min_bits"], read_config(save_dir)["max_bits"]) == (4, 6)


def test_help_documents_every_flag():
    assert_help_documents(SCRIPT, SPEC_FLAGS + NEW_FLAGS)


@pytest.mark.parametrize("args, flag", [
    (("--method", "target_bit_width", "--bit_width", "9"), "--bit_width"),
    (("--method", "target_bit_width", "--bit_width", "4.5"), "--bit_width"),
    (("--bit_width_limits", "8,3"), "--bit_width_limits"),
    (("--bit_width_limits", "3"), "--bit_width_limits"),
    (("--method", "lcs_p", "--bit_width_limits", "3,7.5"), "--bit_width_limits"),
    (("--method", "lcs_p", "--eval_bit_widths", "3.5,8"), "--eval_bit_widths"),
])
def test_refused_values(micro_cifar, tmp_path, args, flag):
    assert_refused(SCRIPT, args, flag, micro_cifar, tmp_path / "run")


def test_script_refuses_a_bad_value_in_one_line(micro_cifar, tmp_path):
    result = assert_refused(SCRIPT, ("--bit_width_limits", "8,3"), "--bit_width_limits", micro_cifar,
                            tmp_path / "run", runner=run_subprocess)
    assert result.returncode == 2

"""train_unstructured.py end to end on tiny image folders: every method x norm, the three
models, the outputs, --help and the refused values (issue 3)."""

import math

import pytest

from cli_helpers import micro_cifar  # noqa: F401 (a fixture)
from cli_helpers import (COMMON_SPEC_FLAGS, NEW_FLAGS, acceptance_args, assert_help_documents, assert_ok,
                         assert_refused, check_run, evaluations, read_config, run_script, run_subprocess)

SCRIPT = "train_unstructured.py"
SETTING = "unstructured_sparsity"
# SPEC 2.1: the 14-value TopK grid of lcs_l (alpha) and lcs_p, and target_topk's 9 values.
TOPK_GRID = [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
TARGET_TOPK_GRID = [0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
DEFAULT_NORM = {"lcs_l": "GN", "lcs_p": "GN", "target_topk": "BN"}
README_EXAMPLE = ("--topk_lower_bound", "0.005", "--topk_upper_bound", "0.05",
                  "--eval_topk_grid", "0.005,0.01,0.02,0.03,0.04,0.05")
SPEC_FLAGS = COMMON_SPEC_FLAGS + ("--topk", "--topk_lower_bound", "--topk_upper_bound", "--warmup_budget",
                                  "--eval_topk_grid")

# cPreResNet20 conv weights, by hand from SPEC 3.12: per bottleneck (C_in, planes) a 1x1
# C_in -> planes, a 3x3 planes -> planes, a 1x1 planes -> 4 planes and, in the first block of
# a stage, a 1x1 C_in -> 4 planes down-sampling conv; the stem (3 -> 16, 3x3) and the
# classifier (256 -> 10) stay dense.
BLOCKS = [(16, 16, True), (64, 16, False), (64, 32, True), (128, 32, False), (128, 64, True), (256, 64, False)]
BODY_CONVS = [n for c, p, down in BLOCKS for n in [c * p, 9 * p * p, 4 * p * p] + ([c * 4 * p] if down else [])]
ALL_CONV_WEIGHTS = sum(BODY_CONVS) + 3 * 16 * 9 + 256 * 10


def topk_sparsity(k):
    """SPEC 3.3: each body conv zeroes floor((1 - k) * numel) weights; sparsity is the zeros
    over all conv weights (0.9615 at k = 0.025 and 0.4931 at 0.5, as SPEC measured)."""
    return sum(math.floor((1 - k) * n) for n in BODY_CONVS) / ALL_CONV_WEIGHTS


def test_hand_count_matches_the_spec_figures():
    assert topk_sparsity(0.025) == pytest.approx(0.9615, abs=5e-5)
    assert topk_sparsity(0.5) == pytest.approx(0.4931, abs=5e-5)
    assert topk_sparsity(1.0) == 0


def assert_sparsity_at_topk(rows, topk_of_level):
    for row in rows:
        assert row["sparsity"] == pytest.approx(topk_sparsity(topk_of_level(row["level"])), abs=2e-5)


def test_script_runs_lcs_l_and_writes_its_outputs(micro_cifar, tmp_path):
    """The real script as a child process: the default method and norm, the whole alpha grid.
    One step of 20 images with warmup_budget 80 % gives W = ceil(0.8 * 20 / 128) = 1."""
    save_dir = tmp_path / "run"
    result = run_subprocess(SCRIPT, *acceptance_args("lcs_l", micro_cifar, save_dir))
    assert_ok(result)
    rows = check_run(save_dir, setting=SETTING, method="lcs_l", norm="GN", levels=TOPK_GRID, alphas=TOPK_GRID)
    before, final = evaluations(rows)
    # Step 0: the warmup decay k = alpha + (1 - alpha) * (1 - t/W) is 1 at every alpha.
    assert all(row["effective_topk"] == 1.0 for row in before)
    assert_sparsity_at_topk(before, lambda level: 1.0)
    # After the warmup k = alpha.
    assert [row["effective_topk"] for row in final] == pytest.approx(TOPK_GRID)
    assert_sparsity_at_topk(final, lambda level: level)
    assert "Final evaluation" in result.stdout


@pytest.mark.parametrize("method, norm", [("lcs_l", "BN"), ("lcs_l", "IN"), ("lcs_p", "GN"), ("lcs_p", "BN"),
                                          ("lcs_p", "IN"), ("target_topk", "GN"), ("target_topk", "BN"),
                                          ("target_topk", "IN")])
def test_every_method_and_norm(micro_cifar, tmp_path, method, norm):
    """The acceptance command for every method x norm: the YAML's grid with the method's
    default norm, three levels with the others. One step: W = 1 (see above)."""
    save_dir = tmp_path / "run"
    if norm == DEFAULT_NORM[method]:
        extra, grid = (), TARGET_TOPK_GRID if method == "target_topk" else TOPK_GRID
    else:
        extra, grid = ("--norm", norm, "--eval_topk_grid", "0.025,0.5,1.0"), [0.025, 0.5, 1.0]
    assert_ok(run_script(SCRIPT, *acceptance_args(method, micro_cifar, save_dir), *extra))
    rows = check_run(save_dir, setting=SETTING, method=method, norm=norm, levels=grid,
                     alphas=grid if method == "lcs_l" else None)
    before, final = evaluations(rows)
    if method == "lcs_p":  # no decay: evaluated at the grid's TopK even during the warmup
        assert_sparsity_at_topk(rows, lambda level: level)
    else:  # decayed from 1 (step 0) to the grid value (after W = 1 step)
        assert_sparsity_at_topk(before, lambda level: 1.0)
        assert_sparsity_at_topk(final, lambda level: level)
    assert all(("bn_stats" in row) == (norm == "BN") for row in rows)


def test_readme_example_lcs_p_with_bounds(micro_cifar, tmp_path):
    save_dir = tmp_path / "run"
    assert_ok(run_script(SCRIPT, *acceptance_args("lcs_p", micro_cifar, save_dir), *README_EXAMPLE))
    grid = [0.005, 0.01, 0.02, 0.03, 0.04, 0.05]
    rows = check_run(save_dir, setting=SETTING, method="lcs_p", norm="GN", levels=grid)
    assert_sparsity_at_topk(rows, lambda level: level)
    # SPEC 1.2: the bounds become alpha_sampling = [lower, upper, 0.5].
    assert read_config(save_dir)["alpha_sampling"] == [0.005, 0.05, 0.5]


@pytest.mark.parametrize("model, method, data, grid", [
    ("resnet18", "lcs_l", "imagenet", [0.05, 1.0]),
    ("vgg19", "target_topk", "imagenet", [0.05, 1.0]),
    ("vgg19", "lcs_l", "cifar10", [1.0]),
])
def test_other_models(micro_cifar, tiny_imagenet, tmp_path, model, method, data, grid):
    """ResNet18 (40x40) and VGG19 (32x32) on ImageNet-layout images, VGG19 on CIFAR-10 too. One step
    of 8 images with warmup_budget 80 %: W = ceil(0.8 * 8 / 8) = 1, so the step trains at
    k = 1 and the final evaluation is at k = level. (Few TopK levels below 1: each sorts the
    weights of every layer, millions for these networks.)"""
    save_dir = tmp_path / "run"
    if data == "imagenet":
        # ResNet18 needs more than 32 pixels: its last feature map must exceed 1x1.
        size = 40 if model == "resnet18" else 32
        data_args = ("--dataset", "imagenet", "--imagenet_dir", tiny_imagenet, "--image_size", size)
    else:
        data_args = ("--data_dir", micro_cifar)
    result = run_script(SCRIPT, "--method", method, "--model", model, *data_args, "--epochs", 1,
                        "--batch_size", 8, "--train_subset", 8, "--test_subset", 8, "--num_workers", 0,
                        "--eval_topk_grid", ",".join(map(str, grid)), "--save_dir", save_dir)
    assert_ok(result)
    rows = check_run(save_dir, setting=SETTING, method=method, norm=DEFAULT_NORM[method], levels=grid,
                     alphas=grid if method == "lcs_l" else None, model=model, dataset=data, num_images=8)
    before, final = evaluations(rows)
    assert all(row["sparsity"] == 0 for row in before)  # step 0: k decayed to 1
    for row in final:
        if row["level"] == 1.0:
            assert row["sparsity"] == 0
        else:  # 95 % of every body conv pruned; the dense stem and classifier weigh little
            assert 0.9 < row["sparsity"] < 0.95


def test_help_documents_every_flag():
    entries = assert_help_documents(SCRIPT, SPEC_FLAGS + NEW_FLAGS)
    # The lower bound is the sparse, efficient end (the original's help had it reversed).
    assert "sparse" in entries["--topk_lower_bound"] and "dense" in entries["--topk_upper_bound"]


@pytest.mark.parametrize("args, flag", [
    (("--topk_lower_bound", "-0.1", "--topk_upper_bound", "0.5", "--eval_topk_grid", "0.5"), "--topk_lower_bound"),
    (("--topk_lower_bound", "0.1", "--topk_upper_bound", "1.5", "--eval_topk_grid", "0.5"), "--topk_upper_bound"),
    (("--topk_lower_bound", "0.5", "--topk_upper_bound", "0.1", "--eval_topk_grid", "0.5"), "--topk_lower_bound"),
    (("--topk_lower_bound", "0.1", "--topk_upper_bound", "0.5"), "--eval_topk_grid"),
    (("--eval_topk_grid", "0,0.5"), "--eval_topk_grid"),
    (("--eval_topk_grid", "0.5,1.5"), "--eval_topk_grid"),
    (("--method", "target_topk", "--topk", "0"), "--topk"),
    (("--method", "target_topk", "--topk", "1.5"), "--topk"),
])
def test_refused_values(micro_cifar, tmp_path, args, flag):
    assert_refused(SCRIPT, args, flag, micro_cifar, tmp_path / "run")


def test_script_refuses_a_bad_value_in_one_line(micro_cifar, tmp_path):
    result = assert_refused(SCRIPT, ("--method", "target_topk", "--topk", "1.5"), "--topk", micro_cifar,
                            tmp_path / "run", runner=run_subprocess)
    assert result.returncode == 2

"""train_structured.py end to end on tiny image folders: every method, the three models, the
outputs, --help and the refused values (issue 2)."""

import pytest
import torch

from cli_helpers import micro_cifar  # noqa: F401 (a fixture)
from cli_helpers import (COMMON_SPEC_FLAGS, NEW_FLAGS, acceptance_args, assert_help_documents, assert_ok,
                         assert_refused, check_run, evaluations, run_script, run_subprocess)

from deploy.compressed import export_model, load_exported, save_export, training_model
from utils import checkpoint as ckpt
from utils.errors import ConfigError

SCRIPT = "train_structured.py"
SETTING = "structured_sparsity"
WIDTHS = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25]
# configs/structured_sparsity/lcs_l.yaml evaluates these widths at alpha = (w - 0.25) / 0.75.
LCS_L_ALPHAS = [(w - 0.25) / 0.75 for w in WIDTHS]
# SPEC 3.4: cPreResNet20 structured sparsity at the widths above (measured on the original).
SPEC_SPARSITY = [0.0, 0.2329, 0.4349, 0.6061, 0.7465, 0.8561, 0.9349]
LEC_FRACTIONS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
SPEC_FLAGS = COMMON_SPEC_FLAGS + ("--width_factors_list", "--width_factor_limits", "--width_factor_samples",
                                  "--eval_width_factors", "--width_factor")


def assert_spec_sparsity(rows):
    for row in rows:
        assert row["sparsity"] == pytest.approx(SPEC_SPARSITY[WIDTHS.index(row["level"])], abs=6e-5)


def test_script_runs_lcs_l_and_writes_its_outputs(micro_cifar, tmp_path):
    """The real script as a child process: the default method, its whole grid."""
    save_dir = tmp_path / "run"
    result = run_subprocess(SCRIPT, *acceptance_args("lcs_l", micro_cifar, save_dir))
    assert_ok(result)
    assert "Traceback" not in result.stderr
    rows = check_run(save_dir, setting=SETTING, method="lcs_l", norm="IN", levels=WIDTHS, alphas=LCS_L_ALPHAS)
    assert_spec_sparsity(rows)
    assert "Final evaluation" in result.stdout


@pytest.mark.parametrize("method, norm", [("lcs_p", "IN"), ("us", "BN"), ("ns", "BN")])
def test_slimmable_methods_evaluate_the_width_grid(micro_cifar, tmp_path, method, norm):
    save_dir = tmp_path / "run"
    assert_ok(run_script(SCRIPT, *acceptance_args(method, micro_cifar, save_dir)))
    rows = check_run(save_dir, setting=SETTING, method=method, norm=norm, levels=WIDTHS)
    assert_spec_sparsity(rows)
    # BN models report the running-statistics analysis of SPEC 3.11; IN models have none.
    assert all(("bn_stats" in row) == (norm == "BN") for row in rows)


def test_lcs_l_with_batchnorm(micro_cifar, tmp_path):
    """Structured lcs_l with --norm BN (the original crashed, SPEC 4.5): a line BN."""
    save_dir = tmp_path / "run"
    assert_ok(run_script(SCRIPT, *acceptance_args("lcs_l", micro_cifar, save_dir), "--norm", "BN"))
    rows = check_run(save_dir, setting=SETTING, method="lcs_l", norm="BN", levels=WIDTHS, alphas=LCS_L_ALPHAS)
    assert_spec_sparsity(rows)
    assert all("bn_stats" in row for row in rows)


def test_lec_prunes_by_global_gamma_threshold(micro_cifar, tmp_path):
    save_dir = tmp_path / "run"
    assert_ok(run_script(SCRIPT, *acceptance_args("lec", micro_cifar, save_dir)))
    rows = check_run(save_dir, setting=SETTING, method="lec", norm="BN", levels=LEC_FRACTIONS)
    before, final = evaluations(rows)
    # Epoch 0: every gamma is 1, none is strictly above the threshold, so at every fraction
    # each norm keeps only its one-channel floor (the original crashed here, SPEC 3.5).
    assert all(row["channel_floor_applied"] for row in before)
    assert all(row["sparsity"] == pytest.approx(1 - floor_only_parameters() / 220_384, abs=1e-9) for row in before)
    # After training: keeping more channels never raises the sparsity.
    sparsity = [row["sparsity"] for row in final]
    assert sparsity == sorted(sparsity, reverse=True)
    assert 0 < sparsity[-1] < 1e-3  # fraction 1.0 still drops the smallest channel, as the original


def test_target_width_trains_one_width_and_exports_it(micro_cifar, tmp_path):
    """target_width: one network trained at --width_factor, evaluated at that width (its YAML
    grid), exported there as a dense network with the same outputs."""
    save_dir = tmp_path / "run"
    assert_ok(run_script(SCRIPT, *acceptance_args("target_width", micro_cifar, save_dir)))
    rows = check_run(save_dir, setting=SETTING, method="target_width", norm="BN", levels=[0.5])
    assert_spec_sparsity(rows)
    assert all("bn_stats" in row for row in rows)
    payload = ckpt.load(str(save_dir / "model_final.pt"))
    content = export_model(payload, 0.5)
    assert (content["level_name"], content["level"], content["alpha"]) == ("width_factor", 0.5, None)
    assert content["widths"]["layer1.0.conv1"] == 8 and content["widths"]["layer3.0.conv3"] == 128
    with pytest.raises(ConfigError, match="at most the trained width_factor"):
        export_model(payload, 0.75)
    # the exported network computes what the trained one computes at its width
    out = tmp_path / "half.pt"
    save_export(str(out), content)
    model, method = training_model(payload, "model_final.pt")
    method.apply_levels(model, method.eval_levels(method.eval_points()[0], step=None))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_exported(str(out))(images), model(images), atol=1e-5)


@pytest.mark.parametrize("args, width, grid", [
    (("--width_factor", "0.25"), 0.25, [0.25]),                     # the width trained is the width evaluated
    (("--width_factor", "0.75", "--eval_width_factors", "0.75,0.5"), 0.75, [0.75, 0.5]),
])
def test_target_width_flags(args, width, grid):
    from training_params import parse

    config, _ = parse(SETTING, ["--method", "target_width", *args])
    assert (config.width_factor, config.eval_param_grid) == (width, grid)


def floor_only_parameters():
    """Parameters of cPreResNet20 slimmed to one channel per norm (resprune rules, SPEC 3.5):
    per bottleneck, bn1 kept whole with its selection (3 * C_in), conv1 1 -> 1, bn2 and bn3
    one channel each (2 + 2), conv2 3x3 1 -> 1 (9), conv3 1 -> 4 * planes, the down-sampling
    conv whole (C_in * 4 * planes); plus the stem conv (3 * 16 * 9), the final norm with its
    selection (3 * 256) and the classifier 1 -> 10."""
    blocks = [(16, 16, True), (64, 16, False), (64, 32, True), (128, 32, False), (128, 64, True),
              (256, 64, False)]  # (C_in, planes, has a down-sampling conv)
    body = sum(3 * c + 1 + 4 + 9 + 4 * p + (c * 4 * p if down else 0) for c, p, down in blocks)
    return body + 3 * 16 * 9 + 3 * 256 + 10


@pytest.mark.parametrize("model, method, data", [
    ("resnet18", "lcs_l", "imagenet"),
    ("vgg19", "us", "imagenet"),
    ("vgg19", "lec", "cifar10"),
])
def test_other_models(micro_cifar, tiny_imagenet, tmp_path, model, method, data):
    """ResNet18 and VGG19 on small ImageNet-layout images, VGG19 (with LEC) on CIFAR-10 too.
    ResNet18 gets 64x64 inputs: at 32x32 its last feature map is 1x1, where InstanceNorm
    (the lcs_l default) is undefined (refused, see test_refused_values)."""
    save_dir = tmp_path / "run"
    if data == "imagenet":
        size = 64 if model == "resnet18" else 32
        data_args = ("--dataset", "imagenet", "--imagenet_dir", tiny_imagenet, "--image_size", size)
    else:
        data_args = ("--data_dir", micro_cifar)
    # --list is the original's alias of --eval_width_factors (lec has no width grid).
    grid = ("--list", "1.0,0.25") if method != "lec" else ()
    result = run_script(SCRIPT, "--method", method, "--model", model, *data_args, "--epochs", 1,
                        "--batch_size", 8, "--test_subset", 8, "--num_workers", 0, *grid, "--save_dir", save_dir)
    assert_ok(result)
    norm = "IN" if method == "lcs_l" else "BN"
    levels = LEC_FRACTIONS if method == "lec" else [1.0, 0.25]
    alphas = [1.0, 0.0] if method == "lcs_l" else None
    rows = check_run(save_dir, setting=SETTING, method=method, norm=norm, levels=levels, alphas=alphas,
                     model=model, dataset=data, num_images=8)
    final = evaluations(rows)[-1]
    if method == "lec":
        sparsity = [row["sparsity"] for row in final]
        assert sparsity == sorted(sparsity, reverse=True) and sparsity[0] > sparsity[-1]
    else:
        full, quarter = final
        assert full["sparsity"] == pytest.approx(0.0, abs=1e-9)
        assert 0.85 < quarter["sparsity"] < 1.0  # about 1 - 0.25^2, first/last layers aside


def test_help_documents_every_flag():
    entries = assert_help_documents(SCRIPT, SPEC_FLAGS + NEW_FLAGS)
    # --list is listed as another name of --eval_width_factors.
    assert entries["--list"] == entries["--eval_width_factors"]


def test_list_alias_sets_the_evaluation_widths():
    from training_params import parse

    by_alias, _ = parse(SETTING, ["--method", "us", "--list", "1.0,0.5"])
    by_name, _ = parse(SETTING, ["--method", "us", "--eval_width_factors", "1.0,0.5"])
    assert by_alias.eval_param_grid == by_name.eval_param_grid == [1.0, 0.5]


@pytest.mark.parametrize("args, flag", [
    (("--norm", "GN"), "--norm"),
    (("--method", "lec", "--norm", "IN"), "--norm"),
    (("--method", "lec", "--eval_width_factors", "1.0,0.5"), "--eval_width_factors"),
    (("--warmup_budget", "50"), "--warmup_budget"),
    (("--eval_width_factors", "1.0,0.1"), "--eval_width_factors"),
    (("--method", "target_width", "--width_factor", "0.5", "--eval_width_factors", "0.75"), "--eval_width_factors"),
    (("--method", "target_width", "--width_factor", "1.5"), "--width_factor"),
    (("--method", "target_width", "--norm", "GN"), "--norm"),
    (("--method", "us", "--width_factor", "0.5"), "--width_factor"),
    # InstanceNorm (the lcs_l default) is undefined on resnet18's 1x1 last map at 32x32.
    (("--model", "resnet18", "--dataset", "imagenet", "--imagenet_dir", "unused", "--image_size", "32"),
     "--image_size"),
])
def test_refused_values(micro_cifar, tmp_path, args, flag):
    assert_refused(SCRIPT, args, flag, micro_cifar, tmp_path / "run")


def test_script_refuses_a_bad_value_in_one_line(micro_cifar, tmp_path):
    result = assert_refused(SCRIPT, ("--method", "ns", "--norm", "IN"), "--norm", micro_cifar, tmp_path / "run",
                            runner=run_subprocess)
    assert result.returncode == 2

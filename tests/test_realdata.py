"""Short CPU trainings on real CIFAR-10 (750-1,440 training images, 8-9 epochs): LCS+L of
each setting must beat chance (10 %) clearly at both ends of its compression range; and LEC
evaluated with re-estimated BN statistics must not be worse than with running statistics.

Each test runs its script once inside the test process (`training_params.main`, as the
scripts do; no interpreter and torch start-up to pay) on one CPU thread, evaluates only the
levels it asserts, only when it asserts them (`--no-eval_at_start`: the untrained network is
not evaluated, which changes nothing of the training), and on 1,000 test images (chance
accuracy 10 % +- 0.95 % standard error). The recipes were picked from short measurements on
this project's 2-core machine (about 60-125 s of CPU each):

* The LR schedule ramps up over 5 epochs (lr * (e + 1) / 5) and only then decays (cosine),
  so a 3-4 epoch run ends at its highest LR and is evaluated on a noisy iterate. 8-9 epochs
  over fewer images (the same CPU as 3 epochs over 2,000) end with the LR decaying
  (x 1.0, 0.75, 0.25 for the last three of 8 epochs) and a peak LR of 0.1 at batch 16:
  measured 21-29 % instead of 13-25 % (2,000 images, 3 epochs, batch 32, lr 0.25-0.4).
  Higher peak LRs (0.2, 0.4) and more images over 3 epochs measured lower here.
* LCS+L networks learn slowly at first (the original's unstructured LCS+L was at 45-49 %
  after 10 full CIFAR-10 epochs; even a dense network reached only 25 % with the old 3-epoch
  recipe). The thresholds sit below every value measured over seeds 0-2: about ten standard
  errors above chance for the sparsity settings, five for the quantized one.
"""

import subprocess
import sys

import pytest

from cli_helpers import assert_ok, evaluations, read_metrics, run_script
from conftest import REPO

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TEST_IMAGES = 1000
# Re-estimated BN statistics may trail running statistics by at most this accuracy (5 of the
# LEC test's 500 images); the smallest gain measured was 1.6 points.
MARGIN = 0.01
COMMON = ("--test_subset", TEST_IMAGES, "--batch_size", 16, "--seed", 0)


def train(script, data_dir, save_dir, *args):
    """Run `script` on the real data; returns the rows of each evaluation."""
    result = run_script(script, "--data_dir", data_dir, *COMMON, *args, "--save_dir", save_dir)
    assert_ok(result)
    groups = evaluations(read_metrics(save_dir))
    assert all(row["num_images"] == TEST_IMAGES for group in groups for row in group)
    return groups


def accuracies(group):
    return {row["level"]: row["accuracy"] for row in group}


def test_structured_lcs_l_beats_chance_at_full_and_quarter_width(real_cifar, tmp_path):
    """800 images, 8 epochs of 50 steps, the sandwich reduced to its two ends (the widths
    asserted; half the CPU of the default four widths per step).

    --norm BN instead of the default IN: with IN before the global pooling, cPreResNet20 stays
    near chance for the first few hundred steps (measured here: 13 % at width 1.0 after 3 epochs
    with batch 16 and lr up to 0.3); BN learns from the first steps. Measured over seeds 0, 1, 2:
    28.5, 25.2, 28.0 % at width 1.0 and 21.1, 23.0, 25.8 % at width 0.25."""
    groups = train("train_structured.py", real_cifar, tmp_path / "run", "--method", "lcs_l", "--norm", "BN",
                   "--train_subset", 800, "--epochs", 8, "--test_freq", 8, "--learning_rate", 0.1,
                   "--width_factor_samples", 2, "--eval_width_factors", "1.0,0.25", "--no-eval_at_start")
    final = accuracies(groups[-1])
    assert set(final) == {1.0, 0.25}
    assert all(accuracy >= 0.19 for accuracy in final.values()), final


def test_unstructured_lcs_l_beats_chance_dense_and_at_5_percent(real_cifar, tmp_path):
    """750 images, 8 epochs of 47 steps; the TopK warmup over the first half (warmup_budget 50
    instead of 80: W = 188 of 376 steps), so the final evaluation is at k = alpha. GN (the
    YAML's): BN measured no better here (18.9 and 21.8 % for seed 0 with lr 0.2). Measured over
    seeds 0, 1, 2: 23.7, 21.7, 21.6 % at k = 0.05 and 22.8, 21.4, 21.8 % dense."""
    groups = train("train_unstructured.py", real_cifar, tmp_path / "run", "--method", "lcs_l",
                   "--train_subset", 750, "--epochs", 8, "--test_freq", 8, "--learning_rate", 0.1,
                   "--warmup_budget", 50, "--eval_topk_grid", "0.05,1.0", "--no-eval_at_start")
    final = groups[-1]
    assert [row["effective_topk"] for row in final] == pytest.approx([0.05, 1.0])
    accuracy = accuracies(final)
    assert all(value >= 0.20 for value in accuracy.values()), accuracy


def test_quantized_lcs_l_beats_chance_before_and_after_the_activation_delay(real_cifar, tmp_path):
    """1,440 images, 9 epochs of 90 steps; warmup_budget 78 gives W = ceil(0.78 * 810) = 632
    steps, just past the seventh epoch. The evaluation at epoch 7 (after 630 steps) therefore
    has weights quantized and activations not; the final one follows two epochs (LR x 0.5,
    0.15) with quantized activations. Measured over seeds 0, 1, 2 (3 / 8 bits): before the
    delay 23.1, 17.2, 19.4 % and 24.3, 19.6, 18.7 %; after it 19.6, 20.9, 24.7 % and 26.0,
    23.0, 25.5 % (about 125 s of CPU per run).

    Twice the images of the other two tests: with 720 images (80 s of CPU) the lowest value
    over the same seeds was 14.4 %, since activation quantization costs accuracy that a few
    low-LR steps over few images do not win back. Also measured no better at 720 images:
    lr 0.05 (14.4-21.3 %), 576 images over 11 epochs (13.6-24.1 %), BN (diverged at lr 0.1
    for seed 0; 12.5-19.7 % for seed 1)."""
    groups = train("train_quantized.py", real_cifar, tmp_path / "run", "--method", "lcs_l",
                   "--train_subset", 1440, "--epochs", 9, "--test_freq", 7, "--learning_rate", 0.1,
                   "--warmup_budget", 78, "--eval_bit_widths", "3,8", "--no-eval_at_start")
    before, after = groups
    assert [row["epoch"] for row in (before[0], after[0])] == [7, 9]
    assert all(row["act_quant"] is False for row in before)
    assert all(row["act_quant"] is True for row in after)
    for group in (before, after):
        accuracy = accuracies(group)
        assert set(accuracy) == {3, 8}
        assert all(value >= 0.15 for value in accuracy.values()), (group[0]["epoch"], accuracy)


def test_lec_re_estimated_bn_statistics_not_worse_than_running_statistics(real_cifar, tmp_path):
    """LEC, 384 images, 3 epochs of 12 steps (batch 32, lr 0.1), evaluated at kept fractions 0.9
    and 1.0 with BN statistics re-estimated on 256 training images; then the same final model
    with --eval_only --bn_calibration_images 0 (the unpruned network's running statistics), on
    the same 500 test images. A paired comparison: the model is the same, only the statistics
    differ.

    Measured (re-estimated vs running statistics, percent) over seeds 0, 1, 2: at 0.9 21.0 vs
    18.4, 17.0 vs 14.8, 20.2 vs 17.0; at 1.0 23.4 vs 21.2, 20.4 vs 18.8, 21.4 vs 19.8: gains of
    1.6-3.2 points (about 40 s of CPU for the training run, 17 s for the evaluation). With 512
    images and 2,048 calibration images (all 512 used) the gains were 1.0-4.2 at 0.9 and
    0.2-6.0 at 1.0, so the test allows re-estimation to trail by MARGIN (1 point) rather than
    asking for a gain."""
    save_dir = tmp_path / "run"
    grid = tmp_path / "grid.yaml"
    grid.write_text("eval_param_grid: [0.9, 1.0]\n")
    result = run_script("train_structured.py", "--method", "lec", "--data_dir", real_cifar, "--config", grid,
                        "--train_subset", 384, "--epochs", 3, "--test_freq", 3, "--batch_size", 32,
                        "--learning_rate", 0.1, "--test_subset", 500, "--bn_calibration_images", 256,
                        "--seed", 0, "--no-eval_at_start", "--save_dir", save_dir)
    assert_ok(result)
    result = run_script("train_structured.py", "--eval_only", "--checkpoint", save_dir / "model_final.pt",
                        "--bn_calibration_images", 0)
    assert_ok(result)
    rows = read_metrics(save_dir)
    calibrated = {row["level"]: row for row in rows if row["final"]}
    running = {row["level"]: row for row in rows if row["eval_only"]}
    assert set(calibrated) == set(running) == {0.9, 1.0}
    for level in (0.9, 1.0):
        assert calibrated[level]["bn_calibration_images"] == 256 and running[level]["bn_calibration_images"] == 0
        assert calibrated[level]["num_images"] == running[level]["num_images"] == 500
        assert calibrated[level]["accuracy"] >= running[level]["accuracy"] - MARGIN, (level, calibrated, running)


def test_the_default_start_of_run_evaluation_prints_each_level_as_it_finishes(real_cifar, tmp_path):
    """The README's default job on the real data (one short epoch here): after its two header
    lines it says what it evaluates, then prints each width's accuracy as that width is done
    (read from the live output while the process still runs), before any training step."""
    save_dir = tmp_path / "run"
    command = [sys.executable, "train_structured.py", "--data_dir", real_cifar, "--train_subset", "64",
               "--test_subset", "100", "--epochs", "1", "--save_dir", str(save_dir)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, running_at_first_level = [], None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if running_at_first_level is None and line.startswith("Test ("):
            running_at_first_level = process.poll() is None
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr[-3000:]
    assert running_at_first_level, "the first level's accuracy came only after the run had ended"
    assert lines[0].startswith("Device: cpu") and lines[1].startswith("Training loss shown")
    assert lines[2] == "Evaluating 7 levels (width_factor) at epoch 0 on 100 test images"
    start = [row for row in read_metrics(save_dir) if row["epoch"] == 0]
    assert len(start) == 7
    # One line per width, in the grid's order, each with the accuracy recorded for it.
    assert lines[3:10] == [f"Test (width_factor = {row['level']:g}, alpha = {row['alpha']:g}): loss {row['loss']:.4f} "
                           f"| accuracy {100 * row['accuracy']:.2f}% | sparsity {row['sparsity']:.4f}" for row in start]
    assert lines[10].startswith("epoch 1/1 ")


def test_init_from_a_plain_torchvision_resnet18_starts_at_its_accuracy(real_cifar, tmp_path):
    """A plain torchvision resnet18 (no conversion) trained briefly in plain PyTorch on the
    project's own CIFAR-10 stream, saved as a state_dict, then --init_from it with BN norms: at
    the uncompressed level the converted network gives the plain model's accuracy on the same
    1,000 test images (within 0.5 points at width 1.0 and TopK 1.0, 2 points at 8 bits, where the
    weights are quantized and the activations not yet). Evaluated with --eval_only, which gives
    there the numbers of a training run's start-of-run evaluation (checked on small data by
    tests/test_own_network.py) without its training step, final evaluation and checkpoints."""
    import torch
    import torchvision

    import training_params
    from data import build_data
    from inprocess import one_thread

    flags = ["--model", "torchvision.resnet18", "--norm", "BN", "--data_dir", real_cifar, "--seed", "0",
             "--test_subset", str(TEST_IMAGES)]
    config, _ = training_params.parse("structured_sparsity", [*flags, "--train_subset", "1000", "--batch_size", "32"])
    data = build_data(config, torch.device("cpu"), 0, 1)
    with one_thread():
        torch.manual_seed(0)
        plain = torchvision.models.resnet18(num_classes=10)
        # Two epochs over 1,000 images at lr 0.02: 19.7 % measured (over 2,000 images 26.3 %, for
        # twice the CPU; one epoch over 2,000: 17.3 %; one at lr 0.05: 11.5 %).
        optimizer = torch.optim.SGD(plain.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
        plain.train()
        for epoch in range(2):
            for images, labels in data.train.batches(epoch):
                torch.nn.functional.cross_entropy(plain(images), labels).backward()
                optimizer.step()
                optimizer.zero_grad()
        plain.eval()
        with torch.no_grad():
            correct = sum(int((plain(images).argmax(1) == labels).sum()) for images, labels in data.test.batches())
        plain_accuracy = 100.0 * correct / TEST_IMAGES
        weights = tmp_path / "resnet18_cifar.pt"
        torch.save(plain.state_dict(), weights)
        for script, grid, level, tolerance in (("train_structured.py", "--eval_width_factors", 1.0, 0.5),
                                               ("train_unstructured.py", "--eval_topk_grid", 1.0, 0.5),
                                               ("train_quantized.py", "--eval_bit_widths", 8, 2.0)):
            save_dir = tmp_path / script
            # --train_subset: the evaluation reads no training image, but the data is built as a run's.
            assert_ok(run_script(script, *flags, "--init_from", weights, grid, level, "--eval_only",
                                 "--train_subset", "16", "--save_dir", save_dir))
            [start] = read_metrics(save_dir)
            assert start["num_images"] == TEST_IMAGES and start["eval_only"] and start["level"] == level
            accuracy = 100.0 * start["accuracy"]
            print(f"{script}: plain {plain_accuracy:.1f} %, converted at {level}: {accuracy:.1f} %")
            assert abs(accuracy - plain_accuracy) <= tolerance, (script, accuracy, plain_accuracy)
    assert plain_accuracy > 15, plain_accuracy  # a model that learnt something, so the comparison means something

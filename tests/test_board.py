"""--tensorboard: the curves read back with TensorBoard's own reader (EventAccumulator).

A 2-epoch run stopped after its first epoch and resumed writes one log: the training loss and
learning rate at every step, accuracy and loss per level per evaluation (one tag per level,
its unit in the tag, the values of metrics.jsonl), the accuracy-vs-level figure per
evaluation; what an interrupted process wrote after its checkpoint is dropped on resume, so no
step appears twice. Without the tensorboard package: one line naming the requirements file.
"""

import signal
import sys

import pytest

from inprocess import one_thread, read_rows, run_script, signal_during_step  # noqa: F401

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is not installed (pip install -r "
                                               "requirements-tensorboard.txt)")

STEPS_PER_EPOCH = 4  # --train_subset 32 / --batch_size 8
FLAGS = ("--epochs", 2, "--test_freq", 1, "--batch_size", 8, "--train_subset", 32, "--test_subset", 16,
         "--eval_topk_grid", "0.5,1", "--seed", 3, "--threads", 1, "--tensorboard")


def read_board(save_dir):
    """{tag: [(step, value)]} of the scalars, and the steps of the figures."""
    accumulator = event_accumulator.EventAccumulator(str(save_dir / "tensorboard"),
                                                     size_guidance={event_accumulator.SCALARS: 0,
                                                                    event_accumulator.IMAGES: 0})
    accumulator.Reload()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    figures = [event.step for event in accumulator.Images("accuracy_vs_level")]
    return scalars, figures


def test_resumed_run_continues_one_log_without_duplicated_steps(tiny_cifar, tmp_path, capsys):
    save_dir = tmp_path / "run"
    flags = (*FLAGS, "--data_dir", tiny_cifar, "--save_dir", save_dir)
    with one_thread(), signal_during_step(STEPS_PER_EPOCH - 1, signal.SIGTERM):
        assert run_script("unstructured_sparsity", *flags) == 143
    # A process killed later than its checkpoint (step 4) had written steps 5 and 6.
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(save_dir / "tensorboard")) as stale:
        for step in (5, 6):
            stale.add_scalar("train/loss", 1e6, step)
    with one_thread():
        assert run_script("unstructured_sparsity", *flags, "--resume") == 0
    capsys.readouterr()

    scalars, figures = read_board(save_dir)
    steps = [step for step, _ in scalars["train/loss"]]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # every step once, in order
    assert all(value < 1e3 for _, value in scalars["train/loss"])
    assert [step for step, _ in scalars["train/learning_rate"]] == steps
    assert scalars["train/learning_rate"][0][1] != scalars["train/learning_rate"][-1][1]  # epoch 2's rate

    rows = read_rows(save_dir)  # evaluations at steps 0 (start), 4 (epoch 2) and 8 (final)
    assert sorted(tag for tag in scalars if not tag.startswith("train/")) == [
        "accuracy/topk=0.5", "accuracy/topk=1", "loss/topk=0.5", "loss/topk=1"]
    for level in (0.5, 1.0):
        expected = [(row["step"], row["accuracy"]) for row in rows if row["level"] == level]
        assert [step for step, _ in expected] == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        recorded = scalars[f"accuracy/topk={level:g}"]
        assert [step for step, _ in recorded] == [step for step, _ in expected]
        assert [value for _, value in recorded] == pytest.approx([value for _, value in expected])
        assert [value for _, value in scalars[f"loss/topk={level:g}"]] == pytest.approx(
            [row["loss"] for row in rows if row["level"] == level], rel=1e-6)
    assert figures == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_only_the_first_process_writes(tmp_path):
    from engine.board import Board
    from training_params import parse
    config = parse("structured_sparsity", ["--tensorboard", "--save_dir", str(tmp_path / "run")])[0]
    board = Board(config, is_main=False)
    board.training(1, 2.0, 0.1)
    board.close()
    assert not (tmp_path / "run").exists()


def test_missing_tensorboard_is_one_line_naming_the_requirements_file(tiny_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    save_dir = tmp_path / "run"
    assert run_script("unstructured_sparsity", *FLAGS, "--data_dir", tiny_cifar, "--save_dir", save_dir) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines() == [
        "train_unstructured.py: error: --tensorboard: needs the tensorboard package: "
        "pip install -r requirements-tensorboard.txt"]
    assert not save_dir.exists()

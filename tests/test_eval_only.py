"""Evaluation only: `--eval_only --checkpoint PATH` at the config's grid or at new levels
(width 0.3, TopK 0.033, bit widths not in the training grid) appends rows to metrics.jsonl,
trains nothing, and refuses flags that would change the model."""

import hashlib
import math
import shutil
import signal

import pytest
import torch
import yaml

from inprocess import (assert_same_tensors, load_checkpoint, one_thread, read_rows, run_script,  # noqa: F401
                       signal_during_step, single_thread)
from utils import checkpoint as ckpt
from engine import train

TINY = ("--batch_size", 8, "--train_subset", 32, "--test_subset", 16, "--test_freq", 1)
# Rows of the same model on the same images agree on everything but these.
RECORD_KEYS = {"evaluation", "final", "eval_only", "checkpoint"}


@pytest.fixture(scope="module")
def structured_run(tiny_cifar, tmp_path_factory):
    """Structured LCS+L, 1 epoch, trained and evaluated at widths 1, 0.5, 0.25."""
    save_dir = tmp_path_factory.mktemp("eval") / "structured"
    with one_thread():
        assert run_script("structured_sparsity", *TINY, "--epochs", 1, "--eval_width_factors", "1,0.5,0.25",
                          "--data_dir", tiny_cifar, "--save_dir", save_dir) == 0
    return save_dir


@pytest.fixture(scope="module")
def unstructured_run(tiny_cifar, tmp_path_factory):
    """Unstructured LCS+L, 2 epochs of 4 steps, TopK warmup over all 8 steps; `mid.pt` is its
    checkpoint after epoch 1 (step 4: TopK halfway through its decay)."""
    save_dir = tmp_path_factory.mktemp("eval") / "unstructured"
    flags = (*TINY, "--epochs", 2, "--warmup_budget", 100, "--eval_topk_grid", "0.05,1", "--data_dir", tiny_cifar,
             "--save_dir", save_dir)
    with one_thread():
        with signal_during_step(3, signal.SIGTERM):
            assert run_script("unstructured_sparsity", *flags) == 143
        shutil.copy(save_dir / ckpt.LAST, save_dir / "mid.pt")
        assert run_script("unstructured_sparsity", *flags, "--resume") == 0
    return save_dir


@pytest.fixture(scope="module")
def quantized_run(tiny_cifar, tmp_path_factory):
    """Quantized LCS+L trained with an evaluation grid of 8 bits only."""
    save_dir = tmp_path_factory.mktemp("eval") / "quantized"
    with one_thread():
        assert run_script("quantized", *TINY, "--epochs", 1, "--warmup_budget", 50, "--eval_bit_widths", "8",
                          "--data_dir", tiny_cifar, "--save_dir", save_dir) == 0
    return save_dir


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_record_keys(row):
    return {key: value for key, value in row.items() if key not in RECORD_KEYS}


def test_eval_only_at_the_config_grid_reproduces_the_final_evaluation_and_trains_nothing(structured_run,
                                                                                         monkeypatch):
    files = {name: digest(structured_run / name) for name in ("config.yaml", ckpt.LAST, ckpt.FINAL)}
    runs = []
    original = train.Run.evaluate_only
    monkeypatch.setattr(train.Run, "evaluate_only", lambda self, path: runs.append(self) or original(self, path))
    before = read_rows(structured_run)
    final = [row for row in before if row["final"]]
    for name in (ckpt.FINAL, ckpt.LAST):
        rows_so_far = read_rows(structured_run)
        assert run_script("structured_sparsity", "--eval_only", "--checkpoint", structured_run / name) == 0
        rows = read_rows(structured_run)
        assert rows[:len(rows_so_far)] == rows_so_far  # appended, nothing rewritten
        new = rows[len(rows_so_far):]
        assert [without_record_keys(row) for row in new] == [without_record_keys(row) for row in final]
        assert all(row["eval_only"] and not row["final"] for row in new)
        assert {row["checkpoint"] for row in new} == {str(structured_run / name)}
        assert len({row["evaluation"] for row in new}) == 1 and new[0]["evaluation"] > before[-1]["evaluation"]
        # The model evaluated is the checkpoint's, unchanged by the evaluation.
        assert_same_tensors(runs[-1].model.state_dict(), load_checkpoint(structured_run / name)["model"])
    assert {name: digest(structured_run / name) for name in files} == files


def test_eval_only_decodes_no_training_image(structured_run, tiny_cifar, tmp_path):
    """Without BN re-estimation an evaluation reads no training image: with every training image
    of --data_dir undecodable it gives the final evaluation's numbers (training would refuse the
    first such image)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cifar, data)
    images = [path for path in (data / "train").rglob("*") if path.is_file()]
    assert len(images) >= 32
    for path in images:
        path.write_bytes(b"not an image")
    final = [row for row in read_rows(structured_run) if row["final"]]
    save_dir = tmp_path / "evaluated"
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", structured_run / ckpt.FINAL,
                      "--data_dir", data, "--save_dir", save_dir) == 0
    ignored = RECORD_KEYS | {"data_dir"}
    assert [{k: v for k, v in row.items() if k not in ignored} for row in read_rows(save_dir)] == \
        [{k: v for k, v in row.items() if k not in ignored} for row in final]
    assert run_script("structured_sparsity", *TINY, "--epochs", 1, "--data_dir", data,
                      "--save_dir", tmp_path / "training") == 2


def test_eval_only_at_new_widths_structured(structured_run, tmp_path):
    rows_before = read_rows(structured_run)
    out = tmp_path / "widths"
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", structured_run / ckpt.FINAL,
                      "--eval_width_factors", "0.3,0.6", "--save_dir", out) == 0
    assert read_rows(structured_run) == rows_before  # --save_dir: the run's own metrics untouched
    rows = read_rows(out)
    assert [row["level"] for row in rows] == [0.3, 0.6]
    # alpha = (w - lo) / (hi - lo) with the trained limits [0.25, 1]
    assert [row["alpha"] for row in rows] == pytest.approx([0.05 / 0.75, 0.35 / 0.75])
    assert all(row["eval_only"] and row["epoch"] == 1 for row in rows)
    # SPEC 3.4 sparsities of cPreResNet20: 0.25 -> 0.9349, 0.375 -> 0.8561, 0.5 -> 0.7465, 0.625 -> 0.6061
    assert 0.8561 < rows[0]["sparsity"] < 0.9349
    assert 0.6061 < rows[1]["sparsity"] < 0.7465
    assert (out / "results.csv").is_file() and (out / "accuracy_vs_compression.png").is_file()


def test_new_levels_join_the_final_results_in_results_csv(structured_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(structured_run, run_dir)
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", run_dir / ckpt.FINAL,
                      "--eval_width_factors", "0.3") == 0
    lines = (run_dir / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    table = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [float(row["level"]) for row in table] == [0.25, 0.3, 0.5, 1.0]
    assert table[1]["eval_only"] == "True" and table[1]["checkpoint"] == str(run_dir / ckpt.FINAL)
    final = {row["level"]: row for row in read_rows(run_dir) if row["final"]}
    for row in (table[0], table[2], table[3]):
        assert float(row["accuracy"]) == final[float(row["level"])]["accuracy"]


def body_sparsity(state, topk):
    """SPEC 3.3 by hand: each body conv keeps numel - floor((1 - k) numel) weights; the stem
    and the classifier stay dense; sparsity = zeros / all conv weights (endpoint 0)."""
    convs = {name: tensor.numel() for name, tensor in state.items() if tensor.dim() == 4 and name.endswith(".weight")}
    pruned = sum(math.floor((1 - topk) * numel) for name, numel in convs.items()
                 if name not in ("conv1.weight", "fc.weight"))
    return pruned / sum(convs.values())


def test_eval_only_at_a_new_topk_unstructured(unstructured_run):
    assert run_script("unstructured_sparsity", "--eval_only", "--checkpoint", unstructured_run / ckpt.FINAL,
                      "--eval_topk_grid", "0.033") == 0
    row = read_rows(unstructured_run)[-1]
    assert (row["level"], row["alpha"], row["effective_topk"]) == (0.033, 0.033, pytest.approx(0.033))
    state = load_checkpoint(unstructured_run / ckpt.FINAL)["model"]
    assert row["sparsity"] == pytest.approx(body_sparsity(state, 0.033), abs=1e-12)


def test_eval_only_during_the_warmup_keeps_the_trained_warmup(unstructured_run):
    """Halfway through the TopK warmup (step 4 of 8) alpha = 0.033 is evaluated at
    k = 0.033 + 0.967 * (1 - 4/8); a smaller evaluation batch must not stretch the warmup."""
    assert run_script("unstructured_sparsity", "--eval_only", "--checkpoint", unstructured_run / "mid.pt",
                      "--eval_topk_grid", "0.033", "--batch_size", 4) == 0
    row = read_rows(unstructured_run)[-1]
    assert (row["step"], row["epoch"]) == (4, 1)
    assert row["effective_topk"] == pytest.approx(0.033 + 0.967 * 0.5)


def test_eval_only_at_bit_widths_not_trained_on(quantized_run):
    assert [row["num_bits"] for row in read_rows(quantized_run)] == [8, 8]
    assert run_script("quantized", "--eval_only", "--checkpoint", quantized_run / ckpt.FINAL,
                      "--eval_bit_widths", "3,5") == 0
    rows = [row for row in read_rows(quantized_run) if row["eval_only"]]
    # at the alphas of the original's grid (5 bits: 0.499, as configs/quantized/lcs_l.yaml)
    assert [(row["level"], row["num_bits"], row["alpha"]) for row in rows] == [(3, 3, 0.166), (5, 5, 0.499)]
    assert all(row["act_quant"] for row in rows)  # activation ranges were recorded in training


@pytest.mark.parametrize("flags, message", [
    (("--epochs", 5), "--epochs: cannot be changed when evaluating a checkpoint (the checkpoint's epochs is 1, not 5)"),
    (("--norm", "BN"), "--norm: cannot be changed when evaluating a checkpoint"),
    (("--learning_rate", 0.3), "--learning_rate: cannot be changed when evaluating a checkpoint"),
    (("--width_factor_limits", "0.5,1"), "--width_factor_limits: cannot be changed when evaluating a checkpoint"),
    (("--seed", 7), "--seed: cannot be changed when evaluating a checkpoint"),
    (("--method", "us"), "--method: cannot be changed when evaluating a checkpoint"),
    (("--config", "configs/structured_sparsity/us.yaml"), "--config: not used when evaluating a checkpoint"),
    (("--eval_width_factors", "0.1"), "--eval_width_factors: structured_sparsity/lcs_l evaluates width factors in "
                                      "[0.25, 1] (the trained width_factor_limits), got 0.1"),
])
def test_flags_that_would_change_the_model_are_refused(structured_run, capsys, flags, message):
    rows = read_rows(structured_run)
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", structured_run / ckpt.FINAL,
                      *flags) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error, error
    assert read_rows(structured_run) == rows


def test_eval_only_usage_errors(structured_run, capsys):
    for flags, message in [
        (("--eval_only",), "--eval_only: needs --checkpoint PATH"),
        (("--checkpoint", structured_run / ckpt.FINAL), "--checkpoint: only used with --eval_only"),
    ]:
        assert run_script("structured_sparsity", *flags) == 2
        assert message in capsys.readouterr().err
    assert run_script("quantized", "--eval_only", "--checkpoint", structured_run / ckpt.FINAL) == 2
    assert ("holds a final model of structured_sparsity/lcs_l (cpreresnet20), but this script trains quantized"
            in capsys.readouterr().err)


# -- whose results a run directory holds ------------------------------------------------------------
def run_files(save_dir):
    return {path.name: digest(path) for path in save_dir.iterdir() if path.is_file() and path.name != ".lock"}


def test_a_run_directory_takes_the_evaluations_of_its_own_model_only(structured_run, tiny_cifar, tmp_path, capsys):
    """A same-shape model of another seed is refused in one line naming both; the run's own
    model_final.pt and checkpoint_last.pt are evaluated into it; a new directory becomes the
    evaluated model's and then refuses the other model too."""
    run = tmp_path / "run"
    shutil.copytree(structured_run, run)
    other = tmp_path / "other"
    with one_thread():
        assert run_script("structured_sparsity", *TINY, "--epochs", 1, "--eval_width_factors", "1,0.5,0.25",
                          "--seed", 1, "--no-eval_at_start", "--data_dir", tiny_cifar, "--save_dir", other) == 0
    run_id = yaml.safe_load((run / "config.yaml").read_text())["run_id"]
    other_id = load_checkpoint(other / ckpt.FINAL)["config"]["run_id"]
    assert len({run_id, other_id}) == 2 and load_checkpoint(run / ckpt.LAST)["config"]["run_id"] == run_id
    capsys.readouterr()
    before = run_files(run)
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", other / ckpt.FINAL,
                      "--save_dir", run) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"train_structured.py: error: --checkpoint {other / ckpt.FINAL}: a model of run {other_id}, "
                     f"but {run} holds run {run_id}; a run directory holds its own model's results only "
                     f"(evaluate it into its own run directory or a new --save_dir)")
    assert run_files(run) == before
    for name in (ckpt.FINAL, ckpt.LAST):
        rows = len(read_rows(run))
        assert run_script("structured_sparsity", "--eval_only", "--checkpoint", run / name, "--save_dir", run,
                          "--eval_width_factors", "0.3") == 0
        assert len(read_rows(run)) == rows + 1
    new = tmp_path / "new"
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", other / ckpt.FINAL,
                      "--save_dir", new) == 0
    assert yaml.safe_load((new / "config.yaml").read_text())["run_id"] == other_id
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", other / ckpt.LAST,
                      "--save_dir", new, "--eval_width_factors", "0.3") == 0
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", run / ckpt.FINAL,
                      "--save_dir", new) == 2
    assert [row["checkpoint"] for row in read_rows(new)] == [str(other / ckpt.FINAL)] * 3 + [str(other / ckpt.LAST)]


def test_a_model_without_run_id_goes_into_its_own_directory_only(structured_run, tmp_path, capsys):
    """Runs of earlier versions hold no run id: a checkpoint lying in the run directory is its
    own, one from elsewhere is refused there."""
    legacy, elsewhere = tmp_path / "legacy", tmp_path / "elsewhere"
    shutil.copytree(structured_run, legacy)
    elsewhere.mkdir()
    config = yaml.safe_load((legacy / "config.yaml").read_text())
    del config["run_id"]
    (legacy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in (ckpt.FINAL, ckpt.LAST):
        payload = load_checkpoint(legacy / name)
        del payload["config"]["run_id"]
        torch.save(payload, legacy / name)
    shutil.move(legacy / ckpt.LAST, elsewhere / ckpt.LAST)
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", legacy / ckpt.FINAL,
                      "--eval_width_factors", "0.3") == 0
    capsys.readouterr()
    assert run_script("structured_sparsity", "--eval_only", "--checkpoint", elsewhere / ckpt.LAST,
                      "--save_dir", legacy) == 2
    assert f"without a run id (an earlier version's), only a model in {legacy} itself" in capsys.readouterr().err

"""What a newcomer meets first: the --data_dir diagnosis, the suggestion for a mistyped flag,
results.csv's fixed columns, the start-of-run evaluation that can be skipped, the thread
count, the duration estimate, the training loss shown, the plot and the compare table."""

import io
import os
import shutil
import sys
import tarfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import training_params
from cli_helpers import MICRO_CIFAR_TEST_IMAGES, assert_ok, micro_cifar, read_metrics, run_script  # noqa: F401
from conftest import CIFAR_CLASSES, make_image_folder
from data.cifar import load_cifar10
import compare_runs as compare
from engine import evaluate as evaluate_module
from engine import progress
from engine.step import TrainStep
from utils import metrics
from utils import distributed
from utils.distributed import Context, choose_threads, choose_workers
from utils.errors import ConfigError, DataError

SCRIPT = "train_structured.py"


# -- --data_dir: the common wrong places --------------------------------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A correct CIFAR-10 root and the common mistakes made with it."""
    root = tmp_path_factory.mktemp("places")
    cifar = root / "cifar"
    make_image_folder(str(cifar / "train"), CIFAR_CLASSES, 1, 32, seed=0)
    make_image_folder(str(cifar / "test"), CIFAR_CLASSES, 1, 32, seed=1)
    shutil.copytree(cifar, root / "holder" / "cifar10-jpeg")
    (root / "archives").mkdir()
    with tarfile.open(root / "archives" / "cifar10-jpeg.tar.gz", "w:gz") as archive:
        archive.add(cifar / "train", arcname="train")
        archive.add(cifar / "test", arcname="test")
    (root / "batches" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "batches" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not read")
    (root / "python").mkdir()
    with tarfile.open(root / "python" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(root / "batches" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    make_image_folder(str(root / "loose"), ["images"], 2, 32)
    return root


def data_dir_cases(root):
    """(--data_dir, what the message must say instead)."""
    return [
        (root / "cifar" / "train", f"pass --data_dir {root / 'cifar'}"),
        (root / "holder", f"pass --data_dir {root / 'holder' / 'cifar10-jpeg'}"),
        (root / "archives" / "cifar10-jpeg.tar.gz",
         f"mkdir -p {root / 'archives' / 'cifar10-jpeg'} && tar xzf {root / 'archives' / 'cifar10-jpeg.tar.gz'} "
         f"-C {root / 'archives' / 'cifar10-jpeg'}; then pass --data_dir {root / 'archives' / 'cifar10-jpeg'}"),
        (root / "archives", "holds the archive cifar10-jpeg.tar.gz, not unpacked"),
        (root / "python", f"tar xzf {root / 'python' / 'cifar-10-python.tar.gz'} -C {root / 'python'}; "
                          f"then pass --data_dir {root / 'python'}"),
        (root / "batches" / "cifar-10-batches-py", f"pass its parent, --data_dir {root / 'batches'}"),
        (root / "loose" / "images", "holds images directly"),
    ]


def tree(root):
    return sorted((path, os.path.getsize(os.path.join(path, name)) if name else 0)
                  for path, folders, files in os.walk(root) for name in files + [""])


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's CIFAR10 made to record its calls instead of reading or downloading."""
    import torchvision

    calls = []

    def refuse(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("torchvision.datasets.CIFAR10 called")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)
    return calls


def test_each_data_dir_mistake_says_what_to_pass_and_touches_nothing(places, no_download):
    before = tree(places)
    for path, advice in data_dir_cases(places):
        with pytest.raises(ConfigError) as refused:
            training_params.parse("structured_sparsity", ["--data_dir", str(path), "--save_dir", str(places / "r")])
        assert str(refused.value).startswith("--data_dir: ") and advice in str(refused.value), path
        with pytest.raises(DataError) as refused:
            load_cifar10(str(path), train=True)
        assert str(refused.value).startswith(f"--data_dir {path}: ") and advice in str(refused.value), path
    assert no_download == [] and tree(places) == before


def test_the_correct_root_loads_and_an_empty_folder_may_receive_the_download(places, no_download):
    images, labels = load_cifar10(str(places / "cifar"), train=False)
    assert images.shape == (10, 32, 32, 3) and sorted(labels.tolist()) == list(range(10))
    (places / "empty").mkdir()
    with pytest.raises(DataError, match="the download failed"):
        load_cifar10(str(places / "empty"), train=True)
    assert no_download == [{"root": str(places / "empty"), "train": True, "download": True}]


def test_default_data_dir_with_the_copy_one_level_down_fails_before_writing(places, no_download, monkeypatch):
    """The recipe unpacks into data/cifar10-jpeg; forgetting --data_dir must not download into data/."""
    os.makedirs(places / "work" / "data")
    shutil.copytree(places / "cifar", places / "work" / "data" / "cifar10-jpeg")
    monkeypatch.chdir(places / "work")
    before = tree(places)
    result = run_script(SCRIPT, "--epochs", 1, "--save_dir", "run")
    assert result.returncode == 2 and no_download == [] and tree(places) == before
    assert result.stderr.strip().splitlines() == [
        f"{SCRIPT}: error: --data_dir ./data: holds CIFAR-10 one level down: pass --data_dir ./data/cifar10-jpeg"]


# -- a mistyped flag ----------------------------------------------------------------------
@pytest.mark.parametrize("argv, hint", [
    (["--train-subset", "20"], " (did you mean --train_subset?)"),
    (["--learning_rat", "0.1"], " (did you mean --learning_rate?)"),
    (["--no_eval_at_start"], " (did you mean --no-eval_at_start?)"),
    (["--eval-only"], " (did you mean --eval_only?)"),
    (["--data-dir=x"], " (did you mean --data_dir?)"),
    (["--epoch", "1", "--seeds", "3"], " (--epoch: did you mean --epochs?; --seeds: did you mean --seed?)"),
    # A flag of another setting names the script that takes it.
    (["--eval_topk_grid", "0.5"], " (--eval_topk_grid is a flag of train_unstructured.py)"),
    (["--epoch", "1", "--bit_width", "4"],
     " (--epoch: did you mean --epochs?; --bit_width is a flag of train_quantized.py)"),
    (["--frobnicate"], ""),
])
def test_unknown_flags_get_the_closest_valid_flag(argv, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        training_params.build_parser("structured_sparsity").parse_args(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"{SCRIPT}: error: unrecognized arguments: {' '.join(argv)}{hint}\n"


# -- results.csv and the start-of-run evaluation -----------------------------------------
# The documented column order (docs/outputs.md), whatever the setting, method or evaluation.
COLUMNS = ["evaluation", "epoch", "step", "setting", "method", "model", "dataset", "norm", "num_classes",
           "level_name", "level", "alpha", "accuracy", "loss", "num_images", "data_dir", "sparsity", "num_bits",
           "act_quant", "conv_params", "macs", "nonzero_params", "effective_topk", "params", "channel_floor_applied",
           "bn_calibration_images", "lec_test_batch_statistics", "final", "eval_only", "checkpoint"]
RUN_ARGS = ("--norm", "BN", "--epochs", 1, "--eval_width_factors", "1,0.25")


@pytest.fixture(scope="module")
def runs(micro_cifar, tmp_path_factory):
    """Structured LCS+L, 1 epoch (one step), with and without the start-of-run evaluation."""
    root = tmp_path_factory.mktemp("first_run")
    outputs = {}
    for name, extra in (("default", ()), ("skipped", ("--no-eval_at_start",))):
        result = run_script(SCRIPT, *RUN_ARGS, *extra, "--data_dir", micro_cifar, "--save_dir", root / name)
        assert_ok(result)
        outputs[name] = result.stdout
    return root, outputs


def read_table(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_results_csv_columns_stay_put_after_eval_only(runs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0] / "default", run_dir)
    before = read_table(run_dir / "results.csv")
    assert before[0] == COLUMNS and all(len(line) == len(COLUMNS) for line in before)
    assert [line[COLUMNS.index("level")] for line in before[1:]] == ["0.25", "1.0"]
    monkeypatch.chdir(tmp_path)  # a relative checkpoint path: its files are named as given, as training does
    result = run_script(SCRIPT, "--eval_only", "--checkpoint", os.path.join("run", "model_final.pt"),
                        "--eval_width_factors", "0.3")
    assert_ok(result)
    assert "\nFiles in run:\n" in result.stdout
    after = read_table(run_dir / "results.csv")
    assert after[0] == COLUMNS and all(len(line) == len(COLUMNS) for line in after)
    column = {name: [line[COLUMNS.index(name)] for line in after[1:]] for name in COLUMNS}
    assert column["level"] == ["0.25", "0.3", "1.0"]
    assert column["eval_only"] == ["False", "True", "False"]
    assert column["checkpoint"] == ["", str(run_dir / "model_final.pt"), ""]
    # alpha of width 0.3 on the line from 0.25 to 1: 0.05 / 0.75, rounded in the CSV only.
    assert column["alpha"] == ["0.0", "0.0667", "1.0"]
    assert read_metrics(run_dir)[-1]["alpha"] == pytest.approx(0.05 / 0.75, abs=1e-12)
    assert column["sparsity"][0] != "" and column["num_bits"] == ["", "", ""]
    assert column["num_classes"] == ["10", "10", "10"]


def test_the_start_of_run_evaluation_can_be_skipped(runs):
    root, outputs = runs
    default, skipped = read_metrics(root / "default"), read_metrics(root / "skipped")
    assert [(row["epoch"], row["final"]) for row in default] == [(0, False)] * 2 + [(1, True)] * 2
    assert [(row["epoch"], row["final"]) for row in skipped] == [(1, True)] * 2
    assert outputs["default"].index("Test (") < outputs["default"].index("epoch 1/1")
    # The evaluation says what it does before its first level is done (on 10 test images).
    assert outputs["default"].index(f"Evaluating 2 levels (width_factor) at epoch 0 on {MICRO_CIFAR_TEST_IMAGES} "
                                    f"test images") < outputs["default"].index("Test (")
    assert outputs["skipped"].index("epoch 1/1") < outputs["skipped"].index("Test (")
    assert training_params.read_yaml(root / "skipped" / "config.yaml")["eval_at_start"] is False
    # Evaluating changes nothing of the training: the same model and final accuracies either way.
    models = [torch.load(root / name / "model_final.pt", weights_only=True)["model"] for name in ("default", "skipped")]
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])
    assert [row["accuracy"] for row in skipped] == [row["accuracy"] for row in default[2:]]


def test_each_level_is_printed_as_it_finishes(runs, tmp_path, monkeypatch):
    """What was printed when each level's test pass began: the evaluation's first line, then
    one line more per level finished."""
    printed = []
    original = evaluate_module.test_pass

    def test_pass(*args, **kwargs):
        printed.append(sys.stdout.getvalue())  # run_script prints into a StringIO
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "test_pass", test_pass)
    result = run_script(SCRIPT, "--eval_only", "--checkpoint", runs[0] / "default" / "model_final.pt",
                        "--eval_width_factors", "1,0.5,0.25", "--save_dir", tmp_path / "eval")
    assert_ok(result)
    assert len(printed) == 3 and printed[0].endswith(f"Evaluating 3 levels (width_factor) at epoch 1 on "
                                                     f"{MICRO_CIFAR_TEST_IMAGES} test images\n")
    assert [text.count("Test (") for text in printed] == [0, 1, 2]
    assert "Test (width_factor = 1, alpha = 1): loss " in printed[1]


def test_evaluation_bar_on_a_terminal(monkeypatch, capsys):
    """On a terminal a bar counts the test batches of every level; the levels' lines go above it."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    data = SimpleNamespace(test=SimpleNamespace(num_batches=3), num_test=30)
    log = progress.EvaluationLog(Context(), "num_bits", 2, data, epoch=4)
    for level in (3, 8):
        for _ in range(3):
            log.batch_done()
        log.level_done({"level": level, "alpha": None, "loss": 2.0, "accuracy": 0.5})
    assert log.bar.n == 6 and log.bar.total == 6
    log.close()
    assert capsys.readouterr().out == ("Evaluating 2 levels (num_bits) at epoch 4 on 30 test images\n"
                                       "Test (num_bits = 3): loss 2.0000 | accuracy 50.00%\n"
                                       "Test (num_bits = 8): loss 2.0000 | accuracy 50.00%\n")
    assert "evaluation:" in terminal.getvalue() and "/6" in terminal.getvalue()


def test_progress_lines_show_the_labelled_loss_per_pass(runs):
    printed = runs[1]["default"]
    assert "Training loss shown: loss/pass, the mean cross-entropy of the step's forward passes" in printed
    assert "epoch 1/1 [1/1 100%] loss/pass " in printed


def test_the_loss_shown_is_the_mean_over_the_forward_passes():
    """Four passes at the same weights (the step comes after them): the mean equals one
    pass's cross-entropy; their sum would be four times it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    expected = F.cross_entropy(model(images), labels).item()
    method = SimpleNamespace(apply_levels=lambda model, levels: None, regularizer=lambda model: None,
                             after_backward=lambda model: None)
    step = TrainStep(model, method, torch.optim.SGD(model.parameters(), lr=0.1), Context(),
                           SimpleNamespace(amp=False, compile=False))
    loss, _ = step([{}, {}, {}, {}], images, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# -- threads and the duration estimate -----------------------------------------------------
def test_threads_default_to_the_free_cores():
    assert choose_threads(3, {}, 8, 0.0).threads == 3                                 # --threads
    assert choose_threads(None, {"OMP_NUM_THREADS": "2"}, 8, 0.0).threads == 2        # the user's variable
    assert choose_threads(None, {}, 2, 0.1).threads == 2                              # idle: every core
    assert choose_threads(None, {}, 2, 1.2).threads == 1                              # one core busy
    assert choose_threads(None, {}, 2, 7.5).threads == 1                              # never below one
    assert choose_threads(None, {}, 64, 0.0).threads == 16                            # capped
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "4"}, 16, 0.0).threads == 4      # shared by torchrun
    choice = choose_threads(None, {}, 2, 1.2)
    assert choice.reason == "2 usable cores, load average 1.2"


def test_workers_are_capped_at_the_usable_cores():
    assert choose_workers(2, usable_cores=2) == (2, None)
    assert choose_workers(0, usable_cores=1) == (0, None)
    assert choose_workers(64, usable_cores=2) == (2, "--num_workers 64: this process may use 2 CPU core(s); "
                                                     "using 2 data-loading worker(s)")


def test_too_many_workers_get_one_line_of_ours_and_no_dataloader_warning(micro_cifar, tmp_path, monkeypatch,
                                                                          recwarn):
    monkeypatch.setattr(distributed, "count_usable_cores", lambda: 1)
    result = run_script(SCRIPT, "--data_dir", micro_cifar, "--data_pipeline", "dataloader", "--num_workers", 64,
                        "--epochs", 1, "--batch_size", 10, "--test_subset", 4, "--no-eval_at_start",
                        "--save_dir", tmp_path / "run")
    assert_ok(result)
    notes = [line for line in result.stdout.splitlines() if "--num_workers" in line]
    assert notes == ["--num_workers 64: this process may use 1 CPU core(s); using 1 data-loading worker(s)"]
    assert not [w for w in recwarn if "worker" in str(w.message)], [str(w.message) for w in recwarn]


def test_duration_text_and_evaluations_still_to_come():
    assert [progress.format_duration(s) for s in (42, 185, 7620, 3 * 86400 + 4 * 3600 + 59)] == \
        ["42 s", "3 min 05 s", "2 h 07 min", "3 d 4 h"]
    assert progress.evaluations_after(0, 200, 20) == 9 + 1    # epochs 20, 40, ..., 180 and the final one
    assert progress.evaluations_after(180, 200, 20) == 1
    assert progress.evaluations_after(0, 3, 20) == 1


def test_run_clock_estimates_from_the_pace_after_the_first_step(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    config = SimpleNamespace(epochs=2, test_freq=1)
    clock = progress.RunClock(config, steps_per_epoch=10)
    clock.evaluated(30.0)                                     # the start-of-run evaluation
    now[0] += 30.0 + 5.0                                      # ... and a slow first step
    said = []
    assert clock.seconds_left(SimpleNamespace(global_step=1, epoch=0), said.append) is None
    now[0] += 4 * 2.0
    assert clock.seconds_left(SimpleNamespace(global_step=5, epoch=0), said.append) is None
    now[0] += 2.0
    # 2 s per step for the 14 steps left, one evaluation at epoch 1 and the final one at 30 s.
    assert clock.seconds_left(SimpleNamespace(global_step=6, epoch=0), said.append) == pytest.approx(14 * 2 + 60)
    assert said == ["Estimated duration of the run: 2 min 13 s (2 epochs of 10 steps at 2 s per step, "
                    "2 more evaluations: 30 s each)"]


def test_the_estimate_from_the_pace_timed_before_the_first_evaluation():
    clock = progress.RunClock(SimpleNamespace(epochs=2, test_freq=1), steps_per_epoch=10)
    said = []
    clock.announce_probed(SimpleNamespace(global_step=0, epoch=0), 2.0, 30.0, said.append)
    # 20 steps at 2 s, evaluations at epochs 0 and 1 and the final one at 30 s
    assert said == ["Estimated duration of the run: 2 min 10 s (2 epochs of 10 steps at 2 s per step, "
                    "3 evaluations of about 30 s each; timed on a few steps and test batches)"]
    assert clock.seconds_left(SimpleNamespace(global_step=1, epoch=0), said.append) is None and len(said) == 1


def test_the_estimate_comes_before_the_first_evaluation_and_changes_nothing(micro_cifar, tmp_path, monkeypatch):
    """A run long enough to time its pace first (here every run: PROBE_MIN_STEPS 0) prints its
    estimate before the start-of-run evaluation, then trains and evaluates the very model and
    numbers of a run that did not time it."""
    from engine import train

    flags = ("--norm", "BN", "--epochs", 2, "--batch_size", 5, "--eval_width_factors", "1,0.25", "--data_dir",
             micro_cifar)
    outputs = {}
    for name, min_steps in (("timed", 0), ("untimed", 10**9)):
        monkeypatch.setattr(train, "PROBE_MIN_STEPS", min_steps)
        result = run_script(SCRIPT, *flags, "--save_dir", tmp_path / name)
        assert_ok(result)
        outputs[name] = result.stdout
    timed = outputs["timed"]
    assert timed.count("Estimated duration of the run") == 1
    assert timed.index("Estimated duration of the run") < timed.index("Evaluating 2 levels (width_factor) at epoch 0")
    # 20 images in batches of 5; the start-of-run evaluation and the final one (--test_freq 20)
    assert "(2 epochs of 4 steps at " in timed and "2 evaluations of about" in timed
    assert "Estimated duration of the run" not in outputs["untimed"].split("epoch 1/2")[0]
    models = [torch.load(tmp_path / name / "model_final.pt", weights_only=True)["model"]
              for name in ("timed", "untimed")]
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])
    rows = [[(row["level"], row["accuracy"], row["loss"]) for row in read_metrics(tmp_path / name)]
            for name in ("timed", "untimed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_a_resumed_run_clock_counts_the_evaluations_timed_before(monkeypatch):
    """Resumed after its epoch-0 evaluation (40 s, in the checkpoint), a run estimates its later
    evaluations at that pace without timing one again."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    timed = [40.0]
    clock = progress.RunClock(SimpleNamespace(epochs=2, test_freq=1), steps_per_epoch=10, evaluation_s=timed)
    said = []
    for step in range(3, 10):
        clock.seconds_left(SimpleNamespace(global_step=step, epoch=0), said.append)
        now[0] += 1.0
    # Announced at step 8: 5 s since the first measured step (step 3), 12 steps left at 1 s and
    # two evaluations at 40 s: 5 + 12 + 80 = 97 s.
    assert said == ["Estimated duration of the run: 1 min 37 s (2 epochs of 10 steps at 1 s per step, "
                    "2 more evaluations: 40 s each)"]
    clock.evaluated(20.0)
    assert timed == [40.0, 20.0]  # the run's list: saved with its next checkpoint


# -- the plot and the compare table ----------------------------------------------------------
def row(level, accuracy, final=True, eval_only=False, setting="quantized", sparsity=None):
    return {"evaluation": 1, "epoch": 3, "step": 30, "setting": setting, "method": "lcs_l", "model": "cpreresnet20",
            "dataset": "cifar10", "norm": "BN", "num_classes": 10, "level_name": "num_bits", "level": level,
            "alpha": None, "accuracy": accuracy, "loss": 2.0, "num_images": 100, "sparsity": sparsity,
            "num_bits": level, "final": final, "eval_only": eval_only}


def test_plot_draws_chance_eval_only_points_and_starts_at_zero():
    import matplotlib.pyplot as plt

    rows = [row(3, 0.16), row(5, 0.2, final=False, eval_only=True), row(8, 0.25)]
    figure = metrics.draw_runs([("lcs_l", rows)])
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines["lcs_l"].get_ydata()) == pytest.approx([16, 20, 25])
    assert list(lines["lcs_l: --eval_only"].get_xdata()) == [5]
    assert lines["lcs_l: --eval_only"].get_markerfacecolor() == "white"
    assert list(lines["chance (10 %)"].get_ydata()) == [10, 10] and lines["chance (10 %)"].get_linestyle() == "--"
    assert axes.get_ylim() == (0, 30)
    plt.close(figure)
    assert metrics.model_state(rows) == "final evaluation + --eval_only levels, epoch 3"
    assert metrics.model_state([rows[1]]) == "--eval_only of the epoch 3 model"
    assert metrics.model_state([rows[0]]) == "final evaluation, epoch 3"
    assert metrics.model_state([row(3, 0.1, final=False)]) == "epoch 3 (run not finished)"


def test_compare_leaves_out_columns_empty_for_every_run():
    labelled = [("A", [row(3, 0.5), row(8, 0.6)]), ("B", [row(3, 0.4)]),
                ("C", [dict(row(0.5, 0.3, setting="structured_sparsity", sparsity=0.7), level_name="width_factor")])]
    header, lines = compare.drop_empty_columns(*compare.comparison_table(labelled))
    assert header == ["setting", "level_name", "level", "A: accuracy", "B: accuracy", "C: accuracy", "C: sparsity"]
    assert lines == [["quantized", "num_bits", 3, 0.5, 0.4, None, None],
                     ["quantized", "num_bits", 8, 0.6, None, None, None],
                     ["structured_sparsity", "width_factor", 0.5, None, None, 0.3, 0.7]]

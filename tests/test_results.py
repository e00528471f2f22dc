"""Run outputs: results.csv and the accuracy-vs-compression plot after every evaluation, the
table printed at the end of training, and the compare tool (`python compare_runs.py`)."""

import contextlib
import csv
import io
import os
import struct
import subprocess
import sys

import pytest

from inprocess import one_thread, read_rows, run_script, single_thread  # noqa: F401
import compare_runs as compare
from engine import train
from utils import metrics
from utils.metrics import format_table, latest_results, update_outputs, write_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk of a PNG file; fails on anything else."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def row(evaluation, step, level, accuracy, setting="unstructured_sparsity", level_name="topk", method="lcs_l",
        final=False, eval_only=False, num_images=100, **extra):
    return {"evaluation": evaluation, "epoch": step // 10, "step": step, "setting": setting, "method": method,
            "model": "cpreresnet20", "dataset": "cifar10", "norm": "GN", "level_name": level_name, "level": level,
            "alpha": None, "accuracy": accuracy, "loss": 1.5, "num_images": num_images, "sparsity": 0.5,
            "num_bits": None, **extra, "final": final, "eval_only": eval_only}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


# -- unit: which rows are "the results" --------------------------------------------------
def test_latest_results_merges_levels_evaluated_later_on_the_same_model():
    rows = [row(0, 0, 0.5, 0.1), row(0, 0, 1.0, 0.1),
            row(1, 20, 1.0, 0.6, final=True), row(1, 20, 0.5, 0.4, final=True),
            row(2, 20, 0.033, 0.2, eval_only=True), row(3, 20, 0.5, 0.45, eval_only=True)]
    latest = latest_results(rows)
    # A level evaluated again the same way keeps its first row: nothing is replaced.
    assert [(r["level"], r["accuracy"]) for r in latest] == [(0.033, 0.2), (0.5, 0.4), (1.0, 0.6)]
    # An evaluation of another model state (an earlier step) stands alone.
    assert [r["level"] for r in latest_results(rows + [row(4, 10, 0.25, 0.3, eval_only=True)])] == [0.25]
    assert latest_results([]) == []


@pytest.mark.parametrize("field, other", [("num_images", 50), ("data_dir", "/elsewhere"),
                                          ("bn_calibration_images", 512), ("lec_test_batch_statistics", True)])
def test_evaluations_made_differently_are_series_of_their_own(field, other):
    """The same model evaluated another way (other test images, BN statistics) keeps every row,
    as a second series labelled by what differs; a level of the training grid is not marked."""
    way = {"data_dir": "/data", "bn_calibration_images": 0, "lec_test_batch_statistics": False}
    rows = [row(1, 20, 0.5, 0.4, final=True, **way), row(1, 20, 1.0, 0.6, final=True, **way),
            row(2, 20, 1.0, 0.7, eval_only=True, **{**way, field: other}),
            row(2, 20, 0.25, 0.3, eval_only=True, **{**way, field: other})]
    latest = latest_results(rows)
    assert [(r["level"], r["accuracy"]) for r in latest] == [(0.5, 0.4), (1.0, 0.6), (0.25, 0.3), (1.0, 0.7)]
    texts = {"num_images": ["100 test images", "50 test images"], "data_dir": ["data /data", "data /elsewhere"],
             "bn_calibration_images": ["BN running statistics", "BN re-estimated on 512 training images"],
             "lec_test_batch_statistics": ["BN running statistics", "BN statistics of each test batch"]}[field]
    assert [(label, [r["level"] for r in rows]) for label, rows in metrics.labelled_series("us", latest)] == \
        [(f"us: {texts[0]}", [0.5, 1.0]), (f"us: {texts[1]}", [0.25, 1.0])]
    figure = metrics.draw_runs([("us", latest)])
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines[f"us: {texts[1]}"].get_ydata()) == pytest.approx([30, 70])
    assert list(lines[f"us: {texts[1]}: --eval_only"].get_xdata()) == [0.25]  # 1.0 was in the training grid
    assert f"{texts[0]}:\n" in format_table(latest) and f"{texts[1]}:\n" in format_table(latest)


def test_results_csv_and_plot_after_an_evaluation(tmp_path):
    rows = [row(0, 0, 1.0, 0.1), row(1, 20, 0.05, 0.25, effective_topk=0.05, bn_stats={"x": 1.0}),
            row(1, 20, 1.0, 0.75, effective_topk=1.0, bn_stats={"x": 2.0})]
    update_outputs(str(tmp_path), rows)
    assert read_rows(tmp_path) == rows
    table = read_csv(tmp_path / metrics.RESULTS)
    # Every column of every setting, in a fixed order; empty where a metric does not apply.
    assert table[0] == ["evaluation", "epoch", "step", "setting", "method", "model", "dataset", "norm",
                        "num_classes", "level_name", "level", "alpha", "accuracy", "loss", "num_images", "data_dir",
                        "sparsity",
                        "num_bits", "act_quant", "conv_params", "macs", "nonzero_params", "effective_topk", "params",
                        "channel_floor_applied", "bn_calibration_images", "lec_test_batch_statistics", "final",
                        "eval_only", "checkpoint"]
    assert table[1:] == [
        ["1", "2", "20", "unstructured_sparsity", "lcs_l", "cpreresnet20", "cifar10", "GN", "", "topk", "0.05", "",
         "0.25", "1.5", "100", "", "0.5", "", "", "", "", "", "0.05", "", "", "", "", "False", "False", ""],
        ["1", "2", "20", "unstructured_sparsity", "lcs_l", "cpreresnet20", "cifar10", "GN", "", "topk", "1.0", "",
         "0.75", "1.5", "100", "", "0.5", "", "", "", "", "", "1.0", "", "", "", "", "False", "False", ""]]
    plot = tmp_path / metrics.PLOT
    assert png_size(plot) == (640, 440)  # figsize 6.4 x 4.4 inches at 100 dpi
    assert 5_000 < os.path.getsize(plot) < 200_000


def test_format_table_by_hand():
    rows = [dict(row(1, 20, 0.25, 0.125, setting="structured_sparsity", level_name="width_factor"), alpha=0.0),
            dict(row(1, 20, 1.0, 0.5, setting="structured_sparsity", level_name="width_factor"), alpha=1.0,
                 sparsity=0.0)]
    assert format_table(rows) == ("width_factor   alpha  accuracy    loss  sparsity\n"
                                  "      0.2500  0.0000    12.50%  1.5000    0.5000\n"
                                  "      1.0000  1.0000    50.00%  1.5000    0.0000")
    quantized = [dict(row(1, 20, 3, 0.3, setting="quantized", level_name="num_bits"), act_quant=True)]
    assert format_table(quantized) == ("num_bits  accuracy    loss  act_quant\n"
                                       "       3    30.00%  1.5000        yes")


# -- training runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tiny_cifar, tmp_path_factory):
    """Unstructured lcs_l and lcs_p, 1 epoch each, evaluated at TopK 0.05, 0.5 and 1. For
    lcs_l, results.csv is copied after every evaluation and the printed output kept."""
    root = tmp_path_factory.mktemp("results")
    snapshots, outputs = [], {}
    original = train.update_outputs

    def update_and_snapshot(save_dir, rows, units=None):
        original(save_dir, rows, units)
        if save_dir.endswith("lcs_l"):
            snapshots.append((read_csv(os.path.join(save_dir, metrics.RESULTS)), [dict(r) for r in rows]))

    train.update_outputs = update_and_snapshot
    try:
        for method in ("lcs_l", "lcs_p"):
            printed = io.StringIO()
            with one_thread(), contextlib.redirect_stdout(printed):
                assert run_script("unstructured_sparsity", "--method", method, "--epochs", 1, "--batch_size", 8,
                                  "--train_subset", 32, "--test_subset", 16, "--test_freq", 1,
                                  "--eval_topk_grid", "0.05,0.5,1", "--data_dir", tiny_cifar,
                                  "--save_dir", root / method) == 0
            outputs[method] = printed.getvalue()
    finally:
        train.update_outputs = original
    return root, snapshots, outputs


def test_results_csv_follows_every_evaluation(two_runs):
    root, snapshots, _ = two_runs
    assert len(snapshots) == 2  # the epoch-0 evaluation and the final one
    for table, rows in snapshots:
        latest = [r for r in rows if r["evaluation"] == rows[-1]["evaluation"]]
        header = table[0]
        assert [float(line[header.index("level")]) for line in table[1:]] == [0.05, 0.5, 1.0]
        assert [float(line[header.index("accuracy")]) for line in table[1:]] == [r["accuracy"] for r in latest]
        assert [line[header.index("final")] for line in table[1:]] == [str(latest[0]["final"])] * 3
    plot = root / "lcs_l" / metrics.PLOT
    assert png_size(plot) == (640, 440) and 5_000 < os.path.getsize(plot) < 200_000


def test_end_of_training_table_and_file_locations(two_runs):
    root, _, outputs = two_runs
    final = [r for r in read_rows(root / "lcs_l") if r["final"]]
    text = outputs["lcs_l"]
    summary = text[text.index("Final evaluation (unstructured_sparsity, lcs_l, cpreresnet20, epoch 1):"):]
    assert format_table(final) in summary
    assert f"Files in {root / 'lcs_l'}:" in summary
    for name in ("config.yaml", "metrics.jsonl", "results.csv", "accuracy_vs_compression.png",
                 "checkpoint_last.pt", "model_final.pt"):
        assert f"  {name} " in summary and (root / "lcs_l" / name).is_file()


@pytest.mark.slow
def test_compare_two_run_directories(two_runs, tmp_path):
    root, _, _ = two_runs
    out = tmp_path / "figures" / "compare.png"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "compare_runs.py", str(root / "lcs_l"), str(root / "lcs_p"),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (640, 440) and 5_000 < os.path.getsize(out) < 200_000
    table = read_csv(tmp_path / "figures" / "compare.csv")
    assert table[0] == ["setting", "level_name", "level", "lcs_l: accuracy", "lcs_l: sparsity", "lcs_p: accuracy",
                        "lcs_p: sparsity"]
    finals = {method: {r["level"]: r for r in read_rows(root / method) if r["final"]} for method in ("lcs_l", "lcs_p")}
    assert [float(line[2]) for line in table[1:]] == [0.05, 0.5, 1.0]
    for line in table[1:]:
        level = float(line[2])
        assert float(line[3]) == finals["lcs_l"][level]["accuracy"]
        assert float(line[5]) == finals["lcs_p"][level]["accuracy"]
        assert float(line[4]) == finals["lcs_l"][level]["sparsity"] == float(line[6])
    printed = result.stdout
    assert f"lcs_l: {root / 'lcs_l'} (unstructured_sparsity, lcs_l, cpreresnet20, cifar10, GN), final evaluation" \
        in printed
    assert f"{100 * finals['lcs_p'][0.5]['accuracy']:.2f}%" in printed
    assert f"Figure: {out}" in printed and f"Table: {tmp_path / 'figures' / 'compare.csv'}" in printed


def synthetic_run(directory, setting, level_name, method, levels):
    os.makedirs(directory)
    write_rows(os.path.join(directory, metrics.METRICS),
               [row(0, 40, level, 0.5 + level / 10, setting=setting, level_name=level_name, method=method, final=True)
                for level in levels])
    return str(directory)


def test_compare_runs_of_different_settings_side_by_side(tmp_path, capsys):
    structured = synthetic_run(tmp_path / "s", "structured_sparsity", "width_factor", "us", [0.25, 1.0])
    quantized = synthetic_run(tmp_path / "q", "quantized", "num_bits", "lcs_l", [3, 8])
    unstructured = synthetic_run(tmp_path / "u", "unstructured_sparsity", "topk", "lcs_l", [0.05, 1.0])
    out = str(tmp_path / "all.png")
    compare.main([structured, quantized, unstructured, "--out", out, "--labels", "US,LCS+L q,LCS+L u"])
    assert png_size(out) == (3 * 560 + 80, 440)  # one 5.6-inch axes per setting
    table = read_csv(tmp_path / "all.csv")
    assert table[0] == ["setting", "level_name", "level", "US: accuracy", "US: sparsity", "LCS+L q: accuracy",
                        "LCS+L q: sparsity", "LCS+L u: accuracy", "LCS+L u: sparsity"]
    assert table[1:] == [
        ["structured_sparsity", "width_factor", "0.25", "0.525", "0.5", "", "", "", ""],
        ["structured_sparsity", "width_factor", "1.0", "0.6", "0.5", "", "", "", ""],
        ["quantized", "num_bits", "3", "", "", "0.8", "0.5", "", ""],
        ["quantized", "num_bits", "8", "", "", "1.3", "0.5", "", ""],
        ["unstructured_sparsity", "topk", "0.05", "", "", "", "", "0.505", "0.5"],
        ["unstructured_sparsity", "topk", "1.0", "", "", "", "", "0.6", "0.5"]]
    assert "LCS+L q: accuracy" in capsys.readouterr().out


def test_compare_default_labels_tell_runs_apart(tmp_path):
    first = synthetic_run(tmp_path / "a", "structured_sparsity", "width_factor", "us", [1.0])
    second = synthetic_run(tmp_path / "b", "structured_sparsity", "width_factor", "us", [1.0])
    third = synthetic_run(tmp_path / "c", "structured_sparsity", "width_factor", "lcs_l", [1.0])
    runs = [(d, compare.load_run(d)) for d in (first, second, third)]
    assert compare.default_labels(runs) == [f"us [{first}]", f"us [{second}]", "lcs_l"]


def test_compare_gives_each_series_of_a_run_its_columns(tmp_path):
    directory = tmp_path / "us"
    os.makedirs(directory)
    write_rows(str(directory / metrics.METRICS),
               [row(0, 40, 1.0, 0.5, final=True, bn_calibration_images=0),
                row(1, 40, 1.0, 0.6, eval_only=True, bn_calibration_images=64)])
    out = tmp_path / "cmp.png"
    compare.main([str(directory), "--out", str(out), "--labels", "us"])
    table = read_csv(tmp_path / "cmp.csv")
    assert table[0][3::2] == ["us: BN running statistics: accuracy", "us: BN re-estimated on 64 training images: "
                                                                      "accuracy"]
    assert table[1][3::2] == ["0.5", "0.6"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    good = synthetic_run(tmp_path / "good", "structured_sparsity", "width_factor", "us", [1.0])
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"level": 1}\n')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{not json\n')
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    other = synthetic_run(tmp_path / "other", "structured_sparsity", "width_factor", "lcs_l", [1.0])
    out = str(tmp_path / "fig.png")
    cases = [
        ([str(tmp_path / "missing"), "--out", out], f"{tmp_path / 'missing'}: no such run directory"),
        ([str(tmp_path / "empty"), "--out", out], f"{tmp_path / 'empty'}: no metrics.jsonl in it"),
        ([str(bad), "--out", out], f"{bad / 'metrics.jsonl'}:1: not a metrics row of this project"),
        ([str(broken), "--out", out], f"{broken / 'metrics.jsonl'}:1: not a JSON line (Expecting property name"),
        ([good, "--out", str(tmp_path / "fig.pdf")], "must name a .png file"),
        ([good, "--out", str(tmp_path / "nowhere" / "fig.png")], "does not exist"),
        ([good, "--out", out, "--labels", "a,b"], "--labels: 2 labels for 1 run directories"),
        ([str(deep), "--out", out], f"{deep / 'metrics.jsonl'}:1: nested too deeply to be a metrics row"),
        ([good, other, "--out", out, "--labels", "a,a"], "--labels: 'a' is given twice"),
        ([good, other, "--out", out, "--labels", "a, "], "--labels: label 2 of 2 is empty"),
        ([good, other, "--out", out, "--labels", ","], "--labels: label 1 of 2 is empty"),
        ([good, "--out", out, "--labels", ""], "--labels: label 1 of 1 is empty"),
        ([good, other, good, "--out", out], f"{good}: given twice; give each run directory once"),
        ([good, good + os.sep, "--out", out], f"{good + os.sep}: given twice (the same directory as {good})"),
        ([good], "the following arguments are required: --out"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and message in error, error
    assert not os.path.exists(out)

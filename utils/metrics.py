"""Run outputs: metrics.jsonl (every evaluation), results.csv and the plot (the latest
results, see latest_results: one series per way of evaluating), and the summary table printed
at the end of training."""

import csv
import io
import json
import math
import os

from utils.checkpoint import atomic_write, write_text
from utils.errors import DataError

METRICS = "metrics.jsonl"
RESULTS = "results.csv"
PLOT = "accuracy_vs_compression.png"
# results.csv has these columns in this order whatever the setting, method or evaluation
# (a cell is empty where a metric does not apply); docs/outputs.md describes them. Every
# scalar a metrics row holds must have its column here (write_results_csv checks).
RESULT_COLUMNS = ("evaluation", "epoch", "step", "setting", "method", "model", "dataset", "norm", "num_classes",
                  "level_name", "level", "alpha", "accuracy", "loss", "num_images", "data_dir", "sparsity",
                  "num_bits", "act_quant", "conv_params", "macs", "nonzero_params", "effective_topk", "params",
                  "channel_floor_applied", "bn_calibration_images", "lec_test_batch_statistics", "final",
                  "eval_only", "checkpoint")
# alpha is rounded in results.csv (metrics.jsonl keeps full precision).
CSV_DIGITS = {"alpha": 4}
# Each row's fields and the types they must have; None marks a field that may be null.
ROW_TYPES = {"evaluation": (int,), "epoch": (int,), "step": (int,), "setting": (str,), "method": (str,),
             "model": (str,), "dataset": (str,), "norm": (str,), "level_name": (str,), "level": (float,),
             "accuracy": (float,), "num_images": (int,), "final": (bool,), "loss": (float, None),
             "alpha": (float, None), "sparsity": (float, None),
             # how the evaluation was made (PROTOCOL); absent from rows written before each was recorded
             "data_dir": (str, None), "bn_calibration_images": (int, None), "lec_test_batch_statistics": (bool, None)}
ROW_KEYS = set(ROW_TYPES) - {"loss", "alpha", "sparsity", "data_dir", "bn_calibration_images",
                             "lec_test_batch_statistics"}
# Rows that agree on these describe the same model.
MODEL_STATE_KEYS = ("step", "setting", "method", "model", "dataset", "norm")
LOG_TICKS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def evaluation_rows(results, index, epoch, step, config, level_name, num_classes, final=False, eval_only=False,
                    checkpoint=None):
    """The metrics rows of one evaluation (one per level): where the run stood, what was
    trained, then the evaluation's results and the test images' directory."""
    data_dir = os.path.abspath(config.imagenet_dir if config.dataset == "imagenet" else config.data_dir)
    rows = []
    for result in results:
        row = {"evaluation": index, "epoch": epoch, "step": step, "setting": config.setting,
               "method": config.method, "model": config.model, "dataset": config.dataset, "norm": config.norm,
               "num_classes": num_classes, "level_name": level_name, **result, "data_dir": data_dir,
               "final": final, "eval_only": eval_only}
        if eval_only:
            row["checkpoint"] = os.path.abspath(checkpoint)
        row.setdefault("sparsity", None)
        row.setdefault("num_bits", None)
        rows.append(row)
    return rows


def read_rows(path):
    """The rows of a metrics.jsonl file ([] if there is none); DataError naming the line (and
    field) of a damaged one."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text (a damaged or foreign file)") from None
            if line.strip():
                rows.append(_parse_row(path, number, line))
    return rows


def _parse_row(path, number, line):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    except RecursionError:  # a hostile line such as [[[[...]]]] nested 100,000 deep
        raise DataError(f"{path}:{number}: nested too deeply to be a metrics row of this project") from None
    if not isinstance(row, dict) or not ROW_KEYS <= set(row):
        raise DataError(f"{path}:{number}: not a metrics row of this project")
    for key, kinds in ROW_TYPES.items():
        value = row.get(key)
        if not _has_type(value, kinds):
            words = " or ".join("null" if kind is None else TYPE_WORDS[kind] for kind in kinds)
            raise DataError(f"{path}:{number}: {key} is {shown_json(value)}, expected {words}")
    return row


def shown_json(value, limit=60):
    text = json.dumps(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _has_type(value, kinds):
    if value is None:
        return None in kinds
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds and math.isfinite(value)
    return any(kind is not None and isinstance(value, kind) for kind in kinds)


def strict_row(row):
    """The row as strict JSON allows: a non-finite number (a loss that overflowed) becomes null,
    and the field `non_finite` says which fields were and what they held ("nan", "inf")."""
    replaced = {}

    def clean(value, name):
        if isinstance(value, float) and not math.isfinite(value):
            replaced[name] = str(value)
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{name}.{key}") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{name}[{index}]") for index, item in enumerate(value)]
        return value

    cleaned = {key: clean(value, key) for key, value in row.items()}
    if replaced:
        cleaned["non_finite"] = {**(row.get("non_finite") or {}), **replaced}
    return cleaned


def write_rows(path, rows):
    write_text(path, "".join(json.dumps(strict_row(row), allow_nan=False) + "\n" for row in rows))


def bn_statistics_text(row):
    if row.get("lec_test_batch_statistics"):
        return "BN statistics of each test batch"
    images = row.get("bn_calibration_images")
    if images is None:  # rows written before it was recorded
        return "BN statistics not recorded"
    return f"BN re-estimated on {images} training images" if images else "BN running statistics"


# How an evaluation was made, beyond which model: rows that differ in one of these aspects
# were measured differently and form another series, never merged with or replacing the
# others. {aspect: (its value in a row, its description)}; a row without a field (written
# before it was recorded) has None there.
PROTOCOL = {
    "bn": (lambda row: (row.get("bn_calibration_images"), row.get("lec_test_batch_statistics")),
           bn_statistics_text),
    "data_dir": (lambda row: row.get("data_dir"), lambda row: f"data {row.get('data_dir') or 'not recorded'}"),
    "num_images": (lambda row: row["num_images"], lambda row: f"{row['num_images']} test images"),
}


def protocol(row):
    return tuple(value(row) for value, _ in PROTOCOL.values())


def series(rows):
    """The rows of one model split by how they were evaluated (PROTOCOL): a list of series, in
    the order each first appears, each one row per level sorted by level. Within a series a
    level keeps its first row: a later one is the same measurement again (e.g. --eval_only at a
    level of the training grid)."""
    groups = {}
    for row in rows:
        groups.setdefault(protocol(row), {}).setdefault(row["level"], row)
    return [sorted(by_level.values(), key=lambda row: row["level"]) for by_level in groups.values()]


def series_texts(groups):
    """What tells each series of `groups` apart from the others ('' when there is one)."""
    varying = [index for index in range(len(PROTOCOL)) if len({protocol(rows[0])[index] for rows in groups}) > 1]
    describe = [text for _, text in PROTOCOL.values()]
    return [", ".join(describe[index](rows[0]) for index in varying) for rows in groups]


def labelled_series(label, rows):
    """[(label, rows)] of each series of `rows` (one model), the label extended by what
    differs where there are several."""
    groups = series(rows)
    if len(groups) == 1:
        return [(label, groups[0])]
    return [(f"{label}: {text}" if label else text, group) for text, group in zip(series_texts(groups), groups)]


def latest_results(rows):
    """The results of the model of the most recent evaluation: that evaluation's rows, plus the
    levels that other evaluations of the same model added (e.g. --eval_only at new levels after
    the final evaluation), as series (see `series`) one after the other."""
    if not rows:
        return []
    state = [rows[-1].get(key) for key in MODEL_STATE_KEYS]
    same_model = [row for row in rows if [row.get(key) for key in MODEL_STATE_KEYS] == state]
    return [row for group in series(same_model) for row in group]


def csv_cell(key, value):
    if value is None:
        return ""
    if key in CSV_DIGITS and isinstance(value, float):
        return round(value, CSV_DIGITS[key])
    return value


def write_csv(path, header, lines):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    write_text(path, buffer.getvalue())


def write_results_csv(path, rows):
    for row in rows:
        unknown = [key for key, value in row.items()
                   if key not in RESULT_COLUMNS and not isinstance(value, (dict, list))]
        assert not unknown, f"metrics {unknown} have no results.csv column: add them to RESULT_COLUMNS"
    write_csv(path, RESULT_COLUMNS, [[csv_cell(key, row.get(key)) for key in RESULT_COLUMNS] for row in rows])


def plot_runs(path, runs, title=None, units=None):
    """Write the figure of draw_runs to `path` (PNG)."""
    import matplotlib.pyplot as plt

    figure = draw_runs(runs, title, units)
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


def draw_runs(runs, title=None, units=None):
    """Accuracy against level, one line per run and series: runs = [(label, rows of one model,
    e.g. latest_results)]; a run evaluated in several ways (see `series`) gets a line per way,
    labelled by what differs. Levels outside the grid evaluated in training (added by
    --eval_only) are hollow markers, chance accuracy is dashed. Runs of different settings
    (width factor / TopK / bit width) get side-by-side axes. `units`: {level name: its unit
    (methods.base.LevelUnit: axis_label, scale)}; a level name without one is its own label on a
    linear axis. Rows with an `accuracy_spread` (a mean over seeds) get error bars of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level_names = []
    for _, rows in runs:
        if rows and rows[0]["level_name"] not in level_names:
            level_names.append(rows[0]["level_name"])
    level_names = level_names or ["level"]
    figure, all_axes = plt.subplots(1, len(level_names), figsize=(5.6 * len(level_names) + 0.8, 4.4), dpi=100,
                                    squeeze=False)
    for axes, level_name in zip(all_axes[0], level_names):
        shown = [(label, [row for row in rows if row["level_name"] == level_name]) for label, rows in runs]
        shown = [(label, rows) for label, rows in shown if rows]
        for run_label, run_rows in shown:
            trained = {row["level"] for row in run_rows if not row.get("eval_only")}
            for label, rows in labelled_series(run_label, run_rows):
                _draw_series(axes, label, rows, trained)
        chances = sorted({chance for _, rows in shown for chance in [chance_accuracy(rows[0])] if chance})
        for chance in chances:
            axes.axhline(100 * chance, color="gray", linestyle="--", linewidth=1,
                         label=f"chance ({100 * chance:g} %)")
        # From 0, so that a spread of a few points is not drawn as a collapse.
        highest = max([100 * row["accuracy"] for _, rows in shown for row in rows] + [100 * c for c in chances] + [0])
        axes.set_ylim(0, min(100, 10 * math.ceil((highest + 2) / 10)))
        unit = (units or {}).get(level_name)
        if unit is not None and unit.scale == "log":
            _log_axis(axes, [row["level"] for _, rows in shown for row in rows])
        axes.set_xlabel(unit.axis_label if unit is not None else level_name)
        axes.set_ylabel("test accuracy (%)")
        axes.grid(True, which="both", alpha=0.3)
        if axes.get_legend_handles_labels()[1]:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    _set_margins(figure, len(level_names), title)
    return figure


# Margins in inches, as tight_layout measured them for these figures (y tick labels up to "100",
# one axis label per side, a 9-point title line 0.24 in), with a little room to spare. Fixed
# rather than measured: tight_layout draws the figure once more to measure it, which was a
# third of the time of each redraw (0.113 s against 0.081 s a figure on this project's machine),
# and a run redraws after every evaluation.
MARGINS = {"left": 0.8, "right": 0.2, "bottom": 0.62, "top": 0.22, "title_line": 0.24, "between": 0.85}


def _set_margins(figure, columns, title):
    width, height = figure.get_size_inches()
    top = MARGINS["top"] + (MARGINS["title_line"] * len(title.splitlines()) if title else 0.0)
    axes_width = (width - MARGINS["left"] - MARGINS["right"] - MARGINS["between"] * (columns - 1)) / columns
    figure.subplots_adjust(left=MARGINS["left"] / width, right=1 - MARGINS["right"] / width,
                           bottom=MARGINS["bottom"] / height, top=1 - top / height,
                           wspace=MARGINS["between"] / axes_width)


def _draw_series(axes, label, rows, trained):
    """One series as a line; its levels outside the `trained` grid (added by --eval_only) as
    hollow markers."""
    line, = axes.plot([row["level"] for row in rows], [100 * row["accuracy"] for row in rows], marker="o",
                      markersize=4, label=label)
    # Rows averaged over seeds (experiments/reproduce.py) carry their standard deviation.
    spread = [row.get("accuracy_spread") for row in rows]
    if any(value is not None for value in spread):
        axes.errorbar([row["level"] for row in rows], [100 * row["accuracy"] for row in rows],
                      yerr=[100 * (value or 0) for value in spread], fmt="none", ecolor=line.get_color(), capsize=3,
                      linewidth=1)
    added = [row for row in rows if row.get("eval_only") and row["level"] not in trained]
    if added:
        axes.plot([row["level"] for row in added], [100 * row["accuracy"] for row in added], linestyle="",
                  marker="o", markersize=8, markerfacecolor="white", markeredgecolor=line.get_color(),
                  label=f"{label}: --eval_only" if label else "--eval_only")


def _log_axis(axes, levels):
    """Log x axis with plain-number ticks (0.025, 0.05, ...) instead of powers of ten."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    axes.set_xscale("log")
    low, high = min(levels), max(levels)
    ticks = [t for t in LOG_TICKS if low <= t <= high] or [low, high]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.set_xticklabels([f"{t:g}" for t in ticks])
    axes.xaxis.set_minor_formatter(NullFormatter())


# Chance accuracy where rows lack num_classes (written before it was recorded).
DATASET_CLASSES = {"cifar10": 10}


def chance_accuracy(row):
    """1 / number of classes, or None when unknown."""
    classes = row.get("num_classes") or DATASET_CLASSES.get(row.get("dataset"))
    return 1 / classes if classes else None


def model_state(rows):
    """What the latest results of one model are: 'final evaluation', '--eval_only' levels
    added to it, or the epoch of an unfinished run."""
    epoch = rows[-1]["epoch"]
    final = any(row["final"] for row in rows)
    if any(row.get("eval_only") for row in rows):
        return (f"final evaluation + --eval_only levels, epoch {epoch}" if final
                else f"--eval_only of the epoch {epoch} model")
    return f"final evaluation, epoch {epoch}" if final else f"epoch {epoch} (run not finished)"


def run_label(row):
    return f"{row['method']} ({row['model']}, {row['norm']})"


def update_outputs(save_dir, rows, units=None):
    """Rewrite metrics.jsonl, results.csv and the plot (`units` as draw_runs takes them) after an
    evaluation."""
    write_rows(os.path.join(save_dir, METRICS), rows)
    latest = latest_results(rows)
    write_results_csv(os.path.join(save_dir, RESULTS), latest)
    if latest:
        last = latest[-1]
        title = f"{last['setting']} / {run_label(last)} on {last['dataset']}\n{model_state(latest)}"
        plot_runs(os.path.join(save_dir, PLOT), [(last["method"], latest)], title=title, units=units)


def _format(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows):
    """A compact text table of one model's results: level, (alpha,) accuracy, loss, and
    sparsity or whether activations were quantized; one per series, each under what tells it
    apart, where the model was evaluated in several ways."""
    if not rows:
        return ""
    groups = series(rows)
    if len(groups) > 1:
        return "\n\n".join(f"{text}:\n{_series_table(group)}" for text, group in zip(series_texts(groups), groups))
    return _series_table(rows)


def _series_table(rows):
    # Sparsity for the sparsity settings; for quantized models, whether activations were quantized.
    extra = "act_quant" if rows[0].get("act_quant") is not None else "sparsity"
    has_alpha = any(row.get("alpha") is not None for row in rows)
    header = [rows[0]["level_name"]] + (["alpha"] if has_alpha else []) + ["accuracy", "loss", extra]
    lines = []
    for row in rows:
        alpha = [_format(row.get("alpha"))] if has_alpha else []
        lines.append([_format(row["level"])] + alpha + [f"{100 * row['accuracy']:.2f}%", _format(row["loss"]),
                                                         _format(row.get(extra))])
    return text_table(header, lines)


def text_table(header, lines):
    """Right-aligned columns separated by two spaces."""
    table = [list(header)] + [list(line) for line in lines]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table)

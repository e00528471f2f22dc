"""Compare runs: accuracy against compression level of several run directories in one
figure and one table (the paper-style comparison of lcs_l, lcs_p and the baselines).

    python compare_runs.py RUN_DIR [RUN_DIR ...] --out FIG.png [--labels A,B,...]

Each run contributes the results of its latest model: its final evaluation (or, for an
unfinished run, its latest one) plus any levels added with --eval_only from the same
checkpoint (utils.metrics.latest_results); evaluations made another way (BN statistics, test
images) are a series of their own, with a line and columns labelled by what differs. Runs of
the same setting share one axes; runs of different settings (width factor / TopK / bit width)
get axes side by side. The table, printed and written to FIG.csv, has one row per setting and
level and, per run (and series), its accuracy (and sparsity for the sparsity settings); an
empty cell means the run was not evaluated at that level.
"""

import os
import sys

from methods import in_current_units, level_units
from utils.atomic import refuse_overwrite
from utils.errors import ConfigError, UsageParser, UserError, one_line, shown
from utils.metrics import (METRICS, labelled_series, latest_results, model_state, plot_runs, read_rows, text_table,
                           write_csv)


def load_run(run_dir):
    """The latest results of the run in `run_dir`; a one-line error naming what is missing."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no {METRICS} in it (not a run directory, or no evaluation recorded yet)")
    rows = in_current_units(read_rows(path))
    if not rows:
        raise ConfigError(f"{path}: holds no evaluation yet")
    return latest_results(rows)


def default_labels(runs):
    """The method, plus model / dataset / norm where the runs differ in them, plus the
    directory where that still leaves two runs with the same label."""
    firsts = [rows[0] for _, rows in runs]
    varying = [key for key in ("model", "dataset", "norm") if len({row[key] for row in firsts}) > 1]
    labels = []
    for row in firsts:
        details = ", ".join(row[key] for key in varying)
        labels.append(f"{row['method']} ({details})" if details else row["method"])
    return [label if labels.count(label) == 1 else f"{label} [{run_dir}]"
            for label, (run_dir, _) in zip(labels, runs)]


def comparison_table(labelled):
    """(header, lines): one line per (setting, level unit, level), per run its accuracy and
    sparsity (values as recorded: fractions; None where the run has no such level). The level
    unit is the method's (LEC's fractions of channels kept are not width factors)."""
    settings = []
    for _, rows in labelled:
        if (rows[0]["setting"], rows[0]["level_name"]) not in settings:
            settings.append((rows[0]["setting"], rows[0]["level_name"]))
    with_sparsity = any(row.get("sparsity") is not None for _, rows in labelled for row in rows)
    header = ["setting", "level_name", "level"]
    for label, _ in labelled:
        header.append(f"{label}: accuracy")
        if with_sparsity:
            header.append(f"{label}: sparsity")
    lines = []
    for setting, level_name in settings:
        runs = [(label, {row["level"]: row for row in rows
                         if (row["setting"], row["level_name"]) == (setting, level_name)})
                for label, rows in labelled]
        for level in sorted({level for _, by_level in runs for level in by_level}):
            line = [setting, level_name, level]
            for _, by_level in runs:
                row = by_level.get(level)
                line.append(row["accuracy"] if row else None)
                if with_sparsity:
                    line.append(row.get("sparsity") if row else None)
            lines.append(line)
    return header, lines


def _printable(header, lines):
    def cell(name, value):
        if value is None:
            return ""
        if name.endswith(": accuracy"):
            return f"{100 * value:.2f}%"
        if isinstance(value, float):
            return f"{value:.4f}" if name.endswith(": sparsity") else f"{value:g}"
        return str(value)
    return text_table(header, [[cell(name, value) for name, value in zip(header, line)] for line in lines])


def drop_empty_columns(header, lines):
    """The table without the run columns that are empty for every level (e.g. sparsity of a
    run that records none)."""
    keep = [index for index, name in enumerate(header)
            if index < 3 or any(line[index] is not None for line in lines)]
    return [header[i] for i in keep], [[line[i] for i in keep] for line in lines]


def describe(label, run_dir, rows):
    row = rows[-1]
    return (f"{label}: {run_dir} ({row['setting']}, {row['method']}, {row['model']}, {row['dataset']}, "
            f"{row['norm']}), {model_state(rows)}, {row['num_images']} test images")


def check_distinct(run_dirs, labels):
    """Each run once and each label its own: the table's columns and the legend are keyed by
    label, so a repeated or empty one would merge or hide runs."""
    seen = {}
    for run_dir in run_dirs:
        first = seen.get(os.path.realpath(run_dir))
        if first is not None:
            also = "" if first == run_dir else f" (the same directory as {first})"
            raise ConfigError(f"{run_dir}: given twice{also}; give each run directory once")
        seen[os.path.realpath(run_dir)] = run_dir
    if labels is None:
        return
    if len(labels) != len(run_dirs):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(run_dirs)} run directories")
    for number, label in enumerate(labels, 1):
        if not label:
            raise ConfigError(f"--labels: label {number} of {len(labels)} is empty; give each run a label")
        if labels.index(label) != number - 1:
            raise ConfigError(f"--labels: {shown(label)} is given twice; give each run its own label")


def compare(run_dirs, out, labels=None):
    """Write the figure to `out` and the table to `out` with .csv; return the printed text."""
    if not out.lower().endswith(".png"):
        raise ConfigError(f"--out {out}: must name a .png file")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out}: directory {out_dir} does not exist")
    table_path = out[:-4] + ".csv"
    inputs = [os.path.join(run_dir, METRICS) for run_dir in run_dirs]
    refuse_overwrite("--out", out, inputs)
    refuse_overwrite("--out", table_path, inputs)
    check_distinct(run_dirs, labels)
    # Every row of every run is read and checked before anything is written.
    runs = [(run_dir, load_run(run_dir)) for run_dir in run_dirs]
    if labels is None:
        labels = default_labels(runs)
    labelled = [(label, rows) for label, (_, rows) in zip(labels, runs)]
    datasets = sorted({rows[0]["dataset"] for _, rows in runs})
    models = sorted({rows[0]["model"] for _, rows in runs})
    plot_runs(out, labelled, title=f"{', '.join(models)} on {', '.join(datasets)}", units=level_units())
    # A run evaluated in several ways (BN statistics, test images) gets a column per way.
    columns = [entry for label, rows in labelled for entry in labelled_series(label, rows)]
    header, lines = drop_empty_columns(*comparison_table(columns))
    write_csv(table_path, header, [["" if value is None else value for value in line] for line in lines])
    text = [describe(label, run_dir, rows) for label, (run_dir, rows) in zip(labels, runs)]
    text += ["", _printable(header, lines), "", f"Figure: {out}", f"Table: {table_path}"]
    return "\n".join(text)


def build_parser():
    parser = UsageParser(
        prog="compare_runs.py",
        description="Overlay the accuracy-vs-compression results of several runs in one figure and one table.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="figure to write (PNG); the table goes next to it as .csv")
    parser.add_argument("--labels", help="comma-separated legend labels, one per run directory "
                                         "(default: the method, plus what tells the runs apart)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    labels = None if args.labels is None else [label.strip() for label in args.labels.split(",")]
    try:
        print(compare(args.run_dirs, args.out, labels))
    except UserError as error:
        print(f"compare_runs.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()

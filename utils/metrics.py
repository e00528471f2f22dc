"""Run outputs: metrics.jsonl (every evaluation), results.csv (the latest one), the plot,
and the summary table printed at the end of training."""

import csv
import io
import json
import os

from utils.checkpoint import atomic_write

METRICS = "metrics.jsonl"
RESULTS = "results.csv"
PLOT = "accuracy_vs_compression.png"
RESULT_COLUMNS = ("epoch", "level_name", "level", "alpha", "accuracy", "loss", "sparsity", "num_bits",
                  "act_quant", "macs", "params", "final")
AXIS_LABELS = {"width_factor": "width factor", "topk": "TopK fraction kept", "num_bits": "bit width"}


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_rows(path, rows):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, lambda temporary: _write_text(temporary, text))


def _write_text(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def latest_evaluation(rows):
    """The rows of the most recent evaluation (same `evaluation` index)."""
    if not rows:
        return []
    last = rows[-1]["evaluation"]
    return [row for row in rows if row["evaluation"] == last]


def write_results_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in RESULT_COLUMNS})
    atomic_write(path, lambda temporary: _write_text(temporary, buffer.getvalue()))


def plot_runs(path, runs, title=None):
    """Accuracy against level for several runs: runs = [(label, rows of one evaluation)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    level_names = set()
    for label, rows in runs:
        points = sorted((row["level"], 100 * row["accuracy"]) for row in rows)
        if not points:
            continue
        level_names.add(rows[0]["level_name"])
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel(" / ".join(AXIS_LABELS.get(n, n) for n in sorted(level_names)) or "level")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title, fontsize=9)
    if len(runs) > 1 or runs and runs[0][0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


def run_label(row):
    return f"{row['method']} ({row['model']}, {row['norm']})"


def update_outputs(save_dir, rows):
    """Rewrite metrics.jsonl, results.csv and the plot after an evaluation."""
    write_rows(os.path.join(save_dir, METRICS), rows)
    latest = latest_evaluation(rows)
    write_results_csv(os.path.join(save_dir, RESULTS), latest)
    if latest:
        first = latest[0]
        title = f"{first['setting']} / {run_label(first)}, epoch {first['epoch']}"
        plot_runs(os.path.join(save_dir, PLOT), [(first["method"], latest)], title=title)


def _format(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows):
    """A compact text table of one evaluation: level, accuracy and sparsity or bits."""
    if not rows:
        return ""
    level_name = rows[0]["level_name"]
    extra = "act_quant" if rows[0]["setting"] == "quantized" else "sparsity"
    header = [level_name, "alpha", "accuracy", "loss", extra]
    has_alpha = any(row.get("alpha") is not None for row in rows)
    if not has_alpha:
        header.remove("alpha")
    lines = [header]
    for row in rows:
        line = [_format(row["level"]), _format(row.get("alpha")), f"{100 * row['accuracy']:.2f}%",
                _format(row["loss"]), _format(row.get(extra))]
        if not has_alpha:
            del line[1]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)

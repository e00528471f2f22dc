"""TensorBoard curves of a run (--tensorboard), in <save_dir>/tensorboard/.

    train/loss, train/learning_rate           per logging step (the progress line's loss)
    accuracy/<unit>=<level>, loss/<unit>=<level>  per evaluation, one tag per level, the level
                                              unit in the tag (accuracy/width_factor=0.25)
    accuracy_vs_level                         the evaluation's accuracy-vs-level figure

The x axis is the training step count (global_step). Only rank 0 writes. An evaluation is
written after the checkpoint that holds it, and a resumed run opens the log with purge_step
= the checkpoint's step + 1, so TensorBoard drops whatever an interrupted process wrote after
its checkpoint: the resumed run continues one log without duplicated steps. tensorboard is an
optional dependency (requirements-tensorboard.txt), imported only here and only when asked
for; compare_runs.py stays the tool that compares runs.
"""

import os

from engine.run_dir import BOARD_DIR
from utils.errors import ConfigError
from utils.metrics import draw_runs


def summary_writer_class():
    """torch's SummaryWriter, or a one-line error naming the requirements file."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise ConfigError("--tensorboard: needs the tensorboard package: "
                          "pip install -r requirements-tensorboard.txt") from None
    return SummaryWriter


def level_tag(quantity, row):
    """accuracy/width_factor=0.25: the level and its unit in the tag."""
    return f"{quantity}/{row['level_name']}={row['level']:g}"


class Board:
    """What one run writes to TensorBoard; a no-op where --tensorboard is off or off rank 0."""

    def __init__(self, config, is_main, purge_step=None, units=None):
        self.writer, self.units = None, units
        if config.tensorboard and is_main:
            writer_class = summary_writer_class()
            self.writer = writer_class(os.path.join(config.save_dir, BOARD_DIR), purge_step=purge_step)

    def training(self, step, loss, learning_rate):
        if self.writer is None or loss is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", learning_rate, step)

    def evaluation(self, rows):
        """The rows of one evaluation (one per level)."""
        if self.writer is None or not rows:
            return
        step = rows[0]["step"]
        for row in rows:
            self.writer.add_scalar(level_tag("accuracy", row), row["accuracy"], step)
            self.writer.add_scalar(level_tag("loss", row), row["loss"], step)
        title = f"evaluation {rows[0]['evaluation']} (epoch {rows[0]['epoch']}" + (", final)" if rows[0]["final"]
                                                                                    else ")")
        self.writer.add_figure("accuracy_vs_level", draw_runs([(rows[0]["method"], rows)], title, self.units),
                               step, close=True)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()

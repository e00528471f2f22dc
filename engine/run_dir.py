"""The run directory: where it is, what it holds, and whether it may be resumed or overwritten.

Every decision about a run's directory lives here:

* where:       --save_dir as given; for --eval_only --checkpoint without it, the checkpoint's directory;
               otherwise <save_root>/<method>/<model>/<dataset>/<norm>
* what exists: config.yaml, metrics.jsonl, results.csv, the plot, checkpoint_last.pt and
               model_final.pt (FILE_DESCRIPTIONS); a new run refuses a directory holding any
               of them unless told to --resume or --overwrite
* resuming:    --resume alone continues from <save_dir>/checkpoint_last.pt; a checkpoint must
               come from the same setting, and resuming needs a training checkpoint
* files:       the resolved config.yaml (written when a run starts), the checkpoints' names
* whose:       a run's files describe its own model only. Each run gets a run id when it starts
               (a new one when overwritten; kept when resumed), written into its config.yaml and
               into every checkpoint's config; --eval_only writes into a directory holding a run
               only a model of that run (same id), and makes a new directory the evaluated model's
               (its config.yaml). A run or model of an earlier version has no id: then only the
               checkpoints lying in the directory itself are its own.
"""

import os
import shlex
import shutil
import uuid
from dataclasses import dataclass
from typing import Optional

import yaml

from utils import checkpoint as ckpt
from utils.errors import CheckpointError, ConfigError
from utils.metrics import METRICS, PLOT, RESULTS
from utils.stop_signals import TORCHRUN_SIGNALS
from utils.yaml_io import read_yaml

CONFIG_FILE = "config.yaml"
LAST, FINAL = ckpt.LAST, ckpt.FINAL
# The files of a run, as the end-of-run summary describes them.
FILE_DESCRIPTIONS = {
    CONFIG_FILE: "the resolved config",
    METRICS: "every evaluation, one JSON object per level",
    RESULTS: "the table above",
    PLOT: "accuracy against compression level",
    LAST: "training checkpoint (--resume)",
    FINAL: "the trained model (--eval_only --checkpoint)",
}
RUN_FILES = tuple(FILE_DESCRIPTIONS)
BOARD_DIR = "tensorboard"  # --tensorboard's log (engine/board.py), removed with the run by --overwrite


@dataclass
class RunOptions:
    """What to do with the config (not part of it)."""

    resume: Optional[str] = None        # None, "last" or a checkpoint path
    overwrite: bool = False
    eval_only: bool = False
    checkpoint: Optional[str] = None


def default_save_dir(config):
    return os.path.join(config.save_root, config.method, config.model, config.dataset, config.norm)


def locate(config, options, source):
    """Set config.save_dir (see the module docstring) and check it can be a directory;
    `source` names where an explicit save_dir came from, for errors."""
    if config.save_dir is None:
        if options.checkpoint:
            # As the user wrote it (relative stays relative, as for training runs).
            config.save_dir = os.path.dirname(options.checkpoint) or os.curdir
        else:
            config.save_dir, source = default_save_dir(config), "'save_root'"
    check_directory(config.save_dir, source)


def check_directory(save_dir, source):
    """The run directory must be a directory or creatable as one."""
    path = os.path.abspath(save_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if os.path.abspath(save_dir) == path else f"lies under the file {path}"
        raise ConfigError(f"{source}: the run directory {save_dir} {what}, expected a directory")


def last_checkpoint(save_dir):
    """The checkpoint `--resume` continues from."""
    path = os.path.join(save_dir, LAST)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no {LAST} in {save_dir} to resume from (pass --resume PATH or the "
                              f"run's --save_dir)")
    return path


def checkpoint_config(path, setting, training=False):
    """The config dict stored in a checkpoint made by the `setting` script (a training
    checkpoint when `training`, e.g. to resume). Read without torch where the file allows
    (ckpt.read_header): a command is checked against it in well under a second; the run loads
    the whole checkpoint, and checks it, later."""
    payload = ckpt.read_header(path) or ckpt.load(path)
    kind = "training checkpoint" if payload.get("kind") == "training" else "final model"
    held = f"a {kind} of {payload.get('setting')}/{payload.get('method')} ({payload.get('model_name')})"
    if payload.get("setting") != setting:
        raise CheckpointError(f"{path}: holds {held}, but this script trains {setting}")
    if training and payload.get("kind") != "training":
        raise CheckpointError(f"{path}: holds {held}, resuming needs a training checkpoint ({LAST})")
    if not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{path}: holds no run config (not a checkpoint of this project's format "
                              f"{ckpt.FORMAT})")
    return dict(payload["config"])


def check_free(save_dir, options):
    """Refuse to train (or to evaluate --init_from's weights) over an existing run unless told
    to resume or overwrite it; an evaluated checkpoint adds its rows (check_own_model)."""
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(save_dir, name))]
    if existing and not (options.resume or options.overwrite or options.checkpoint):
        what = ("pass --overwrite to replace it or choose another --save_dir" if options.eval_only else
                "pass --resume to continue it or --overwrite to replace it")
        raise ConfigError(f"--save_dir {save_dir}: already holds a run ({', '.join(existing)}); {what}")


def prepare(save_dir, config, options):
    """Create the directory, remove the files of a run being overwritten, give a run that starts
    its run id (a resumed one keeps its own), write config.yaml."""
    os.makedirs(save_dir, exist_ok=True)
    if options.overwrite:
        for name in RUN_FILES:
            path = os.path.join(save_dir, name)
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(save_dir, BOARD_DIR), ignore_errors=True)
    if not options.resume:
        config.run_id = uuid.uuid4().hex
    write_config(save_dir, config)


def write_config(save_dir, config):
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    ckpt.write_text(os.path.join(save_dir, CONFIG_FILE), text)


def prepare_evaluation(save_dir, config):
    """The directory an --eval_only call writes into; a new one becomes the evaluated model's
    (its config.yaml, run id included), so that later calls know whose results it holds."""
    os.makedirs(save_dir, exist_ok=True)
    if not os.path.exists(path(save_dir, CONFIG_FILE)):
        write_config(save_dir, config)


def check_own_model(save_dir, checkpoint, run_id):
    """--eval_only --checkpoint `checkpoint` (a model of the run `run_id`) may write into
    `save_dir` when the directory holds no run yet or that very run (see the module docstring)."""
    if not any(os.path.exists(path(save_dir, name)) for name in RUN_FILES):
        return
    config_file = path(save_dir, CONFIG_FILE)
    own_id = read_yaml(config_file).get("run_id") if os.path.exists(config_file) else None
    if own_id and run_id:
        if own_id == run_id:
            return
        whose = f"a model of run {run_id}, but {save_dir} holds run {own_id}"
    elif os.path.realpath(os.path.dirname(checkpoint) or os.curdir) == os.path.realpath(save_dir):
        return
    else:
        whose = f"without a run id (an earlier version's), only a model in {save_dir} itself may be evaluated there"
    raise ConfigError(f"--checkpoint {checkpoint}: {whose}; a run directory holds its own model's results only "
                      f"(evaluate it into its own run directory or a new --save_dir)")


def path(save_dir, name):
    return os.path.join(save_dir, name)


def describe_files(save_dir):
    """The summary lines naming the run's files and what each holds."""
    files = [(name, about) for name, about in FILE_DESCRIPTIONS.items() if os.path.exists(path(save_dir, name))]
    width = max(len(name) for name, _ in files)
    return f"Files in {save_dir}:\n" + "\n".join(f"  {name:<{width}}  {about}" for name, about in files)


def resume_command(script, save_dir, environ=os.environ):
    """The command that continues a run; under torchrun, with a torchrun prefix."""
    command = f"{script} --save_dir {shlex.quote(save_dir)} --resume"
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return f"python {command}"
    local = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    if local == world_size:
        return f"torchrun --standalone --nproc_per_node={local} {TORCHRUN_SIGNALS} {command}"
    return f"torchrun <this run's torchrun options, on every node> {command}"

"""Run the paper's experiments, or a CPU-sized version of them, in one command.

    python experiments/reproduce.py --recipe cpu --data_dir data/cifar10-jpeg --out results/cpu
    python experiments/reproduce.py --recipe paper --data_dir data/cifar10-jpeg --out results/paper --gpus 0,1,2,3
    python experiments/reproduce.py --recipe cpu --dry_run          # the commands and their cost, nothing run
    python experiments/reproduce.py --recipe paper-imagenet --imagenet_dir /data/imagenet --dry_run --estimate
    python experiments/reproduce.py --recipe cpu --data_dir data/cifar10-jpeg --seeds 0,1,2

A recipe (experiments/recipes.yaml, or a YAML file of the same shape) is a set of flags added to
every run and the setting/method pairs run by default. Each run is the project's own entry
script (train_structured.py, ...) in a subprocess, writing into <out>/<setting>/<run>/ (seed k
of --seeds into <out>/<setting>/<run>_seed<k>/, seed 0 where a one-seed sweep writes it); the
sweep adds no training code of its own.

* Runs go one after another on one device, or side by side with --gpus (one run per GPU, or
  per group of --gpus_per_run GPUs under torchrun), through CUDA_VISIBLE_DEVICES; or, with
  --launcher slurm, each as a Slurm job through submitit (experiments/launchers.py).
* Before anything runs (the dry run alike): every run's flags are checked by its script's parser,
  its directory's name and place, and what a directory already holds against what would run
  there; one sweep at a time writes into --out (a lock, as for a run directory).
* Calling it again is safe: a finished run is skipped, an interrupted one resumed (--resume),
  a failed one reported with the last line of its log while the others go on. SIGTERM, Ctrl-C,
  SIGHUP (a closed terminal) or the cluster's warning signal (utils/stop_signals.py) is passed on
  to the running runs, which stop after their current step, each with a checkpoint. The exit
  status is 0 only when every selected run has finished.
* The dry run prints each run's cost (epochs x training images); --estimate times the first
  steps of each run on this machine (in a temporary directory) and estimates the durations.
* At the end, per setting: comparison.png/.csv, the paper's curves (a per-target baseline's
  models joined into one curve, each at the level it trained; mean and standard deviation over
  the seeds), and runs.png/.csv, compare_runs' figure and table of every run directory; for the
  sweep: summary.md (per run and seed: status, wall time, budget, commit, machine; per setting
  the curves and each model's whole grid, mean ± spread over seeds, and the exact commands).
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import training_params  # noqa: E402  (the scripts' parsers and config merge; no torch)
from engine.progress import format_duration  # noqa: E402
from experiments import launchers  # noqa: E402  (--launcher slurm; submitit imported only there)
from engine.run_dir import CONFIG_FILE, check_directory  # noqa: E402
from methods import METHODS, in_current_units, level_units  # noqa: E402
from utils.checkpoint import write_text  # noqa: E402
from utils.errors import ConfigError, UsageParser, UserError, one_line, shown  # noqa: E402
from utils.metrics import METRICS, latest_results, plot_runs, protocol, read_rows, write_csv  # noqa: E402
from utils.run_lock import RunDirLock  # noqa: E402
from utils.stop_signals import STOP_SIGNALS, TORCHRUN_SIGNALS, exit_status, stopped_by  # noqa: E402
from utils.yaml_io import read_yaml  # noqa: E402

RECIPES = os.path.join(REPO, "experiments", "recipes.yaml")
RECORD = "sweep_run.json"   # beside a run's own files: how the sweep ran it (commands, wall time)
LOG = "train.log"           # the run's stdout and stderr, appended over its segments
FINAL_MODEL = "model_final.pt"
LAST_CHECKPOINT = "checkpoint_last.pt"
SUMMARY = "summary.md"
FIGURE = "comparison.png"      # per setting: the curves, mean and spread over seeds (and its .csv)
RUNS_FIGURE = "runs.png"       # per setting: every run directory's whole grid (and its .csv)
POLL_S = 0.5
# What the sweep sets in every run itself (--resume and --overwrite from the run's state) or
# what would make a run something else than a training run: a recipe may not give them.
SWEEP_FLAGS = ("method", "seed", "data_dir", "imagenet_dir", "save_dir", "resume", "overwrite", "eval_only",
               "checkpoint")
# The whole training sets (CIFAR-10, ILSVRC-2012), for a run without --train_subset.
TRAIN_IMAGES = {"cifar10": 50_000, "imagenet": 1_281_167}
# A run's script prints this once it has timed its first steps (engine/progress.py, RunClock).
PROBE_LINE = re.compile(r"Estimated duration of the run: .*\((\d+) epochs of (\d+) steps at ([0-9.eE+-]+) s per step")
PROBE_LIMIT_S = 600   # a probe that times no step by then is given up
NAME_MAX = 255    # bytes of one name in a path (Linux and macOS file systems)
PATH_MAX = 4096   # bytes of a whole path (Linux)


# ----------------------------------------------------------------------------- recipes

@dataclass
class RunSpec:
    setting: str
    method: str
    name: str                # the run's directory under <out>/<setting>/
    flags: list = field(default_factory=list)


@dataclass
class Recipe:
    name: str
    about: str
    flags: list
    runs: list               # RunSpec, in order
    where: str = ""          # the file and the recipe's name in it, for errors


def _flag_list(value, where):
    if value is None:
        return []
    if not isinstance(value, str):
        raise ConfigError(f"{where}: flags must be one string of command-line flags, got {type(value).__name__}")
    try:
        return shlex.split(value)
    except ValueError as error:
        raise ConfigError(f"{where}: flags cannot be split ({error})") from None


def known_pairs():
    """{setting: [method, ...]} of the methods' registry."""
    from methods import METHODS
    return {setting: list(methods) for setting, methods in METHODS.items()}


def setting_aliases(pairs):
    """Each setting by its full name and by its first word (structured, unstructured, quantized)."""
    aliases = {}
    for setting in pairs:
        aliases[setting] = setting
        aliases.setdefault(setting.split("_")[0], setting)
    return aliases


def parse_pair(text, pairs, where):
    """'setting/method' (setting by its full or short name) -> (setting, method)."""
    aliases = setting_aliases(pairs)
    setting_text, _, method = text.strip().partition("/")
    setting = aliases.get(setting_text)
    if setting is None:
        raise ConfigError(f"{where}: unknown setting {setting_text!r} in {text!r} "
                          f"(allowed: {', '.join(sorted(aliases))})")
    if method not in pairs[setting]:
        raise ConfigError(f"{where}: unknown method {method!r} of {setting} in {text!r} "
                          f"(allowed: {', '.join(pairs[setting])})")
    return setting, method


def _run_spec(entry, pairs, where):
    if isinstance(entry, str):
        entry = {"run": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("run"), str):
        raise ConfigError(f"{where}: a run is 'setting/method' or {{run: setting/method, name: ..., flags: ...}}")
    unknown = set(entry) - {"run", "name", "flags"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: run, name, flags)")
    setting, method = parse_pair(entry["run"], pairs, where)
    name = entry.get("name", method)
    # Printable: a newline or a NUL byte breaks the summary's rows or the file system's calls.
    if (not isinstance(name, str) or not name or "/" in name or name.startswith(".") or not name.isprintable()
            or len(name.encode("utf-8", "surrogateescape")) > NAME_MAX):
        raise ConfigError(f"{where}: name {shown(name)} must be a plain directory name (printable, no '/', "
                          f"not starting with '.', at most {NAME_MAX} bytes)")
    return RunSpec(setting, method, name, _flag_list(entry.get("flags"), f"{where} ({name})"))


def load_recipe(name_or_path, pairs):
    """The recipe named in experiments/recipes.yaml, or the one recipe of a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")):
        path, data = name_or_path, read_yaml(name_or_path)
        name = os.path.splitext(os.path.basename(path))[0]
    else:
        path, all_recipes = RECIPES, read_yaml(RECIPES)
        if name_or_path not in all_recipes:
            raise ConfigError(f"--recipe: unknown recipe {name_or_path!r} (allowed: {', '.join(all_recipes)}, "
                              f"or a .yaml file)")
        name, data = name_or_path, all_recipes[name_or_path]
    where = f"{path} ({name})"
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ConfigError(f"{where}: a recipe is a mapping with 'runs' (a list of setting/method) and "
                          f"optional 'flags' and 'about'")
    unknown = set(data) - {"about", "flags", "runs"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: about, flags, runs)")
    runs = [_run_spec(entry, pairs, where) for entry in data["runs"]]
    _check_unique(runs, where)
    recipe = Recipe(name, str(data.get("about") or "").strip(), _flag_list(data.get("flags"), where), runs, where)
    for spec in runs:
        check_recipe_flags(recipe, spec)
    return recipe


def parse_run_flags(spec, flags, where):
    """`flags` parsed by the parser of the run's script (training_params; no torch), as the
    script will parse them; ConfigError naming the run for any flag it refuses."""
    parser = training_params.build_parser(spec.setting)

    def refuse(message):
        raise ConfigError(f"{where}: run {spec.setting}/{spec.name}: {script_of(spec.setting)} refuses its flags: "
                          f"{message}")
    # One line instead of argparse's exit; --help would print the script's help and exit 0.
    parser.error = refuse
    parser.print_help = lambda *_: None
    parser.exit = lambda *_: refuse("-h/--help is not a run flag")
    return parser.parse_args(flags)


def check_recipe_flags(recipe, spec):
    """A recipe's flags for a run must be its script's and leave the sweep's own alone."""
    given = parse_run_flags(spec, recipe.flags + spec.flags, recipe.where)
    for key in SWEEP_FLAGS:
        if getattr(given, key) not in (None, False):
            why = ("a sweep trains its runs" if key in ("eval_only", "checkpoint") else
                   "the sweep sets --method, --seed, --data_dir, --imagenet_dir and --save_dir of each run, "
                   "and --resume or --overwrite from its state")
            raise ConfigError(f"{recipe.where}: run {spec.setting}/{spec.name}: --{key} is not a recipe flag "
                              f"({why}); remove it from the recipe")


def _check_unique(runs, where):
    seen = set()
    for spec in runs:
        key = (spec.setting, spec.name)
        if key in seen:
            raise ConfigError(f"{where}: run {spec.setting}/{spec.name} appears twice")
        seen.add(key)


def select_runs(recipe, select, pairs):
    """The recipe's runs, or those --select names (a recipe's run by setting/name, a whole
    setting of the recipe by its name, or any setting/method pair), in the order given."""
    if not select:
        return list(recipe.runs)
    chosen = []
    aliases = setting_aliases(pairs)
    for item in (part.strip() for part in select.split(",")):
        if not item:
            raise ConfigError(f"--select {select!r}: an empty item")
        if "/" not in item:
            setting = aliases.get(item)
            if setting is None:
                raise ConfigError(f"--select: unknown setting {item!r} (allowed: {', '.join(sorted(aliases))}, "
                                  f"or setting/method)")
            matches = [spec for spec in recipe.runs if spec.setting == setting]
            if not matches:
                raise ConfigError(f"--select: recipe {recipe.name} has no run of {setting}; name its methods "
                                  f"as {item}/METHOD")
        else:
            setting_text, _, name = item.partition("/")
            setting = aliases.get(setting_text)
            matches = [spec for spec in recipe.runs if spec.setting == setting and spec.name == name]
            if not matches:
                setting, method = parse_pair(item, pairs, "--select")
                matches = [RunSpec(setting, method, method)]
        chosen += [spec for spec in matches if spec not in chosen]
    _check_unique(chosen, "--select")
    return chosen


# ----------------------------------------------------------------------------- the runs

@dataclass
class Run:
    spec: RunSpec
    run_dir: str
    base_command: list       # without --resume / --overwrite
    state: str = ""          # finished, resume, restart, new
    process: object = None
    log: object = None
    started: float = 0.0
    gpus: object = None      # the slot it runs on
    expected: dict = None    # the config the run's script resolves from its flags (held keys compared)
    outcome: str = ""        # finished, failed, interrupted, skipped
    last_line: str = ""
    seed: int = 0

    @property
    def shown_name(self):
        """setting/<its directory's name>: the run of the recipe and, past seed 0, its seed."""
        return f"{self.spec.setting}/{os.path.basename(self.run_dir)}"


def script_of(setting):
    from methods import SETTINGS
    return SETTINGS[setting].script


def base_command(spec, recipe, args, run_dir, gpus_per_run, seed):
    launcher = [sys.executable]
    if gpus_per_run > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_run}",
                    TORCHRUN_SIGNALS]
    return launcher + [_script_path(script_of(spec.setting))] + run_flags(spec, recipe, args, run_dir, seed)


def run_flags(spec, recipe, args, run_dir, seed):
    """The flags of a run's script (without --resume / --overwrite)."""
    flags = ["--method", spec.method, "--seed", str(seed)]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    if args.imagenet_dir:
        flags += ["--imagenet_dir", args.imagenet_dir]
    flags += ["--save_dir", run_dir] + recipe.flags + spec.flags
    if args.gpus:
        flags += ["--device", "cuda"]
    return flags


def _script_path(script):
    """The entry script, relative to the working directory when it lies below it."""
    path = os.path.join(REPO, script)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def is_finished(run_dir):
    """A run has finished when its final model is saved and its metrics hold a final evaluation."""
    if not os.path.isfile(os.path.join(run_dir, FINAL_MODEL)):
        return False
    try:
        rows = read_rows(os.path.join(run_dir, METRICS))
    except UserError:
        return False
    return any(row["final"] and not row.get("eval_only") for row in rows)


def run_state(run_dir):
    if is_finished(run_dir):
        return "finished"
    if os.path.isfile(os.path.join(run_dir, LAST_CHECKPOINT)):
        return "resume"
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        return "restart"      # started, but killed before its first checkpoint: nothing to keep
    return "new"


def check_place(run_dir, where):
    """The run directory can be made and written into: names the file system takes, not under a
    file, its nearest existing folder writable. Checked before anything runs, so that the dry run
    refuses what the real run would."""
    path = os.path.abspath(run_dir)
    longest = max(path.split(os.sep), key=lambda part: len(os.fsencode(part)))
    problem = None
    if len(os.fsencode(longest)) > NAME_MAX:
        problem = f"the name {shown(longest)} has {len(os.fsencode(longest))} bytes (at most {NAME_MAX})"
    elif len(os.fsencode(path)) + NAME_MAX >= PATH_MAX:
        problem = f"its path of {len(os.fsencode(path))} bytes leaves no room for its files (at most {PATH_MAX})"
    if problem:
        raise ConfigError(f"{where}: the run directory cannot be made: {problem}")
    check_directory(run_dir, where)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: the run directory {run_dir} cannot be made or written: {existing} is not "
                          f"writable")


def check_holds_this_run(run):
    """A run directory that already holds a run (its config.yaml) must hold the one the sweep
    would run there: another method, setting, seed or budget would be skipped, resumed or
    overwritten, and summarised, under this run's name. Where and how it ran may differ."""
    path = os.path.join(run.run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    held, expected = read_yaml(path), run.expected
    if (held.get("setting"), held.get("method")) == (run.spec.setting, run.spec.method):
        METHODS[run.spec.setting][run.spec.method].upgrade(held, dict.fromkeys(held, path))  # earlier versions' keys
    # Where and how it ran may differ, and its run id is its own (new at each run's start).
    differing = [key for key, value in expected.items()
                 if key not in training_params.NON_TRAINING_KEYS and key in held and held[key] != value]
    if differing:
        def describe(values):
            return ", ".join(f"{key} {values[key]}" for key in differing[:6])
        raise ConfigError(f"{run.run_dir}: holds another run than {run.spec.setting}/{run.spec.name} of this sweep "
                          f"({describe(held)}; expected {describe(expected)}); use another --out or move the "
                          f"directory away")


def command_for(run):
    extra = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(run.state, [])
    return run.base_command + extra


def shown_command(command):
    """The command as a user would type it (the interpreter as `python`, paths relative to the
    repository where they lie inside it)."""
    words = ["python" if index == 0 and word == sys.executable else word for index, word in enumerate(command)]
    return " ".join(shlex.quote(word) for word in words)


def read_record(run_dir):
    try:
        with open(os.path.join(run_dir, RECORD), encoding="utf-8") as handle:
            record = json.load(handle)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def write_record(run_dir, record):
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    write_text(os.path.join(run_dir, RECORD), text)


def last_log_line(path):
    """The last non-empty line of a log (progress bars end their lines with carriage returns)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 65536))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1] if lines else ""


def project_commit():
    def git(*words):
        result = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "--short=10", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}"


def machine(gpus):
    """The GPU name(s) for GPU runs, else the CPU model and its usable cores."""
    if gpus:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        names = result.stdout.split("\n") if result and result.returncode == 0 else []
        names = [names[int(index)].strip() for index in gpus if int(index) < len(names)]
        if names:
            return ", ".join(f"{names.count(name)}x {name}" for name in dict.fromkeys(names))
        return f"GPUs {','.join(gpus)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores (CPU only)"


class Tee(threading.Thread):
    """Copies a child's output to its log, and to the console when the run is alone."""

    def __init__(self, stream, log, echo):
        super().__init__(daemon=True)
        self.stream, self.log, self.echo = stream, log, echo

    def run(self):
        for chunk in iter(lambda: self.stream.read1(65536), b""):
            self.log.write(chunk)
            self.log.flush()
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()


class Sweep:
    def __init__(self, runs, slots, commit, machine_name, echo):
        self.queue, self.slots = list(runs), list(slots)
        self.running, self.done = [], []
        self.commit, self.machine_name, self.echo = commit, machine_name, echo
        self.stop_signal = None

    def _signal(self, signum, frame):
        # The first signal stops every running run after its current step (it saves a
        # checkpoint); a second Ctrl-C is passed on as such, which stops the runs at once.
        first = self.stop_signal is None
        self.stop_signal = self.stop_signal or signum
        if first or signum == signal.SIGINT:
            print(f"\n{signal.Signals(signum).name}: stopping the running run(s) after their current step; "
                  f"call the same command again to resume", file=sys.stderr, flush=True)
            for run in self.running:
                _send(run.process, signum)

    def execute(self):
        previous = {signum: signal.signal(signum, self._signal) for signum in STOP_SIGNALS}
        try:
            while (self.queue and self.stop_signal is None) or self.running:
                while self.queue and self.slots and self.stop_signal is None:
                    self._start(self.queue.pop(0), self.slots.pop(0))
                time.sleep(POLL_S)
                for run in [run for run in self.running if run.process.poll() is not None]:
                    self._finish(run)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        for run in self.queue:
            run.outcome = "not started"
            self.done.append(run)

    def _start(self, run, slot):
        os.makedirs(run.run_dir, exist_ok=True)
        record = read_record(run.run_dir) if run.state == "resume" else {}
        command = command_for(run)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        where = f" on GPU {','.join(slot)}" if slot is not None else ""
        verb = {"resume": "resuming", "restart": "restarting (no checkpoint was saved)"}.get(run.state, "starting")
        print(f"[{_now()}] {verb} {run.shown_name}{where}: {shown_command(command)}", flush=True)
        record.setdefault("segments", [])
        record.update(command=shown_command(run.base_command), setting=run.spec.setting, method=run.spec.method,
                      seed=run.base_command[run.base_command.index("--seed") + 1], status="running")
        record["segments"].append({"started": _now(), "command": shown_command(command), "commit": self.commit,
                                   "machine": self.machine_name})
        write_record(run.run_dir, record)
        run.log = open(os.path.join(run.run_dir, LOG), "ab")
        run.log.write(f"\n[{_now()}] {shown_command(command)}\n".encode())
        run.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        run.tee = Tee(run.process.stdout, run.log, self.echo)
        run.tee.start()
        run.started, run.gpus, run.record = time.monotonic(), slot, record
        self.running.append(run)

    def _finish(self, run):
        run.tee.join()
        run.log.close()
        status = run.process.returncode
        wall = time.monotonic() - run.started
        record = run.record
        record["segments"][-1].update(ended=_now(), wall_s=round(wall, 1), exit_status=status)
        record["wall_s"] = round(sum(segment.get("wall_s", 0) for segment in record["segments"]), 1)
        run.last_line = last_log_line(os.path.join(run.run_dir, LOG))
        if status == 0 and is_finished(run.run_dir):
            run.outcome = "finished"
        elif self.stop_signal is not None and stopped_by(status) is not None:
            run.outcome = "interrupted"
        else:
            run.outcome = "failed"
        record["status"] = run.outcome
        write_record(run.run_dir, record)
        print(f"[{_now()}] {run.shown_name}: {run.outcome} after {_duration(wall)} "
              f"(exit status {status})" + (f": {run.last_line}" if run.outcome == "failed" else ""), flush=True)
        self.running.remove(run)
        self.slots.append(run.gpus)
        self.done.append(run)


def _send(process, signum):
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def gpu_slots(gpus, gpus_per_run):
    if not gpus:
        return [None]
    if len(gpus) % gpus_per_run:
        raise ConfigError(f"--gpus_per_run {gpus_per_run}: must divide the {len(gpus)} GPUs of --gpus")
    return [gpus[i:i + gpus_per_run] for i in range(0, len(gpus), gpus_per_run)]


# ----------------------------------------------------------------------------- the summary

@dataclass
class Curve:
    """One line of a setting's figure and one column of its tables: a run's rows as read, one
    per level (and series), the accuracy the mean over its seeds with results, with
    `accuracy_spread` their standard deviation (None for one seed) and `seeds` their number."""
    label: str
    rows: list


def seed_groups(runs):
    """The runs of each run of the recipe, one per seed, in the order of `runs`."""
    groups = {}
    for run in runs:
        groups.setdefault((run.spec.setting, run.spec.name), []).append(run)
    return list(groups.values())


def mean_over_seeds(rows_per_seed):
    """One row per series and level of the seeds' final rows (utils.metrics.protocol: rows
    measured another way are never averaged together)."""
    by_level = {}
    for rows in rows_per_seed:
        for row in rows:
            by_level.setdefault((protocol(row), row["level"]), []).append(row)
    mean = []
    for rows in by_level.values():
        values = [row["accuracy"] for row in rows]
        mean.append(dict(rows[0], accuracy=statistics.fmean(values), seeds=len(values),
                         accuracy_spread=statistics.stdev(values) if len(values) > 1 else None))
    return mean


def run_config(group):
    """The config a run of the recipe trains (the first seed's config.yaml, else the one the
    sweep expects)."""
    for run in group:
        config = _run_config(run.run_dir)
        if config:
            return config
    return group[0].expected or {}


def setting_curves(groups):
    """(curves, grids) of one setting's runs with results: the curves of its figure, each run's
    whole grid, except the per-target baselines (Method.target_key): the runs of one that
    differ only in their target are one curve, each model at the level it trained, as the
    paper draws them; `grids` keeps their whole-grid evaluations for the tables. A model whose
    own level was not evaluated is drawn with its whole grid."""
    curves, grids, joined = [], [], {}
    for group in groups:
        rows = mean_over_seeds([_final_rows(run.run_dir) for run in group])
        if not rows:
            continue
        run, config = group[0], run_config(group)
        curve = Curve(run_label(run, config), rows)
        key = METHODS[run.spec.setting][run.spec.method].target_key
        own = [row for row in rows if key and config.get(key) is not None
               and math.isclose(row["level"], config[key], rel_tol=1e-9)]
        if not own:  # not a per-target baseline, or its own level was not evaluated: its whole grid
            curves.append(curve)
            continue
        grids.append(curve)
        ignored = {key, "seed", "eval_param_grid", *training_params.NON_TRAINING_KEYS}
        identity = json.dumps({name: value for name, value in config.items() if name not in ignored},
                              sort_keys=True, default=str)
        if identity not in joined:
            joined[identity] = (Curve(run.spec.method, []), config)
            curves.append(joined[identity][0])
        joined[identity][0].rows += own
    several_models = len({config.get("model") for _, config in joined.values()}) > 1
    for curve, config in joined.values():
        details = f"{config.get('model')}, {config.get('norm')}" if several_models else config.get("norm")
        curve.label = f"{curve.label} ({details}): one model per level"
    return curves, grids


def run_label(run, config=None):
    """The run's name and its norm (the baselines' configs use other norms than LCS)."""
    norm = (config if config is not None else _run_config(run.run_dir)).get("norm")
    return f"{run.spec.name} ({norm})" if norm else run.spec.name


def write_figures(out, setting, runs):
    """<setting>/comparison.png and .csv: the setting's curves (setting_curves), mean and
    standard deviation over the seeds; <setting>/runs.png and .csv: compare_runs' figure and
    table of every run directory with results, its whole grid. compare_runs' text, or None."""
    import compare_runs
    with_results = [run for run in runs if os.path.isfile(os.path.join(run.run_dir, METRICS))]
    if not with_results:
        return None
    text = compare_runs.compare([run.run_dir for run in with_results], os.path.join(out, setting, RUNS_FIGURE),
                                labels=[_dir_label(run) for run in with_results])
    curves, grids = setting_curves(seed_groups(runs))
    if not curves:
        return text
    seeds = sorted({run.seed for run in with_results})
    models = sorted({str(row["model"]) for curve in curves for row in curve.rows})
    datasets = sorted({str(row["dataset"]) for curve in curves for row in curve.rows})
    title = f"{', '.join(models)} on {', '.join(datasets)}" + (
        f"; mean and standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    plot_runs(os.path.join(out, setting, FIGURE), [(curve.label, curve.rows) for curve in curves], title=title,
              units=level_units())
    header, lines = ["level_name", "level"], []
    columns = curves + grids
    for curve in columns:
        header += [f"{curve.label}: accuracy", f"{curve.label}: spread", f"{curve.label}: seeds"]
    for level_name, level in sorted({(row["level_name"], row["level"]) for curve in columns for row in curve.rows}):
        line = [level_name, level]
        for curve in columns:
            row = _row_at(curve, level_name, level)
            line += [row["accuracy"], row["accuracy_spread"], row["seeds"]] if row else [None] * 3
        lines.append(["" if value is None else round(value, 6) if isinstance(value, float) else value
                      for value in line])
    write_csv(os.path.join(out, setting, FIGURE[:-4] + ".csv"), header, lines)
    return text


def _row_at(curve, level_name, level):
    """The curve's row at a level (its first series)."""
    return next((row for row in curve.rows if (row["level_name"], row["level"]) == (level_name, level)), None)


def _dir_label(run):
    """A run directory's label in runs.png: its name (the seed in it) and norm."""
    norm = _run_config(run.run_dir).get("norm")
    name = os.path.basename(run.run_dir)
    return f"{name} ({norm})" if norm else name


def _percent(value):
    return "" if value is None else f"{100 * value:.2f} %"


def _cell(row, seeds):
    """Mean ± standard deviation over the seeds, and how many where fewer than the sweep's."""
    if row is None:
        return ""
    if row["accuracy_spread"] is None:
        text = _percent(row["accuracy"])
    else:
        text = f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_spread']:.2f} %"
    return text + (f" (n={row['seeds']})" if row["seeds"] < seeds else "")


def _seeds_text(seeds):
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def summary_text(recipe, args, runs, commit, machine_name):
    seeds = sorted({run.seed for run in runs})
    lines = [f"# Sweep: recipe `{recipe.name}`, {_seeds_text(seeds)}", "",
             f"Recipe `{recipe.name}`: {recipe.about or '(no description)'}.", "",
             f"Written {_now()} by `experiments/reproduce.py` at commit {commit} on {machine_name}. "
             f"Data: `{args.imagenet_dir or args.data_dir or './data'}`.", "",
             "| run | seed | status | wall time | training images | epochs | test images | commit | machine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        record = read_record(run.run_dir)
        config = _run_config(run.run_dir)
        rows = _final_rows(run.run_dir)
        segments = record.get("segments", [])
        commits = ", ".join(dict.fromkeys(segment.get("commit", "?") for segment in segments)) or "-"
        machines = ", ".join(dict.fromkeys(segment.get("machine", "?") for segment in segments)) or "-"
        wall = _duration(record["wall_s"]) if "wall_s" in record else "-"
        if len(segments) > 1:
            wall += f" ({len(segments)} segments)"
        train_images = (config.get("train_subset") or "all") if config else "-"
        test_images = rows[0]["num_images"] if rows else "-"
        status = run.outcome or record.get("status", "not started")
        if status == "failed" and run.last_line:
            status += f": {run.last_line}"
        lines.append(f"| {run.shown_name} | {run.seed} | {status} | {wall} | "
                     f"{train_images} | {config.get('epochs', '-')} | {test_images} | {commits} | {machines} |")
    by_setting = {}
    for run in runs:
        by_setting.setdefault(run.spec.setting, []).append(run)
    for setting, setting_runs in by_setting.items():
        lines += ["", f"## {setting}", ""]
        if os.path.isfile(os.path.join(args.out, setting, FIGURE)):
            lines += [f"![{setting}]({setting}/{FIGURE})", ""]
        curves, grids = setting_curves(seed_groups(setting_runs))
        if not curves:
            lines.append("No final evaluation yet.")
        else:
            lines += _accuracy_tables(curves + grids, len(seeds))
            notes = []
            if len(seeds) > 1:
                notes.append(f"Accuracy: mean ± standard deviation over the {_seeds_text(seeds)} (n: the seeds "
                             f"with results where fewer).")
            if grids:
                notes.append("A curve `...: one model per level` joins a per-target baseline's models, each at "
                             "the level it trained; the columns after it hold each model's whole grid.")
            if os.path.isfile(os.path.join(args.out, setting, RUNS_FIGURE)):
                notes.append(f"Each run directory's whole grid: [{setting}/{RUNS_FIGURE}]({setting}/{RUNS_FIGURE}).")
            lines += [""] + [" ".join(notes)] * bool(notes)
        lines += ["", "Commands (each run resumed with the same command plus `--resume`):", ""]
        lines += [f"    {read_record(run.run_dir).get('command') or shown_command(run.base_command)}"
                  for run in setting_runs]
    return "\n".join(lines) + "\n"


def _accuracy_tables(columns, seeds):
    """One table per level unit (LEC's kept channel fraction is no width factor): a row per
    level, a column per curve."""
    by_unit, lines = {}, []
    for column in columns:
        by_unit.setdefault(column.rows[0]["level_name"], []).append(column)
    for number, (level_name, unit_columns) in enumerate(by_unit.items()):
        levels = sorted({row["level"] for column in unit_columns for row in column.rows})
        lines += [""] * (number > 0) + [
            "| " + " | ".join([level_name] + [column.label for column in unit_columns]) + " |",
            "| " + " | ".join(["---"] * (len(unit_columns) + 1)) + " |"]
        for level in levels:
            cells = [_cell(_row_at(column, level_name, level), seeds) for column in unit_columns]
            lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return lines


def _final_rows(run_dir):
    try:
        rows = [row for row in in_current_units(read_rows(os.path.join(run_dir, METRICS))) if not row.get("eval_only")]
    except UserError:
        return []
    final = [row for row in rows if row["final"]]
    return latest_results(final)


def _run_config(run_dir):
    try:
        return read_yaml(os.path.join(run_dir, "config.yaml"))
    except UserError:
        return {}


def summarise(recipe, args, runs, commit, machine_name):
    by_setting = {}
    for run in runs:
        by_setting.setdefault(run.spec.setting, []).append(run)
    for setting, setting_runs in by_setting.items():
        try:
            text = write_figures(args.out, setting, setting_runs)
        except UserError as error:
            print(f"reproduce.py: {setting}: no comparison figure: {one_line(error)}", file=sys.stderr)
            continue
        if text:
            print(text)
    text = summary_text(recipe, args, runs, commit, machine_name)
    path = os.path.join(args.out, SUMMARY)
    write_text(path, text)
    print(f"Summary: {path}")


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = UsageParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="Recipes: experiments/recipes.yaml (docs/results.md tells what each produced).")
    parser.add_argument("--recipe", default="cpu",
                        help="a recipe of experiments/recipes.yaml (paper, paper-imagenet, cpu) or a YAML file of "
                             "one recipe (default: cpu)")
    parser.add_argument("--select", help="comma-separated runs: setting/method (setting as structured, "
                                         "unstructured, quantized or its full name) or a whole setting of the "
                                         "recipe (default: the recipe's runs)")
    parser.add_argument("--data_dir", help="CIFAR-10 root, passed to every run (default: the scripts' ./data)")
    parser.add_argument("--imagenet_dir", help="ImageNet root (training/ + validation/), passed to every run "
                                               "(the recipe paper-imagenet needs it)")
    parser.add_argument("--out", default=None, help="folder of every run and the summary (default: "
                                                     "results/<recipe>)")
    parser.add_argument("--seed", type=int, help="seed of every run (default: 0); the same as --seeds SEED")
    parser.add_argument("--seeds", help="comma-separated seeds: each run once per seed, seed 0 in <run>/, seed k "
                                        "in <run>_seed<k>/; the summary shows mean and spread (default: 0)")
    parser.add_argument("--gpus", help="comma-separated GPU indices to run on side by side (default: one run at "
                                       "a time on the scripts' default device)")
    parser.add_argument("--gpus_per_run", type=int, default=1,
                        help="GPUs per run; above 1 each run is started under torchrun (default: 1)")
    launchers.add_arguments(parser)
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands and what each costs (epochs x training images), run nothing, "
                             "write nothing")
    parser.add_argument("--estimate", action="store_true",
                        help="with --dry_run: time the first steps of each run on this machine (in a temporary "
                             "directory, removed after) and estimate each run's and the sweep's duration")
    parser.add_argument("--summary_only", action="store_true",
                        help="write the figures and summary.md of the runs as they stand, run nothing")
    return parser


def parse_seeds(args):
    """--seeds as a list of distinct seeds (--seed N is --seeds N; default 0)."""
    if args.seed is not None and args.seeds is not None:
        raise ConfigError("--seed: cannot be combined with --seeds (give every seed in --seeds)")
    if args.seeds is None:
        seed = 0 if args.seed is None else args.seed
        if not 0 <= seed < 2**32:
            raise ConfigError(f"--seed {seed}: must lie in 0 .. 2^32-1")
        return [seed]
    parts = [part.strip() for part in args.seeds.split(",")]
    if (not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts)
            or not all(int(part) < 2**32 for part in parts)):
        raise ConfigError(f"--seeds {args.seeds!r}: expected distinct seeds in 0 .. 2^32-1, such as 0,1,2")
    return [int(part) for part in parts]


def seed_dir_name(name, seed):
    """Each seed of a run in its own directory: seed 0 in <name>/ (where a sweep of one seed
    has always written it), seed k in <name>_seed<k>/."""
    return name if seed == 0 else f"{name}_seed{seed}"


def plan(args):
    """The selected runs, every flag, name and place checked (what the run directories hold is
    not read yet; nothing is written)."""
    args.seeds = parse_seeds(args)
    gpus = None
    if args.gpus is not None:
        gpus = [part.strip() for part in args.gpus.split(",")]
        if not all(part.isdigit() for part in gpus) or len(set(gpus)) != len(gpus):
            raise ConfigError(f"--gpus {args.gpus!r}: expected distinct GPU indices such as 0,1,2,3")
    if not 1 <= args.gpus_per_run <= 64:
        raise ConfigError(f"--gpus_per_run {args.gpus_per_run}: must lie in 1..64")
    if args.estimate and not args.dry_run:
        raise ConfigError("--estimate: needs --dry_run (it estimates a sweep before it runs)")
    if args.dry_run and args.summary_only:
        raise ConfigError("--summary_only: cannot be combined with --dry_run (it writes the summary)")
    if args.gpus_per_run > 1 and not gpus:
        raise ConfigError("--gpus_per_run: needs --gpus (the GPUs each group of runs uses)")
    for flag in ("data_dir", "imagenet_dir"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            raise ConfigError(f"--{flag} {getattr(args, flag)}: no such directory")
    pairs = known_pairs()
    recipe = load_recipe(args.recipe, pairs)
    specs = select_runs(recipe, args.select, pairs)
    args.out = args.out or os.path.join("results", recipe.name)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    out_shown = args.out if len(args.out) <= 200 else shown(args.out, 200)  # a path too long is cut
    runs, places = [], {}
    for spec in specs:
        if spec not in recipe.runs:  # a pair named by --select: the recipe's flags, checked for it
            check_recipe_flags(recipe, spec)
        for seed in args.seeds:
            run_dir = os.path.join(args.out, spec.setting, seed_dir_name(spec.name, seed))
            where = f"run {spec.setting}/{spec.name}" + (f" (seed {seed})" if seed else "")
            if run_dir in places:
                raise ConfigError(f"--seeds: {where} and {places[run_dir]} would share the directory {run_dir}; "
                                  f"rename the recipe's run")
            places[run_dir] = where
            check_place(run_dir, f"--out {out_shown}: {where}")
            run = Run(spec, run_dir, base_command(spec, recipe, args, run_dir, args.gpus_per_run, seed), seed=seed)
            run.expected = expected_config(spec, run_flags(spec, recipe, args, run_dir, seed), recipe.where)
            runs.append(run)
    check_data_flags(args, runs)
    return recipe, runs, gpu_slots(gpus, args.gpus_per_run), gpus


def check_data_flags(args, runs):
    """--imagenet_dir for the runs on ImageNet, --data_dir (or the scripts' ./data) for those on
    CIFAR-10: each is passed to every run, and a script refuses the other dataset's flag."""
    for run in runs:
        where = f"run {run.spec.setting}/{run.spec.name}"
        if run.expected["dataset"] == "imagenet":
            if not args.imagenet_dir:
                raise ConfigError(f"--imagenet_dir: missing; {where} trains on ImageNet (give the ImageNet root "
                                  f"with training/ + validation/ class folders)")
            if args.data_dir:
                raise ConfigError(f"--data_dir {args.data_dir}: {where} trains on ImageNet, read from "
                                  f"--imagenet_dir; leave --data_dir out")
        elif args.imagenet_dir:
            raise ConfigError(f"--imagenet_dir {args.imagenet_dir}: {where} trains on {run.expected['dataset']}, "
                              f"not ImageNet; leave --imagenet_dir out")


def expected_config(spec, flags, where):
    """The config a run's script resolves from `flags`, as its config.yaml holds it."""
    given = parse_run_flags(spec, flags, where)
    try:
        config, _ = training_params.merge(spec.setting, given)
    except ConfigError as error:
        raise ConfigError(f"{where}: run {spec.setting}/{spec.name}: {one_line(error)}") from None
    return yaml.safe_load(yaml.safe_dump(config.to_dict()))


def examine(runs):
    """Each run's state, after checking its directory holds no other run."""
    for run in runs:
        check_holds_this_run(run)
        run.state = run_state(run.run_dir)


def lock_out(out):
    """The sweep's lock on --out: one sweep at a time writes into it (runs, figures, summary)."""
    try:
        return RunDirLock(out, flag="--out", kind="sweep folder")
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot be made or locked ({error.strerror or error})") from None


def training_images(config):
    """The images one epoch of a run trains on: its --train_subset, or the whole training set."""
    whole = TRAIN_IMAGES[config["dataset"]]
    return min(config["train_subset"], whole) if config.get("train_subset") else whole


def cost_text(run):
    epochs, images = run.expected["epochs"], training_images(run.expected)
    return f"{epochs} epochs x {images:,} training images = {epochs * images:,} images trained"


def probe(run, recipe, args, slot):
    """(seconds, how) the run would take on this machine: its own command, in a temporary
    directory, stopped once the script has timed its first steps (its estimate line: seconds per
    step, steps per epoch, epochs); the directory is removed after. Training steps only (the
    script times no evaluation before then); None and why where no step was timed."""
    probe_dir = tempfile.mkdtemp(prefix="reproduce-estimate-")
    try:
        command = base_command(run.spec, recipe, args, os.path.join(probe_dir, "run"), args.gpus_per_run, run.seed)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        started = time.monotonic()
        process = subprocess.Popen(command + ["--no-eval_at_start"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        timer = threading.Timer(PROBE_LIMIT_S, _send, (process, signal.SIGKILL))
        timer.start()
        found, last = None, ""
        try:
            for line in process.stdout:
                last = line.strip() or last
                found = PROBE_LINE.search(line)
                if found:
                    break
        finally:
            timer.cancel()
            _send(process, signal.SIGKILL)
            process.wait()
            process.stdout.close()
        wall = time.monotonic() - started
        if found:
            epochs, steps, step_s = int(found[1]), int(found[2]), float(found[3])
            return (step_s * epochs * steps,
                    f"{step_s:.3g} s per step x {epochs * steps:,} steps (timed training steps; evaluations "
                    f"not included)")
        if process.returncode == 0 and is_finished(os.path.join(probe_dir, "run")):
            return wall, f"the whole run took {format_duration(wall)} in the probe"
        return None, f"no step timed ({shown(last, 200) if last else 'no output'})"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def print_dry_run(recipe, args, runs, slots, gpus):
    print(f"# recipe {recipe.name}: {recipe.about}")
    if len(args.seeds) > 1:
        print(f"# seeds {', '.join(map(str, args.seeds))}: seed 0 in <run>/, seed k in <run>_seed<k>/")
    if gpus:
        groups = " | ".join(",".join(slot) for slot in slots)
        print(f"# side by side, CUDA_VISIBLE_DEVICES set per run to a free group of: {groups}")
    estimated = []
    for run in runs:
        cost = cost_text(run)
        if args.estimate and run.state != "finished":
            seconds, how = probe(run, recipe, args, slots[0])
            cost += f"; on this machine: ~{format_duration(seconds)}, {how}" if seconds is not None else \
                f"; on this machine: no estimate, {how}"
            estimated.append(seconds)
        print(f"# {run.shown_name}: {cost}")
        note = {"finished": "# finished, skipped: ", "resume": "# interrupted, resumed: "}.get(run.state, "")
        print(f"{note}{shown_command(command_for(run))}", flush=True)
    todo = [run for run in runs if run.state != "finished"]
    total = sum(run.expected["epochs"] * training_images(run.expected) for run in todo)
    line = f"# the sweep: {len(todo)} run(s) to do, {total:,} images trained"
    timed = [seconds for seconds in estimated if seconds is not None]
    if timed:
        side = f", ~{format_duration(sum(timed) / len(slots))} on {len(slots)} GPU groups" if len(slots) > 1 else ""
        untimed = len(estimated) - len(timed)
        line += (f"; ~{format_duration(sum(timed))} one run after another{side}"
                 + (f" ({untimed} run(s) not timed)" if untimed else ""))
    print(line)


def main(argv=None):
    args = build_parser().parse_args(argv)
    lock = None
    try:
        recipe, runs, slots, gpus = plan(args)
        launchers.check(args)
        if args.dry_run:
            examine(runs)
            print_dry_run(recipe, args, runs, slots, gpus)
            if args.launcher == "slurm":
                print(launchers.describe(args))
            return 0
        commit, machine_name = project_commit(), machine(gpus)
        if args.summary_only:
            if not any(os.path.isdir(run.run_dir) for run in runs):
                raise ConfigError(f"--out {args.out}: no sweep there (no directory of the {len(runs)} selected "
                                  f"run(s)); name the --out of a sweep")
            examine(runs)
            for run in runs:
                run.outcome = "finished" if run.state == "finished" else ""
            if args.launcher == "slurm":  # the jobs' states, while they run
                launchers.update_states(runs, args.out, sys.modules[__name__])
            summarise(recipe, args, runs, commit, machine_name)
            return 0
        lock = lock_out(args.out)
        examine(runs)
        print(f"Recipe {recipe.name}, {len(runs)} run(s) into {args.out}; commit {commit}; {machine_name}",
              flush=True)
        if args.launcher == "slurm":  # submitted; the jobs go on without this process
            launchers.submit(runs, args, commit, sys.modules[__name__])
            summarise(recipe, args, runs, commit, machine_name)
            return 0
        todo = []
        for run in runs:
            if run.state == "finished":
                run.outcome = "finished"
                print(f"{run.shown_name}: finished before, skipped ({run.run_dir})")
            else:
                todo.append(run)
        sweep = Sweep(todo, slots, commit, machine_name, echo=len(slots) == 1)
        sweep.execute()
        summarise(recipe, args, runs, commit, machine_name)
    except UserError as error:
        print(f"reproduce.py: error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    finally:
        if lock is not None:
            lock.release()
    failed = [run for run in runs if run.outcome != "finished"]
    for run in failed:
        print(f"{run.shown_name}: {run.outcome}"
              + (f" ({run.last_line})" if run.last_line and run.outcome == "failed" else ""), file=sys.stderr)
    if sweep.stop_signal is not None:
        return exit_status(sweep.stop_signal)
    return 1 if failed else 0


def main_quiet_on_closed_output(argv=None):
    """main(), ending quietly when its output is cut (piped into `head`): status 141 (128 +
    SIGPIPE), as a tool killed by the signal reports in the shell."""
    try:
        status = main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main_quiet_on_closed_output())

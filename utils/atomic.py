"""Writing files safely: atomically (temporary file + rename), with any failure turned into one
line that keeps the previous file; stale temporary files of killed writers removed; outputs of
a tool refused where they would replace its inputs or a run directory's own files."""

import os
import re

from utils.errors import ConfigError, TrainingError, UserError

# Temporary files of atomic_write: ".<name>.tmp<pid>" beside the file they become.
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
# What a run directory holds (engine.run_dir.RUN_FILES; checked equal by the tests). A tool must
# never write over one of them.
RUN_DIR_FILES = ("config.yaml", "metrics.jsonl", "results.csv", "accuracy_vs_compression.png",
                 "checkpoint_last.pt", "model_final.pt")


# LCS_FSYNC=0: no flush to disk before the rename. The write stays atomic for the processes
# that read it (a killed writer leaves the previous file; the page cache holds the new one), not
# across a power cut, which may leave an empty file. For throwaway runs on a slow disk; the test
# suite sets it (thousands of small writes, each flush 10-20 ms of waiting on its disk).
FSYNC_VARIABLE = "LCS_FSYNC"


def flushes_to_disk(environ=os.environ):
    return environ.get(FSYNC_VARIABLE, "1").strip() != "0"


def temporary_path(path):
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp{os.getpid()}")


def atomic_write(path, write, failure=TrainingError):
    """Call write(temporary path), flush it to disk, then rename it over `path`: a reader
    never sees a partial file, and a failed or interrupted write leaves the previous file
    intact (and no temporary file behind). Any failure of the write (an OSError, or the
    RuntimeError torch's zip writer makes of one) is a `failure` of one line (training: a
    TrainingError; tools: an OutputError); a UserError raised by `write` itself (a check of
    what was written) keeps its own message."""
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), name=os.path.basename(path))
    temporary = temporary_path(path)
    try:
        write(temporary)
        if flushes_to_disk():
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, UserError):
            raise
        if isinstance(error, Exception):
            raise failure(f"{path}: could not be written ({write_failure(error)}); "
                                f"the previous version, if any, is intact") from None
        raise  # KeyboardInterrupt, SystemExit: the caller reports those


def write_failure(error):
    """Why a write failed, in a few words: the OSError behind it where there is one (torch's
    writer raises a RuntimeError whose context is the OSError of the file's write)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:160]


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(directory, name=None):
    """Remove the temporary files that writers killed mid-write left in `directory` (those of
    file `name` only, when given); a live process's temporary file is left alone."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = TEMPORARY.match(entry)
        if match and (name is None or match["name"] == name) and not _alive(int(match["pid"])):
            _remove(os.path.join(directory, entry))


def _same_file(first, second):
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.realpath(first) == os.path.realpath(second)


def is_run_directory(directory):
    return any(os.path.isfile(os.path.join(directory, name)) for name in RUN_DIR_FILES)


def refuse_overwrite(flag, out, inputs=()):
    """ConfigError when writing `out` would replace one of `inputs` or a file of a run
    directory (its checkpoints, metrics, results, plot or config)."""
    for source in inputs:
        if os.path.exists(out) and _same_file(out, source):
            raise ConfigError(f"{flag} {out}: is an input of this command ({source}); write to another file")
    directory = os.path.dirname(os.path.abspath(out))
    if os.path.basename(out) in RUN_DIR_FILES and is_run_directory(directory):
        raise ConfigError(f"{flag} {out}: would replace the {os.path.basename(out)} of the run directory "
                          f"{directory}; write to another file")

"""One writer per run directory: an exclusive lock on <run dir>/.lock, held while a process
trains or evaluates into the directory.

The lock is fcntl.flock on an open file: the kernel releases it when the holder exits in any
way (SIGKILL included), so a lock left by a killed process is no lock; its file, which records
the holder's pid, host and command for the error message, is simply taken over."""

import fcntl
import os
import socket
import sys
import time

from utils.atomic import remove_stale_temporaries
from utils.errors import ConfigError

LOCK_FILE = ".lock"


def refuse_if_locked(directory, flag="--save_dir", kind="run directory"):
    """ConfigError naming the holder when a live process holds `directory`'s lock; creates
    nothing (a check before the work of building a run, which takes the lock itself)."""
    try:
        handle = open(os.path.join(directory, LOCK_FILE))
    except OSError:
        return  # no lock file, no writer
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked_error(directory, flag, handle, kind) from None


def _locked_error(directory, flag, handle, kind):
    handle.seek(0)
    holder = handle.read(500).strip() or "another process"
    return ConfigError(f"{flag} {directory}: another process is writing to this {kind} ({holder}); "
                       f"wait for it to end or use another {flag}")


class RunDirLock:
    """Acquired by the constructor (ConfigError naming the holder when another process writes
    into `directory`); release() gives it up and removes the lock file. `kind` names the
    directory in that message (a run directory, the sweep's folder)."""

    def __init__(self, directory, flag="--save_dir", kind="run directory"):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.created_directory = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        self.handle = self._lock(flag, kind)
        self._record_holder()
        remove_stale_temporaries(directory)

    def _lock(self, flag, kind):
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = _locked_error(self.directory, flag, handle, kind)
                handle.close()
                raise error from None
            # The previous holder may have removed the file between our open and flock: a lock
            # on a file no longer at this path protects nothing, so start again.
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    def _record_holder(self):
        command = " ".join(os.path.basename(arg) if index == 0 else arg for index, arg in enumerate(sys.argv))
        text = (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{command}")[:400]
        # Unbuffered: a write that fails (a full disk) leaves nothing pending that closing the
        # handle would try again and fail on. The lock holds all the same; the message then
        # names no holder.
        try:
            os.ftruncate(self.handle.fileno(), 0)
            os.write(self.handle.fileno(), (text + "\n").encode())
        except OSError:
            pass

    def release(self):
        """Remove the lock file, then unlock (the reverse order would let a newcomer lock a
        file about to disappear); the directory too when this lock created it and it is empty."""
        if self.handle is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        self.handle.close()
        self.handle = None
        if self.created_directory:
            try:
                os.rmdir(self.directory)
            except OSError:
                pass  # it holds the run's files

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

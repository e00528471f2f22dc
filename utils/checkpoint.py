"""Checkpoints as plain data, written atomically, read with clear errors.

A checkpoint is a dict that `torch.load(path, weights_only=True)` reads back:
  format, kind ("training" or "model"), setting, method, model_name, config (plain dict),
  model (state dict, no `module.` prefix; BN statistics and quantizer ranges included),
  epoch, global_step, warmup_iterations and, for training checkpoints, optimizer,
  progress (epoch, step_in_epoch, global_step, evaluated_epoch, evaluations, finished),
  rng (Python, NumPy, torch, CUDA, the level sampler's generator) and evaluation_seconds
  (how long each evaluation timed so far took; absent from older checkpoints).

torch and NumPy are imported by the functions that read or write tensors: the command line
imports this module (through the run directory's rules) before torch, to check a command in
well under a second.
"""

import collections
import os
import pickle
import random
import stat
import warnings
import zipfile

from utils.atomic import atomic_write  # noqa: F401  (callers write through this module)
from utils.errors import CheckpointError, TrainingError

FORMAT = 1
LAST = "checkpoint_last.pt"
FINAL = "model_final.pt"


def make_payload(kind, config, model, epoch, global_step, warmup_iterations, optimizer=None, progress=None,
                 rng=None, evaluation_seconds=()):
    """The checkpoint dict (see the module docstring) of a Config, a model and where the run
    stands; `kind` "training" adds the optimiser, progress and RNG states and the durations of
    the evaluations timed so far."""
    payload = {"format": FORMAT, "kind": kind, "setting": config.setting, "method": config.method,
               "model_name": config.model, "config": config.to_dict(), "model": model.state_dict(),
               "epoch": epoch, "global_step": global_step, "warmup_iterations": warmup_iterations}
    if kind == "training":
        payload.update({"optimizer": optimizer.state_dict(), "progress": progress, "rng": rng,
                        "evaluation_seconds": list(evaluation_seconds)})
    return payload


def save(path, payload, failure=TrainingError):
    """Write `payload` to `path` atomically; a failed write is a `failure` of one line."""
    atomic_write(path, lambda temporary: _write_payload(temporary, payload), failure=failure)


def _write_payload(path, payload):
    import torch

    # Through a Python file: torch's zip writer turns a failed write (ENOSPC, EIO) into a
    # RuntimeError whose context is the file's OSError, which atomic_write reports.
    with open(path, "wb") as handle:
        torch.save(payload, handle)


def write_text(path, text):
    """Write a text file atomically (see atomic_write)."""
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)
    atomic_write(path, write)


def load(path, map_location="cpu"):
    """The checkpoint dict, or CheckpointError saying what is wrong with the file."""
    require_regular_file(path, "checkpoint")
    try:
        payload = load_plain_data(path, map_location)
    except Exception as error:  # a foreign or damaged file fails deep inside torch.load in many ways
        first = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged? {first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no format-{FORMAT} header)")
    return payload


# The pickled part of a checkpoint (its dict; tensors' data are records of their own) is
# small: a few hundred kB for ResNet18's optimiser state.
HEADER_MAX_BYTES = 64 * 1024 * 1024


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles torch.save's data.pkl with every tensor left out (None) and nothing but an
    OrderedDict and torch's tensor and storage names allowed (no code of the file runs)."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch", "torch._utils") and (name.endswith("Storage") or name.startswith("_rebuild_tensor")):
            return _left_out
        raise pickle.UnpicklingError(f"{module}.{name} is not read without torch")

    def persistent_load(self, pid):
        return None  # a storage record


def _left_out(*args):
    return None


def read_header(path):
    """The checkpoint dict with its tensors left out (None), read without torch, so that the
    command line checks a command against a checkpoint's config in well under a second; None
    when the file cannot be read that way (not a regular file, not torch.save's zip format,
    objects other than tensors): load() then says what is wrong with it."""
    try:
        require_regular_file(path, "checkpoint")
        with zipfile.ZipFile(path) as archive:
            pickled = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
            if len(pickled) != 1 or pickled[0].file_size > HEADER_MAX_BYTES:
                return None
            with archive.open(pickled[0]) as handle:
                payload = _HeaderUnpickler(handle).load()
    except Exception:  # a damaged or foreign file fails in many ways; load() reports it
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("model"), dict) \
            or not isinstance(payload.get("config"), dict):
        return None
    return payload


def load_plain_data(path, map_location="cpu"):
    """torch.load(path, weights_only=True) without torch's UserWarnings about the file (a
    foreign pickle gets "Detected pickle protocol 4 ..." before failing): a file that fails is
    reported by the caller in one line, and one that loads needs no note."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
        return torch.load(path, map_location=map_location, weights_only=True)


def require_regular_file(path, what):
    """CheckpointError unless `path` is a regular file (or a link to one): a directory, pipe or
    device is refused before it is opened (reading a pipe or /dev/zero would never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what}") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a directory, expected a {what} file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is not a regular file (a pipe, socket or device), expected a {what} file")


def state_mismatch(expected, found):
    """How the tensors of a checkpoint (`found`) differ from those a model holds (`expected`)."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [name for name in expected if name in found
                and tuple(getattr(found[name], "shape", ())) != tuple(expected[name].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if reshaped:
        name = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape, e.g. {name} {tuple(getattr(found[name], 'shape', ()))} "
                     f"instead of {tuple(expected[name].shape)}")
    return "; ".join(parts) or "tensors of another type"


# -- RNG state as plain data -------------------------------------------------------------
def rng_state(generator):
    import numpy as np
    import torch

    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state, generator):
    import numpy as np
    import torch

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

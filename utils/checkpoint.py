"""Checkpoints as plain data, written atomically, read with clear errors.

A checkpoint is a dict that `torch.load(path, weights_only=True)` reads back:
  format, kind ("training" or "model"), setting, method, model_name, config (plain dict),
  model (state dict, no `module.` prefix; BN statistics and quantizer ranges included),
  epoch, global_step, warmup_iterations and, for training checkpoints, optimizer,
  progress (epoch, step_in_epoch, global_step, evaluated_epoch, evaluations, finished) and
  rng (Python, NumPy, torch, CUDA, the level sampler's generator).
"""

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from utils.errors import CheckpointError, TrainingError

FORMAT = 1
LAST = "checkpoint_last.pt"
FINAL = "model_final.pt"


def atomic_write(path, write):
    """Call write(temporary path), flush it to disk, then rename it over `path`: a reader
    never sees a partial file, and a failed or interrupted write leaves the previous file
    intact (and no temporary file behind)."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            try:
                os.remove(temporary)
            except OSError:
                pass
        if isinstance(error, OSError):
            raise TrainingError(f"{path}: could not be written ({error.strerror or error}); "
                                f"the previous version, if any, is intact") from None
        raise


def save(path, payload):
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load(path, map_location="cpu"):
    """The checkpoint dict, or CheckpointError saying what is wrong with the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged? {first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no format-{FORMAT} header)")
    return payload


def read_checkpoint_config(path, setting):
    """The config dict stored in a checkpoint made by the `setting` script."""
    payload = load(path)
    if payload.get("setting") != setting:
        raise CheckpointError(f"{path}: holds a {payload.get('setting')} model ({payload.get('method')}), "
                              f"this script trains {setting}")
    return dict(payload["config"])


def checkpoint_path_for_resume(save_dir):
    path = os.path.join(save_dir, LAST)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no {LAST} in {save_dir} to resume from (pass --resume PATH or the "
                              f"run's --save_dir)")
    return path


# -- RNG state as plain data -------------------------------------------------------------
def rng_state(generator):
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
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

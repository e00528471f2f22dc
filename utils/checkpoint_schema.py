"""The whole schema of a checkpoint, checked before anything is restored or written.

A checkpoint that torch.load reads may still be wrong (edited by hand, written by another
version, damaged in a way the zip format does not notice): a negative epoch would train with a
negative learning rate, a step counter past the epoch would skip it, a bad RNG state or
optimizer state would fail deep inside numpy or torch. Each check raises CheckpointError naming
the file and the field."""

import math
import numbers

import torch

from utils.errors import CheckpointError, shown

PROGRESS_FIELDS = {"epoch": int, "step_in_epoch": int, "global_step": int, "evaluated_epoch": int,
                   "evaluations": int, "finished": bool}
# SGD hyperparameters that must agree with the run's config (lr is set anew every epoch).
FIXED_HYPERPARAMETERS = ("momentum", "weight_decay", "dampening", "nesterov")


def _found(value):
    return "missing" if value is None else shown(value)


def _fail(path, field, message):
    raise CheckpointError(f"{path}: {field} {message}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(path, field, value, low, high):
    if not _is_int(value) or not low <= value <= high:
        _fail(path, field, f"is {shown(value)}, expected an integer in {low}..{high}")
    return value


def _require_tensor(path, field, value, dtype=None, numel=None):
    if not isinstance(value, torch.Tensor) or (dtype is not None and value.dtype != dtype) \
            or (numel is not None and value.numel() != numel):
        what = f"a {dtype} tensor" if dtype is not None else "a tensor"
        if numel is not None:
            what += f" of {numel} elements"
        found = f"a {value.dtype} tensor of {value.numel()} elements" if isinstance(value, torch.Tensor) \
            else shown(value)
        _fail(path, field, f"is {found}, expected {what}")


def check_header(payload, path, config):
    """The checkpoint belongs to the run described by `config` (a dict)."""
    for field, key in (("setting", "setting"), ("method", "method"), ("model_name", "model")):
        if payload.get(field) != config.get(key):
            _fail(path, field, f"is {shown(payload.get(field))}, but its config says {config.get(key)!r}")


def check_model(payload, path):
    """model: a state dict of finite tensors (whether they fit the model, load_state_dict tells)."""
    for name, value in payload["model"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            _fail(path, f"model[{shown(name)}]", f"is {shown(value)}, expected a tensor")
    check_finite(payload["model"], path)


def finite(tensor):
    """0-dim bool tensor: the floating-point `tensor` holds no NaN or infinity. Its minimum and
    maximum carry any NaN or infinity, and aminmax finds both in one pass without a tensor of
    flags (100M values, one thread: 0.03 s against 0.49 s for isfinite().all())."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def check_finite(state, path):
    """CheckpointError naming the first tensor holding NaN or infinity."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(finite(value)):
            raise CheckpointError(f"{path}: non-finite weights in {name} (NaN or infinity); a model with them "
                                  f"cannot be evaluated, exported or trained further")


def check_counters(payload, path, epochs):
    """epoch, global_step and warmup_iterations of any checkpoint (a final model too)."""
    require_int(path, "epoch", payload.get("epoch"), 0, epochs)
    require_int(path, "global_step", payload.get("global_step"), 0, 2**62)
    warmup = payload.get("warmup_iterations")
    if warmup is not None:
        require_int(path, "warmup_iterations", warmup, 0, 2**62)


# More evaluations than any run makes (at most one per epoch, and 100,000 epochs).
MAX_TIMED_EVALUATIONS = 100_001


def evaluation_seconds(payload, path):
    """evaluation_seconds: how long each evaluation timed before this checkpoint took, for the
    estimate of a resumed run's duration; [] for checkpoints written before it was stored."""
    seconds = payload.get("evaluation_seconds", [])
    if not isinstance(seconds, list) or len(seconds) > MAX_TIMED_EVALUATIONS or not all(
            isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s >= 0 for s in seconds):
        _fail(path, "evaluation_seconds", f"is {shown(seconds)}, expected a list of durations (seconds >= 0)")
    return [float(s) for s in seconds]


def check_progress(payload, path, epochs, steps_per_epoch, warmup_iterations):
    """progress: the position in training, consistent with the epoch count and the data."""
    progress = payload.get("progress")
    if not isinstance(progress, dict):
        _fail(path, "progress", f"is {_found(progress)}, expected the training position (a dict)")
    if set(progress) != set(PROGRESS_FIELDS):
        _fail(path, "progress", f"has the keys {sorted(map(str, progress))}, expected {sorted(PROGRESS_FIELDS)}")
    for key, kind in PROGRESS_FIELDS.items():
        value = progress[key]
        if kind is bool and not isinstance(value, bool) or kind is int and not _is_int(value):
            expected = "true or false" if kind is bool else "an integer"
            _fail(path, f"progress.{key}", f"is {shown(value)}, expected {expected}")
    epoch = require_int(path, "progress.epoch", progress["epoch"], 0, epochs)
    last_step = steps_per_epoch - 1 if epoch < epochs else 0
    step = require_int(path, "progress.step_in_epoch", progress["step_in_epoch"], 0, last_step)
    expected = epoch * steps_per_epoch + step
    # Resumed on another number of processes, an epoch may count one step more or fewer.
    require_int(path, "progress.global_step", progress["global_step"], max(0, expected - epoch), expected + epoch)
    require_int(path, "progress.evaluated_epoch", progress["evaluated_epoch"], -1, epoch)
    require_int(path, "progress.evaluations", progress["evaluations"], 0, 2**31)
    if progress["finished"] and epoch != epochs:
        _fail(path, "progress.finished", f"is true at epoch {epoch} of {epochs}")
    for key in ("epoch", "global_step"):
        if payload.get(key) != progress[key]:
            _fail(path, key, f"is {shown(payload.get(key))}, but progress.{key} is {progress[key]}")
    if payload.get("warmup_iterations") != warmup_iterations:
        _fail(path, "warmup_iterations", f"is {shown(payload.get('warmup_iterations'))}, but this run's data and "
                                         f"config give {warmup_iterations}")


def check_optimizer(payload, path, optimizer):
    """optimizer: an SGD state for exactly the parameters of `optimizer`, with the run's settings."""
    state = payload.get("optimizer")
    reference = optimizer.state_dict()
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        _fail(path, "optimizer", f"is {_found(state)}, expected an optimizer state (state, param_groups)")
    groups = state["param_groups"]
    if len(groups) != len(reference["param_groups"]):
        _fail(path, "optimizer.param_groups", f"has {len(groups)} groups, expected {len(reference['param_groups'])}")
    shapes = {}
    for index, (group, own) in enumerate(zip(groups, reference["param_groups"])):
        field = f"optimizer.param_groups[{index}]"
        if not isinstance(group, dict) or group.get("params") != own["params"]:
            _fail(path, f"{field}.params", "do not list this model's parameters")
        for key in FIXED_HYPERPARAMETERS:
            if key in own and group.get(key) != own[key]:
                _fail(path, f"{field}.{key}", f"is {shown(group.get(key))}, but the run's config gives {own[key]}")
        for key, value in group.items():
            if key != "params" and isinstance(own.get(key), numbers.Real) and not isinstance(own.get(key), bool) \
                    and not (isinstance(value, numbers.Real) and math.isfinite(value)):
                _fail(path, f"{field}.{key}", f"is {shown(value)}, expected a finite number")
        shapes.update(zip(own["params"], (p.shape for p in optimizer.param_groups[index]["params"])))
    for key, entry in state["state"].items():
        field = f"optimizer.state[{shown(key)}]"
        if key not in shapes or not isinstance(entry, dict):
            _fail(path, field, "is not the state of one of this model's parameters")
        buffer = entry.get("momentum_buffer")
        if buffer is not None:
            _require_tensor(path, f"{field}.momentum_buffer", buffer)
            if tuple(buffer.shape) != tuple(shapes[key]) or not bool(finite(buffer)):
                _fail(path, f"{field}.momentum_buffer", f"has shape {tuple(buffer.shape)} or non-finite values, "
                                                        f"expected finite values of shape {tuple(shapes[key])}")


def check_rng(payload, path, generator):
    """rng: the states of Python, NumPy, torch and the level sampler, as rng_state writes them."""
    rng = payload.get("rng")
    if not isinstance(rng, dict) or not {"python", "numpy", "torch", "sampler"} <= set(rng):
        _fail(path, "rng", f"is {_found(rng)}, expected the random states (python, numpy, torch, sampler)")
    python = rng["python"]
    if not (isinstance(python, (list, tuple)) and len(python) == 3 and _is_int(python[0])
            and isinstance(python[1], (list, tuple)) and len(python[1]) == 625
            and all(_is_int(v) and 0 <= v < 2**32 for v in python[1]) and python[1][-1] <= 624
            and (python[2] is None or isinstance(python[2], float))):
        _fail(path, "rng.python", "is not a state of Python's random module")
    numpy = rng["numpy"]
    if not isinstance(numpy, dict) or not {"keys", "position", "has_gauss", "cached"} <= set(numpy):
        _fail(path, "rng.numpy", f"is {shown(numpy)}, expected keys, position, has_gauss, cached")
    _require_tensor(path, "rng.numpy.keys", numpy["keys"], torch.int64, 624)
    if not bool(((numpy["keys"] >= 0) & (numpy["keys"] < 2**32)).all()):
        _fail(path, "rng.numpy.keys", "holds values outside 0..2**32-1")
    require_int(path, "rng.numpy.position", numpy["position"], 0, 624)
    require_int(path, "rng.numpy.has_gauss", numpy["has_gauss"], 0, 1)
    if not isinstance(numpy["cached"], float):
        _fail(path, "rng.numpy.cached", f"is {shown(numpy['cached'])}, expected a number")
    _require_tensor(path, "rng.torch", rng["torch"], torch.uint8, torch.get_rng_state().numel())
    _require_tensor(path, "rng.sampler", rng["sampler"], torch.uint8, generator.get_state().numel())
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple))
                                 and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        _fail(path, "rng.cuda", "is not a list of CUDA generator states")

"""The stored tensors of a subspace artefact (deploy/subspace.py), checked at load, and the
checksum written with them.

A file that torch.load reads may still be wrong: cut, edited, written by another program, or
with a byte flipped on a disk or in a copy (torch.load does not check the zip's CRCs). Unchecked,
such a file loaded silently (NaN weights, a float64 buffer converted on the way, levels outside
the range) or failed later inside `at` with a bare torch error. Each check here raises
CheckpointError of one line naming the file and what is wrong, in this order:

1. check_layout: every packed group (names, shapes, tensors) is what the writer makes: names
   are strings, shapes lists of sizes, tensors flat and of their dtype, each as long as its
   names and shapes (and, for integer codes, its bit width) say;
2. check_checksum: the sha256 over the stored tensors equals the one written (files of format
   version 1, written before the checksum, have none);
3. check_levels: the levels, the bit widths of the codes and the BN statistics per level are
   those of the file's method; check_against_model: every tensor is one of the network the
   config builds, of its shape, with usable values (finite weights, positive finite scales,
   zero points on the integer grid, BN variances >= 0).
"""

import hashlib
import math

import torch

from deploy.formats import FORMATS
from deploy.packing import unpack_tensors
from models.quant import grid_limits
from utils.checkpoint_schema import finite
from utils.errors import CheckpointError, shown

FLOAT_TENSORS = {"values": torch.float32}
CODE_TENSORS = {"codes": torch.uint8, "scales": torch.float32, "zero_points": torch.int32}
BN_STATISTICS = ("running_mean", "running_var")


def _groups(content):
    """(place, packed group, its bit width or None) of every group of tensors a subspace stores,
    in a fixed order (the checksum's). A group of integer codes holds CODE_TENSORS, the others
    FLOAT_TENSORS, each with its names and shapes."""
    yield "weights", content["weights"], None
    for bits in sorted(content["codes"] or {}):
        yield f"codes[{bits}]", content["codes"][bits], bits
    for index, group in enumerate(content["bn_statistics"] or []):
        yield f"bn_statistics[{index}]", group, None


def _fail(path, message):
    raise CheckpointError(f"{path}: damaged subspace artefact: {message}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _classifier_outputs(content: dict) -> int:
    """The outputs of the stored classifier (the last stored conv or linear weight, as
    num_classes_of reads a state dict; the classifier is never stored as codes)."""
    weights = content["weights"]
    shapes = [shape for name, shape in zip(weights["names"], weights["shapes"])
              if name.endswith("weight") and len(shape) in (2, 4)]
    return shapes[-1][0] if shapes else 0


# -- 1. layout ----------------------------------------------------------------------------
def check_layout(content: dict, path: str) -> None:
    """Each group's names, shapes and tensors as the writer makes them (see the module docstring)."""
    if content["codes"] is not None and not all(_is_int(bits) and bits > 0 for bits in content["codes"]):
        _fail(path, f"codes holds bit widths {shown(list(content['codes']))}, expected positive integers")
    for place, group, bits in _groups(content):
        names, shapes = group["names"], group["shapes"]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            _fail(path, f"{place}.names is {shown(names)}, expected a list of tensor names")
        if not isinstance(shapes, list) or len(shapes) != len(names) or not all(
                isinstance(shape, list) and all(_is_int(size) and size >= 0 for size in shape) for shape in shapes):
            _fail(path, f"{place}.shapes is {shown(shapes)}, expected a list of {len(names)} shapes")
        count = sum(math.prod(shape) for shape in shapes)
        for key, dtype in (CODE_TENSORS if bits else FLOAT_TENSORS).items():
            tensor = group[key]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != 1:
                found = (f"a {tensor.dtype} tensor of shape {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                         else shown(tensor))
                _fail(path, f"{place}.{key} is {found}, expected a flat {dtype} tensor")
            if key == "codes":
                expected = math.ceil(count * bits / 8)
                if len(tensor) != expected:
                    _fail(path, f"integer codes at {bits} bits hold {len(tensor)} bytes, {expected} expected "
                                f"({len(names)} convs of {count} weights)")
                continue
            expected = count if key == "values" else len(names)  # scales, zero points: one per conv
            if len(tensor) != expected:
                _fail(path, f"{place}.{key} holds {len(tensor)} values, {expected} expected "
                            f"({len(names)} tensors of {count} values)")
    outputs = _classifier_outputs(content)
    if content["num_classes"] != outputs:  # before a network of that many outputs is built
        _fail(path, f"num_classes is {content['num_classes']}, but the stored classifier has {outputs} outputs")


# -- 2. checksum ---------------------------------------------------------------------------
def checksum(content: dict) -> str:
    """sha256 over every stored tensor (its place, dtype, length and bytes) and the names and
    shapes that say how to read it, in a fixed order."""
    digest = hashlib.sha256()
    for place, group, bits in _groups(content):
        digest.update(repr((place, group["names"], group["shapes"])).encode())
        for key in CODE_TENSORS if bits else FLOAT_TENSORS:
            tensor = group[key].detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key} {tensor.dtype} {len(tensor)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_checksum(content: dict, path: str, version: int) -> None:
    """The stored checksum equals that of the stored tensors; files of version 1 hold none."""
    if version == 1:
        return
    stored = content.get("checksum")
    if not isinstance(stored, str):
        _fail(path, f"checksum is {'missing' if stored is None else shown(stored)}, expected a sha256 digest")
    if stored != checksum(content):
        raise CheckpointError(f"{path}: damaged (checksum mismatch): its stored tensors are not those written; "
                              f"write it again with python -m deploy.export --subspace")


# -- 3. against the network ---------------------------------------------------------------------
def check_levels(content: dict, path: str, method, calibrated: bool) -> None:
    """The levels, bit widths of the codes and BN statistics are those the file's method gives."""
    levels = method.level_range(method.config)
    outside = [level for level in content["levels"] if level not in levels]
    if outside:
        _fail(path, f"levels holds {shown(outside[0])}, outside this {method.setting}/{method.name} run's "
                    f"{levels.describe()}")
    codes = content["codes"]
    if codes is not None and FORMATS[method.export_format].subspace_codes is None:
        _fail(path, f"codes is stored, but {method.setting}/{method.name} subspaces store no integer codes")
    if codes is not None and sorted(codes) != list(range(int(levels.low), int(levels.high) + 1)):
        _fail(path, f"codes holds bit widths {sorted(codes)}, expected {levels.low:g}..{levels.high:g}")
    statistics = content["bn_statistics"]
    if calibrated != (statistics is not None):
        _fail(path, f"bn_statistics is {'missing' if statistics is None else 'stored'}, but this "
                    f"{method.setting}/{method.name} run {'re-estimated' if calibrated else 'kept'} BN statistics "
                    f"at evaluation")
    if statistics is not None and len(statistics) != len(content["levels"]):
        _fail(path, f"bn_statistics holds {len(statistics)} levels, levels {len(content['levels'])}")


def check_against_model(content: dict, path: str, model) -> None:
    """Every stored tensor is one of `model`'s with its shape, with usable values."""
    own = {name: list(value.shape) for name, value in model.state_dict().items()}
    for place, group, _ in _groups(content):
        for name, shape in zip(group["names"], group["shapes"]):
            if name not in own:
                _fail(path, f"{place} holds {shown(name)}, which the network has not")
            # A level's BN statistics are those of its (possibly narrower) per-level network.
            fits = (name.rsplit(".", 1)[-1] in BN_STATISTICS and len(shape) == 1 and shape[0] <= own[name][0]
                    if place.startswith("bn_statistics") else shape == own[name])
            if not fits:
                _fail(path, f"{place}: {name} has shape {shape}, the network's is {own[name]}")
    for place, group, bits in _groups(content):
        if bits:
            _check_codes(path, place, group, bits, content["codes"])
            continue
        for name, value in unpack_tensors(group).items():
            if not bool(finite(value)):
                _fail(path, f"{place}: non-finite values in {name} (NaN or infinity)")
            if name.endswith("running_var") and bool((value < 0).any()):
                _fail(path, f"{place}: negative BN variance in {name}")


def _check_codes(path, place, group, bits, codes):
    """The codes of one bit width: the same convs at every bit width, usable scales and zero points."""
    first = codes[min(codes)]
    if group["names"] != first["names"] or group["shapes"] != first["shapes"]:
        _fail(path, f"{place} stores other convs than codes[{min(codes)}]")
    scales, zero_points = group["scales"], group["zero_points"]
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        _fail(path, f"{place}: the scale of {group['names'][index]} is {scales[index].item():g}, expected a "
                    f"positive finite number")
    q_min, q_max = grid_limits(bits)
    bad = (zero_points < q_min) | (zero_points > q_max)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        _fail(path, f"{place}: the zero point of {group['names'][index]} is {int(zero_points[index])}, expected "
                    f"an integer in {q_min}..{q_max}")

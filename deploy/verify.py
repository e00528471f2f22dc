"""Every export checked against the model it was made from, before it is written.

An export is a second network built from the first one's weights (narrower, masked, decoded
from integer codes); a mistake there gives a file that runs, loads and agrees with itself. So
`python -m deploy.export` compares each artefact (a per-level export, the network its ONNX graph
is traced from, every level of a subspace) with the training-time model of the checkpoint, set
to the level as the run's evaluation sets it (engine/evaluate.py: the method's Level, the
network it evaluates, BN statistics re-estimated where it re-estimated them), on a few seeded
random images, and refuses to write what disagrees. The tests compare with the same function.
"""

from typing import Optional

import torch
import torch.nn as nn

from deploy.compressed import calibration_batches, input_size_of
from deploy.formats import FORMATS
from methods.base import EvalPoint, Method
from models.bn_calibration import calibrate_bn, preserved_bn_statistics
from models.layers import Level
from utils.errors import UserError

CHECK_IMAGES = 8


class ExportMismatch(UserError):
    """An artefact whose logits are not those of the training-time model at its level."""


def check_images(method: Method, count: int = CHECK_IMAGES, seed: int = 0) -> torch.Tensor:
    """Seeded random images of the model's input size (normalised inputs are about N(0, 1))."""
    size = input_size_of(method.config)
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibration(method: Method, data_dir: Optional[str]) -> Optional[list]:
    """The batches the run's evaluations re-estimated BN statistics on (read once, to serve
    every level), or None where they did not."""
    images = method.bn_at_evaluation(method.config).calibration_images
    return list(calibration_batches(method.config, images, data_dir)) if images else None


@torch.no_grad()
def training_time_logits(model: nn.Module, method: Method, point: EvalPoint, images: torch.Tensor,
                         levels: Optional[Level] = None, batches: Optional[list] = None) -> torch.Tensor:
    """Logits of the training-time `model` at `point` as the run's evaluation computes them: the
    layers at `levels` (default the method's export level, that of its final evaluation), the
    network the method evaluates (LEC: slimmed), BN statistics re-estimated on `batches` when
    given. The model's own BN statistics are restored afterwards."""
    with preserved_bn_statistics(model):
        method.apply_levels(model, method.export_level(point) if levels is None else levels)
        network, _ = method.eval_model(model, point)
        if batches is not None:
            calibrate_bn(network, batches)
        return network.eval()(images)


def tolerance(method: Method, expected: torch.Tensor) -> float:
    """The largest |logit difference| the method's export format allows: its relative
    tolerance times the largest |logit| of the training-time model (at least 1)."""
    return FORMATS[method.export_format].check_tolerance * max(1.0, float(expected.abs().max()))


def level_text(method: Method, level) -> str:
    return f"{method.level_unit.label} {level:g}"


@torch.no_grad()
def check_levels(model: nn.Module, method: Method, artefact, levels, name: str, data_dir: Optional[str] = None,
                 batches: Optional[list] = None) -> str:
    """Compare `artefact(level)` (the network an artefact gives at a level) with the training-time
    model at each of `levels`: the line saying what was checked, or ExportMismatch naming `name`
    (the file not written) and the first level that disagrees. `batches`: the run's calibration
    batches, read from `data_dir` when needed and not given."""
    if batches is None:
        batches = calibration(method, data_dir)
    images = check_images(method)
    worst, worst_allowed = 0.0, 0.0
    for level in levels:
        point = method.export_point(level)
        expected = training_time_logits(model, method, point, images, batches=batches)
        difference = float((artefact(level)(images) - expected).abs().max())
        allowed = tolerance(method, expected)
        text = f"max |Δlogit| {difference:.2g} on {len(images)} random images (tolerance {allowed:.2g})"
        if not difference <= allowed:  # also refuses NaN
            raise ExportMismatch(f"{name}: not written: at {level_text(method, level)} the export does not "
                                 f"reproduce the training-time model ({text}); this is a fault of the export")
        if difference >= worst:
            worst, worst_allowed, worst_level = difference, allowed, level
    at = ", ".join(f"{level:g}" for level in levels)
    where = f" (largest at {worst_level:g})" if len(levels) > 1 else ""
    return (f"checked against the training-time model at {method.level_unit.label} {at}: max |Δlogit| "
            f"{worst:.2g}{where} on {len(images)} random images (tolerance {worst_allowed:.2g})")

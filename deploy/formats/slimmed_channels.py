"""Export format `slimmed_channels` (LEC): the network slimmed at a fraction of norm channels kept
(the global |gamma| threshold), stored as its channel spec (`widths`, `selected` channel-selection
sizes) and weights."""

from deploy.formats.base import ExportFormat
from deploy.state import effective_state
from models.slimming import lec_slim


def export(model, method, num_classes, level, round_to):
    slim, info = lec_slim(model, method.config.model, num_classes, level)
    return slim, effective_state(slim), {"widths": info["widths"], "selected": info["selected"]}


def describe(content):
    lines = ["channels: " + ", ".join(f"{name} {width}" for name, width in content["widths"].items())]
    if content["selected"]:
        lines.append("selected: " + ", ".join(f"{name} {count}" for name, count in content["selected"].items()))
    return lines


FORMAT = ExportFormat("slimmed_channels", export, describe=describe)

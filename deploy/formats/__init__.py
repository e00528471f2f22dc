"""Registry of export formats: one module each (write, decode, describe, subspace hooks), one
line each here. Method.export_format names the format of a method's exports."""

from deploy.formats import channels, int_codes, slimmed_channels, topk
from deploy.formats.base import ExportFormat

FORMATS = {}


def register(export_format: ExportFormat) -> ExportFormat:
    """Add an export format under its name."""
    FORMATS[export_format.name] = export_format
    return export_format


register(channels.FORMAT)
register(slimmed_channels.FORMAT)
register(topk.FORMAT)
register(int_codes.FORMAT)

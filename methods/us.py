"""US (universally slimmable network) baseline: structured LCS+P with a shared BatchNorm."""

from methods.lcs_p import LcsPStructured


class US(LcsPStructured):
    """Widths [lo, hi, u, u], u ~ U(lo, hi), summed CE losses; one set of BN running
    statistics shared by all widths (never recalibrated)."""

    name = "us"

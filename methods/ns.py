"""NS (slimmable network) baseline: a fixed list of widths per batch (SPEC 3.4)."""

from methods.config import Key
from methods.structured import StructuredMethod


class NS(StructuredMethod):
    """Every batch runs every width of `width_factors_list` in order (summed CE losses).
    As in the original's shipped config, one BatchNorm is shared by all widths."""

    name = "ns"
    compiles_when = ""
    norms = ("BN",)
    own_keys = {"width_factors_list": Key("floats?", None, "NS widths")}

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        widths = config.width_factors_list
        checks.require(isinstance(widths, list) and len(widths) > 0, "width_factors_list",
                       "the list of widths is empty")
        for width in widths:
            checks.in_range("width_factors_list", width, 0, 1, low_open=True, what="width factors")

    def train_levels(self, step, generator):
        from models.layers import Level
        return [Level(width_factor=w) for w in self.config.width_factors_list]

    def distinct_train_levels(self):
        return len(self.config.width_factors_list)

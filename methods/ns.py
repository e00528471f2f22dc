"""NS (slimmable network) baseline: a fixed list of widths per batch (SPEC 3.4)."""

from methods.base import StructuredMethod


class NS(StructuredMethod):
    """Every batch runs every width of `width_factors_list` in order (summed CE losses).
    As in the original's shipped config, one BatchNorm is shared by all widths."""

    name = "ns"
    config_keys = ("width_factors_list", "eval_param_grid")

    def train_levels(self, step, generator):
        return [{"width_factor": w} for w in self.config.width_factors_list]

    def distinct_train_levels(self):
        return len(self.config.width_factors_list)

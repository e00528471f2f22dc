"""Target width baseline: one network trained at a fixed width factor, the structured
counterpart of target_topk and target_bit_width (the independently trained models LCS is
compared against)."""

from methods.base import Flag, LevelRange
from methods.config import Key
from methods.structured import StructuredMethod


class TargetWidth(StructuredMethod):
    """A slimmable network trained only at `width_factor` (every body conv keeps its leading
    round(w * C) channels; the others are never used). It is evaluated and exported at widths
    up to the trained one: wider networks would use channels that never trained."""

    name = "target_width"
    target_key = "width_factor"
    compiles_when = ""
    own_keys = {"width_factor": Key("float?", 0.5, "width factor trained (target_width)")}
    own_flags = (Flag("--width_factor", ("width_factor",),
                      "width factor to train at, in (0, 1] (default 0.5); without "
                      "--eval_width_factors it is also the width evaluated", type=float),)

    @classmethod
    def flag_values(cls, args, siblings, skip=()):
        entries = super().flag_values(args, siblings, skip)
        if args.width_factor is not None and args.eval_width_factors is None:
            entries.append(("eval_param_grid", [args.width_factor], "--width_factor"))
        return entries

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.in_range("width_factor", config.width_factor, 0, 1, low_open=True, what="the width factor")

    @classmethod
    def level_range(cls, config):
        return LevelRange(0, config.width_factor, "width factors", low_open=True,
                          note="at most the trained width_factor")

    def train_levels(self, step, generator):
        from models.layers import Level
        return [Level(width_factor=self.config.width_factor)]

    def distinct_train_levels(self):
        return 1

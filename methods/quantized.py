"""The quantized setting: fake-quantized convs whose level is a bit width."""

from methods.base import Flag, LevelRange, LevelUnit, WarmupMethod
from methods.config import Key
from utils.errors import ConfigError, number_list

# The bit widths this project trains and evaluates (SPEC 3.6).
MIN_BITS, MAX_BITS = 3, 8


def _one_bit_width(values):
    if len(values) != 1:
        raise ConfigError(f"--bit_width: expected one integer, got {values}")
    return {"num_bits": values[0]}


def _bit_width_limits(limits):
    if len(limits) != 2:
        raise ConfigError(f"--bit_width_limits: expected exactly two integers min,max, got {limits}")
    return {"min_bits": limits[0], "max_bits": limits[1]}


class QuantizedMethod(WarmupMethod):
    setting = "quantized"
    script = "train_quantized.py"
    description = "Train a network whose bit width can be chosen at inference time."
    level_unit = LevelUnit("num_bits", "bit width", type=int)
    export_format = "int_codes"
    deploy_levels = (8, 7, 6, 5, 4, 3)
    line = False
    own_flags = (
        Flag("--bit_width", ("num_bits",), f"bit width to train at, {MIN_BITS}..{MAX_BITS} (default 6)",
             type=number_list(int), to_values=_one_bit_width),
        Flag("--eval_bit_widths", ("eval_param_grid",),
             f"comma-separated bit widths to evaluate, {MIN_BITS}..{MAX_BITS}", type=number_list(int)),
        Flag("--bit_width_limits", ("min_bits", "max_bits"), "min,max: range of bit widths trained",
             type=number_list(int), to_values=_bit_width_limits),
        Flag("--warmup_budget", ("warmup_budget",),
             "percent of all iterations before activations are quantized, in (0, 100] (default: 80)", type=float),
    )

    def layer_factory(self):
        from models.factory import LayerFactory
        # With BN the norms (folded into the quantized convs) are never on the line.
        return LayerFactory(norm_kind=self.config.norm, body="quant", num_groups=self.config.num_groups,
                            line_convs=self.line, line_norms=self.line and self.config.norm != "BN")

    @classmethod
    def complete(cls, config):
        super().complete(config)
        grid = config.eval_param_grid
        if isinstance(grid, list) and all(isinstance(b, (int, float)) and float(b).is_integer() for b in grid):
            config.eval_param_grid = [int(b) for b in grid]

    @classmethod
    def level_range(cls, config):
        return LevelRange(MIN_BITS, MAX_BITS, "bit widths", integer=True)

    def activation_quant(self, step):
        """Activations are quantized from the end of the warmup on (weights from step 0)."""
        return step >= self.warmup_iterations

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level(num_bits=int(point.level))

    def compression_metrics(self, model, input_size):
        from models.layers import quant_layers
        layers = quant_layers(model)
        return {"num_bits": layers[0].num_bits if layers else None,
                "act_quant": all(bool(layer.act_range_ready) for layer in layers)}


class BitRange:
    """Methods that train a range of bit widths [min_bits, max_bits] (lcs_l, lcs_p): they
    evaluate and export only bit widths inside it."""

    own_keys = {"min_bits": Key("int?", MIN_BITS), "max_bits": Key("int?", MAX_BITS)}

    @classmethod
    def flag_values(cls, args, siblings, skip=()):
        """--bit_width_limits without --eval_bit_widths evaluates every bit width of the range."""
        entries = super().flag_values(args, siblings, skip)
        if args.bit_width_limits is not None and args.eval_bit_widths is None:
            low, high = args.bit_width_limits
            entries.append(("eval_param_grid", list(range(low, high + 1)), "--bit_width_limits"))
        return entries

    @classmethod
    def level_range(cls, config):
        return LevelRange(config.min_bits, config.max_bits, "bit widths", integer=True,
                          note="the trained min_bits..max_bits")

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        low, high = config.min_bits, config.max_bits
        checks.require(isinstance(low, int) and isinstance(high, int) and MIN_BITS <= low < high <= MAX_BITS,
                       "min_bits", f"bit width limits must satisfy {MIN_BITS} <= min < max <= {MAX_BITS}, "
                                   f"got {low},{high}")

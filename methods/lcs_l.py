"""LCS+L: a line of networks theta(alpha); alpha also sets the compression level.

The three settings differ in what lies on the line and how alpha maps to a level; those
differences are all in this file (SPEC 0.1, 3.1, 3.2, 3.7). Grids, metrics and exports speak
in levels; each class maps a level to its alpha (alpha_of) and back (level_of_alpha, for
configs written when grids were in alpha).
"""

from methods.base import LineMethod
from methods.config import Key
from methods.levels import (alpha_to_bits, alpha_to_width, bits_to_alpha, decayed_topk, discrete_alpha,
                            sample_alpha_biased, sandwich, uniform, width_to_alpha)
from methods.quantized import MAX_BITS, MIN_BITS, BitRange, QuantizedMethod
from methods.structured import StructuredMethod, WidthRange
from methods.unstructured import SampledTopK, UnstructuredMethod

# Widths recorded from a legacy alpha grid are rounded to this many digits: the alphas of the
# original's grid (0.83333, ...) stand for round widths (0.875, ...).
LEGACY_WIDTH_DIGITS = 4


class LcsLStructured(LineMethod, WidthRange, StructuredMethod):
    """Only the norms are on the line (convs shared); width = lo + (hi - lo) * alpha;
    sandwich alphas [0, 1, u, u] per batch; cos^2 on the norm gammas."""

    name = "lcs_l"
    own_keys = {
        "width_factor_sampling_method": Key("str?", "sandwich", "sandwich or point"),
        "apply_beta_to_norm": Key("bool?", False, "cos^2 penalty on norm gammas"),
    }

    @property
    def regularize_norms(self):
        return self.config.apply_beta_to_norm

    @classmethod
    def validate_setting(cls, config, checks):
        sampling = config.width_factor_sampling_method
        checks.require(sampling in ("sandwich", "point"), "width_factor_sampling_method",
                       f"must be sandwich or point, got {sampling!r}")
        super().validate_setting(config, checks)

    @classmethod
    def min_samples_for(cls, config):
        return 2 if config.width_factor_sampling_method == "sandwich" else 1

    def layer_factory(self):
        from models.factory import LayerFactory
        return LayerFactory(norm_kind=self.config.norm, body="slim", line_norms=True)

    def _level(self, alpha):
        from models.layers import Level
        low, high = self.config.width_factor_limits
        return Level(alpha=alpha, width_factor=alpha_to_width(alpha, low, high))

    def train_levels(self, step, generator):
        if self.config.width_factor_sampling_method == "sandwich":
            alphas = sandwich(0.0, 1.0, self.config.width_factor_samples, generator)
        else:  # "point": one alpha per batch
            alphas = [uniform(0.0, 1.0, generator)]
        return [self._level(alpha) for alpha in alphas]

    def alpha_of(self, level):
        return width_to_alpha(level, *self.config.width_factor_limits)

    @classmethod
    def level_of_alpha(cls, alpha, values):
        return round(alpha_to_width(alpha, *values.get("width_factor_limits", [0.25, 1.0])), LEGACY_WIDTH_DIGITS)

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level(alpha=point.alpha, width_factor=point.level)


class LcsLUnstructured(LineMethod, SampledTopK, UnstructuredMethod):
    """Every conv and norm on the line; TopK fraction k = alpha after a linear decay from 1
    over the warmup (also at evaluation during the warmup); biased endpoint sampling."""

    name = "lcs_l"
    line = True

    def _level(self, alpha, step):
        from models.layers import Level
        return Level(alpha=alpha, topk=decayed_topk(alpha, step, self.warmup_iterations))

    def train_levels(self, step, generator):
        low, high, endpoint_probability = self.config.alpha_sampling
        return [self._level(sample_alpha_biased(low, high, endpoint_probability, generator), step)]

    def alpha_of(self, level):
        return level

    @classmethod
    def level_of_alpha(cls, alpha, values):
        return alpha

    def eval_levels(self, point, step):
        return self._level(point.alpha, step)


class LcsLQuantized(LineMethod, BitRange, QuantizedMethod):
    """Every conv and norm on the line (norms not with BN); alpha in {1/n, ..., 1} (or U(0, 1))
    picks one bit width for all quantized layers."""

    name = "lcs_l"
    line = True
    own_keys = {"discrete_alpha_map": Key("bool?", False, "alpha drawn from {1/n, ..., 1}")}
    compiles_when = "with discrete_alpha_map"

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.require(isinstance(config.discrete_alpha_map, bool), "discrete_alpha_map", "must be true or false")

    def _level(self, alpha, step=None):
        from models.layers import Level
        bits = alpha_to_bits(alpha, self.config.min_bits, self.config.max_bits)
        act_quant = self.activation_quant(step) if step is not None else None
        return Level(alpha=alpha, num_bits=bits, act_quant=act_quant)

    def train_levels(self, step, generator):
        if self.config.discrete_alpha_map:
            alpha = discrete_alpha(self.config.min_bits, self.config.max_bits, generator)
        else:
            alpha = uniform(0.0, 1.0, generator)
        return [self._level(alpha, step)]

    def distinct_train_levels(self):
        if not self.config.discrete_alpha_map:
            return None
        # n alphas, each with activation quantization off (warmup) and on.
        return 2 * (self.config.max_bits - self.config.min_bits + 1)

    def alpha_of(self, level):
        return bits_to_alpha(level, self.config.min_bits, self.config.max_bits)

    @classmethod
    def level_of_alpha(cls, alpha, values):
        return alpha_to_bits(alpha, values.get("min_bits", MIN_BITS), values.get("max_bits", MAX_BITS))

    def eval_levels(self, point, step):
        """The bit width as given (alpha is only for the line): no bits -> alpha -> bits."""
        from models.layers import Level
        return Level(alpha=point.alpha, num_bits=int(point.level))

"""LCS+L: a line of networks theta(alpha); alpha is also the compression level.

The three settings differ in what lies on the line and how alpha maps to a level; those
differences are all in this file (SPEC 0.1, 3.1, 3.2, 3.7).
"""

from methods.base import EvalPoint, LineMethod, QuantizedMethod, StructuredMethod, UnstructuredMethod
from methods.levels import (alpha_to_bits, alpha_to_width, decayed_topk, discrete_alpha,
                            sample_alpha_biased, sandwich, uniform)
from models.factory import LayerFactory


class LcsLStructured(LineMethod, StructuredMethod):
    """Only the norms are on the line (convs shared); width = lo + (hi - lo) * alpha;
    sandwich alphas [0, 1, u, u] per batch; cos^2 on the norm gammas."""

    name = "lcs_l"
    grid_key = "alpha_grid"
    config_keys = ("width_factor_limits", "width_factor_samples", "width_factor_sampling_method",
                   "apply_beta_to_norm", "beta", "alpha_grid")
    defaults = {"width_factor_sampling_method": "sandwich", "apply_beta_to_norm": False, "beta": 1.0}

    @property
    def regularize_norms(self):
        return self.config.apply_beta_to_norm

    def layer_factory(self):
        return LayerFactory(norm_kind=self.config.norm, body="slim", line_norms=True)

    def _levels(self, alpha):
        low, high = self.config.width_factor_limits
        return {"alpha": alpha, "width_factor": alpha_to_width(alpha, low, high)}

    def train_levels(self, step, generator):
        if self.config.width_factor_sampling_method == "sandwich":
            alphas = sandwich(0.0, 1.0, self.config.width_factor_samples, generator)
        else:  # "point": one alpha per batch
            alphas = [uniform(0.0, 1.0, generator)]
        return [self._levels(alpha) for alpha in alphas]

    def eval_points(self):
        low, high = self.config.width_factor_limits
        # Widths from the 5-digit alpha grid (0.8749975, ...) give the same channel counts
        # as the round widths; the level is reported rounded.
        return [EvalPoint(level=round(alpha_to_width(a, low, high), 4), alpha=float(a))
                for a in self.config.alpha_grid]

    def eval_levels(self, point, step):
        return self._levels(point.alpha)


class LcsLUnstructured(LineMethod, UnstructuredMethod):
    """Every conv and norm on the line; TopK fraction k = alpha after a linear decay from 1
    over the warmup (also at evaluation during the warmup); biased endpoint sampling."""

    name = "lcs_l"
    grid_key = "alpha_grid"
    config_keys = ("alpha_sampling", "beta", "alpha_grid")
    defaults = {"alpha_sampling": [0.025, 1.0, 0.0], "beta": 1.0}

    def _levels(self, alpha, step):
        return {"alpha": alpha, "topk": decayed_topk(alpha, step, self.warmup_iterations)}

    def train_levels(self, step, generator):
        low, high, endpoint_probability = self.config.alpha_sampling
        return [self._levels(sample_alpha_biased(low, high, endpoint_probability, generator), step)]

    def eval_points(self):
        return [EvalPoint(level=float(a), alpha=float(a)) for a in self.config.alpha_grid]

    def eval_levels(self, point, step):
        return self._levels(point.alpha, step)


class LcsLQuantized(LineMethod, QuantizedMethod):
    """Every conv and norm on the line (norms not with BN); alpha in {1/n, ..., 1} (or U(0, 1))
    picks one bit width for all quantized layers."""

    name = "lcs_l"
    grid_key = "alpha_grid"
    config_keys = ("min_bits", "max_bits", "discrete_alpha_map", "beta", "alpha_grid")
    defaults = {"min_bits": 2, "max_bits": 8, "discrete_alpha_map": False, "beta": 1.0}

    def _levels(self, alpha, step=None):
        bits = alpha_to_bits(alpha, self.config.min_bits, self.config.max_bits)
        levels = {"alpha": alpha, "num_bits": bits}
        if step is not None:
            levels["act_quant"] = self.activation_quant(step)
        return levels

    def train_levels(self, step, generator):
        if self.config.discrete_alpha_map:
            alpha = discrete_alpha(self.config.min_bits, self.config.max_bits, generator)
        else:
            alpha = uniform(0.0, 1.0, generator)
        return [self._levels(alpha, step)]

    def distinct_train_levels(self):
        if not self.config.discrete_alpha_map:
            return None
        # n alphas, each with activation quantization off (warmup) and on.
        return 2 * (self.config.max_bits - self.config.min_bits + 1)

    def eval_points(self):
        return [EvalPoint(level=alpha_to_bits(a, self.config.min_bits, self.config.max_bits), alpha=float(a))
                for a in self.config.alpha_grid]

    def eval_levels(self, point, step):
        return self._levels(point.alpha)

"""LCS+P: one network trained with a random compression level per batch (SPEC 0.2, 3.2)."""

import torch

from methods.base import QuantizedMethod, StructuredMethod, UnstructuredMethod
from methods.levels import sandwich, uniform
from models.layers import quant_layers, set_layer_bits, set_level


class LcsPStructured(StructuredMethod):
    """Slimmable network with IN, widths [lo, hi, u, u], u ~ U(lo, hi): the US recipe."""

    name = "lcs_p"
    config_keys = ("width_factor_limits", "width_factor_samples", "eval_param_grid")

    def train_levels(self, step, generator):
        low, high = self.config.width_factor_limits
        return [{"width_factor": w} for w in sandwich(low, high, self.config.width_factor_samples, generator)]


class LcsPUnstructured(UnstructuredMethod):
    """TopK = alpha_sampling[1] (1.0: dense) during the warmup, then k ~ U(lo, hi) per batch,
    shared by all layers (an abrupt switch, no decay)."""

    name = "lcs_p"
    config_keys = ("alpha_sampling", "eval_param_grid")
    defaults = {"alpha_sampling": [0.025, 1.0, 0.0]}

    def train_levels(self, step, generator):
        low, high = self.config.alpha_sampling[:2]
        if step < self.warmup_iterations:
            return [{"topk": high}]
        return [{"topk": uniform(low, high, generator)}]

    def eval_levels(self, point, step):
        return {"topk": point.level}


class LcsPQuantized(QuantizedMethod):
    """The upper bit width (max_bits) during the warmup; afterwards every quantized layer draws its own bit width
    uniformly from {min_bits..max_bits} in every batch. Evaluated at one uniform bit width."""

    name = "lcs_p"
    config_keys = ("min_bits", "max_bits", "eval_param_grid")
    defaults = {"min_bits": 2, "max_bits": 8}

    def bind(self, model):
        self.num_layers = len(quant_layers(model))

    def train_levels(self, step, generator):
        if not self.activation_quant(step):
            return [{"num_bits": self.config.max_bits, "act_quant": False}]
        bits = torch.randint(self.config.min_bits, self.config.max_bits + 1, (self.num_layers,),
                             generator=generator)
        return [{"layer_bits": bits.tolist(), "act_quant": True}]

    def apply_levels(self, model, levels):
        levels = dict(levels)
        if "layer_bits" in levels:
            set_layer_bits(model, levels.pop("layer_bits"))
        set_level(model, **levels)

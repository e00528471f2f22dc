"""LCS+P: one network trained with a random compression level per batch (SPEC 0.2, 3.2)."""

from methods.quantized import BitRange, QuantizedMethod
from methods.levels import sandwich, uniform
from methods.structured import StructuredMethod, WidthRange
from methods.unstructured import SampledTopK, UnstructuredMethod


class LcsPStructured(WidthRange, StructuredMethod):
    """Slimmable network with IN, widths [lo, hi, u, u], u ~ U(lo, hi): the US recipe."""

    name = "lcs_p"

    def train_levels(self, step, generator):
        from models.layers import Level
        low, high = self.config.width_factor_limits
        return [Level(width_factor=w) for w in sandwich(low, high, self.config.width_factor_samples, generator)]


class LcsPUnstructured(SampledTopK, UnstructuredMethod):
    """TopK = alpha_sampling[1] (1.0: dense) during the warmup, then k ~ U(lo, hi) per batch,
    shared by all layers (an abrupt switch, no decay)."""

    name = "lcs_p"

    def train_levels(self, step, generator):
        from models.layers import Level
        low, high = self.config.alpha_sampling[:2]
        if step < self.warmup_iterations:
            return [Level(topk=high)]
        return [Level(topk=uniform(low, high, generator))]


class LcsPQuantized(BitRange, QuantizedMethod):
    """The upper bit width (max_bits) during the warmup; afterwards every quantized layer draws its
    own bit width uniformly from {min_bits..max_bits} in every batch. Evaluated at one uniform bit width."""

    name = "lcs_p"

    def bind(self, model):
        from models.layers import quant_layers
        self.num_layers = len(quant_layers(model))

    def train_levels(self, step, generator):
        import torch

        from models.layers import Level
        if not self.activation_quant(step):
            return [Level(num_bits=self.config.max_bits, act_quant=False)]
        bits = torch.randint(self.config.min_bits, self.config.max_bits + 1, (self.num_layers,),
                             generator=generator)
        return [Level(layer_bits=tuple(bits.tolist()), act_quant=True)]

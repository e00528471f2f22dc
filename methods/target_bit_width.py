"""Target bit width baseline: one network trained at a fixed bit width (SPEC 3.2)."""

from methods.base import QuantizedMethod


class TargetBitWidth(QuantizedMethod):
    """Weights quantized at `num_bits` from the first step, activations after the warmup."""

    name = "target_bit_width"
    config_keys = ("num_bits", "eval_param_grid")
    defaults = {"num_bits": 8}

    def train_levels(self, step, generator):
        return [{"num_bits": self.config.num_bits, "act_quant": self.activation_quant(step)}]

    def distinct_train_levels(self):
        return 2  # activation quantization off, then on

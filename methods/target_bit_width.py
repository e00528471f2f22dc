"""Target bit width baseline: one network trained at a fixed bit width (SPEC 3.2)."""

from methods.config import Key
from methods.quantized import MAX_BITS, MIN_BITS, QuantizedMethod


class TargetBitWidth(QuantizedMethod):
    """Weights quantized at `num_bits` from the first step, activations after the warmup."""

    name = "target_bit_width"
    target_key = "num_bits"
    compiles_when = ""
    own_keys = {"num_bits": Key("int?", MAX_BITS, "target bit width")}

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.require(config.num_bits in range(MIN_BITS, MAX_BITS + 1), "num_bits",
                       f"bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {config.num_bits}")

    def train_levels(self, step, generator):
        from models.layers import Level
        return [Level(num_bits=self.config.num_bits, act_quant=self.activation_quant(step))]

    def distinct_train_levels(self):
        return 2  # activation quantization off, then on

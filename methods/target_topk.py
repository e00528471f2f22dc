"""Target TopK baseline: one network sparsified to a fixed TopK fraction (SPEC 3.2)."""

from methods.config import Key
from methods.levels import decayed_topk
from methods.unstructured import UnstructuredMethod


class TargetTopK(UnstructuredMethod):
    """k_t = T + (1 - T) * max(1 - t/W, 0); at evaluation T is the grid value with the
    same decay factor."""

    name = "target_topk"
    target_key = "topk"
    own_keys = {"topk": Key("float?", 0.0, "target TopK fraction (target_topk)")}

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        checks.in_range("topk", config.topk, 0, 1, low_open=True, what="the TopK fraction")

    def train_levels(self, step, generator):
        from models.layers import Level
        return [Level(topk=decayed_topk(self.config.topk, step, self.warmup_iterations))]

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level(topk=decayed_topk(point.level, step, self.warmup_iterations))

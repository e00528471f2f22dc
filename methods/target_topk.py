"""Target TopK baseline: one network sparsified to a fixed TopK fraction (SPEC 3.2)."""

from methods.base import UnstructuredMethod
from methods.levels import decayed_topk


class TargetTopK(UnstructuredMethod):
    """k_t = T + (1 - T) * max(1 - t/W, 0); at evaluation T is the grid value with the
    same decay factor."""

    name = "target_topk"
    config_keys = ("topk", "eval_param_grid")
    defaults = {"topk": 0.0}

    def train_levels(self, step, generator):
        return [{"topk": decayed_topk(self.config.topk, step, self.warmup_iterations)}]

    def eval_levels(self, point, step):
        return {"topk": decayed_topk(point.level, step, self.warmup_iterations)}

"""Evaluation of a model over its method's grid of compression levels (SPEC 3.11)."""

import contextlib
import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from data import Data
from methods.base import Method
from models.bn_calibration import calibrate_bn, own_batch_statistics, preserved_bn_statistics
from models.layers import Norm2d
from utils.distributed import Context, all_reduce_sum


class BNStatistics:
    """For every BN layer: per batch, the mean absolute difference between the channel
    mean / variance of the layer's input and its running statistics (leading C entries);
    summarised as mean and std over batches (the original's BN analysis)."""

    def __init__(self, model):
        self.records, self.hooks = {}, []
        for name, module in model.named_modules():
            if isinstance(module, Norm2d) and module.kind == "BN":
                self.records[name] = {"mean": [], "var": []}
                self.hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def record(module, inputs, output):
            x = inputs[0].float()
            channels = x.shape[1]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3))
            self.records[name]["mean"].append((mean - module.running_mean[:channels]).abs().mean())
            self.records[name]["var"].append((var - module.running_var[:channels]).abs().mean())
        return record

    def summary(self):
        for hook in self.hooks:
            hook.remove()
        out = {}
        for name, record in self.records.items():
            for stat in ("mean", "var"):
                values = torch.stack(record[stat]) if record[stat] else torch.zeros(1)
                out[f"{name}_running_{stat}_MAD_mean"] = values.mean().item()
                out[f"{name}_running_{stat}_MAD_std"] = values.std().item() if len(values) > 1 else 0.0
        return out


def autocast(device, enabled):
    """--amp: bfloat16 autocast, on CUDA and on CPUs (fast on those with bfloat16 units, e.g.
    AMX or AVX512-BF16; slower than fp32 on the others)."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NoProgress:
    """What evaluate() tells a progress display (engine.progress.EvaluationLog); here, nothing."""

    def batch_done(self):
        pass

    def level_done(self, result):
        pass


@torch.no_grad()
def test_pass(net, test, context, amp=False, progress=NoProgress(), max_batches=None):
    """(accuracy, mean loss per image, number of images) over the whole test set (its first
    `max_batches` batches when given), each image counted once across processes."""
    device = context.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in itertools.islice(test.batches(), max_batches):
        with autocast(device, amp):
            logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(dim=1) == labels).sum()
        totals += torch.stack([correct.double(), loss.double(), torch.tensor(len(labels), device=device).double()])
        progress.batch_done()
    correct, loss_sum, count = all_reduce_sum(totals, context).tolist()
    return correct / max(count, 1), loss_sum / max(count, 1), int(count)


def evaluate(model: torch.nn.Module, method: Method, data: Data, context: Context, step: Optional[int],
             amp: bool = False, bn_statistics: bool = True, test_batch_bn: bool = False,
             progress=NoProgress(), max_batches: Optional[int] = None) -> list[dict]:
    """One dict per grid point: level, alpha, accuracy, loss and the method's metrics; each
    test batch and each finished point are told to `progress`. `max_batches`: only the first
    test and calibration batches of each point (to time an evaluation).

    `step`: the training step whose levels are evaluated (the TopK warmup, the activation delay);
    None: each level as a trained model holds it (its export level).

    BN statistics of the evaluated network: re-estimated on `data.calibration` when there is
    one (the model's own are restored afterwards), each test batch's own with `test_batch_bn`,
    else the running statistics."""
    was_training = model.training
    model.eval()
    results = []
    calibration = getattr(data, "calibration", None)
    try:
        with preserved_bn_statistics(model) if calibration is not None else contextlib.nullcontext():
            for point in method.eval_points():
                # step None: as a trained model, at the level itself (TopK after its warmup decay).
                levels = method.export_level(point) if step is None else method.eval_levels(point, step)
                method.apply_levels(model, levels)
                net, extra = method.eval_model(model, point)
                calibrated = 0
                if calibration is not None:
                    with autocast(context.device, amp):
                        calibrated = calibrate_bn(net, itertools.islice(calibration.batches(), max_batches))
                metrics = dict(method.compression_metrics(net, data.input_size))
                metrics.update(extra)
                statistics = BNStatistics(net) if bn_statistics else None
                with own_batch_statistics(net) if test_batch_bn else contextlib.nullcontext():
                    accuracy, loss, count = test_pass(net, data.test, context, amp, progress, max_batches)
                row = {"level": point.level, "alpha": point.alpha, "accuracy": accuracy, "loss": loss,
                       "num_images": count, **metrics, "bn_calibration_images": calibrated,
                       "lec_test_batch_statistics": test_batch_bn}
                if statistics is not None and statistics.records:
                    row["bn_stats"] = statistics.summary()
                elif statistics is not None:
                    statistics.summary()
                results.append(row)
                progress.level_done(row)
    finally:
        model.train(was_training)
    return results


"""One optimisation step and what it needs: the step itself (forward and backward per level,
regulariser, gradient edits, SGD step), torch.compile and the cuDNN choice, and the checks that
stop a run whose losses or weights stop being finite."""

import contextlib

import torch
import torch.nn.functional as F

from engine import run_dir
from engine.evaluate import autocast
from methods import compilable_methods
from utils.checkpoint_schema import finite
from utils.errors import ConfigError, TrainingError

def configure_backends(method, device):
    """cuDNN autotuning times every kernel for each new input shape; the method says whether
    its networks keep their shapes (see Method.cudnn_benchmark)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = method.cudnn_benchmark


def check_compile_support(method, config):
    """--compile builds one graph per distinct level setting of training; methods that draw
    a new width / TopK / alpha at every step would recompile at every step (and slimmable
    widths break the compiler's dynamic shapes), so they are refused up front."""
    if method.distinct_train_levels() is None:
        raise ConfigError(f"--compile: {config.setting}/{config.method} draws a new compression level at "
                          f"almost every step, so torch.compile would rebuild its graph every step; it is for "
                          f"methods with a few fixed levels ({compilable_methods()}); run without --compile")


def compile_network(network, method):
    # Static shapes: a graph per level setting and batch shape (the last batch of an epoch
    # is smaller). Dynamic shapes would not help (the levels are few) and inductor fails on
    # the symbolic channel counts of slimmable convs. Past the limit dynamo would silently
    # fall back to eager, so that is made an error.
    torch._dynamo.config.recompile_limit = max(8, 2 * method.distinct_train_levels() + 2)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(network, dynamic=False)


class TrainStep:
    """One optimisation step (SPEC 3.9): a forward and backward per level of the step (so the
    losses are summed), the method's regulariser on the last one, the method's gradient
    edits, one SGD step. Nothing here waits for the device.

    Under DDP the gradients are all-reduced once, by the last backward (the others run in
    no_sync); every process then holds the gradient of the global batch and applies the
    method's gradient edits (LEC's L1 sub-gradient) identically, so the replicas stay equal.
    """

    def __init__(self, model, method, optimizer, context, config):
        self.model, self.method, self.optimizer = model, method, optimizer
        self.device, self.amp = context.device, config.amp
        self.ddp = None
        network = model
        if context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = network = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.forward = compile_network(network, method) if config.compile else network

    def __call__(self, levels_list, images, labels):
        """(mean loss per forward pass, logits of the last forward), both left on the device."""
        loss, logits = self.backward(levels_list, images, labels)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, logits

    def backward(self, levels_list, images, labels):
        """The step without the optimiser: the forward and backward passes of every level, the
        regulariser and the method's gradient edits; (mean loss per pass, last logits)."""
        total = None
        for index, levels in enumerate(levels_list):
            self.method.apply_levels(self.model, levels)
            last = index == len(levels_list) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.amp):
                    logits = self.forward(images)
                loss = F.cross_entropy(logits.float(), labels)
                if last:
                    penalty = self.method.regularizer(self.model)
                    if penalty is not None:
                        loss = loss + penalty
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.method.after_backward(self.model)
        return total / len(levels_list), logits


class LossMonitor:
    """Collects step losses on the device and checks them at flush time (one host sync)."""

    def __init__(self):
        self.pending = []

    def add(self, loss, epoch, step, levels):
        self.pending.append((loss, epoch, step, levels))

    def flush(self, config):
        if not self.pending:
            return None
        values = torch.stack([torch.as_tensor(loss).float() for loss, *_ in self.pending]).cpu()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            _, epoch, step, levels = self.pending[first]
            raise TrainingError(
                f"non-finite loss ({values[first].item()}) at epoch {epoch}, step {step} "
                f"(levels: {_levels_text(levels)}); training stopped, the last good checkpoint is "
                f"{run_dir.path(config.save_dir, run_dir.LAST)}; try a lower --learning_rate "
                f"(now {config.learning_rate})")
        self.pending = []
        return values.mean().item()


@torch.no_grad()
def check_finite_weights(model, progress, config):
    """TrainingError instead of a checkpoint of NaN / inf weights (the last step's loss can be
    finite while its update overflows); the checkpoint already on disk stays."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if bool(torch.stack([finite(t) for _, t in tensors]).all()):
        return
    name = next(name for name, t in tensors if not bool(finite(t)))
    raise TrainingError(
        f"non-finite weights ({name}) after {progress.global_step} training steps (before epoch {progress.epoch}, "
        f"step {progress.step_in_epoch}); training stopped without saving them, the last good checkpoint is "
        f"{run_dir.path(config.save_dir, run_dir.LAST)}; try a lower --learning_rate (now {config.learning_rate})")


def _levels_text(levels):
    def short(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return "; ".join(", ".join(f"{name}={short(value)}" for name, value in level.items()) or "-" for level in levels)

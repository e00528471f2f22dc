"""The one training loop of every setting and method.

    for epoch in start .. epochs-1:
        set this epoch's learning rate (cosine with a 5-epoch linear warmup)
        if epoch % test_freq == 0: evaluate the grid, record it, checkpoint
        train one epoch (each step: the method's levels, forward/backward per level, the
                         method's regulariser and gradient edits, one SGD step)
        checkpoint
    evaluate the grid (final), save model_final.pt

A run can be resumed from any checkpoint with identical results (same seed, same machine),
is preempted cleanly by SIGTERM / Ctrl-C, and runs under torchrun with DDP.
"""

import contextlib
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import build_data
from engine import run_dir
from engine.evaluate import autocast, evaluate
from methods import METHODS
from methods.levels import cosine_lr, warmup_iterations
from models import build_model
from utils import checkpoint as ckpt
from utils import checkpoint_schema as schema
from utils.distributed import any_process, barrier, choose_threads, setup, teardown
from utils.errors import CheckpointError, ConfigError, TrainingError, one_line
from utils.metrics import METRICS, evaluation_rows, format_table, latest_results, read_rows, update_outputs
from utils.run_lock import RunDirLock, refuse_if_locked

EXIT_INTERRUPTED = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0             # epochs completed
    step_in_epoch: int = 0     # steps of the current epoch completed
    global_step: int = 0       # training steps completed (drives the warmups)
    evaluated_epoch: int = -1  # the epoch whose start-of-epoch evaluation is recorded
    evaluations: int = 0       # evaluations recorded so far
    finished: bool = False


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop stops after the current step."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_INTERRUPTED:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(context, message):
    if context.is_main:
        print(message, flush=True)


class Run:
    """Everything one training (or evaluation-only) process holds."""

    def __init__(self, config, options, context):
        self.config, self.options, self.context = config, options, context
        self.device = context.device
        self.save_dir = config.save_dir
        self.progress = Progress()
        self.rows = []
        # How long each evaluation took, kept in checkpoints: a resumed run's estimate counts them.
        self.evaluation_seconds = []
        seed_everything(config.seed)
        self.data = build_data(config, self.device, context.rank, context.world_size)
        budget = config.get("warmup_budget")
        warmup = warmup_iterations(budget, config.epochs, self.data.num_train, config.batch_size) if budget else None
        self.method = METHODS[config.setting][config.method](config, warmup)
        if config.compile:
            check_compile_support(self.method, config)
        self.model = build_model(config.model, self.method.layer_factory(), self.data.num_classes)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=memory_format)
        self.method.bind(self.model)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        configure_backends(self.method, self.device)

    # -- checkpoints --------------------------------------------------------------------
    def payload(self, kind="training"):
        training = kind == "training"
        return ckpt.make_payload(kind, self.config, self.model, self.progress.epoch, self.progress.global_step,
                                 self.method.warmup_iterations, optimizer=self.optimizer,
                                 progress=asdict(self.progress) if training else None,
                                 rng=ckpt.rng_state(self.generator) if training else None,
                                 evaluation_seconds=self.evaluation_seconds)

    def save_checkpoint(self):
        check_finite_weights(self.model, self.progress, self.config)
        if self.context.is_main:
            ckpt.save(run_dir.path(self.save_dir, run_dir.LAST), self.payload())
        barrier(self.context)

    def check_checkpoint(self, payload, path):
        """The fields every checkpoint holds, before any of it is used (checkpoint_schema)."""
        schema.check_header(payload, path, self.config.to_dict())
        schema.check_counters(payload, path, self.config.epochs)
        schema.check_model(payload, path)

    def load_model_state(self, payload, path):
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError:
            raise CheckpointError(f"{path}: its weights do not fit {self.config.model} built for "
                                  f"{self.config.setting}/{self.config.method} "
                                  f"({ckpt.state_mismatch(self.model.state_dict(), payload['model'])})") from None

    def resume(self, path):
        payload = ckpt.load(path, map_location=self.device)
        if payload.get("kind") != "training":
            raise CheckpointError(f"{path}: a final model, not a training checkpoint (resume needs "
                                  f"{run_dir.LAST})")
        self.check_checkpoint(payload, path)
        schema.check_progress(payload, path, self.config.epochs, self.data.train.steps_per_epoch,
                              self.method.warmup_iterations)
        schema.check_optimizer(payload, path, self.optimizer)
        schema.check_rng(payload, path, self.generator)
        evaluation_seconds = schema.evaluation_seconds(payload, path)
        self.load_model_state(payload, path)
        try:  # the schema was checked; this catches what it cannot foresee
            self.optimizer.load_state_dict(payload["optimizer"])
            ckpt.restore_rng_state(payload["rng"], self.generator)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as error:
            raise CheckpointError(f"{path}: its optimizer or random state cannot be restored "
                                  f"({one_line(error)[:160]})") from None
        self.progress = Progress(**payload["progress"])
        self.evaluation_seconds = evaluation_seconds
        kept = [row for row in read_rows(os.path.join(self.save_dir, METRICS)) if self._keep_on_resume(row)]
        self.rows = kept
        _log(self.context, resumed_message(self.progress, self.config.epochs, self.data.train.steps_per_epoch, path,
                                           evaluation_seconds))

    def _keep_on_resume(self, row):
        """Rows recorded after the checkpoint are dropped: the resumed run records them again."""
        if row.get("eval_only"):
            return True
        if row["final"]:
            return self.progress.finished
        return row["epoch"] < self.progress.epoch or (row["epoch"] == self.progress.epoch
                                                      and self.progress.evaluated_epoch == self.progress.epoch)

    # -- evaluation ---------------------------------------------------------------------
    def record_evaluation(self, final=False, eval_only=False, checkpoint=None):
        log = EvaluationLog(self.context, self.method.level_name, len(self.method.eval_points()), self.data,
                            self.progress.epoch)
        try:
            results = evaluate(self.model, self.method, self.data, self.context, self.progress.global_step,
                               amp=self.config.amp, test_batch_bn=bool(self.config.get("lec_test_batch_statistics")),
                               progress=log)
        finally:
            log.close()
        index = max([row["evaluation"] for row in self.rows], default=-1) + 1
        self.rows += evaluation_rows(results, index, self.progress.epoch, self.progress.global_step, self.config,
                                     self.method.level_name, self.data.num_classes, final, eval_only, checkpoint)
        self.progress.evaluations = index + 1
        if self.context.is_main:
            update_outputs(self.save_dir, self.rows)

    def evaluate_only(self, path):
        payload = ckpt.load(path, map_location=self.device)
        self.check_checkpoint(payload, path)
        self.load_model_state(payload, path)
        self.progress.epoch = payload.get("epoch", 0)
        self.progress.global_step = payload.get("global_step", 0)
        # The warmup depends on the training batch size, which --batch_size may change here;
        # the levels evaluated (TopK decay) must follow the warmup the model was trained with.
        if "warmup_iterations" in payload:
            self.method.warmup_iterations = payload["warmup_iterations"]
        if self.context.is_main:
            os.makedirs(self.save_dir, exist_ok=True)
        self.rows = read_rows(os.path.join(self.save_dir, METRICS))
        self.record_evaluation(eval_only=True, checkpoint=path)
        self.print_summary("Evaluation")
        return 0

    # -- training -----------------------------------------------------------------------
    def train(self):
        config, progress = self.config, self.progress
        if progress.finished:
            _log(self.context, f"The run in {self.save_dir} has already finished ({config.epochs} epochs).")
            return 0
        step = TrainStep(self.model, self.method, self.optimizer, self.context, config)
        self.clock = RunClock(config, self.data.train.steps_per_epoch, self.evaluation_seconds)
        _log(self.context, f"Training loss shown: {LOSS_LABEL}, the mean cross-entropy of the step's forward "
                           f"passes (one per compression level trained; regulariser included)")
        with StopFlag() as stop:
            try:
                while progress.epoch < config.epochs:
                    lr = cosine_lr(config.learning_rate, progress.epoch, config.epochs)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    if self.evaluation_due():
                        started = time.perf_counter()
                        self.record_evaluation()
                        self.clock.evaluated(time.perf_counter() - started)
                        progress.evaluated_epoch = progress.epoch
                        self.save_checkpoint()
                        self.stop_if_requested(stop)
                    self.train_epoch(step, lr, stop)
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                    self.save_checkpoint()
                    self.stop_if_requested(stop)
            except Interrupted as interrupted:
                self.save_checkpoint()
                _log(self.context, interrupted_message(interrupted.signum, progress, self.data.train.steps_per_epoch,
                                                       config))
                return EXIT_INTERRUPTED[interrupted.signum]
            # Still under StopFlag: a signal now lets the final evaluation and saves finish.
            self.record_evaluation(final=True)
            progress.finished = True
            check_finite_weights(self.model, progress, config)
            if self.context.is_main:
                ckpt.save(run_dir.path(self.save_dir, run_dir.FINAL), self.payload(kind="model"))
            self.save_checkpoint()
        self.print_summary("Final evaluation")
        return 0

    def evaluation_due(self):
        """Every test_freq epochs, at the start of the epoch (epoch 0 only with eval_at_start)."""
        progress = self.progress
        return (progress.epoch % self.config.test_freq == 0 and progress.evaluated_epoch != progress.epoch
                and (progress.epoch > 0 or self.config.eval_at_start))

    def train_epoch(self, step, lr, stop):
        self.model.train()
        config, progress = self.config, self.progress
        log = EpochLog(self.context, progress.epoch, config.epochs, self.data.train.steps_per_epoch,
                       progress.step_in_epoch, lr)
        monitor = LossMonitor()
        # Checking the losses waits for the device: on GPUs (and across processes) only every
        # 10 steps, so the host can queue work ahead.
        check_every = 10 if self.context.distributed or self.device.type == "cuda" else 1
        for images, labels in self.data.train.batches(progress.epoch, progress.step_in_epoch):
            levels = self.method.train_levels(progress.global_step, self.generator)
            loss, logits = step(levels, images, labels)
            monitor.add(loss, progress.epoch, progress.step_in_epoch, levels)
            progress.step_in_epoch += 1
            progress.global_step += 1
            if progress.step_in_epoch % check_every == 0 or progress.step_in_epoch == log.steps:
                mean_loss = monitor.flush(self.config)
                seconds_left = self.clock.seconds_left(progress, lambda text: _log(self.context, text))
                log.update(progress.step_in_epoch, mean_loss, logits, labels, self.config.batch_size, seconds_left)
                if progress.step_in_epoch < log.steps:  # after the last step the epoch is completed first
                    self.stop_if_requested(stop)
        monitor.flush(self.config)
        log.close()

    def stop_if_requested(self, stop):
        """Raise Interrupted once any process has been signalled (all processes stop together)."""
        if any_process(stop.signum is not None, self.context, self.device):
            raise Interrupted(stop.signum or signal.SIGTERM)

    # -- reporting ----------------------------------------------------------------------
    def print_summary(self, title):
        if not self.context.is_main:
            return
        rows = latest_results(self.rows)
        print(f"\n{title} ({self.config.setting}, {self.config.method}, {self.config.model}, epoch "
              f"{self.progress.epoch}):\n{format_table(rows)}")
        print(run_dir.describe_files(self.save_dir), flush=True)


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
                          f"methods with a few fixed levels (structured ns and lec, quantized target_bit_width, "
                          f"quantized lcs_l with discrete_alpha_map); run without --compile")


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
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(levels_list), logits


def _describe(row):
    text = f"Test ({row['level_name']} = {row['level']:g}"
    if row.get("alpha") is not None:
        text += f", alpha = {row['alpha']:g}"
    text += f"): loss {row['loss']:.4f} | accuracy {100 * row['accuracy']:.2f}%"
    if row.get("sparsity") is not None:
        text += f" | sparsity {row['sparsity']:.4f}"
    if row.get("act_quant") is not None:
        text += f" | activations {'quantized' if row['act_quant'] else 'unquantized (before warmup end)'}"
    return text


def resumed_message(progress, epochs, steps_per_epoch, path, evaluation_seconds):
    """Where a resumed run continues (epochs counted from 1, as on the progress lines)."""
    if progress.finished:
        where = f"the end of the run ({epochs} epochs)"
    else:
        where = f"epoch {progress.epoch + 1}/{epochs}, step {progress.step_in_epoch} of {steps_per_epoch}"
    text = f"Resumed from {where}, checkpoint {path}"
    timed = len(evaluation_seconds)
    if timed:
        text += (f" ({timed} evaluation{'s' if timed > 1 else ''} timed before, "
                 f"{format_duration(sum(evaluation_seconds) / timed)} each on average: counted in the estimate)")
    return text


def interrupted_message(signum, progress, steps_per_epoch, config):
    script = METHODS[config.setting][config.method].script
    if progress.step_in_epoch:
        where = f"in epoch {progress.epoch + 1}/{config.epochs} after step {progress.step_in_epoch}/{steps_per_epoch}"
    else:
        where = f"after epoch {progress.epoch}/{config.epochs}"
    return (f"Interrupted by {signal.Signals(signum).name} {where}; saved "
            f"{run_dir.path(config.save_dir, run_dir.LAST)}.\nResume with: "
            f"{run_dir.resume_command(script, config.save_dir)}")


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
    if bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return
    name = next(name for name, t in tensors if not bool(torch.isfinite(t).all()))
    raise TrainingError(
        f"non-finite weights ({name}) after {progress.global_step} training steps (before epoch {progress.epoch}, "
        f"step {progress.step_in_epoch}); training stopped without saving them, the last good checkpoint is "
        f"{run_dir.path(config.save_dir, run_dir.LAST)}; try a lower --learning_rate (now {config.learning_rate})")


def _levels_text(levels):
    def short(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return "; ".join(", ".join(f"{name}={short(value)}" for name, value in level.items()) or "-" for level in levels)


LOSS_LABEL = "loss/pass"
FIRST_ESTIMATE_STEPS = 5


def format_duration(seconds):
    """'42 s', '3 min 05 s', '2 h 07 min', '3 d 4 h'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def evaluations_after(epoch, epochs, test_freq):
    """Evaluations still to come while epoch `epoch` trains: the periodic ones of the later
    epochs and the final one."""
    return sum(1 for later in range(epoch + 1, epochs) if later % test_freq == 0) + 1


class RunClock:
    """The pace of this process's training steps and evaluations, for the estimate of the
    run's duration (printed once after the first few steps, then kept on the progress line).
    The first measured step is left out: it warms up (memory, kernels)."""

    def __init__(self, config, steps_per_epoch, evaluation_s=None):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.started = time.perf_counter()
        self.base = None            # (time, global step) of the first measurement
        # Durations of the evaluations timed so far, before an interruption too (the run's own
        # list, saved in its checkpoints: evaluated() appends to it).
        self.evaluation_s = [] if evaluation_s is None else evaluation_s
        self.evaluation_since_base_s = 0.0
        self.announced = False

    def evaluated(self, seconds):
        self.evaluation_s.append(seconds)
        if self.base is not None:
            self.evaluation_since_base_s += seconds

    def seconds_left(self, progress, announce):
        """The estimated time the rest of the run takes (None until FIRST_ESTIMATE_STEPS steps
        are measured); the first estimate is also passed to `announce` as a sentence."""
        now = time.perf_counter()
        if self.base is None:
            self.base = (now, progress.global_step)
            return None
        steps = progress.global_step - self.base[1]
        if steps < FIRST_ESTIMATE_STEPS:
            return None
        step_s = (now - self.base[0] - self.evaluation_since_base_s) / steps
        config = self.config
        evaluations = evaluations_after(progress.epoch, config.epochs, config.test_freq)
        evaluation_s = sum(self.evaluation_s) / len(self.evaluation_s) if self.evaluation_s else 0.0
        left = step_s * (config.epochs * self.steps_per_epoch - progress.global_step) + evaluation_s * evaluations
        if not self.announced:
            self.announced = True
            timed = (f"{format_duration(evaluation_s)} each" if self.evaluation_s else "not timed yet, not included")
            announce(f"Estimated duration of the run: {format_duration(now - self.started + left)} "
                     f"({config.epochs} epochs of {self.steps_per_epoch} steps at {step_s:.3g} s per step, "
                     f"{evaluations} more evaluation{'s' if evaluations > 1 else ''}: {timed})")
        return left


class EpochLog:
    """A tqdm bar on a terminal, plain lines (about ten per epoch) otherwise."""

    def __init__(self, context, epoch, epochs, steps, first_step, lr):
        self.enabled = context.is_main
        self.epoch, self.epochs, self.steps, self.lr = epoch, epochs, steps, lr
        self.first_step = self.shown_step = first_step
        self.start = time.perf_counter()
        self.loss_sum, self.loss_count = 0.0, 0
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, step, mean_loss, logits, labels, images_per_step, seconds_left=None):
        """Called after `step` steps of the epoch; `mean_loss` averages the steps since the last call;
        `seconds_left` estimates the rest of the run (None until known)."""
        if not self.enabled:
            return
        self.loss_sum += mean_loss
        self.loss_count += 1
        if self.bar is None and step - self.shown_step < max(1, self.steps // 10) and step != self.steps:
            return  # the batch accuracy below waits for the device: only for lines shown
        loss = self.loss_sum / self.loss_count
        rate = images_per_step * (step - self.first_step) / max(time.perf_counter() - self.start, 1e-9)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        left = "" if seconds_left is None else format_duration(seconds_left)
        if self.bar is not None:
            self.bar.update(step - self.shown_step)
            postfix = {LOSS_LABEL: f"{loss:.4f}", "acc": f"{100 * accuracy:.1f}%", "lr": f"{self.lr:.4g}",
                       "img/s": f"{rate:.0f}"}
            if left:
                postfix["run left"] = left
            self.bar.set_postfix(postfix)
        else:
            print(f"epoch {self.epoch + 1}/{self.epochs} [{step}/{self.steps} {100 * step / self.steps:.0f}%] "
                  f"{LOSS_LABEL} {loss:.4f} acc {100 * accuracy:.1f}% lr {self.lr:.4g} {rate:.0f} img/s"
                  + (f" | run left ~{left}" if left else ""), flush=True)
        self.shown_step = step

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"epoch {self.epoch + 1}/{self.epochs} done in {time.perf_counter() - self.start:.1f} s",
                  flush=True)


class EvaluationLog:
    """The progress of one evaluation: a line saying what it evaluates as it starts, a tqdm bar
    over its levels' test batches on a terminal, and each level's result as it finishes."""

    def __init__(self, context, level_name, num_levels, data, epoch):
        self.enabled, self.level_name, self.bar = context.is_main, level_name, None
        if not self.enabled:
            return
        batches = data.test.num_batches
        print(f"Evaluating {num_levels} level{'s' if num_levels > 1 else ''} ({level_name}) at epoch {epoch} on "
              f"{data.num_test} test images", flush=True)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=num_levels * batches, desc="evaluation", unit="batch", leave=False,
                            dynamic_ncols=True)

    def batch_done(self):
        if self.bar is not None:
            self.bar.update(1)

    def level_done(self, result):
        if self.enabled:
            text = _describe({**result, "level_name": self.level_name})
            if self.bar is not None:
                self.bar.write(text)  # above the bar
            else:
                print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def on_main_process(context, action, save_dir):
    """action() in the first process only (it alone writes the run directory, so it alone
    locks it); when that refuses with a ConfigError, every process raises one."""
    result, refused = None, None
    if context.is_main:
        try:
            result = action()
        except ConfigError as error:
            refused = error
    if any_process(refused is not None, context, context.device):
        raise refused or ConfigError(f"--save_dir {save_dir}: another process is writing to this run directory "
                                     f"(the first process's error names it)")
    return result


def run(config, options):
    """Train (or evaluate) as the config and options say; returns the exit status."""
    context = setup(config.device)
    threads_before = torch.get_num_threads()
    lock = None
    try:
        # The lock itself (utils.run_lock) is taken once the run is built.
        on_main_process(context, lambda: refuse_if_locked(config.save_dir), config.save_dir)
        run_dir.check_free(config.save_dir, options)
        # --device auto falls back to the CPU without CUDA; --amp there is bfloat16 on the CPU,
        # fast only with bfloat16 units: say so.
        amp_note = (" (--amp on the CPU: bfloat16 autocast, faster than fp32 only on CPUs with bfloat16 "
                    "units such as AMX)") if config.amp and context.device.type != "cuda" else ""
        threads = choose_threads(config.threads)
        torch.set_num_threads(threads.threads)
        _log(context, f"Device: {context.device}, {context.world_size} process(es), {threads.threads} CPU "
                      f"thread(s) per process ({threads.reason}; --threads N to choose){amp_note}")
        state = Run(config, options, context)
        lock = on_main_process(context, lambda: RunDirLock(config.save_dir), config.save_dir)
        run_dir.check_free(config.save_dir, options)  # again: a run may have finished there meanwhile
        if options.eval_only:
            return state.evaluate_only(options.checkpoint)
        if options.resume:
            state.resume(options.resume)
        if context.is_main:
            run_dir.prepare(config.save_dir, config, options.overwrite)
        return state.train()
    finally:
        torch.set_num_threads(threads_before)  # for callers in the same process (tests)
        if lock is not None:
            lock.release()
        teardown(context)

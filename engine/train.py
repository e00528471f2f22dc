"""The one training loop of every setting and method.

    for epoch in start .. epochs-1:
        set this epoch's learning rate (cosine with a 5-epoch linear warmup)
        if epoch % test_freq == 0: evaluate the grid, record it, checkpoint
        train one epoch (each step: the method's levels, forward/backward per level, the
                         method's regulariser and gradient edits, one SGD step)
        checkpoint
    evaluate the grid (final), save model_final.pt

A run can be resumed from any checkpoint with identical results (same seed, same machine),
is preempted cleanly by SIGTERM, Ctrl-C, SIGHUP or the cluster's warning signal
(utils/stop_signals.py), and runs under torchrun with DDP. One step is
engine/step.py's TrainStep; what the run shows while it runs (progress lines, the time
estimate, an evaluation's progress) is engine/progress.py.
"""

import copy
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data import build_data
from engine import run_dir
from engine.board import Board, summary_writer_class
from engine.evaluate import evaluate
from engine.progress import LOSS_LABEL, EpochLog, EvaluationLog, RunClock, resumed_message
from engine.step import LossMonitor, TrainStep, check_compile_support, check_finite_weights, configure_backends
from engine.run_dir import RunOptions
from methods import METHODS, in_current_units
from methods.config import Config
from methods.levels import cosine_lr
from models import build_model, check_network
from utils import checkpoint as ckpt
from utils import checkpoint_schema as schema
from utils.distributed import any_process, barrier, choose_threads, choose_workers, max_over_processes, setup, teardown
from utils.errors import CheckpointError, ConfigError, one_line
from utils.metrics import METRICS, evaluation_rows, format_table, latest_results, read_rows, update_outputs
from utils.run_lock import RunDirLock, refuse_if_locked
from utils.stop_signals import STOP_SIGNALS, exit_status

# The pace timed before a run's first evaluation (for its duration estimate): steps after one
# warm-up step, and the first test batches of each level. Runs of fewer steps than
# PROBE_MIN_STEPS (tests, smoke runs) start at once: their estimate after the first steps
# comes soon enough, and timing would cost a noticeable share of them.
PROBE_STEPS = 3
PROBE_TEST_BATCHES = 2
PROBE_MIN_STEPS = 100


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
    """A stop signal (SIGTERM, SIGINT, SIGHUP, the warning signal) sets a flag; the loop stops
    after the current step."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
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
        self.board = Board(config, is_main=False)  # writes nothing; train() opens the run's own
        seed_everything(config.seed)
        method_class = METHODS[config.setting][config.method]
        self.bn_at_evaluation = method_class.bn_at_evaluation(config)
        # A run's own weights come from its checkpoint when resumed or evaluated; --init_from
        # starts a fresh run (or is what --eval_only without a checkpoint evaluates).
        init_from = config.init_from if not (options.resume or options.checkpoint) else None
        # A network written elsewhere is refused (if it is) before the data is read: seconds, not
        # the minute that decoding CIFAR-10 takes. Its class count does not change its topology.
        check_network(config, method_class(config).layer_factory(), 10 if config.dataset == "cifar10" else 1000,
                      init_from)
        self.data = build_data(config, self.device, context.rank, context.world_size,
                               calibration_images=self.bn_at_evaluation.calibration_images,
                               training=not options.eval_only)
        warmup = method_class.warmup_iterations_for(config, self.data.num_train)
        self.method = method_class(config, warmup)
        if config.compile:
            check_compile_support(self.method, config)
        self.model = build_model(config.model, self.method.layer_factory(), self.data.num_classes,
                                 model_kwargs=config.model_kwargs, input_size=config.input_size, init_from=init_from)
        if getattr(self.model, "conversion", None) is not None:
            _log(context, f"{config.model}: {self.model.conversion.header()}")
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
        kept = [row for row in self.read_rows() if self._keep_on_resume(row)]
        self.rows = kept
        _log(self.context, resumed_message(self.progress, self.config.epochs, self.data.train.steps_per_epoch, path,
                                           evaluation_seconds))

    def read_rows(self):
        """The run directory's metrics rows, level names of earlier versions in today's units."""
        return in_current_units(read_rows(os.path.join(self.save_dir, METRICS)))

    def _keep_on_resume(self, row):
        """Rows recorded after the checkpoint are dropped: the resumed run records them again."""
        if row.get("eval_only"):
            return True
        if row["final"]:
            return self.progress.finished
        return row["epoch"] < self.progress.epoch or (row["epoch"] == self.progress.epoch
                                                      and self.progress.evaluated_epoch == self.progress.epoch)

    # -- evaluation ---------------------------------------------------------------------
    def record_evaluation(self, final=False, eval_only=False, checkpoint=None, as_trained=False):
        """The grid evaluated at the run's step (its warmup's levels), or `as_trained`: each level
        as a trained model holds it."""
        unit = self.method.level_unit
        log = EvaluationLog(self.context, unit.name, len(self.method.eval_points()), self.data,
                            self.progress.epoch)
        try:
            results = evaluate(self.model, self.method, self.data, self.context,
                               None if as_trained else self.progress.global_step,
                               amp=self.config.amp, test_batch_bn=self.bn_at_evaluation.test_batch,
                               progress=log)
        finally:
            log.close()
        index = max([row["evaluation"] for row in self.rows], default=-1) + 1
        self.rows += evaluation_rows(results, index, self.progress.epoch, self.progress.global_step, self.config,
                                     unit.name, self.data.num_classes, final, eval_only, checkpoint)
        self.progress.evaluations = index + 1
        if self.context.is_main:
            update_outputs(self.save_dir, self.rows, {unit.name: unit})

    def evaluate_only(self, path: str) -> int:
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
            run_dir.prepare_evaluation(self.save_dir, self.config)
        self.rows = self.read_rows()
        self.record_evaluation(eval_only=True, checkpoint=path)
        self.print_summary("Evaluation")
        return 0

    def evaluate_init_from(self) -> int:
        """--eval_only --init_from FILE: the converted network with FILE's weights, evaluated as a
        trained model is (levels as after the warmup; quantized: weights only, since no activation
        range has been recorded), into a new run directory; no checkpoint is written."""
        if self.context.is_main:
            run_dir.prepare(self.save_dir, self.config, self.options)
        self.record_evaluation(eval_only=True, checkpoint=self.config.init_from, as_trained=True)
        self.print_summary("Evaluation")
        return 0

    # -- training -----------------------------------------------------------------------
    def train(self) -> int:
        config, progress = self.config, self.progress
        if progress.finished:
            _log(self.context, f"The run in {self.save_dir} has already finished ({config.epochs} epochs).")
            return 0
        step = TrainStep(self.model, self.method, self.optimizer, self.context, config)
        self.clock = RunClock(config, self.data.train.steps_per_epoch, self.evaluation_seconds)
        _log(self.context, f"Training loss shown: {LOSS_LABEL}, the mean cross-entropy of the step's forward "
                           f"passes (one per compression level trained; regulariser included)")
        steps_left = config.epochs * self.data.train.steps_per_epoch - progress.global_step
        if self.evaluation_due() and steps_left >= PROBE_MIN_STEPS:
            self.clock.announce_probed(progress, *self.time_pace(step), lambda text: _log(self.context, text))
        # A resumed run drops what its interrupted process wrote after the checkpoint.
        unit = self.method.level_unit
        self.board = Board(config, self.context.is_main, units={unit.name: unit},
                           purge_step=progress.global_step + 1 if self.options.resume else None)
        try:
            return self.train_epochs(step)
        finally:
            self.board.close()

    def train_epochs(self, step) -> int:
        config, progress = self.config, self.progress
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
                        self.board.evaluation(self.last_evaluation_rows())  # once a checkpoint holds it
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
                return exit_status(interrupted.signum)
            # Still under StopFlag: a signal now lets the final evaluation and saves finish.
            self.record_evaluation(final=True)
            progress.finished = True
            check_finite_weights(self.model, progress, config)
            if self.context.is_main:
                ckpt.save(run_dir.path(self.save_dir, run_dir.FINAL), self.payload(kind="model"))
            self.save_checkpoint()
            self.board.evaluation(self.last_evaluation_rows())
        self.print_summary("Final evaluation")
        return 0

    def time_pace(self, step):
        """(seconds per training step, seconds per evaluation), timed on a few training steps and
        the first test batches of each level; the weights, optimiser and random states are
        restored afterwards, so the run trains and evaluates exactly what it would have."""
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                 ckpt.rng_state(self.generator))
        try:
            batches = self.data.train.batches(self.progress.epoch, self.progress.step_in_epoch)
            step_s = []
            for index, (images, labels) in zip(range(PROBE_STEPS + 1), batches):
                started = time.perf_counter()
                loss, _ = step(self.method.train_levels(self.progress.global_step + index, self.generator), images,
                               labels)
                loss.item()  # waits for the device
                step_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluate(self.model, self.method, self.data, self.context, self.progress.global_step, amp=self.config.amp,
                     test_batch_bn=self.bn_at_evaluation.test_batch, max_batches=PROBE_TEST_BATCHES)
            probe_s = time.perf_counter() - started
        finally:
            self.model.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            ckpt.restore_rng_state(saved[2], self.generator)
        streams = [self.data.test] + ([self.data.calibration] if self.data.calibration is not None else [])
        timed = sum(min(stream.num_batches, PROBE_TEST_BATCHES) for stream in streams)
        evaluation_s = probe_s * sum(stream.num_batches for stream in streams) / max(timed, 1)
        timed_steps = step_s[1:] or step_s  # the first warms up, when there are others
        return sum(timed_steps) / len(timed_steps), evaluation_s

    def last_evaluation_rows(self):
        return [row for row in self.rows if row["evaluation"] == self.progress.evaluations - 1]

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
                self.board.training(progress.global_step, mean_loss, lr)
                seconds_left = self.clock.seconds_left(progress, lambda text: _log(self.context, text))
                log.update(progress.step_in_epoch, mean_loss, logits, labels, self.config.batch_size, seconds_left)
                if progress.step_in_epoch < log.steps:  # after the last step the epoch is completed first
                    self.stop_if_requested(stop)
        monitor.flush(self.config)
        log.close()

    def stop_if_requested(self, stop):
        """Raise Interrupted once any process has been signalled (all processes stop together,
        naming the signal one of them received)."""
        signum = max_over_processes(stop.signum or 0, self.context, self.device)
        if signum:
            raise Interrupted(signal.Signals(signum))

    # -- reporting ----------------------------------------------------------------------
    def print_summary(self, title):
        if not self.context.is_main:
            return
        rows = latest_results(self.rows)
        print(f"\n{title} ({self.config.setting}, {self.config.method}, {self.config.model}, epoch "
              f"{self.progress.epoch}):\n{format_table(rows)}")
        print(run_dir.describe_files(self.save_dir), flush=True)


def interrupted_message(signum, progress, steps_per_epoch, config):
    script = METHODS[config.setting][config.method].script
    if progress.step_in_epoch:
        where = f"in epoch {progress.epoch + 1}/{config.epochs} after step {progress.step_in_epoch}/{steps_per_epoch}"
    else:
        where = f"after epoch {progress.epoch}/{config.epochs}"
    return (f"Interrupted by {signal.Signals(signum).name} {where}; saved "
            f"{run_dir.path(config.save_dir, run_dir.LAST)}.\nResume with: "
            f"{run_dir.resume_command(script, config.save_dir)}")


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


def locked_and_free(save_dir, options):
    """The run directory's lock, taken, once the directory holds no other run (else released)."""
    lock = RunDirLock(save_dir)
    try:
        run_dir.check_free(save_dir, options)
    except ConfigError:
        lock.release()
        raise
    return lock


def run(config: Config, options: RunOptions) -> int:
    """Train (or evaluate) as the config and options say; returns the exit status."""
    context = setup(config.device)
    threads_before = torch.get_num_threads()
    lock = None
    try:
        # The lock itself (utils.run_lock) is taken once the run is built.
        # Only the first process looks at the run directory: another one, checking it while the
        # first already writes it, would find "a run" there (a race seen under torchrun).
        on_main_process(context, lambda: (refuse_if_locked(config.save_dir),
                                          run_dir.check_free(config.save_dir, options)), config.save_dir)
        # --device auto falls back to the CPU without CUDA; --amp there is bfloat16 on the CPU,
        # fast only with bfloat16 units: say so.
        amp_note = (" (--amp on the CPU: bfloat16 autocast, faster than fp32 only on CPUs with bfloat16 "
                    "units such as AMX)") if config.amp and context.device.type != "cuda" else ""
        if config.tensorboard:
            summary_writer_class()  # missing: a one-line error before anything is written
        threads = choose_threads(config.threads)
        torch.set_num_threads(threads.threads)
        _log(context, f"Device: {context.device}, {context.world_size} process(es), {threads.threads} CPU "
                      f"thread(s) per process ({threads.reason}; --threads N to choose){amp_note}")
        config.num_workers, workers_note = choose_workers(config.num_workers)
        if workers_note:
            _log(context, workers_note)
        state = Run(config, options, context)
        # Again once locked: a run may have finished there meanwhile.
        lock = on_main_process(context, lambda: locked_and_free(config.save_dir, options), config.save_dir)
        if options.eval_only:
            return state.evaluate_only(options.checkpoint) if options.checkpoint else state.evaluate_init_from()
        if options.resume:
            state.resume(options.resume)
        if context.is_main:
            run_dir.prepare(config.save_dir, config, options)
        return state.train()
    finally:
        torch.set_num_threads(threads_before)  # for callers in the same process (tests)
        if lock is not None:
            lock.release()
        teardown(context)

"""What a run shows while it runs: the progress line of each epoch (a tqdm bar on a terminal,
plain lines otherwise), the time estimate of the whole run, and the progress of an evaluation.
The loop (engine/train.py) tells these objects where it stands; they only display it."""

import sys
import time

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
    run's duration: printed once, before the run's first evaluation when the run measured its
    pace then (announce_probed), else after the first few steps; then kept on the progress
    line. The first measured step is left out: it warms up (memory, kernels)."""

    def __init__(self, config, steps_per_epoch, evaluation_s=None):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.started = time.perf_counter()
        self.base = None            # (time, global step) of the first measurement
        # Durations of the evaluations timed so far, before an interruption too (the run's own
        # list, saved in its checkpoints: evaluated() appends to it).
        self.evaluation_s = [] if evaluation_s is None else evaluation_s
        self.evaluation_since_base_s = 0.0
        self.announced = False

    def announce_probed(self, progress, step_s, evaluation_s, announce):
        """The estimate from a pace measured before the evaluation now due: `step_s` per training
        step, `evaluation_s` per evaluation (passed to `announce` as a sentence)."""
        config = self.config
        evaluations = 1 + evaluations_after(progress.epoch, config.epochs, config.test_freq)
        steps = config.epochs * self.steps_per_epoch - progress.global_step
        self.announced = True
        announce(f"Estimated duration of the run: {format_duration(step_s * steps + evaluation_s * evaluations)} "
                 f"({config.epochs} epochs of {self.steps_per_epoch} steps at {step_s:.3g} s per step, "
                 f"{evaluations} evaluation{'s' if evaluations > 1 else ''} of about {format_duration(evaluation_s)} "
                 f"each; timed on a few steps and test batches)")

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
            text = describe_result({**result, "level_name": self.level_name})
            if self.bar is not None:
                self.bar.write(text)  # above the bar
            else:
                print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def describe_result(row):
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

"""Every user mistake gets one clear line: a table of bad command lines, YAML files, data
folders and checkpoints, each run through a training script's entry point (or a tool's:
deploy.export, compare_runs.py, benchmarks/deploy.py) in its own process.

For each case the test checks the exit status (2 for usage, data and checkpoint errors), that
stderr is exactly one line naming the flag or file, that no traceback is printed and that
nothing was written: the run directory does not exist afterwards, or is unchanged.

Importing torch costs 2-5 s per process on the CI machine, so the table is run by one runner
process (this file run as a script) that imports the project once and forks a child per case;
each child calls the same `training_params.main(setting, argv)` the scripts call and exits
with its real status, its stdout and stderr going to files. `test_scripts_as_subprocesses`
runs a few cases through the real `python train_*.py` command lines as well.

Hostile inputs (alias bombs, deep nesting, pipes and devices as files, huge numbers) must fail
fast and small: each child runs under a memory limit (RLIMIT_AS, the runner's own address space
plus MEMORY_MARGIN_BYTES) and is killed after its case's time limit, so that a regression fails
the test instead of hanging CI or exhausting the machine.
"""

import hashlib
import importlib
import json
import os
import pickle
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"structured": "structured_sparsity", "unstructured": "unstructured_sparsity", "quantized": "quantized"}
SCRIPTS = {"structured": "train_structured.py", "unstructured": "train_unstructured.py",
           "quantized": "train_quantized.py"}
TOOLS = {"export": "deploy.export", "compare": "compare_runs", "deploy": "benchmarks.deploy",
         "train_speed": "benchmarks.train_speed"}
CASE_TIMEOUT_S = 90   # a case that builds data and, wrongly accepted, would start training
HOSTILE_LIMIT_S = 20  # a hostile input is refused before any data is read
MEMORY_MARGIN_BYTES = 3 * 2**30
PARALLEL_CASES = 2


# -- the runner process: run each case in a forked child ---------------------------------
def _entry_point(script):
    if script in SETTINGS:
        import training_params
        return lambda argv: training_params.main(SETTINGS[script], argv)
    return importlib.import_module(TOOLS[script]).main


def _address_space_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def _child(script, argv, out_path, err_path, memory_limit):
    """Runs in the forked child: bound its memory, redirect stdout/stderr, call the entry
    point, exit with its status (an uncaught exception prints its traceback and exits 1, as
    the interpreter does)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    status = 1
    try:
        import torch
        torch.set_num_threads(1)  # tiny cases; every thread would also reserve address space
        _entry_point(script)(argv)
        status = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(cases_path, results_path):
    """Run every case of `cases_path` (JSON), at most PARALLEL_CASES at a time."""
    os.chdir(REPO)
    sys.path.insert(0, REPO)
    for script in (*SETTINGS, *TOOLS):  # imported once, inherited by every child
        _entry_point(script)
    import torch
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its first use imports torch._dynamo (seconds)
    memory_limit = _address_space_bytes() + MEMORY_MARGIN_BYTES

    with open(cases_path) as handle:
        cases = json.load(handle)
    results, running, pending = {}, {}, list(cases)
    while pending or running:
        while pending and len(running) < PARALLEL_CASES:
            case = pending.pop(0)
            out_path, err_path = case["log"] + ".out", case["log"] + ".err"
            pid = os.fork()
            if pid == 0:
                _child(case["script"], case["argv"], out_path, err_path, memory_limit)
            running[pid] = (case, time.monotonic())
        for pid, (case, started) in list(running.items()):
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            seconds = time.monotonic() - started
            timed_out = done == 0 and seconds > case["limit_s"]
            if timed_out:
                os.kill(pid, 9)
                done, wait_status = os.waitpid(pid, 0)
            if done:
                del running[pid]
                results[case["id"]] = {"status": os.waitstatus_to_exitcode(wait_status), "timed_out": timed_out,
                                       "seconds": seconds, "stdout": _read(case["log"] + ".out"),
                                       "stderr": _read(case["log"] + ".err")}
        time.sleep(0.02)
    with open(results_path, "w") as handle:
        json.dump(results, handle)


def _read(path):
    with open(path, errors="replace") as handle:
        return handle.read()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
    sys.exit(0)


# -- the test side ----------------------------------------------------------------------
import pytest  # noqa: E402  (the runner process above does not need it)

from conftest import CIFAR_CLASSES, make_image_folder  # noqa: E402


@dataclass
class Case:
    id: str
    script: str     # structured, unstructured or quantized
    args: str       # command line; {names} are the fixture paths below, {save} this case's run dir
    names: str      # what the error line must name (the flag or the file), same {names}
    status: int = 2
    watch: str = "{save}"   # the directory that must be absent or unchanged afterwards
    may_write: tuple = ()   # files allowed to appear in `watch` (see the lazy ImageNet case)
    limit_s: float = CASE_TIMEOUT_S  # killed (and failed) after this long


def Hostile(*args, **kwargs):
    """A case that must be refused within HOSTILE_LIMIT_S (and the runner's memory limit)."""
    return Case(*args, **kwargs, limit_s=HOSTILE_LIMIT_S)


# {D}: tiny CIFAR-10 and this case's run directory, so a case that wrongly passes validation
# trains on tiny data instead of downloading CIFAR-10 into ./data.
CASES = [
    # argparse: unknown flags, bad choices, missing and malformed values
    Case("unknown_flag", "structured", "{D} --learning_rat 0.1", "--learning_rat"),
    Case("bad_choice_method", "unstructured", "{D} --method us", "--method"),
    Case("bad_choice_norm", "quantized", "{D} --norm LN", "--norm"),
    Case("missing_value", "quantized", "{D} --epochs", "--epochs"),
    Case("not_an_int", "structured", "{D} --batch_size 12.5", "--batch_size"),
    Case("not_a_list", "unstructured", "{D} --eval_topk_grid 0.5,x", "--eval_topk_grid"),
    Case("bits_not_integers", "quantized", "{D} --method lcs_p --eval_bit_widths 4.5", "--eval_bit_widths"),
    # numbers out of range, NaN and infinity
    Case("epochs_zero", "structured", "{D} --epochs 0", "--epochs"),
    Case("batch_negative", "quantized", "{D} --batch_size -4", "--batch_size"),
    Case("test_freq_zero", "unstructured", "{D} --test_freq 0", "--test_freq"),
    Case("lr_negative", "structured", "{D} --learning_rate -0.1", "--learning_rate"),
    Case("lr_nan", "unstructured", "{D} --learning_rate nan", "--learning_rate"),
    Case("weight_decay_negative", "quantized", "{D} --weight_decay -1e-4", "--weight_decay"),
    Case("weight_decay_inf", "structured", "{D} --weight_decay inf", "--weight_decay"),
    Case("momentum_above_one", "unstructured", "{D} --momentum 1.5", "--momentum"),
    Case("seed_negative", "structured", "{D} --seed -1", "--seed"),
    Case("seed_too_large", "quantized", "{D} --seed 4294967296", "--seed"),
    Case("num_workers_negative", "unstructured", "{D} --num_workers -2", "--num_workers"),
    Case("train_subset_zero", "structured", "{D} --train_subset 0", "--train_subset"),
    Case("warmup_zero", "unstructured", "{D} --warmup_budget 0", "--warmup_budget"),
    Case("warmup_nan", "quantized", "{D} --warmup_budget nan", "--warmup_budget"),
    Case("warmup_structured", "structured", "{D} --warmup_budget 50", "--warmup_budget"),
    # structured: widths, norms, methods
    Case("width_limits_reversed", "structured", "{D} --width_factor_limits 0.8,0.4", "--width_factor_limits"),
    Case("width_limits_zero", "structured", "{D} --method us --width_factor_limits 0,1", "--width_factor_limits"),
    Case("width_limits_above_one", "structured", "{D} --width_factor_limits 0.5,1.5", "--width_factor_limits"),
    Case("width_limits_three", "structured", "{D} --width_factor_limits 0.25,0.5,1", "--width_factor_limits"),
    Case("eval_width_outside_limits", "structured", "{D} --method lcs_p --eval_width_factors 0.1,1",
         "--eval_width_factors"),
    Case("eval_width_outside_lcs_l", "structured", "{D} --width_factor_limits 0.5,1 --eval_width_factors 0.25",
         "--eval_width_factors"),
    Case("width_samples_one", "structured", "{D} --method us --width_factor_samples 1", "--width_factor_samples"),
    Case("ns_widths_above_one", "structured", "{D} --method ns --width_factors_list 1.5,0.5", "--width_factors_list"),
    Case("limits_for_ns", "structured", "{D} --method ns --width_factor_limits 0.5,1", "--width_factor_limits"),
    Case("widths_list_for_us", "structured", "{D} --method us --width_factors_list 1,0.5", "--width_factors_list"),
    Case("eval_widths_for_lec", "structured", "{D} --method lec --eval_width_factors 0.5", "--eval_width_factors"),
    Case("gn_structured", "structured", "{D} --norm GN", "--norm"),
    Case("ns_with_in", "structured", "{D} --method ns --norm IN", "--norm"),
    Case("lec_with_resnet18", "structured",
         "--method lec --model resnet18 --dataset imagenet --imagenet_dir {imagenet} --save_dir {save}", "--model"),
    # unstructured: TopK
    Case("topk_above_one", "unstructured", "{D} --method target_topk --topk 1.5", "--topk"),
    Case("topk_for_lcs_l", "unstructured", "{D} --topk 0.5", "--topk"),
    Case("topk_grid_zero", "unstructured", "{D} --method lcs_p --eval_topk_grid 0,0.5", "--eval_topk_grid"),
    Case("topk_grid_above_one", "unstructured", "{D} --eval_topk_grid 0.5,1.2", "--eval_topk_grid"),
    Case("topk_one_bound", "unstructured", "{D} --topk_lower_bound 0.1", "--topk_lower_bound"),
    Case("topk_bounds_reversed", "unstructured",
         "{D} --topk_lower_bound 0.9 --topk_upper_bound 0.1 --eval_topk_grid 0.5", "--topk_lower_bound"),
    Case("topk_bounds_without_grid", "unstructured", "{D} --topk_lower_bound 0.1 --topk_upper_bound 0.9",
         "--eval_topk_grid"),
    # quantized: bit widths
    Case("bit_width_nine", "quantized", "{D} --method target_bit_width --bit_width 9", "--bit_width"),
    Case("bit_width_for_lcs_l", "quantized", "{D} --bit_width 4", "--bit_width"),
    Case("bit_limits_two", "quantized", "{D} --bit_width_limits 2,8", "--bit_width_limits"),
    Case("bit_limits_reversed", "quantized", "{D} --method lcs_p --bit_width_limits 8,4", "--bit_width_limits"),
    Case("eval_bits_nine", "quantized", "{D} --method target_bit_width --eval_bit_widths 4,9", "--eval_bit_widths"),
    Case("eval_bits_outside_limits", "quantized", "{D} --method lcs_p --bit_width_limits 4,8 --eval_bit_widths 3,8",
         "--eval_bit_widths"),
    # datasets, models and paths
    Case("imagenet_without_dir", "quantized", "--dataset imagenet --model resnet18 --save_dir {save}",
         "--imagenet_dir"),
    Case("cpreresnet_on_imagenet", "structured", "--dataset imagenet --imagenet_dir {imagenet} --save_dir {save}",
         "cpreresnet20"),
    Case("imagenet_dir_missing", "unstructured",
         "--dataset imagenet --model vgg19 --imagenet_dir {missing} --save_dir {save}", "--imagenet_dir"),
    Case("imagenet_tensor_pipeline", "quantized", "--dataset imagenet --model resnet18 --imagenet_dir {imagenet} "
         "--data_pipeline tensor --save_dir {save}", "--data_pipeline"),
    Case("image_size_too_small", "structured", "--dataset imagenet --model resnet18 --imagenet_dir {imagenet} "
         "--image_size 16 --save_dir {save}", "--image_size"),
    Case("image_size_for_cifar", "unstructured", "{D} --image_size 64", "--image_size"),
    Case("imagenet_dir_for_cifar", "quantized", "{D} --imagenet_dir {imagenet}", "--imagenet_dir"),
    Case("data_dir_missing", "structured", "--data_dir {missing} --save_dir {save}", "--data_dir"),
    Case("save_dir_is_a_file", "unstructured", "--data_dir {cifar} --save_dir {a_file}", "--save_dir",
         watch="{a_file}"),
    Case("save_dir_empty", "quantized", "--data_dir {cifar} --save_dir ''", "--save_dir"),
    Case("existing_run", "structured", "--data_dir {cifar} --save_dir {run}", "--save_dir", watch="{run}"),
    # YAML files given with --config
    Case("config_missing", "structured", "{D} --config {missing}", "{missing}"),
    Case("config_is_a_directory", "structured", "{D} --config {cifar}", "{cifar}"),
    Case("yaml_syntax", "unstructured", "{D} --config {yaml_syntax}", "{yaml_syntax}:3"),
    Case("yaml_unclosed_list", "structured", "{D} --config {yaml_unclosed_list}", "flow sequence from line 2)"),
    Case("yaml_unknown_key", "structured", "{D} --config {yaml_unknown_key}", "'learning_rat'"),
    Case("yaml_key_of_other_method", "structured", "{D} --config {yaml_topk}", "'topk'"),
    Case("yaml_wrong_type", "quantized", "{D} --config {yaml_wrong_type}", "'epochs'"),
    Case("yaml_number_as_text", "unstructured", "{D} --config {yaml_number_as_text}", "'weight_decay'"),
    Case("yaml_out_of_range", "structured", "{D} --config {yaml_out_of_range}", "{yaml_out_of_range}"),
    Case("yaml_null_required", "unstructured", "{D} --config {yaml_null_warmup}", "'warmup_budget'"),
    Case("yaml_other_setting", "structured", "{D} --config {yaml_quantized}", "{yaml_quantized}"),
    Case("yaml_not_a_mapping", "quantized", "{D} --config {yaml_list}", "{yaml_list}"),
    Case("yaml_bad_method", "quantized", "{D} --config {yaml_bad_method}", "'method'"),
    # data folders
    Case("nine_classes", "structured", "--data_dir {cifar_9_classes} --save_dir {save}", "{cifar_9_classes}/train"),
    Case("empty_class_folder", "unstructured", "--data_dir {cifar_empty_class} --save_dir {save}",
         "{cifar_empty_class}/train/cat"),
    Case("no_class_folders", "quantized", "--data_dir {cifar_no_classes} --save_dir {save}",
         "{cifar_no_classes}/train"),
    Case("no_test_split", "structured", "--data_dir {cifar_no_test} --save_dir {save}", "{cifar_no_test}/test"),
    Case("unreadable_image", "unstructured", "--data_dir {cifar_bad_image} --save_dir {save}",
         "{cifar_bad_image}/train/cat/0003.png"),
    Case("image_not_32x32", "quantized", "--data_dir {cifar_40px} --save_dir {save}", "{cifar_40px}/train/airplane/"),
    Case("test_classes_differ", "structured", "--data_dir {cifar_other_test_classes} --save_dir {save}",
         "{cifar_other_test_classes}/test"),
    Case("imagenet_val_classes_differ", "structured", "--dataset imagenet --model resnet18 --imagenet_dir "
         "{imagenet_other_val} --save_dir {save}", "{imagenet_other_val}/validation"),
    Case("imagenet_layout", "unstructured", "--dataset imagenet --model resnet18 --imagenet_dir {imagenet_no_val} "
         "--save_dir {save}", "{imagenet_no_val}"),
    # ImageNet images are read lazily by DataLoader workers (reading 1.28M files up front is
    # not cheap): the error comes from the epoch-0 evaluation, after config.yaml is written;
    # it must still be one line naming the file, and no checkpoint may be written.
    Case("imagenet_unreadable_in_worker", "structured", "--dataset imagenet --model resnet18 --imagenet_dir "
         "{imagenet_bad_image} --num_workers 1 --image_size 33 --eval_width_factors 1 --batch_size 4 "
         "--save_dir {save}", "{imagenet_bad_image}/validation/n02/0001.png", may_write=("config.yaml",)),
    # run options and checkpoints
    Case("eval_only_without_checkpoint", "structured", "{D} --eval_only", "--eval_only"),
    Case("checkpoint_without_eval_only", "structured", "{D} --checkpoint {ckpt_last}", "--checkpoint"),
    Case("resume_and_overwrite", "structured", "{D} --resume --overwrite", "--overwrite"),
    Case("eval_only_and_overwrite", "structured", "--eval_only --checkpoint {ckpt_last} --overwrite",
         "--overwrite", watch="{run}"),
    Case("resume_nothing_to_resume", "structured", "{D} --resume", "--resume"),
    Case("resume_missing_file", "structured", "{D} --resume {missing}", "{missing}"),
    Case("resume_truncated", "structured", "{D} --resume {ckpt_truncated}", "{ckpt_truncated}"),
    Case("resume_final_model", "structured", "--save_dir {save} --resume {ckpt_final}", "{ckpt_final}",
         watch="{run}"),
    Case("resume_changes_method", "structured", "--save_dir {run} --resume --method lcs_l", "--method",
         watch="{run}"),
    Case("resume_with_config", "structured", "--save_dir {run} --resume --config {yaml_valid}", "--config",
         watch="{run}"),
    Case("eval_text_file", "structured", "--eval_only --checkpoint {yaml_valid} --save_dir {save}", "{yaml_valid}"),
    Case("eval_plain_state_dict", "structured", "--eval_only --checkpoint {ckpt_state_dict} --save_dir {save}",
         "{ckpt_state_dict}"),
    Case("eval_other_setting", "structured", "--eval_only --checkpoint {ckpt_quantized} --save_dir {save}",
         "{ckpt_quantized}"),
    Case("eval_weights_do_not_fit", "structured", "--eval_only --checkpoint {ckpt_other_layers} --save_dir {save}",
         "{ckpt_other_layers}: its weights do not fit cpreresnet20 built for structured_sparsity/us (1 tensor(s) "
         "missing, e.g. {missing_tensor})"),
    Case("eval_unknown_config_key", "structured", "--eval_only --checkpoint {ckpt_unknown_key} --save_dir {save}",
         "'width_multiplier'"),
    Case("eval_changes_model", "structured", "--eval_only --checkpoint {ckpt_last} --model vgg19 --save_dir {save}",
         "--model"),
    # hostile YAML: aliases (a 1 KB bomb), deep nesting, repeated keys, size, devices and pipes
    Hostile("yaml_alias_bomb", "structured", "{D} --config {yaml_alias_bomb}",
            "{yaml_alias_bomb}:1: YAML anchors and aliases"),
    Hostile("yaml_deep", "structured", "{D} --config {yaml_deep}", "{yaml_deep}:1: nested more than"),
    Hostile("yaml_duplicate_key", "unstructured", "{D} --config {yaml_duplicate}",
            "{yaml_duplicate}:3: key 'epochs' is given twice (also on line 1)"),
    Hostile("yaml_huge", "quantized", "{D} --config {yaml_huge}", "{yaml_huge}: larger than"),
    Hostile("yaml_huge_number", "quantized", "{D} --config {yaml_huge_number}", "{yaml_huge_number}"),
    Hostile("yaml_long_value", "structured", "{D} --config {yaml_long_value}", "key 'epochs' must be an integer"),
    Hostile("yaml_not_utf8", "unstructured", "{D} --config {yaml_not_utf8}", "{yaml_not_utf8}: cannot read"),
    Hostile("config_dev_zero", "structured", "{D} --config /dev/zero", "/dev/zero: is not a regular file"),
    Hostile("config_pipe", "quantized", "{D} --config {pipe}", "{pipe}: is not a regular file"),
    Hostile("flag_huge_number", "structured", "{D} --epochs " + "9" * 5000, "--epochs"),
    # numbers beyond what makes sense
    Hostile("num_workers_huge", "unstructured", "{D} --num_workers 100000", "--num_workers"),
    Hostile("batch_size_huge", "structured", "{D} --batch_size 1000000000", "--batch_size"),
    Hostile("grid_too_long", "unstructured", "{D} --method lcs_p --eval_topk_grid " + ",".join(["0.5"] * 1000),
            "--eval_topk_grid"),
    # checkpoints that load but are wrong, and files that are not regular files
    Hostile("resume_pipe", "structured", "--save_dir {save} --resume {pipe}", "{pipe}: is not a regular file"),
    Hostile("eval_dev_zero", "structured", "--eval_only --checkpoint /dev/zero --save_dir {save}", "/dev/zero"),
    # a pickle that is no checkpoint: torch warns about its protocol before refusing it; only our line shows
    Hostile("eval_foreign_pickle", "structured", "--eval_only --checkpoint {foreign_pickle} --save_dir {save}",
            "{foreign_pickle}: not a readable checkpoint"),
    Hostile("export_foreign_pickle", "export", "--checkpoint {foreign_pickle} --level 1 --out {exports}/p.pt",
            "{foreign_pickle}: not a readable checkpoint", watch="{exports}"),
    Hostile("resume_bad_rng", "structured", "--save_dir {save} --resume {ckpt_bad_rng}", "{ckpt_bad_rng}: rng.python"),
    Hostile("resume_no_optimizer", "structured", "--save_dir {save} --resume {ckpt_no_optimizer}",
            "{ckpt_no_optimizer}: optimizer is missing"),
    Hostile("resume_no_progress", "structured", "--save_dir {save} --resume {ckpt_no_progress}",
            "{ckpt_no_progress}: progress is missing"),
    Hostile("resume_negative_epoch", "structured", "--save_dir {save} --resume {ckpt_negative_epoch}",
            "{ckpt_negative_epoch}: epoch is -1, expected an integer in 0..200"),
    Hostile("resume_step_past_epoch", "structured", "--save_dir {save} --resume {ckpt_step_past_epoch}",
            "{ckpt_step_past_epoch}: progress.step_in_epoch is 1000000"),
    Hostile("resume_global_step_huge", "structured", "--save_dir {save} --resume {ckpt_global_step_huge}",
            "{ckpt_global_step_huge}: progress.global_step is 1000000000000"),
    Hostile("resume_wrong_type", "structured", "--save_dir {save} --resume {ckpt_wrong_type}",
            "{ckpt_wrong_type}: progress.finished is 'no', expected true or false"),
    Hostile("resume_momentum_shape", "structured", "--save_dir {save} --resume {ckpt_momentum_shape}",
            "{ckpt_momentum_shape}: optimizer.state[0].momentum_buffer"),
    Hostile("resume_model_not_tensor", "structured", "--save_dir {save} --resume {ckpt_model_not_tensor}",
            "{ckpt_model_not_tensor}: model["),
    Hostile("resume_other_model_name", "structured", "--save_dir {save} --resume {ckpt_other_model_name}",
            "{ckpt_other_model_name}: model_name is 'vgg19'"),
    Hostile("resume_nan_weights", "structured", "--save_dir {save} --resume {ckpt_nan}",
            "{ckpt_nan}: non-finite weights in"),
    Hostile("resume_bad_timing", "structured", "--save_dir {save} --resume {ckpt_bad_timing}",
            "{ckpt_bad_timing}: evaluation_seconds is [1.0, 'x'], expected a list of durations"),
    # non-finite weights are neither evaluated nor exported
    Hostile("eval_nan_weights", "structured", "--eval_only --checkpoint {ckpt_nan_final} --save_dir {save}",
            "{ckpt_nan_final}: non-finite weights in"),
    Hostile("export_nan_weights", "export", "--checkpoint {ckpt_nan_final} --level 1 --out {exports}/nan.pt",
            "{ckpt_nan_final}: non-finite weights in", watch="{exports}"),
    # tools never write over their inputs or a run directory's own files
    Hostile("export_over_its_input", "export", "--checkpoint {ckpt_final} --level 1 --out {ckpt_final}",
            "--out {ckpt_final}: is an input of this command", watch="{run}"),
    Hostile("export_over_run_checkpoint", "export",
            "--checkpoint {ckpt_final} --level 1 --out {run}/checkpoint_last.pt",
            "would replace the checkpoint_last.pt of the run directory {run}", watch="{run}"),
    Hostile("compare_over_run_results", "compare", "{metrics_run} --out {metrics_run}/results.png",
            "--out {metrics_run}/results.csv: would replace the results.csv", watch="{metrics_run}"),
    Hostile("compare_over_run_plot", "compare", "{metrics_run} --out {metrics_run}/accuracy_vs_compression.png",
            "would replace the accuracy_vs_compression.png", watch="{metrics_run}"),
    # damaged metrics rows: every row is checked before anything is written
    Hostile("compare_not_utf8", "compare", "{metrics_run} {rows_not_utf8} --out {exports}/cmp.png",
            "{rows_not_utf8}/metrics.jsonl:2: not UTF-8", watch="{exports}"),
    Hostile("compare_accuracy_text", "compare", "{metrics_run} {rows_accuracy_text} --out {exports}/cmp.png",
            "{rows_accuracy_text}/metrics.jsonl:2: accuracy is \"high\", expected a finite number", watch="{exports}"),
    Hostile("compare_null_level", "compare", "{rows_null_level} --out {exports}/cmp.png",
            "{rows_null_level}/metrics.jsonl:1: level is null, expected a finite number", watch="{exports}"),
    # the tools' numeric flags
    Hostile("deploy_huge_batch", "deploy", "--checkpoint {ckpt_final} --batch_sizes 1,100000000",
            "--batch_sizes 100000000: must be in 1..4096"),
    Hostile("deploy_huge_threads", "deploy", "--checkpoint {ckpt_final} --threads 1000000", "--threads 1000000"),
    Hostile("deploy_huge_repeats", "deploy", "--checkpoint {ckpt_final} --repeats 10000000000", "--repeats"),
    Hostile("train_speed_huge_workers", "train_speed", "--workers 100000 --device cpu", "--workers: must be in 0..256"),
    Hostile("export_huge_round_to", "export", "--checkpoint {ckpt_final} --level 0.5 --round_to 100000000 "
            "--out {exports}/x.pt", "--round_to 100000000", watch="{exports}"),
]


# -- fixtures: broken data, YAML files and checkpoints ----------------------------------
def _copy(source, target):
    shutil.copytree(source, target)
    return str(target)


@pytest.fixture(scope="module")
def paths(tiny_cifar, tiny_imagenet, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    p = {"cifar": tiny_cifar, "imagenet": tiny_imagenet, "missing": str(root / "no_such_path")}
    p.update(_broken_cifar(tiny_cifar, root))
    p.update(_broken_imagenet(tiny_imagenet, root))
    p.update(_yaml_files(root))
    (root / "a_file").write_text("not a directory\n")
    p["a_file"] = str(root / "a_file")
    p.update(_checkpoints(tiny_cifar, root))
    p.update(_hostile_files(root))
    p.update(_metrics_runs(root))
    return p


def _broken_cifar(tiny_cifar, root):
    p = {}
    p["cifar_9_classes"] = _copy(tiny_cifar, root / "cifar_9_classes")
    for split in ("train", "test"):
        shutil.rmtree(os.path.join(p["cifar_9_classes"], split, "truck"))
    p["cifar_empty_class"] = _copy(tiny_cifar, root / "cifar_empty_class")
    for name in os.listdir(os.path.join(p["cifar_empty_class"], "train", "cat")):
        os.remove(os.path.join(p["cifar_empty_class"], "train", "cat", name))
    p["cifar_no_classes"] = _copy(tiny_cifar, root / "cifar_no_classes")
    shutil.rmtree(os.path.join(p["cifar_no_classes"], "train"))
    os.makedirs(os.path.join(p["cifar_no_classes"], "train"))
    p["cifar_no_test"] = _copy(tiny_cifar, root / "cifar_no_test")
    shutil.rmtree(os.path.join(p["cifar_no_test"], "test"))
    p["cifar_bad_image"] = _copy(tiny_cifar, root / "cifar_bad_image")
    with open(os.path.join(p["cifar_bad_image"], "train", "cat", "0003.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n this is not an image")
    p["cifar_40px"] = str(root / "cifar_40px")
    make_image_folder(os.path.join(p["cifar_40px"], "train"), CIFAR_CLASSES, 1, 40)
    make_image_folder(os.path.join(p["cifar_40px"], "test"), CIFAR_CLASSES, 1, 40)
    p["cifar_other_test_classes"] = _copy(tiny_cifar, root / "cifar_other_test_classes")
    os.rename(os.path.join(p["cifar_other_test_classes"], "test", "truck"),
              os.path.join(p["cifar_other_test_classes"], "test", "lorry"))
    return p


def _broken_imagenet(tiny_imagenet, root):
    p = {}
    p["imagenet_other_val"] = _copy(tiny_imagenet, root / "imagenet_other_val")
    os.rename(os.path.join(p["imagenet_other_val"], "validation", "n04"),
              os.path.join(p["imagenet_other_val"], "validation", "n05"))
    p["imagenet_no_val"] = _copy(tiny_imagenet, root / "imagenet_no_val")
    shutil.rmtree(os.path.join(p["imagenet_no_val"], "validation"))
    p["imagenet_bad_image"] = _copy(tiny_imagenet, root / "imagenet_bad_image")
    path = os.path.join(p["imagenet_bad_image"], "validation", "n02", "0001.png")
    with open(path, "rb") as handle:
        head = handle.read(120)
    with open(path, "wb") as handle:  # a PNG cut short: the header reads, the pixels do not
        handle.write(head)
    return p


YAML_FILES = {
    "yaml_syntax": "epochs: 10\nlearning_rate: 0.1\n  norm: IN\n",
    "yaml_unclosed_list": "epochs: 10\neval_width_factors: [0.5, 1.0\nlearning_rate: 0.1\n",
    "yaml_unknown_key": "epochs: 10\nlearning_rat: 0.1\n",
    "yaml_topk": "topk: 0.5\n",
    "yaml_wrong_type": "epochs: ten\n",
    "yaml_number_as_text": "weight_decay: 1e-4\n",
    "yaml_out_of_range": "width_factor_limits: [0.5, 2.0]\n",
    "yaml_null_warmup": "warmup_budget: null\n",
    "yaml_quantized": "setting: quantized\nmethod: lcs_l\n",
    "yaml_list": "- epochs: 1\n",
    "yaml_bad_method": "method: [lcs_l]\n",
    "yaml_valid": "epochs: 1\n",
}


def _hostile_files(root):
    """YAML files built to exhaust a parser or a printer, and a named pipe (reading one blocks)."""
    bomb = ["eval_width_factors: [&a [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    bomb += [f"  ,&{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]" for a, b in zip("abcdefgh", "bcdefghi")]
    texts = {"yaml_alias_bomb": "\n".join(bomb) + "]\n",
             "yaml_deep": "eval_width_factors: " + "[" * 50000 + "]" * 50000 + "\n",
             "yaml_duplicate": "epochs: 1\nlearning_rate: 0.1\nepochs: 2\n",
             "yaml_huge": "# " + "x" * 300_000 + "\n",
             "yaml_huge_number": "epochs: " + "9" * 100_000 + "\n",
             "yaml_long_value": "epochs: " + "x" * 200_000 + "\n"}
    p = {}
    for name, text in texts.items():
        p[name] = str(root / f"{name}.yaml")
        with open(p[name], "w") as handle:
            handle.write(text)
    p["yaml_not_utf8"] = str(root / "not_utf8.yaml")
    with open(p["yaml_not_utf8"], "wb") as handle:
        handle.write(b"epochs: 1\nnorm: \xff\xfe\n")
    p["pipe"] = str(root / "pipe")
    os.mkfifo(p["pipe"])
    p["foreign_pickle"] = str(root / "foreign.pt")
    with open(p["foreign_pickle"], "wb") as handle:
        pickle.dump({"model": [1, 2, 3]}, handle, protocol=4)
    p["exports"] = str(root / "exports")
    os.makedirs(p["exports"])
    return p


def _metrics_runs(root):
    """A run directory holding metrics.jsonl, and copies with one damaged row each."""
    from utils.metrics import write_rows

    row = {"evaluation": 0, "epoch": 1, "step": 2, "setting": "structured_sparsity", "method": "us",
           "model": "cpreresnet20", "dataset": "cifar10", "norm": "BN", "level_name": "width_factor", "level": 1.0,
           "alpha": None, "accuracy": 0.5, "loss": 2.0, "num_images": 10, "sparsity": 0.0, "num_bits": None,
           "final": True, "eval_only": False}
    p = {"metrics_run": str(root / "metrics_run")}
    os.makedirs(p["metrics_run"])
    write_rows(os.path.join(p["metrics_run"], "metrics.jsonl"), [row])
    damaged = {"rows_not_utf8": json.dumps(row).encode() + b"\n\xff\xfe{}\n",
               "rows_accuracy_text": (json.dumps(row) + "\n" + json.dumps({**row, "accuracy": "high"}) + "\n").encode(),
               "rows_null_level": (json.dumps({**row, "level": None}) + "\n").encode()}
    for name, data in damaged.items():
        p[name] = str(root / name)
        os.makedirs(p[name])
        with open(os.path.join(p[name], "metrics.jsonl"), "wb") as handle:
            handle.write(data)
    return p


def _damaged_checkpoints(payload, root):
    """Copies of a training checkpoint that torch.load reads but that are wrong in one field."""
    import copy

    import torch

    def edit_rng(ckpt):
        ckpt["rng"]["python"][1] = [1, 2, 3]

    def edit_epoch(ckpt):
        ckpt["epoch"] = ckpt["progress"]["epoch"] = -1

    def edit_global_step(ckpt):
        ckpt["global_step"] = ckpt["progress"]["global_step"] = 10**12

    def edit_momentum(ckpt):
        ckpt["optimizer"]["state"] = {0: {"momentum_buffer": torch.zeros(3)}}

    def edit_model(ckpt):
        ckpt["model"][next(iter(ckpt["model"]))] = 5

    def edit_nan(ckpt):
        next(value for value in ckpt["model"].values() if value.is_floating_point()).fill_(float("nan"))

    edits = {"ckpt_bad_rng": edit_rng, "ckpt_no_optimizer": lambda ckpt: ckpt.pop("optimizer"),
             "ckpt_no_progress": lambda ckpt: ckpt.pop("progress"), "ckpt_negative_epoch": edit_epoch,
             "ckpt_step_past_epoch": lambda ckpt: ckpt["progress"].update(step_in_epoch=10**6),
             "ckpt_global_step_huge": edit_global_step,
             "ckpt_wrong_type": lambda ckpt: ckpt["progress"].update(finished="no"),
             "ckpt_momentum_shape": edit_momentum, "ckpt_model_not_tensor": edit_model,
             "ckpt_other_model_name": lambda ckpt: ckpt.update(model_name="vgg19"), "ckpt_nan": edit_nan,
             "ckpt_bad_timing": lambda ckpt: ckpt.update(evaluation_seconds=[1.0, "x"])}
    p = {}
    for name, edit in edits.items():
        damaged = copy.deepcopy(payload)
        edit(damaged)
        p[name] = str(root / f"{name}.pt")
        torch.save(damaged, p[name])
    final = copy.deepcopy(payload)
    edit_nan(final)
    for key in ("optimizer", "progress", "rng"):
        final.pop(key)
    p["ckpt_nan_final"] = str(root / "nan_final.pt")
    torch.save({**final, "kind": "model"}, p["ckpt_nan_final"])
    return p


def _yaml_files(root):
    p = {}
    for name, text in YAML_FILES.items():
        p[name] = str(root / f"{name}.yaml")
        with open(p[name], "w") as handle:
            handle.write(text)
    return p


def _checkpoints(tiny_cifar, root):
    """A run directory (config.yaml, checkpoint_last.pt, model_final.pt) written by the
    training code for a structured `us` model, checkpoints derived from it, and a checkpoint
    of a quantized model. Nothing is trained: what matters here is the files' format."""
    import torch

    import training_params
    from utils import checkpoint as ckpt
    from utils.distributed import Context
    from engine import run_dir
    from engine.train import Run

    def written_run(setting, flags, save_dir):
        config, options = training_params.parse(setting, ["--data_dir", tiny_cifar, "--batch_size", "16",
                                                          "--train_subset", "16", "--test_subset", "10",
                                                          "--save_dir", save_dir] + flags)
        state = Run(config, options, Context())
        run_dir.prepare(config.save_dir, config, options)
        state.save_checkpoint()
        return state

    directory = str(root / "run")
    state = written_run("structured_sparsity", ["--method", "us"], directory)
    p = {"run": directory, "ckpt_last": os.path.join(directory, ckpt.LAST),
         "ckpt_final": os.path.join(directory, ckpt.FINAL)}
    ckpt.save(p["ckpt_final"], state.payload(kind="model"))
    with open(p["ckpt_last"], "rb") as handle:
        data = handle.read()
    p["ckpt_truncated"] = str(root / "truncated.pt")
    with open(p["ckpt_truncated"], "wb") as handle:
        handle.write(data[:len(data) // 2])
    payload = torch.load(p["ckpt_last"], weights_only=True)
    p["ckpt_state_dict"] = str(root / "state_dict.pt")
    torch.save(payload["model"], p["ckpt_state_dict"])
    # As from another version of the network: one tensor fewer than the config's model holds.
    p["ckpt_other_layers"] = str(root / "other_layers.pt")
    weights = dict(payload["model"])
    p["missing_tensor"] = next(name for name in weights if name.endswith("running_var"))
    weights.pop(p["missing_tensor"])
    torch.save({**payload, "model": weights}, p["ckpt_other_layers"])
    p["ckpt_unknown_key"] = str(root / "unknown_key.pt")
    torch.save({**payload, "config": {**payload["config"], "width_multiplier": 2}}, p["ckpt_unknown_key"])
    p.update(_damaged_checkpoints(payload, root))
    quantized_dir = str(root / "quantized_run")
    written_run("quantized", ["--method", "target_bit_width"], quantized_dir)
    p["ckpt_quantized"] = os.path.join(quantized_dir, ckpt.LAST)
    return p


# -- running the table -------------------------------------------------------------------
def _snapshot(path):
    """{relative path: sha1} of every file under `path` (None when it does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            return {".": hashlib.sha1(handle.read()).hexdigest()}
    tree = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as handle:
                tree[os.path.relpath(full, path)] = hashlib.sha1(handle.read()).hexdigest()
    return tree


def _fill(template, fields):
    return template.format(**fields)


@pytest.fixture(scope="module")
def table(paths, tmp_path_factory):
    """Run every case once; {case id: (case, fields, result, watched before, watched after)}."""
    root = tmp_path_factory.mktemp("cases")
    prepared, specs = {}, []
    for case in CASES:
        fields = dict(paths, save=str(root / case.id / "run"))
        fields["D"] = f"--data_dir {fields['cifar']} --save_dir {fields['save']}"
        argv = shlex.split(_fill(case.args, fields))
        watched = _fill(case.watch, fields)
        prepared[case.id] = (case, fields, watched, _snapshot(watched))
        specs.append({"id": case.id, "script": case.script, "argv": argv, "limit_s": case.limit_s,
                      "log": str(root / f"{case.id}.log")})
    cases_path, results_path = root / "cases.json", root / "results.json"
    cases_path.write_text(json.dumps(specs))
    runner = subprocess.run([sys.executable, os.path.abspath(__file__), str(cases_path), str(results_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert runner.returncode == 0, runner.stderr
    results = json.loads(results_path.read_text())
    return {key: (case, fields, results[key], before, _snapshot(watched))
            for key, (case, fields, watched, before) in prepared.items()}


def check_one_clear_line(stderr, status, expected_status, name):
    """The error contract: status, one line, no traceback, the flag or file named."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert status == expected_status, f"exit status {status}, stderr: {stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert ": error: " in lines[0], lines[0]
    assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert len(lines[0]) <= 800, f"an error line of {len(lines[0])} characters: {lines[0][:300]}..."


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_bad_input_gets_one_clear_line(table, case_id):
    case, fields, result, before, after = table[case_id]
    assert not result["timed_out"], f"still running after {case.limit_s} s: killed"
    check_one_clear_line(result["stderr"], result["status"], case.status, _fill(case.names, fields))
    if case.may_write:
        before = before or {}
        assert set(after or {}) - set(before) <= set(case.may_write), after
    else:
        assert after == before, f"{_fill(case.watch, fields)} changed: {before} -> {after}"


def test_table_covers_every_script_and_kind():
    """Each script is exercised, with usage, YAML, data and checkpoint errors."""
    assert {case.script for case in CASES} == set(SCRIPTS) | set(TOOLS)
    text = " ".join(case.args for case in CASES)
    for needle in ("--config {yaml_", "--data_dir {cifar_", "--imagenet_dir {imagenet_", "--resume", "--eval_only"):
        assert needle in text, needle
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.slow
def test_scripts_as_subprocesses(cli, paths, tmp_path):
    """The real command lines behave as the entry point does in the table."""
    save = str(tmp_path / "run")
    runs = [
        ("train_structured.py", ["--data_dir", paths["cifar"], "--save_dir", save, "--bogus_flag"], "--bogus_flag"),
        ("train_unstructured.py", ["--data_dir", paths["cifar"], "--save_dir", save, "--config",
                                   paths["yaml_syntax"]], paths["yaml_syntax"] + ":3"),
        ("train_quantized.py", ["--data_dir", paths["cifar_bad_image"], "--save_dir", save],
         os.path.join(paths["cifar_bad_image"], "train", "cat", "0003.png")),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda item: cli(item[0], *item[1], timeout=300), runs))
    for (script, _, name), result in zip(runs, results):
        check_one_clear_line(result.stderr, result.returncode, 2, name)
        assert result.stderr.startswith(f"{script}: error: "), result.stderr
    assert not os.path.exists(save)

"""experiments/reproduce.py: the sweep over the entry scripts, on tiny data.

Two pairs; one run interrupted by SIGTERM and resumed by a second call; one run made to fail
(reported with its log's last line while the other finishes); the summary and the figures
written; --dry_run of the shipped recipes listing the expected commands and their cost; --estimate timing
the first steps of a run; --seeds running each seed in its own directory, the summary's tables and
figures showing mean and spread and joining per-target baselines into one curve.
"""

import csv
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cli_helpers import micro_cifar  # noqa: F401  (fixture)
import training_params
from conftest import REPO

SCRIPT = os.path.join(REPO, "experiments", "reproduce.py")


def sweep(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), **kwargs)


def write_recipe(path, flags, runs):
    path.write_text(yaml.safe_dump({"about": "tiny test recipe", "flags": flags, "runs": runs}))
    return str(path)


def recipe_commands(recipe, *extra, data=("--data_dir", REPO), comments=None):
    result = sweep("--recipe", recipe, "--dry_run", *data, "--out", "/nonexistent/out", *extra)
    assert result.returncode == 0, result.stderr
    if comments is not None:
        comments += [line for line in result.stdout.splitlines() if line.startswith("#")]
    return [line for line in result.stdout.splitlines() if not line.startswith("#")]


def flag(line, name):
    words = line.split()
    return words[words.index(name) + 1]


def test_dry_run_cpu_recipe_lists_the_six_runs_with_its_budget():
    comments = []
    lines = recipe_commands("cpu", comments=comments)
    expected = [("train_structured.py", "lcs_l"), ("train_structured.py", "us"),
                ("train_unstructured.py", "lcs_l"), ("train_unstructured.py", "target_topk"),
                ("train_quantized.py", "lcs_l"), ("train_quantized.py", "target_bit_width")]
    assert len(lines) == len(expected)
    for line, (script, method) in zip(lines, expected):
        words = line.split()
        assert words[:2] == ["python", script]
        assert words[words.index("--method") + 1] == method
        assert words[words.index("--seed") + 1] == "0"
        assert words[words.index("--train_subset") + 1] == "10000"
        assert words[words.index("--epochs") + 1] == "12"
        assert words[words.index("--test_freq") + 1] == "12"
        assert words[words.index("--threads") + 1] == "2"
        assert "--no-eval_at_start" in words and "--test_subset" not in words
        # The speed flag measured fastest on the 2-core CPU, per setting (docs/speed.md).
        assert ("--channels_last" in words) == (script != "train_structured.py")
        setting = {"train_structured.py": "structured_sparsity", "train_unstructured.py": "unstructured_sparsity",
                   "train_quantized.py": "quantized"}[script]
        assert words[words.index("--save_dir") + 1] == f"/nonexistent/out/{setting}/{method}"
    assert not os.path.exists("/nonexistent/out")
    # What each run costs, and the sweep.
    assert comments[1] == "# structured_sparsity/lcs_l: 12 epochs x 10,000 training images = 120,000 images trained"
    assert comments[-1] == "# the sweep: 6 run(s) to do, 720,000 images trained"


TOPK_GRID = ["0.025", "0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95", "1.0"]


def paper_grid(lines, script_word, structured=("lcs_l", "lcs_p", "ns", "us", "lec")):
    """(script, method, target) of each command: the paper's grid, one target model per level."""
    runs = [(line.split()[script_word], flag(line, "--method"),
             flag(line, "--topk") if "--topk" in line else flag(line, "--bit_width") if "--bit_width" in line else None)
            for line in lines]
    assert runs == [("train_structured.py", m, None) for m in structured] + \
        [("train_unstructured.py", m, None) for m in ("lcs_l", "lcs_p")] + \
        [("train_unstructured.py", "target_topk", topk) for topk in TOPK_GRID] + \
        [("train_quantized.py", m, None) for m in ("lcs_l", "lcs_p")] + \
        [("train_quantized.py", "target_bit_width", str(bits)) for bits in range(3, 9)]


def test_dry_run_paper_recipe_lists_the_grid_with_a_target_model_per_level():
    comments = []
    lines = recipe_commands("paper", "--gpus", "0,1,2,3", "--gpus_per_run", "2", "--seed", "3", comments=comments)
    assert len(lines) == 24
    paper_grid(lines, 6)
    for line in lines:
        # torchrun passes the warning signal on to every process too (utils/stop_signals.py).
        assert line.startswith("python -m torch.distributed.run --standalone --nproc_per_node=2 "
                               "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 ")
        words = line.split()
        # The configs as they are: no budget flag added.
        assert not {"--epochs", "--train_subset", "--test_subset", "--test_freq"} & set(words)
        assert words[words.index("--seed") + 1] == "3" and words[-2:] == ["--device", "cuda"]
    assert flag(lines[7], "--save_dir") == "/nonexistent/out/unstructured_sparsity/target_topk_0.025_seed3"
    assert "# unstructured_sparsity/target_topk_0.025_seed3: 200 epochs x 50,000 training images = 10,000,000 " \
           "images trained" in comments
    assert comments[-1] == "# the sweep: 24 run(s) to do, 240,000,000 images trained"


def test_dry_run_paper_imagenet_recipe_lists_the_grid_for_resnet18_and_vgg19(tiny_imagenet):
    comments = []
    lines = recipe_commands("paper-imagenet", data=("--imagenet_dir", tiny_imagenet), comments=comments)
    # LEC's channel selection exists for cPreResNet20 and VGG19: no ResNet18 LEC run.
    assert len(lines) == 47
    for model, half in (("resnet18", lines[:23]), ("vgg19", lines[23:])):
        paper_grid(half, 1, ("lcs_l", "lcs_p", "ns", "us") + ("lec",) * (model == "vgg19"))
        for line in half:
            assert (flag(line, "--model"), flag(line, "--dataset"), flag(line, "--imagenet_dir")) == \
                ("resnet18" if model == "resnet18" else "vgg19", "imagenet", tiny_imagenet)
            assert os.path.basename(flag(line, "--save_dir")).startswith(model + "_") and "--data_dir" not in line
        # Each run's config passes its script's own checks (the sweep's check parses and merges).
        for line in half:
            words = line.split()
            setting = {"train_structured.py": "structured_sparsity", "train_unstructured.py": "unstructured_sparsity",
                       "train_quantized.py": "quantized"}[words[1]]
            parser = training_params.build_parser(setting)
            training_params.validate(*training_params.merge(setting, parser.parse_args(words[2:])))
    # The configs' ImageNet budgets: 90 epochs of the whole training set.
    assert "# quantized/vgg19_target_bit_width_3: 90 epochs x 1,281,167 training images = 115,305,030 images " \
           "trained" in comments
    refused(sweep("--recipe", "paper-imagenet", "--dry_run", "--out", "/nonexistent/out"),
            "--imagenet_dir: missing; run structured_sparsity/resnet18_lcs_l trains on ImageNet")
    refused(sweep("--recipe", "cpu", "--dry_run", "--imagenet_dir", tiny_imagenet),
            f"--imagenet_dir {tiny_imagenet}: run structured_sparsity/lcs_l trains on cifar10, not ImageNet")


def test_select_picks_runs_and_refuses_unknown_names():
    lines = recipe_commands("cpu", "--select", "quantized,unstructured/lcs_p")
    methods = [line.split()[line.split().index("--method") + 1] for line in lines]
    assert methods == ["lcs_l", "target_bit_width", "lcs_p"]
    result = sweep("--recipe", "cpu", "--dry_run", "--select", "structured/nope")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown method 'nope' of structured_sparsity" in result.stderr and "Traceback" not in result.stderr
    result = sweep("--recipe", "nosuch", "--dry_run")
    assert result.returncode == 2 and "unknown recipe 'nosuch' (allowed: paper, paper-imagenet, cpu, " in result.stderr


def _wait_for(path, text, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {text!r} appeared in {path}")
        time.sleep(0.2)
    pytest.fail(f"{text!r} did not appear in {path}")


@pytest.mark.slow
def test_sweep_interrupted_resumed_failure_reported_summary_written(tmp_path, micro_cifar):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "tiny.yaml", "--epochs 6 --batch_size 2 --threads 1 --no-eval_at_start",
                          ["quantized/target_bit_width",
                           {"run": "unstructured/target_topk", "flags": "--eval_topk_grid 0.5,1.0"},
                           {"run": "quantized/lcs_p", "name": "broken", "flags": "--bit_width_limits 2,9"}])
    first_dir = out / "quantized" / "target_bit_width"
    # First call: SIGTERM once the first run is training; it stops after its step, with a checkpoint.
    process = subprocess.Popen([sys.executable, SCRIPT, "--recipe", recipe, "--data_dir", micro_cifar,
                                "--out", out], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for(first_dir / "train.log", "epoch 2/6", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "quantized/target_bit_width: interrupted" in stdout
    assert (first_dir / "checkpoint_last.pt").exists() and not (first_dir / "model_final.pt").exists()
    assert "unstructured_sparsity/target_topk: not started" in stderr
    record = json.loads((first_dir / "sweep_run.json").read_text())
    assert record["status"] == "interrupted" and record["segments"][0]["exit_status"] == 143

    # Second call: resumes the first, runs the second, reports the third as failed.
    result = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out)
    assert result.returncode == 1, result.stderr
    assert "resuming quantized/target_bit_width" in result.stdout
    assert "--resume" in result.stdout.split("resuming quantized/target_bit_width")[1].splitlines()[0]
    assert "quantized/broken: failed" in result.stderr
    assert "--bit_width_limits" in result.stderr.split("quantized/broken: failed")[1].splitlines()[0]
    for run_dir in (first_dir, out / "unstructured_sparsity" / "target_topk"):
        assert (run_dir / "model_final.pt").exists()
        assert json.loads((run_dir / "sweep_run.json").read_text())["status"] == "finished"
    record = json.loads((first_dir / "sweep_run.json").read_text())
    assert len(record["segments"]) == 2 and record["wall_s"] == pytest.approx(
        sum(segment["wall_s"] for segment in record["segments"]), abs=0.2)
    # The resumed run trained the same steps as an uninterrupted one: one final evaluation, six epochs.
    rows = [json.loads(line) for line in (first_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if row["final"]] == [6] * 6

    for setting in ("quantized", "unstructured_sparsity"):
        assert (out / setting / "comparison.png").stat().st_size > 1000
        assert (out / setting / "comparison.csv").exists()
    summary = (out / "summary.md").read_text()
    assert "| quantized/target_bit_width | 0 | finished |" in summary and "(2 segments)" in summary
    assert "| unstructured_sparsity/target_topk | 0 | finished |" in summary
    assert "| quantized/broken | 0 | failed: " in summary
    assert "![quantized](quantized/comparison.png)" in summary
    # Per run the accuracy at every level of its grid, and the exact command.
    table = summary.split("## unstructured_sparsity")[1]
    assert "| topk | target_topk (BN) |" in table
    for level in ("0.5", "1"):
        assert any(line.startswith(f"| {level} | ") and line.rstrip().endswith("% |") for line in table.splitlines())
    assert ("python train_unstructured.py --method target_topk --seed 0 --data_dir " + micro_cifar) in summary
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    assert commit and commit in summary

    # Third call: everything finished is skipped (nothing trained again).
    result = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out, "--select",
                   "quantized/target_bit_width,unstructured")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished before, skipped") == 2 and "starting" not in result.stdout
    dry = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out, "--dry_run")
    assert dry.stdout.count("# finished, skipped: ") == 2


def test_summary_gives_each_level_unit_its_own_table(tmp_path):
    """LEC (kept channel fraction) beside width-factor runs of the structured setting: two
    tables, no LEC level in the width column (they once shared one)."""
    import shutil
    from types import SimpleNamespace

    from experiments import reproduce
    out = tmp_path / "out"
    source = os.path.join(REPO, "docs", "results", "structured_sparsity", "lcs_l")
    width_dir = out / "structured_sparsity" / "lcs_l"
    shutil.copytree(source, width_dir)
    lec_dir = out / "structured_sparsity" / "lec"
    lec_dir.mkdir()
    rows = [json.loads(line) for line in (width_dir / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if row["final"]][:2]
    lec_rows = [dict(row, method="lec", level_name="channel_fraction", level=level, accuracy=accuracy)
                for row, level, accuracy in zip(final, (0.4, 0.9), (0.2, 0.3))]
    (lec_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lec_rows))
    runs = [reproduce.Run(reproduce.RunSpec("structured_sparsity", method, method), str(path), ["python"])
            for method, path in (("lcs_l", width_dir), ("lec", lec_dir))]
    recipe = reproduce.Recipe("tiny", "", [], [run.spec for run in runs])
    args = SimpleNamespace(data_dir="data", imagenet_dir=None, out=str(out))
    text = reproduce.summary_text(recipe, args, runs, "abc", "a machine")
    section = text.split("## structured_sparsity")[1]
    width_table, lec_table = section.split("| width_factor |")[1], section.split("| channel_fraction |")[1]
    width_levels = [line.split("|")[1].strip() for line in width_table.split("\n\n")[0].splitlines()[2:]]
    lec_lines = lec_table.split("\n\n")[0].splitlines()
    assert "lec" not in width_table.split("\n\n")[0].splitlines()[0] and "0.4" not in width_levels, width_table
    assert width_levels == sorted({f"{row['level']:g}" for row in rows if row["final"]}, key=float), width_levels
    assert lec_lines[0].strip() == "lec |" and lec_lines[2:] == ["| 0.4 | 20.00 % |", "| 0.9 | 30.00 % |"], lec_lines


def refused(result, *texts):
    """The sweep refused in one line, without a traceback, naming each of `texts`."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("reproduce.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    for text in texts:
        assert text in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize("mode", ["--dry_run", "--real_run"])
@pytest.mark.parametrize("flags, run, select, named", [
    ("--epoch 1", "quantized/lcs_l", None, "run quantized/lcs_l: train_quantized.py refuses its flags: "
                                           "unrecognized arguments: --epoch 1 (did you mean --epochs?)"),
    ("", {"run": "structured/us", "flags": "--widht_factor 0.5"}, None, "run structured_sparsity/us: "
     "train_structured.py refuses its flags: unrecognized arguments: --widht_factor 0.5"),
    ("--epochs", "quantized/lcs_l", None, "run quantized/lcs_l: train_quantized.py refuses its flags: "
                                          "argument --epochs: expected one argument"),
    ("--epochs x", "quantized/lcs_l", None, "invalid int value: 'x'"),
    # A flag of another script, for a pair --select adds to the recipe's runs.
    ("--eval_topk_grid 0.5", "unstructured/target_topk", "quantized/lcs_l", "run quantized/lcs_l: "
     "train_quantized.py refuses its flags: unrecognized arguments: --eval_topk_grid 0.5 (--eval_topk_grid is "
     "a flag of train_unstructured.py)"),
])
def test_run_flags_are_checked_by_the_scripts_parser_before_anything_runs(tmp_path, mode, flags, run, select,
                                                                          named):
    recipe = write_recipe(tmp_path / "typo.yaml", flags, [run])
    out = tmp_path / "out"
    result = sweep("--recipe", recipe, "--out", out, *(["--select", select] if select else []),
                   *([mode] if mode == "--dry_run" else []))
    refused(result, f"reproduce.py: error: {recipe} (typo): ", named)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--method lcs_p", "--seed=3", "--data_dir /tmp", "--imagenet_dir /tmp",
                                  "--save_dir runs/x", "--resume",
                                  "--overwrite", "--eval_only --checkpoint m.pt"])
def test_recipe_flags_may_not_set_what_the_sweep_sets(tmp_path, flag):
    recipe = write_recipe(tmp_path / "own.yaml", "--epochs 2", [{"run": "quantized/lcs_l", "flags": flag}])
    result = sweep("--recipe", recipe, "--dry_run", "--out", tmp_path / "out")
    refused(result, "own.yaml (own): run quantized/lcs_l: " + flag.split()[0].split("=")[0] + " is not a recipe flag")


def test_dry_run_cut_short_by_its_reader_ends_quietly():
    """As `reproduce.py --dry_run | head -1`: the reader is gone before the lines are written."""
    process = subprocess.Popen([sys.executable, SCRIPT, "--recipe", "paper", "--dry_run", "--out", "/nonexistent/out"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE and stderr == b"", stderr


@pytest.mark.parametrize("mode", ["--dry_run", "--real_run"])
@pytest.mark.parametrize("name, out, named", [
    ("a\0b", "out", r"name 'a\x00b' must be a plain directory name"),
    ("a\nb", "out", r"name 'a\nb' must be a plain directory name"),
    ("n" * 256, "out", "at most 255 bytes"),
    ("lcs_l", "file/out", "lies under the file"),
    ("lcs_l", "o" * 256, "has 256 bytes (at most 255)"),
    ("lcs_l", "/".join(["o" * 250] * 16), "leaves no room for its files"),
])
def test_run_directories_that_cannot_be_made_are_refused_before_anything_runs(tmp_path, mode, name, out, named):
    (tmp_path / "file").write_text("a file, not a folder\n")
    recipe = write_recipe(tmp_path / "names.yaml", "", [{"run": "quantized/lcs_l", "name": name}])
    result = sweep("--recipe", recipe, "--out", tmp_path / out, *([mode] if mode == "--dry_run" else []))
    refused(result, named)
    assert sorted(os.listdir(tmp_path)) == ["file", "names.yaml"]


def test_read_only_place_is_refused(tmp_path, monkeypatch, capsys):
    from experiments import reproduce
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root: what os.access tells any other user
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and path != str(read_only))
    for mode in (["--dry_run"], []):
        assert reproduce.main(["--recipe", "cpu", "--out", str(read_only / "out"), *mode]) == 2
        assert capsys.readouterr().err == (
            f"reproduce.py: error: --out {read_only / 'out'}: run structured_sparsity/lcs_l: the run directory "
            f"{read_only / 'out' / 'structured_sparsity' / 'lcs_l'} cannot be made or written: {read_only} is not "
            f"writable\n")
    assert os.listdir(read_only) == []


@pytest.fixture
def cpu_results(tmp_path):
    """A copy of the cpu recipe's runs in docs/results (configs and metrics; no models)."""
    import shutil
    out = tmp_path / "results"
    shutil.copytree(os.path.join(REPO, "docs", "results"), out)
    return out


def test_run_directory_holding_another_run_is_refused(cpu_results):
    import shutil
    result = sweep("--recipe", "cpu", "--dry_run", "--out", cpu_results)
    assert result.returncode == 0 and result.stdout.count("--save_dir") == 6, result.stderr  # the runs it holds
    # Another seed runs in its own directory: never the seed-0 run reported as its own.
    result = sweep("--recipe", "cpu", "--dry_run", "--out", cpu_results, "--seed", "1", "--select", "quantized")
    assert result.returncode == 0 and "finished" not in result.stdout, result.stdout
    assert [flag(line, "--save_dir") for line in result.stdout.splitlines() if not line.startswith("#")] == \
        [f"{cpu_results}/quantized/lcs_l_seed1", f"{cpu_results}/quantized/target_bit_width_seed1"]
    # A seed's directory holding another seed's run is refused.
    shutil.copytree(cpu_results / "quantized" / "lcs_l", cpu_results / "quantized" / "lcs_l_seed1")
    result = sweep("--recipe", "cpu", "--dry_run", "--out", cpu_results, "--seeds", "0,1", "--select", "quantized")
    refused(result, f"{cpu_results}/quantized/lcs_l_seed1: holds another run than quantized/lcs_l of this sweep "
                    f"(seed 0; expected seed 1)")
    held = cpu_results / "quantized" / "target_bit_width"
    (held / "config.yaml").write_text((cpu_results / "quantized" / "lcs_l" / "config.yaml").read_text())
    before, summary = sorted(os.listdir(held)), (cpu_results / "summary.md").read_text()
    for mode in ("--dry_run", "--summary_only", "--real_run"):
        result = sweep("--recipe", "cpu", "--out", cpu_results, "--select", "quantized/target_bit_width",
                       *([mode] if mode != "--real_run" else []))
        refused(result, f"{held}: holds another run than quantized/target_bit_width", "(method lcs_l, norm GN",
                "expected method target_bit_width, norm BN")
    assert sorted(os.listdir(held)) == before and not (cpu_results / ".lock").exists()
    assert (cpu_results / "summary.md").read_text() == summary


def test_second_sweep_on_one_out_is_refused(tmp_path):
    from utils.run_lock import RunDirLock
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "one.yaml", "", ["quantized/lcs_l"])
    with RunDirLock(str(out), flag="--out", kind="sweep folder"):  # the first sweep
        result = sweep("--recipe", recipe, "--out", out)
    refused(result, f"--out {out}: another process is writing to this sweep folder (pid {os.getpid()} on ")
    assert not out.exists()


def test_summary_only_without_a_sweep_says_so(tmp_path):
    result = sweep("--recipe", "cpu", "--summary_only", "--out", tmp_path / "none")
    refused(result, f"--out {tmp_path / 'none'}: no sweep there")
    assert not (tmp_path / "none").exists()


def test_estimate_times_the_first_steps_of_each_run_and_writes_nothing(tmp_path, micro_cifar):
    recipe = write_recipe(tmp_path / "est.yaml", "--epochs 2 --batch_size 2 --threads 1 --no-eval_at_start",
                          ["quantized/target_bit_width"])
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", tmp_path / "out", "--dry_run", "--estimate",
                   env={"TMPDIR": str(temporary)})
    assert result.returncode == 0, result.stderr
    # micro_cifar: 20 training images, 10 steps of 2 per epoch; the script timed its first steps.
    cost = result.stdout.splitlines()[1]
    match = re.fullmatch(r"# quantized/target_bit_width: 2 epochs x 50,000 training images = 100,000 images "
                         r"trained; on this machine: ~\d+ s, ([0-9.e-]+) s per step x 20 steps \(timed training "
                         r"steps; evaluations not included\)", cost)
    assert match and 0 < float(match[1]) < 60, cost
    assert re.search(r"^# the sweep: 1 run\(s\) to do, 100,000 images trained; ~\d+ s one run after another$",
                     result.stdout, re.M), result.stdout
    # (torch keeps its own caches in TMPDIR)
    assert not (tmp_path / "out").exists() and [name for name in os.listdir(temporary) if "reproduce" in name] == []
    refused(sweep("--recipe", recipe, "--estimate", "--out", tmp_path / "out"), "--estimate: needs --dry_run")


@pytest.mark.parametrize("seeds, named", [
    (["--seeds", "0,x"], "--seeds '0,x': expected distinct seeds in 0 .. 2^32-1, such as 0,1,2"),
    (["--seeds", "1,1"], "--seeds '1,1': expected distinct seeds"),
    (["--seeds", "4294967296"], "--seeds '4294967296': expected distinct seeds in 0 .. 2^32-1"),
    (["--seed", "-1"], "--seed -1: must lie in 0 .. 2^32-1"),
    (["--seed", "1", "--seeds", "1,2"], "--seed: cannot be combined with --seeds"),
])
def test_bad_seeds_are_refused(tmp_path, seeds, named):
    refused(sweep("--recipe", "cpu", "--dry_run", "--out", tmp_path / "out", *seeds), named)


@pytest.mark.slow
def test_seeds_run_in_their_own_directories_and_the_summary_shows_mean_and_spread(tmp_path, micro_cifar):
    """Two target TopK models (0.5 and 1.0) of two seeds each: four directories, each with its
    seed; the figure's and tables' curve joins each model at its own level, mean and standard
    deviation over the seeds; a later sweep of one seed skips only that seed's runs."""
    import statistics

    from utils.metrics import draw_runs

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "seeds.yaml", "--epochs 1 --batch_size 4 --threads 1 --no-eval_at_start "
                          "--eval_topk_grid 0.5,1.0 --learning_rate 0.5",
                          [{"run": "unstructured/target_topk", "name": f"t{topk}", "flags": f"--topk {topk}"}
                           for topk in ("0.5", "1.0")])
    result = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out, "--seeds", "0,1")
    assert result.returncode == 0, result.stderr
    setting = out / "unstructured_sparsity"
    accuracy = {}
    for name, seed in (("t0.5", 0), ("t0.5_seed1", 1), ("t1.0", 0), ("t1.0_seed1", 1)):
        assert yaml.safe_load((setting / name / "config.yaml").read_text())["seed"] == seed
        assert f"--seed {seed} " in json.loads((setting / name / "sweep_run.json").read_text())["command"]
        rows = [json.loads(line) for line in (setting / name / "metrics.jsonl").read_text().splitlines()]
        accuracy[name] = {row["level"]: row["accuracy"] for row in rows if row["final"]}
    # The joined curve: the 0.5 model at 0.5, the 1.0 model at 1.0, each over its two seeds.
    joined = {0.5: [accuracy["t0.5"][0.5], accuracy["t0.5_seed1"][0.5]],
              1.0: [accuracy["t1.0"][1.0], accuracy["t1.0_seed1"][1.0]]}
    table = list(csv.DictReader((setting / "comparison.csv").open()))
    label = "target_topk (BN): one model per level"
    for line in table:
        values = joined[float(line["level"])]
        assert float(line[f"{label}: accuracy"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert float(line[f"{label}: spread"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert line[f"{label}: seeds"] == "2"
        # Each model's whole grid stays in the table.
        assert float(line["t0.5 (BN): accuracy"]) == pytest.approx(
            statistics.fmean([accuracy["t0.5"][float(line["level"])], accuracy["t0.5_seed1"][float(line["level"])]]),
            abs=1e-6)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Sweep: recipe `seeds`, seeds 0, 1\n")
    assert "| unstructured_sparsity/t0.5_seed1 | 1 | finished |" in summary
    section = summary.split("## unstructured_sparsity")[1]
    assert f"| topk | {label} | t0.5 (BN) | t1.0 (BN) |" in section
    mean, spread = statistics.fmean(joined[0.5]), statistics.stdev(joined[0.5])
    assert f"| 0.5 | {100 * mean:.2f} ± {100 * spread:.2f} % |" in section
    assert "mean ± standard deviation over the seeds 0, 1" in section
    assert (setting / "comparison.png").stat().st_size > 1000 and (setting / "runs.png").stat().st_size > 1000
    # The figure's curve carries its spread as error bars.
    from experiments import reproduce
    runs = [reproduce.Run(reproduce.RunSpec("unstructured_sparsity", "target_topk", name), str(setting / directory),
                          ["python"], seed=seed)
            for name in ("t0.5", "t1.0") for directory, seed in ((name, 0), (f"{name}_seed1", 1))]
    curves, grids = reproduce.setting_curves(reproduce.seed_groups(runs))
    assert [curve.label for curve in curves] == [label] and [curve.label for curve in grids] == ["t0.5 (BN)",
                                                                                                 "t1.0 (BN)"]
    figure = draw_runs([(curve.label, curve.rows) for curve in curves])
    bars = [container for container in figure.axes[0].containers if type(container).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1

    # Another seed alone: its own runs, the others' never reported as its own.
    result = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out, "--seed", "1")
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if "finished before, skipped" in line]
    assert skipped == [f"unstructured_sparsity/t{topk}_seed1: finished before, skipped ({setting}/t{topk}_seed1)"
                       for topk in ("0.5", "1.0")], result.stdout
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Sweep: recipe `seeds`, seed 1\n") and "| 0 |" not in summary.split("## ")[0]
    dry = sweep("--recipe", recipe, "--data_dir", micro_cifar, "--out", out, "--seed", "2", "--dry_run")
    assert "finished" not in dry.stdout and dry.stdout.count("_seed2 ") == 2, dry.stdout


class _SignalledChild:
    """A real child process in its own session (as the sweep starts its runs) whose first poll
    sends the sweep itself `signum`: the signal arrives while the sweep waits on its runs."""

    def __init__(self, signum):
        code = ("import signal, sys, time\n"
                "for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):\n"
                "    signal.signal(signum, lambda number, frame: sys.exit(128 + number))\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
        self.popen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        assert self.popen.stdout.readline() == "ready\n"
        self.pid, self.signum, self.sent = self.popen.pid, signum, False

    def poll(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return self.popen.poll()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2], ids=lambda signum: signum.name)
def test_sweep_passes_each_stop_signal_on_to_its_runs(signum, monkeypatch, capsys):
    from types import SimpleNamespace

    from experiments import reproduce
    sweep = reproduce.Sweep([], [None], "commit", "machine", echo=False)
    child = _SignalledChild(signum)
    sweep.running = [SimpleNamespace(process=child)]
    monkeypatch.setattr(reproduce.Sweep, "_finish", lambda self, run: self.running.remove(run))
    previous = signal.getsignal(signum)
    sweep.execute()
    assert child.popen.wait(timeout=30) == 128 + signum
    assert sweep.stop_signal == signum and signal.getsignal(signum) == previous
    assert f"{signum.name}: stopping the running run(s) after their current step" in capsys.readouterr().err

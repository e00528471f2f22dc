"""Multi-process training (DistributedDataParallel, gloo on CPU).

* One step with 2 processes on half batches against 1 process on the whole batch: a sandwich
  method (4 forwards, no_sync, the cos^2 penalty on the last) and LEC (BN statistics per
  process, the L1 sub-gradient after the all-reduce).
* Evaluation sharded over 2 processes counts every test image once (odd test size).
* torchrun --nproc_per_node=2 on tiny data for one method per setting: one metrics file, one
  checkpoint, the final evaluation over every test image; resume under torchrun.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO
from data import LoaderTestStream, TensorTestStream, cifar_datasets
from methods import METHODS
from models import build_model
from training_params import parse
from utils.distributed import Context
from utils.stop_signals import TORCHRUN_SIGNALS
from engine import evaluate
from engine.step import TrainStep

WORLD = 2
BATCH = 16          # global batch of the one-step comparison
TEST_IMAGES = 39    # odd: the two shards differ in size
LEC_L1 = 0.01       # large enough for a missing or doubled L1 term to show


# -- one step: 2 processes x half batch == 1 process x whole batch ---------------------------
def build(case):
    """(model, method, optimizer, config) of a comparison case, the same in every process."""
    setting, name = {"sandwich": ("structured_sparsity", "lcs_l"), "lec": ("structured_sparsity", "lec")}[case]
    config, _ = parse(setting, ["--method", name, "--save_dir", "unused"])
    if case == "lec":
        config.bn_update_factor = LEC_L1
    method = METHODS[setting][name](config, None)
    torch.manual_seed(0)
    model = build_model(config.model, method.layer_factory(), 10)
    method.bind(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return model, method, optimizer, config


def whole_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


def step_levels(method):
    return method.train_levels(0, torch.Generator().manual_seed(2))


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def eval_images():
    images = np.random.default_rng(3).integers(0, 256, (TEST_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = np.random.default_rng(4).integers(0, 10, TEST_IMAGES).astype(np.int64)
    return images, labels


def eval_streams(rank, world_size):
    images, labels = eval_images()
    tensor = TensorTestStream(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                              8, rank, world_size, torch.contiguous_format)
    _, test_set = cifar_datasets(images, labels, images, labels, seed=0)
    loader = LoaderTestStream(test_set, 8, rank, world_size, 0, torch.device("cpu"), torch.contiguous_format)
    return {"tensor": tensor, "dataloader": loader}


def evaluation_model():
    model, _, _, _ = build("sandwich")
    return model.eval()


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    context = Context(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    images, labels = whole_batch()
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results = {}
    for case in ("sandwich", "lec"):
        model, method, optimizer, config = build(case)
        step = TrainStep(model, method, optimizer, context, config)
        step(step_levels(method), images[half], labels[half])
        results[case] = parameters(model)
    model = evaluation_model()
    results["evaluation"] = {name: evaluate.test_pass(model, stream, context)
                             for name, stream in eval_streams(rank, WORLD).items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def assert_close(actual, expected, atol=2e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=atol, rtol=1e-5), \
            (name, (actual[name] - expected[name]).abs().max().item())


def test_replicas_stay_identical(two_process_results):
    rank0, rank1 = two_process_results
    for case in ("sandwich", "lec"):
        for name in rank0[case]:
            assert torch.equal(rank0[case][name], rank1[case][name]), (case, name)


def test_sandwich_step_on_half_batches_equals_whole_batch_step(two_process_results):
    model, method, optimizer, config = build("sandwich")
    before = parameters(model)
    images, labels = whole_batch()
    levels = step_levels(method)
    assert len(levels) == 4
    TrainStep(model, method, optimizer, Context(), config)(levels, images, labels)
    expected = parameters(model)
    assert any(not torch.equal(before[n], expected[n]) for n in expected)
    assert_close(two_process_results[0]["sandwich"], expected)


def test_lec_step_equals_mean_of_half_batch_gradients_plus_one_l1_term(two_process_results):
    """With BN each process normalises with its own half-batch statistics, so the reference
    is the mean of the two half-batch gradients, plus s * sign(gamma) once."""
    images, labels = whole_batch()
    gradients = []
    for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        model, _, _, _ = build("lec")
        torch.nn.functional.cross_entropy(model(images[half]), labels[half]).backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    def reference_step(with_l1):
        model, method, optimizer, _ = build("lec")
        for name, p in model.named_parameters():
            if name in gradients[0]:
                p.grad = (gradients[0][name] + gradients[1][name]) / 2
        if with_l1:
            method.after_backward(model)
        optimizer.step()
        return parameters(model)

    expected = reference_step(with_l1=True)
    assert_close(two_process_results[0]["lec"], expected)
    # The L1 term moves every norm weight by lr * s = 1e-3: far beyond the tolerance.
    without = reference_step(with_l1=False)
    gamma = "layer1.0.bn1.weight"
    assert (expected[gamma] - without[gamma]).abs().min().item() == pytest.approx(0.1 * LEC_L1, rel=1e-3)


def test_sharded_evaluation_counts_every_test_image_once(two_process_results):
    model = evaluation_model()
    for name, stream in eval_streams(0, 1).items():
        accuracy, loss, count = evaluate.test_pass(model, stream, Context())
        for rank in range(WORLD):
            shared_accuracy, shared_loss, shared_count = two_process_results[rank]["evaluation"][name]
            assert shared_count == count == TEST_IMAGES
            assert shared_accuracy == pytest.approx(accuracy, abs=1e-12)
            assert shared_loss == pytest.approx(loss, rel=1e-6)


def test_test_shards_are_disjoint_and_cover_the_test_set():
    images, _ = eval_images()
    shards = [eval_streams(rank, WORLD) for rank in range(WORLD)]
    assert sorted(shards[0]["dataloader"].indices + shards[1]["dataloader"].indices) == list(range(TEST_IMAGES))
    sizes = [len(shard["tensor"].labels) for shard in shards]
    assert sizes == [20, 19]


# -- torchrun end to end ---------------------------------------------------------------------
SCRIPTS = {"structured_sparsity": ("train_structured.py", ["--eval_width_factors", "1.0,0.25"]),
           "unstructured_sparsity": ("train_unstructured.py", ["--eval_topk_grid", "0.5,1.0"]),
           "quantized": ("train_quantized.py", ["--bit_width_limits", "7,8"])}
RUN_FILES = {"config.yaml", "metrics.jsonl", "results.csv", "accuracy_vs_compression.png", "checkpoint_last.pt",
             "model_final.pt"}


def torchrun_command(setting, save_dir, *args):
    script, grid = SCRIPTS[setting]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            TORCHRUN_SIGNALS, os.path.join(REPO, script), "--save_dir", str(save_dir), *args]


def training_args(data_dir, epochs, setting):
    return ["--data_dir", data_dir, "--epochs", str(epochs), "--batch_size", "16",
            "--test_subset", str(TEST_IMAGES), *SCRIPTS[setting][1]]


def torchrun(setting, save_dir, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(torchrun_command(setting, save_dir, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def rows(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as lines:
        return [json.loads(line) for line in lines]


def check_one_run(result, save_dir):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(os.listdir(save_dir)) == RUN_FILES
    recorded = rows(save_dir)
    keys = [(row["evaluation"], row["level"]) for row in recorded]
    assert len(keys) == len(set(keys)), "rows written by more than one process"
    final = [row for row in recorded if row["final"]]
    assert final and all(row["num_images"] == TEST_IMAGES for row in final)
    assert result.stdout.count("Final evaluation") == 1, "only rank 0 reports"
    checkpoint = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), weights_only=True)
    assert checkpoint["progress"]["finished"]
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    return final


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["unstructured_sparsity", "quantized"])
def test_torchrun_trains_and_records_once(tiny_cifar, tmp_path, setting):
    save_dir = tmp_path / "run"
    check_one_run(torchrun(setting, save_dir, *training_args(tiny_cifar, 1, setting)), save_dir)


EPOCHS = 4  # the uninterrupted run; the chain below stops it after each of its first three epochs
STEPS_PER_EPOCH = 5  # tiny_cifar's 80 training images in global batches of 16
CHAIN = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


@pytest.mark.slow
def test_torchrun_run_interrupted_by_each_signal_and_resumed_matches_the_uninterrupted_run(tiny_cifar, tmp_path):
    """One run stopped three times, each time by another signal sent to torchrun alone after an
    epoch (a scheduler's SIGTERM, a closed terminal's SIGHUP, the cluster's warning signal):
    torchrun passes it on to both processes (TORCHRUN_SIGNALS), which agree to stop, checkpoint
    and exit; each stop is resumed under torchrun. The final numbers and weights are those of
    the uninterrupted run only if every resume continued exactly where its stop left off."""
    setting = "structured_sparsity"
    args = training_args(tiny_cifar, EPOCHS, setting)
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = check_one_run(torchrun(setting, reference_dir, *args), reference_dir)

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for launch, signum in enumerate(CHAIN):
        command = torchrun_command(setting, resumed_dir, *(("--resume",) if launch else args))
        process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        output, signalled = [], False
        for line in process.stdout:
            output.append(line)
            # The first epoch this launch completes (each launch resumes where the last stopped).
            if not signalled and re.search(rf"epoch [1-{EPOCHS - 1}]/{EPOCHS} done", line):
                process.send_signal(signum)
                signalled = True
        status, text = process.wait(timeout=300), "".join(output)
        assert signalled and status != 0 and f"Interrupted by {signum.name}" in text, text[-3000:]
        progress = torch.load(resumed_dir / "checkpoint_last.pt", weights_only=True)["progress"]
        # Stopped at the end of, or a step after, the epoch it was signalled in: a later one each time
        assert not progress["finished"] and progress["global_step"] >= STEPS_PER_EPOCH * (launch + 1), \
            (signum.name, progress)

    resumed = check_one_run(torchrun(setting, resumed_dir, "--resume"), resumed_dir)
    assert [(r["level"], r["accuracy"]) for r in resumed] == [(r["level"], r["accuracy"]) for r in reference]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], abs=1e-6)
    final_weights = [torch.load(d / "model_final.pt", weights_only=True)["model"] for d in (reference_dir, resumed_dir)]
    for name, value in final_weights[0].items():
        assert torch.allclose(final_weights[1][name], value, atol=1e-6), name

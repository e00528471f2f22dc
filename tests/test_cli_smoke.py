"""A first end-to-end run of each script on tiny data (more in the per-setting test files)."""

import json
import os

import pytest


@pytest.mark.parametrize("script", ["train_structured.py", "train_unstructured.py", "train_quantized.py"])
def test_default_method_runs_and_writes_outputs(cli, tiny_cifar, tmp_path, script):
    save_dir = tmp_path / "run"
    result = cli(script, "--data_dir", tiny_cifar, "--epochs", "1", "--batch_size", "32", "--save_dir", save_dir)
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "metrics.jsonl", "results.csv", "accuracy_vs_compression.png",
                 "checkpoint_last.pt", "model_final.pt"):
        assert (save_dir / name).is_file(), name
    rows = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    final = [row for row in rows if row["final"]]
    assert final and all(0 <= row["accuracy"] <= 1 for row in final)
    assert all(row["num_images"] == 40 for row in final)
    assert {row["method"] for row in rows} == {"lcs_l"}
    assert os.path.getsize(save_dir / "accuracy_vs_compression.png") > 1000

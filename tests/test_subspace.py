"""The subspace artefact (deploy.subspace): one file, any level picked at run time.

Models are the perturbed checkpoints of test_export (norms, statistics and activation ranges
away from their initialisation), compared with the training-time model at the same level.
"""

import os

import pytest
import torch

from deploy import load_subspace, make_subspace, save_subspace
from utils import checkpoint as ckpt
from utils.errors import CheckpointError
from deploy.compressed import build_exported, export_model
from deploy.export import main
from test_export import inputs, make_checkpoint, training_time_logits

# Three levels for each setting and LEC; quantized LCS+L stores codes, target_bit_width floats.
SUBSPACE_CASES = [
    ("structured_sparsity", "lcs_l", (), (1.0, 0.6, 0.25)),
    ("structured_sparsity", "lec", ("--bn_calibration_images", "0"), (0.9, 0.6, 0.3)),
    ("unstructured_sparsity", "lcs_l", (), (1.0, 0.3, 0.05)),
    ("quantized", "lcs_l", (), (8, 5, 3)),
    ("quantized", "target_bit_width", (), (7, 5, 3)),
]


def case_id(case):
    return f"{case[0].split('_')[0]}-{case[1]}"


def alpha_of(trainer, level):
    """The alpha LCS+L evaluates `level` at (None for the other methods)."""
    points = [point for point in trainer.eval_points() if point.level == level]
    if points:
        return points[0].alpha
    return {"structured_sparsity": (level - 0.25) / 0.75, "unstructured_sparsity": level}.get(trainer.setting)


@pytest.mark.parametrize("setting,method,flags,levels", SUBSPACE_CASES, ids=[case_id(c) for c in SUBSPACE_CASES])
def test_subspace_round_trip_equals_training_time_model(tmp_path, setting, method, flags, levels):
    path, payload, model, trainer = make_checkpoint(tmp_path, setting, method, flags)
    out = str(tmp_path / "model.lcs.pt")
    save_subspace(out, make_subspace(ckpt.load(path), path))
    stored = torch.load(out, weights_only=True)
    assert "optimizer" not in stored and stored["format"] == "lcs-subspace"
    sub = load_subspace(out)
    assert sub.levels == [point.level for point in trainer.eval_points()]
    x = inputs()
    for level in levels:
        net = sub.at(level)
        assert not net.training
        with torch.no_grad():
            logits = net(x)
        alpha = alpha_of(trainer, level) if method == "lcs_l" else None
        expected = training_time_logits(model, trainer, level, alpha, x)
        assert (logits - expected).abs().max() <= 1e-5, level
    # Switching back gives the first level's logits again (nothing of the other levels is left).
    with torch.no_grad():
        again = sub.at(levels[0])(x)
    first = training_time_logits(model, trainer, levels[0], alpha_of(trainer, levels[0]) if method == "lcs_l"
                                 else None, x)
    assert (again - first).abs().max() <= 1e-5


def test_subspace_sizes(tmp_path):
    """Structured: about one float32 model (the line norms' second endpoints are small).
    Quantized LCS+L: codes for 3..8 bits (33 bits a weight) instead of two float endpoints."""
    sizes = {}
    for setting, method in (("structured_sparsity", "lcs_l"), ("quantized", "lcs_l"), ("quantized", "lcs_p")):
        path, *_ = make_checkpoint(tmp_path, setting, method)
        out = str(tmp_path / f"{setting}_{method}.lcs.pt")
        content = make_subspace(ckpt.load(path), path)
        save_subspace(out, content)
        sizes[setting, method] = os.path.getsize(out), content
    full = str(tmp_path / "full.pt")
    main(["--checkpoint", str(tmp_path / "structured_sparsity_lcs_l.pt"), "--level", "1.0", "--out", full])
    assert sizes["structured_sparsity", "lcs_l"][0] <= 1.05 * os.path.getsize(full)
    quantized_lcs_l = sizes["quantized", "lcs_l"][1]
    assert sorted(quantized_lcs_l["codes"]) == [3, 4, 5, 6, 7, 8]
    stored_names = quantized_lcs_l["weights"]["names"]
    assert "layer1.0.conv1.weight" not in stored_names and "layer1.0.conv1.weight1" not in stored_names
    assert sizes["quantized", "lcs_l"][0] < 0.6 * os.path.getsize(str(tmp_path / "quantized_lcs_l.pt"))
    assert sizes["quantized", "lcs_p"][1]["codes"] is None  # 33 bits of codes > 32 bits of float


@pytest.mark.parametrize("setting,method,level,message", [
    ("structured_sparsity", "us", 1.5, "width factors in [0.25, 1]"),
    ("quantized", "lcs_l", 9, "integer bit widths in 3..8"),
    ("unstructured_sparsity", "lcs_l", 0, "TopK fractions in (0, 1]"),
])
def test_subspace_levels_outside_the_range_are_one_line_errors(tmp_path, setting, method, level, message):
    path, *_ = make_checkpoint(tmp_path, setting, method)
    out = str(tmp_path / "model.lcs.pt")
    save_subspace(out, make_subspace(ckpt.load(path), path))
    with pytest.raises(Exception) as error:
        load_subspace(out).at(level)
    assert message in str(error.value) and out in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("method,levels", [("us", (0.75, 0.25)), ("lec", (0.9, 0.5))])
def test_calibrated_subspace_equals_the_calibrated_per_level_export(tmp_path, tiny_cifar, capsys, method, levels):
    """A run whose evaluations re-estimated BN statistics: the subspace stores them per level of
    the run's grid (computed from --data_dir at export) and gives those levels only."""
    flags = ("--data_dir", tiny_cifar, "--bn_calibration_images", "24", "--batch_size", "10", "--norm", "BN")
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", method, flags)
    out = str(tmp_path / "model.lcs.pt")
    with pytest.raises(SystemExit):
        main(["--checkpoint", path, "--subspace", "--out", out])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data_dir" in err and not os.path.exists(out)
    main(["--checkpoint", path, "--subspace", "--out", out, "--data_dir", tiny_cifar])
    assert "BN statistics re-estimated per level" in capsys.readouterr().out
    sub = load_subspace(out)
    x = inputs()
    payload = ckpt.load(path)
    for level in levels:
        expected = build_exported(export_model(payload, level, data_dir=tiny_cifar))
        with torch.no_grad():
            assert (sub.at(level)(x) - expected(x)).abs().max() <= 1e-5, level
    with pytest.raises(Exception) as error:
        sub.at(0.4 if method == "lec" else 0.3)
    message = str(error.value)
    held = ", ".join(f"{level:g}" for level in sub.levels)
    assert "is not stored" in message and f"levels {held} only" in message and "\n" not in message


def test_subspace_cli_and_bad_flags(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "model.lcs.pt"
    main(["--checkpoint", path, "--subspace", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "subspace with float weights" in printed and "levels 1, 0.875" in printed and out.is_file()
    assert load_subspace(str(out)).level_range == (0.25, 1.0)
    for argv in (["--subspace", "--level", "0.5"], [], ["--subspace", "--format", "onnx"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", path, "--out", str(tmp_path / "x.pt"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "--level" in err
    with pytest.raises(Exception, match="not this project's subspace artefact"):
        load_subspace(path)


def test_training_and_subspaces_need_no_onnx(tmp_path):
    """With onnx and onnxruntime unimportable, the training scripts and the subspace loader
    import and run, and --format onnx stops with a one-line error naming the requirements file."""
    import subprocess
    import sys

    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "model.lcs.pt"
    save_subspace(str(out), make_subspace(ckpt.load(path), path))
    code = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
            "import torch, train_structured, train_unstructured, train_quantized\n"
            "from deploy import load_subspace\n"
            f"print(load_subspace({str(out)!r}).at(0.5)(torch.zeros(1, 3, 32, 32)).shape)\n"
            "from deploy.export import main\n"
            f"main(['--checkpoint', {path!r}, '--level', '0.5', '--format', 'onnx', '--out', "
            f"{str(tmp_path / 'm.onnx')!r}])\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "torch.Size([1, 10])" in result.stdout
    assert result.stderr.count("\n") == 1 and "requirements-deploy.txt" in result.stderr, result.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def stored_subspace(tmp_path_factory):
    """(path, content) of a structured us subspace artefact, for damaging copies of it."""
    tmp_path = tmp_path_factory.mktemp("damaged")
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = str(tmp_path / "model.lcs.pt")
    save_subspace(out, make_subspace(ckpt.load(path), path))
    return out, torch.load(out, weights_only=True)


def damaged(content, key, value):
    """A copy of `content` with `key` set to `value`, or without `key` when `value` is DELETE."""
    copy = dict(content)
    if value is DELETE:
        del copy[key]
    else:
        copy[key] = value
    return copy


DELETE = object()
STORED_KEYS = ("config", "num_classes", "levels", "weights", "codes", "bn_statistics")


@pytest.mark.parametrize("key,value,message", [
    *[(key, DELETE, f"{key} is missing, expected") for key in STORED_KEYS],
    *[(key, "text", f"{key} is 'text', expected") for key in STORED_KEYS],
    ("num_classes", 0, "num_classes is 0, expected a positive number of classes"),
    ("levels", [], "levels is [], expected a non-empty list of levels"),
    ("config", {"setting": "quantized", "method": "magic"}, "its config names method 'magic' of setting quantized; "
                                                            "this project has lcs_l, lcs_p, target_bit_width"),
    ("config", {"setting": "pruned", "method": "us"}, "its config names setting 'pruned'; this project has"),
    ("num_classes", 7, "damaged subspace artefact (RuntimeError: "),
])
def test_a_damaged_subspace_is_one_line_naming_the_file(tmp_path, stored_subspace, key, value, message):
    _, content = stored_subspace
    path = str(tmp_path / "damaged.lcs.pt")
    torch.save(damaged(content, key, value), path)
    with pytest.raises(CheckpointError) as error:
        load_subspace(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_a_subspace_of_another_shape_is_one_line(tmp_path, stored_subspace):
    """Keys of the right types whose values do not fit together: weights cut short."""
    _, content = stored_subspace
    weights = dict(content["weights"], values=content["weights"]["values"][:100])
    path = str(tmp_path / "short.lcs.pt")
    torch.save(damaged(content, "weights", weights), path)
    with pytest.raises(CheckpointError, match=r"short\.lcs\.pt: damaged subspace artefact \(RuntimeError: "):
        load_subspace(path)


def test_check_images_with_a_pt_export_is_refused(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    for argv in (["--level", "0.5"], ["--subspace"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", path, "--out", str(tmp_path / "x.pt"), "--check_images", "100", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert "--check_images 100: checks ONNX exports only; give it with --format onnx" in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_load_subspace_works_outside_the_repository_after_pip_install_e(tmp_path, stored_subspace):
    """The documented way, `pip install -e .`, then `from deploy import load_subspace` in an
    application's own folder: a fresh virtual environment, a fresh process in a folder outside the
    repository, PYTHONPATH unset. Before the install the import fails there, as it did for users.

    The new environment sees this environment's packages (torch, and the setuptools that
    requirements.txt brings) through a .pth file, never the base interpreter's: `venv
    --system-site-packages` run from inside a venv would expose the *base* Python, whose packages
    differ from machine to machine (a fresh one has setuptools 65.5 and no wheel, which cannot
    build an editable install)."""
    import site
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    venv, app = tmp_path / "venv", tmp_path / "app"
    app.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300, env=env)
    [venv_site] = (venv / "lib").glob("python*/site-packages")
    (venv_site / "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = str(venv / "bin" / "python")
    code = ("import deploy, torch\nfrom deploy import load_subspace\n"
            f"model = load_subspace({stored_subspace[0]!r}).at(0.5)\n"
            "print(tuple(model(torch.zeros(1, 3, 32, 32)).shape), deploy.__file__)\n")

    def application():
        return subprocess.run([python, "-c", code], cwd=app, capture_output=True, text=True, timeout=300, env=env)
    before = application()
    assert before.returncode != 0 and "No module named 'deploy'" in before.stderr, before.stderr
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--no-index", "-e", repo],
                             capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr
    after = application()
    assert after.returncode == 0, after.stderr
    assert after.stdout.split()[:2] == ["(1,", "10)"]
    assert after.stdout.split()[2] == os.path.join(repo, "deploy", "__init__.py")

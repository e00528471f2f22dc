"""The subspace artefact (deploy.subspace): one file, any level picked at run time.

Models are the perturbed checkpoints of test_export (norms, statistics and activation ranges
away from their initialisation), compared with the training-time model at the same level.
"""

import copy as copy_module
import os
import re
import struct
import zipfile

import pytest
import torch

from deploy import load_subspace, make_subspace, save_subspace
from utils import checkpoint as ckpt
from utils.errors import CheckpointError, ConfigError
from deploy.compressed import build_exported, export_model
from deploy.packing import pack_tensors
from deploy.subspace_schema import checksum
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
    with pytest.raises(ConfigError) as error:
        load_subspace(out).at(level)
    text = str(error.value)
    assert text.startswith(f"{out}: at(level): level {level:g} is outside what this {setting}/{method} subspace "
                           f"gives: ") and message in text and "--level" not in text and "\n" not in text, text


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
    assert message.startswith(f"{out}: at(level): level ") and "is not stored" in message
    assert f"levels {held} only" in message and "\n" not in message


def test_subspace_cli_and_bad_flags(tmp_path, capsys):
    path, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    out = tmp_path / "model.lcs.pt"
    main(["--checkpoint", path, "--subspace", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "subspace with float weights" in printed and "levels 1, 0.875" in printed and out.is_file()
    assert load_subspace(str(out)).level_range == (0.25, 1.0)
    for argv in (["--subspace", "--level", "0.5"], [], ["--subspace", "--round_to", "8"]):
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


# A small artefact of each setting, for damaging copies of it (quantized LCS+L stores codes).
ARTEFACTS = {"structured": ("structured_sparsity", "us"), "unstructured": ("unstructured_sparsity", "lcs_l"),
             "quantized": ("quantized", "lcs_l")}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """{name: (path, content, checkpoint path)} of the ARTEFACTS."""
    made = {}
    for name, (setting, method) in ARTEFACTS.items():
        tmp_path = tmp_path_factory.mktemp(name)
        path, *_ = make_checkpoint(tmp_path, setting, method)
        out = str(tmp_path / "model.lcs.pt")
        save_subspace(out, make_subspace(ckpt.load(path), path))
        made[name] = out, torch.load(out, weights_only=True), path
    return made


@pytest.fixture(scope="module")
def stored_subspace(artefacts):
    """(path, content) of the structured us artefact."""
    return artefacts["structured"][:2]


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
    ("config", torch.zeros(2, 2), "config is tensor([[0., 0.], [0., 0.]]), expected the run's config"),
    ("levels", [], "levels is [], expected a non-empty list of levels"),
    ("config", {"setting": "quantized", "method": "magic"}, "its config names method 'magic' of setting quantized; "
                                                            "this project has lcs_l, lcs_p, target_bit_width"),
    ("config", {"setting": "pruned", "method": "us"}, "its config names setting 'pruned'; this project has"),
    ("num_classes", 7, "damaged subspace artefact: num_classes is 7, but the stored classifier has 10 outputs"),
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
    with pytest.raises(CheckpointError, match=r"short\.lcs\.pt: damaged subspace artefact: weights\.values holds "
                                              r"100 values, \d+ expected \(106 tensors of \d+ values\)$"):
        load_subspace(path)


# -- stored tensors checked at load, and their checksum ---------------------------------------
def flip_a_stored_byte(path):
    """Flip one bit in the middle of the largest tensor record of a torch.save zip file, as a
    disk or a copy might; torch.load does not check the zip's CRCs, so the file still loads."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)  # the local header's name and extra field lengths
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x10]))


def non_finite_weight(content):
    weights = content["weights"]
    weights["values"][0] = float("inf")
    return f"damaged subspace artefact: weights: non-finite values in {weights['names'][0]} (NaN or infinity)"


def truncated_codes(content):
    """The integer codes at 5 bits cut short (the weights where no codes are stored)."""
    if content["codes"]:
        group = content["codes"][5]
        size = len(group["codes"])
        group["codes"] = group["codes"][:-3]
        return (f"damaged subspace artefact: integer codes at 5 bits hold {size - 3} bytes, {size} expected "
                f"({len(group['names'])} convs of ")
    size = len(content["weights"]["values"])
    content["weights"]["values"] = content["weights"]["values"][:-3]
    return f"damaged subspace artefact: weights.values holds {size - 3} values, {size} expected"


def level_out_of_range(content):
    content["levels"].append(100.0)
    return "damaged subspace artefact: levels holds 100.0, outside this "


def level_not_a_number(content):
    content["levels"].append("0.5")
    return "damaged subspace artefact: levels is ["


def wrong_dtype(content):
    """int64 codes (float64 weights where no codes are stored)."""
    if content["codes"]:
        group = content["codes"][3]
        group["codes"] = group["codes"].long()
        return (f"damaged subspace artefact: codes[3].codes is a torch.int64 tensor of shape [{len(group['codes'])}], "
                f"expected a flat torch.uint8 tensor")
    content["weights"]["values"] = content["weights"]["values"].double()
    return "damaged subspace artefact: weights.values is a torch.float64 tensor of shape ["


def codes_of_other_bit_widths(content):
    """Quantized: the 8-bit codes left out; the others: codes stored at all."""
    if content["codes"]:
        del content["codes"][8]
        return "damaged subspace artefact: codes holds bit widths [3, 4, 5, 6, 7], expected 3..8"
    content["codes"] = {}
    return "damaged subspace artefact: codes is stored, but "


def statistics_of_another_run(content):
    """BN statistics per level in the file of a run that kept its running statistics."""
    content["bn_statistics"] = [pack_tensors({}) for _ in content["levels"]]
    return "damaged subspace artefact: bn_statistics is stored, but this "


def flipped_byte(content):
    return None  # the file is damaged on disk, after it was written


def missing_checksum(content):
    del content["checksum"]
    return "damaged subspace artefact: checksum is missing, expected a sha256 digest"


DAMAGES = [non_finite_weight, truncated_codes, level_out_of_range, level_not_a_number, wrong_dtype,
           codes_of_other_bit_widths, statistics_of_another_run, flipped_byte, missing_checksum]


@pytest.mark.parametrize("damage", DAMAGES, ids=[damage.__name__ for damage in DAMAGES])
@pytest.mark.parametrize("artefact", list(ARTEFACTS))
def test_damaged_stored_tensors_are_one_line_naming_the_file(tmp_path, artefacts, artefact, damage):
    """Each damage written as a program would write it (the checksum made anew over the damaged
    tensors, so that the check of the damage itself speaks), but the flipped byte, which only
    the checksum notices."""
    _, content, _ = artefacts[artefact]
    copy = copy_module.deepcopy(content)
    message = damage(copy)
    path = str(tmp_path / "damaged.lcs.pt")
    if damage is flipped_byte:
        save_subspace(path, {key: value for key, value in copy.items() if key != "checksum"})
        flip_a_stored_byte(path)
        assert torch.load(path, weights_only=True)["format"] == "lcs-subspace"
        message = "damaged (checksum mismatch): its stored tensors are not those written"
    else:
        if "checksum" in copy:
            copy["checksum"] = checksum(copy)
        torch.save(copy, path)
    with pytest.raises(CheckpointError) as error:
        load_subspace(path)
    text = str(error.value)
    assert type(error.value) is CheckpointError and text.startswith(f"{path}: {message}"), text
    assert "\n" not in text


@pytest.mark.parametrize("artefact", list(ARTEFACTS))
def test_an_undamaged_subspace_and_one_written_before_the_checksum_give_the_exported_logits(tmp_path, artefacts,
                                                                                            artefact):
    path, content, checkpoint = artefacts[artefact]
    assert content["version"] == 2 and content["checksum"] == checksum(content)
    older = str(tmp_path / "version1.lcs.pt")  # as written before the checksum: version 1, no checksum
    torch.save(dict({key: value for key, value in content.items() if key != "checksum"}, version=1), older)
    level = content["levels"][len(content["levels"]) // 2]
    expected = build_exported(export_model(ckpt.load(checkpoint), level))
    x = inputs()
    with torch.no_grad():
        for file in (path, older):
            assert (load_subspace(file).at(level)(x) - expected(x)).abs().max() <= 1e-5, file


@pytest.mark.parametrize("value,message", [
    ("scales", "the scale of layer1.0.conv1.weight is -0.5, expected a positive finite number"),
    ("zero_points", "the zero point of layer1.0.conv1.weight is 200, expected an integer in -16..15"),
])
def test_bad_scales_and_zero_points_are_one_line(tmp_path, artefacts, value, message):
    _, content, _ = artefacts["quantized"]
    copy = copy_module.deepcopy(content)
    group = copy["codes"][5]
    assert group["names"][0] == "layer1.0.conv1.weight"
    group[value][0] = -0.5 if value == "scales" else 200
    copy["checksum"] = checksum(copy)
    path = str(tmp_path / "damaged.lcs.pt")
    torch.save(copy, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: damaged subspace artefact: codes\[5\]: "
                                              rf"{re.escape(message)}$"):
        load_subspace(path)


@pytest.mark.parametrize("level,message", [
    ("0.5", "level must be a number, got '0.5' (a str)"),
    (None, "level must be a number, got None (a NoneType)"),
    (True, "level must be a number, got True (a bool)"),
    (torch.tensor(0.5), "level must be a number, got tensor(0.5000) (a Tensor)"),
    (float("nan"), "level nan is outside what this "),
    (float("inf"), "level inf is outside what this "),
])
@pytest.mark.parametrize("artefact", list(ARTEFACTS))
def test_a_level_of_the_wrong_type_is_one_line(artefacts, artefact, level, message):
    path, content, _ = artefacts[artefact]
    setting, method = ARTEFACTS[artefact]
    with pytest.raises(ConfigError) as error:
        load_subspace(path).at(level)
    text = str(error.value)
    assert type(error.value) is ConfigError and text.startswith(f"{path}: at(level): {message}"), text
    assert f"{setting}/{method} subspace gives" in text and "--level" not in text and "\n" not in text


def test_a_checkpoint_with_non_finite_weights_is_not_written_as_a_subspace(tmp_path):
    path, payload, *_ = make_checkpoint(tmp_path, "structured_sparsity", "us")
    payload = ckpt.load(path)
    payload["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite weights in conv1\.weight"):
        make_subspace(payload, path)


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

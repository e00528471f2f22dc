"""A new export format is one module and one registry line (deploy/formats/): a format defined
here, registered for this test only, exports, loads and round-trips through the library and
the command line without touching any other module; its ONNX form (hooks in this module)
rewrites the traced graph, judges it and adds its note."""

import os

import pytest
import torch

from deploy.compressed import export_model, load_exported, save_export
from deploy.export import main
from deploy.formats import FORMATS, register
from deploy.formats.base import ExportFormat, OnnxForm
from deploy.state import effective_state
from methods import METHODS
from models import build_model
from models.factory import dense_factory
from test_export import inputs, make_checkpoint, training_time_logits


def export_half(model, method, num_classes, level, round_to):
    """The dense network at the level, its conv weights stored in float16."""
    config = method.config
    dense = build_model(config.model, dense_factory(config.norm, method.norm_groups(config)), num_classes)
    state = effective_state(model)
    convs = [key for key, value in state.items() if key.endswith(".weight") and value.dim() == 4]
    return dense, state, {"half": {key: state.pop(key).half() for key in convs}, "format_name": "half"}


def decode_half(content):
    return {key: value.float() for key, value in content["half"].items()}


def describe_half(content):
    return [f"{len(content['half'])} convs stored in float16"]


# The ONNX form's hooks (OnnxForm names this module): the float network, its graph marked.
JUDGED = []


def prepare(model, content):
    return model


def traceable(model, content):
    return model


def rewrite(graph, content):
    graph.metadata_props.add(key="format", value=content["format_name"])


def judge(path, model, content, images, result):
    JUDGED.append((path, len(images)))
    return None  # the float rule


def describe(result, model_text):
    return None


def reports_kernels(content):
    return False


HALF_NOTE = "ONNX holds the float16 weights as float32"
# float16 weights: a lossy format, so deploy.export allows its logits 5 % of the largest from the model's.
HALF = ExportFormat("half", export_half, decode=decode_half, describe=describe_half,
                    onnx=OnnxForm(module=__name__, note=HALF_NOTE), check_tolerance=0.05)


@pytest.fixture
def half_format(monkeypatch):
    """The format registered, and unstructured target_topk exporting with it, for this test only."""
    monkeypatch.setitem(FORMATS, "half", None)  # restored (removed) after the test
    register(HALF)
    monkeypatch.setattr(METHODS["unstructured_sparsity"]["target_topk"], "export_format", "half")
    return HALF


def test_a_new_export_format_plugs_in(half_format, tmp_path, capsys):
    assert FORMATS["half"] is HALF
    path, payload, model, trainer = make_checkpoint(tmp_path, "unstructured_sparsity", "target_topk")
    level = trainer.level_range(trainer.config).high
    content = export_model(payload, level)
    assert set(content["half"]) and all(value.dtype == torch.float16 for value in content["half"].values())
    out = str(tmp_path / "half.pt")
    save_export(out, content)
    loaded = load_exported(out)
    state = loaded.state_dict()
    assert all(torch.equal(state[key], value.float()) for key, value in content["half"].items())
    x = inputs()
    with torch.no_grad():
        logits = loaded(x)
    expected = training_time_logits(model, trainer, level, None, x)
    assert torch.allclose(logits, expected, atol=0.05, rtol=0.05), (logits - expected).abs().max()
    # the command line writes and describes it through the format
    main(["--checkpoint", path, "--level", f"{level:g}", "--out", str(tmp_path / "cli.pt")])
    printed = capsys.readouterr().out
    assert f"{len(content['half'])} convs stored in float16" in printed and os.path.isfile(tmp_path / "cli.pt")


def test_a_new_export_format_brings_its_onnx_form(half_format, tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -r requirements-deploy.txt)")
    path, payload, _, trainer = make_checkpoint(tmp_path, "unstructured_sparsity", "target_topk")
    out = tmp_path / "half.onnx"
    JUDGED.clear()
    main(["--checkpoint", path, "--level", f"{trainer.level_range(trainer.config).high:g}", "--format", "onnx",
          "--out", str(out), "--check_images", "8"])
    printed = capsys.readouterr().out
    assert HALF_NOTE in printed and "ONNX stores no sparse weights" not in printed, printed
    assert {(prop.key, prop.value) for prop in onnx.load(str(out)).metadata_props} >= {("format", "half")}
    assert [count for _, count in JUDGED] == [8]


def test_every_method_names_a_registered_format():
    for setting, methods in METHODS.items():
        for name, cls in methods.items():
            assert FORMATS.get(cls.export_format) is not None, (setting, name, cls.export_format)

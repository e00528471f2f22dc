"""Every Python snippet of the documentation runs as written.

Each fenced ```python block of docs/*.md and README.md is executed on its own, in a folder that
holds tiny artefacts under the file names the snippets use (the placeholders below), exported
from a perturbed structured `us` checkpoint (test_export.make_checkpoint):

    model.lcs.pt    python -m deploy.export --subspace
    model_w050.pt   python -m deploy.export --level 0.5
    model.onnx      python -m deploy.export --level 0.5 --format onnx
    model.lcs.onnx  python -m deploy.export --subspace --format onnx --levels 1.0,0.5,0.25

A snippet that names another file, or needs a name it does not define, fails here: write it so
that it runs, or add its file to ARTEFACTS.
"""

import os
import re

import pytest

from deploy.export import main
from test_export import make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(REPO, "docs"))) if name.endswith(".md")]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
ARTEFACTS = {"model.lcs.pt": ["--subspace"], "model_w050.pt": ["--level", "0.5"],
             "model.onnx": ["--level", "0.5", "--format", "onnx", "--check_images", "8"],
             "model.lcs.onnx": ["--subspace", "--format", "onnx", "--levels", "1.0,0.5,0.25", "--check_images", "8"]}


def snippets():
    """[(file:line, code)] of every ```python block."""
    found = []
    for name in DOCS + ["README.md"]:
        text = open(os.path.join(REPO, name), encoding="utf-8").read()
        for match in BLOCK.finditer(text):
            found.append((f"{name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
    return found


SNIPPETS = snippets()


def test_the_docs_have_snippets():
    assert len(SNIPPETS) >= 4 and any("load_exported" in code for _, code in SNIPPETS)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snippets")
    path, *_ = make_checkpoint(folder, "structured_sparsity", "us")
    for name, argv in ARTEFACTS.items():
        if name.endswith(".onnx") and not onnx_available():
            continue
        main(["--checkpoint", path, "--out", str(folder / name), *argv])
    return folder


def onnx_available():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("where,code", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_snippet_runs(artefacts, monkeypatch, where, code):
    if "onnxruntime" in code and not onnx_available():
        pytest.skip("needs onnx and onnxruntime (pip install -r requirements-deploy.txt)")
    monkeypatch.chdir(artefacts)
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})

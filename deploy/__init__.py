"""Deployment: the subspace artefact (one file, any level at run time) and ONNX export.

Only torch and the project's model code are needed to load a subspace; onnx and onnxruntime
(requirements-deploy.txt) are imported by deploy.onnx_export (and deploy.onnx_subspace, built on
it) and the ONNX form it loads for quantized exports (deploy/formats/int_codes_onnx.py) alone,
when they run.
"""

__all__ = ["Subspace", "load_subspace", "make_subspace", "save_subspace"]


def __getattr__(name):
    """The names of deploy.subspace, imported on first use: `python -m deploy.export` imports this
    package first, and checks its command before torch is imported."""
    if name not in __all__:
        raise AttributeError(f"module 'deploy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module("deploy.subspace"), name)

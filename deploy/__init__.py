"""Deployment: the subspace artefact (one file, any level at run time) and ONNX export.

Only torch and the project's model code are needed to load a subspace; onnx and onnxruntime
(requirements-deploy.txt) are imported by deploy.onnx_export alone, when it runs.
"""

from deploy.subspace import Subspace, load_subspace, make_subspace, save_subspace

__all__ = ["Subspace", "load_subspace", "make_subspace", "save_subspace"]

"""Deployment: the subspace artefact (one file, any level at run time) and ONNX export.

Only torch and the project's model code are needed to load a subspace; onnx and onnxruntime
(requirements-deploy.txt) are imported by deploy.onnx_export and the ONNX form it loads for
quantized exports (deploy/formats/int_codes_onnx.py) alone, when they run.
"""

from deploy.subspace import Subspace, load_subspace, make_subspace, save_subspace

__all__ = ["Subspace", "load_subspace", "make_subspace", "save_subspace"]

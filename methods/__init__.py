"""Registry of training methods, per setting."""

from methods.lcs_l import LcsLQuantized, LcsLStructured, LcsLUnstructured
from methods.lcs_p import LcsPQuantized, LcsPStructured, LcsPUnstructured
from methods.lec import LEC
from methods.ns import NS
from methods.target_bit_width import TargetBitWidth
from methods.target_topk import TargetTopK
from methods.us import US

METHODS = {
    "structured_sparsity": {"lcs_l": LcsLStructured, "lcs_p": LcsPStructured, "us": US, "ns": NS, "lec": LEC},
    "unstructured_sparsity": {"lcs_l": LcsLUnstructured, "lcs_p": LcsPUnstructured, "target_topk": TargetTopK},
    "quantized": {"lcs_l": LcsLQuantized, "lcs_p": LcsPQuantized, "target_bit_width": TargetBitWidth},
}

SETTINGS = tuple(METHODS)


def method_class(setting, name):
    return METHODS[setting][name]

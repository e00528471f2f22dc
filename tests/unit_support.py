"""Helpers shared by the unit-test files (tiny tensors, tiny models)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: more intra-op threads only add overhead (and stall on a busy machine).
    A test module uses it by importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(values):
    """A float32 tensor from nested lists of numbers."""
    return torch.tensor(values, dtype=torch.float32)

"""Test configuration: every test runs in float64 with a fixed seed, on one intra-op thread.

One thread: the tests use many tiny tensors, for which intra-op threading only adds contention on the
2-core CI machine.
"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)

"""Test configuration: every test runs in float64 with a fixed seed, on one intra-op thread.

One thread: the tests use many tiny tensors, for which intra-op threading only adds contention on the
2-core CI machine.

Device: the suite runs on the CPU by default (CI). To run it on an accelerator::

    PYRO_CPA_TEST_DEVICE=cuda python -m pytest            # or: python -m pytest --device cuda

which calls ``torch.set_default_device`` for the session, so the tensors and modules the tests create (and
therefore the decoders, params and data they pass to pyro_cpa) live on that device. Tests that need the
device by name take the ``device`` fixture (``torch.device``, ``cpu`` unless set). Tests that are
CPU-specific by nature (numpy/SciPy references fed straight from tensors, CPU timing or memory figures)
carry ``@pytest.mark.cpu_only`` and are skipped on another device. An unavailable device is a usage error,
not a silent fallback to the CPU.
"""
import os

import pytest
import torch

torch.set_num_threads(1)

DEVICE_ENV = "PYRO_CPA_TEST_DEVICE"
_DEVICE = pytest.StashKey[torch.device]()


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help=f"torch device the suite runs on (default: ${DEVICE_ENV}, else cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: CPU-specific test, skipped when the suite runs on another device")
    name = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    try:
        dev = torch.device(name)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for "CUDA not compiled"
        raise pytest.UsageError(f"test device {name!r} (from --device or ${DEVICE_ENV}) is not usable: {e}")
    config.stash[_DEVICE] = dev
    if dev.type != "cpu":
        torch.set_default_device(dev)


def pytest_collection_modifyitems(config, items):
    dev = config.stash[_DEVICE]
    if dev.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"CPU-specific test; the suite runs on {dev}")
    for item in items:
        if "cpu_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the suite runs on (``--device`` / ``$PYRO_CPA_TEST_DEVICE``, default cpu)."""
    return pytestconfig.stash[_DEVICE]


@pytest.fixture(autouse=True)
def _float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)

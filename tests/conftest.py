"""Shared test setup: which backends to check, and the Triton interpreter on CPU-only machines."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when kernels are decorated, so it must be set before flatfused.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flatfused import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs():
    """(backend, device) for every concrete backend that can run here."""
    pairs = []
    for device in DEVICES:
        for name in backends.available(device):
            pairs.append((name, device))
    return pairs


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test of more than a few seconds (the integration layer, whole "
                   "trainings, compilers); the fast suite is `-m \"not slow\"`")


def pytest_collection_modifyitems(config, items):
    """The integration layer runs real frameworks and processes: slow by construction."""
    for item in items:
        if item.path.parent.name == "integration":
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return "flatfused backends: " + ", ".join(f"{b}@{d}" for b, d in backend_device_pairs())


@pytest.fixture(autouse=True)
def fresh_warn_once():
    """flatfused warns once per process (flat.warn_once): each test starts as a fresh process
    would, so that what a test sees does not depend on which tests ran before it."""
    from flatfused import flat

    saved = set(flat._warned)
    flat._warned.clear()
    yield
    flat._warned.clear()
    flat._warned.update(saved)


@pytest.fixture(params=backend_device_pairs(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of tiny ops: more only add synchronisation (and spin
    badly on a loaded machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["copy", "handover"])
def three_call_mode(request, monkeypatch):
    """NSO's three-call API with the gradient buffer copied into the accumulator, or handed over
    as the accumulator (which pays only for large parameters: forced here on small models)."""
    if request.param == "handover":
        import flatfused.optim.nso_accumulator as nso

        monkeypatch.setattr(nso, "_HANDOVER_MIN_ELEMENTS_PER_PARAM", 0)
        monkeypatch.setattr(nso, "_HANDOVER_MIN_ELEMENTS_PER_PARAM_GPU", 0)
    return request.param


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed at the end, where -q still shows it (pytest-randomly prints it
    only in the header)."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"tests ran in random order: --randomly-seed={seed} repeats it")

"""Shared fixtures: which backends run, on which devices, and the reference probe.

Every backend that can run here is held against the same oracle (tests/reference.py: the
op from its definition, and fastfuse.paper, the unfused SPEC §1 probe, in float64). Without a GPU the Triton kernels run on CPU
tensors through the Triton interpreter, so TRITON_INTERPRET=1 is set before triton loads.
FASTFUSE_REQUIRE_BACKENDS (comma separated; the README's test command sets it) turns an
unavailable backend from a skip into a failure, so CI cannot go green by skipping a backend.
"""
import os

import torch

if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fastfuse

REQUIRED = [name for name in os.environ.get("FASTFUSE_REQUIRE_BACKENDS", "").split(",") if name]


def backend_cases():
    """(backend, device) pairs: every registered backend on every device it serves here."""
    report = fastfuse.backends()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = []
    for name, entry in report.items():
        for device in devices:
            if device not in entry["devices"]:
                continue
            # A required backend that is unavailable stops the session (pytest_sessionstart).
            marks = [] if entry["available"] else [
                pytest.mark.skip(reason=f"backend {name} unavailable: {entry['reason']}")]
            cases.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return cases


def pytest_sessionstart(session):
    report = fastfuse.backends()
    missing = [f"{name}: {report.get(name, {}).get('reason', 'not registered')}"
               for name in REQUIRED if not report.get(name, {}).get("available")]
    if missing:
        raise pytest.UsageError("FASTFUSE_REQUIRE_BACKENDS names unavailable backends: " + "; ".join(missing))


def pytest_report_header(config):
    lines = []
    for name, entry in fastfuse.backends().items():
        lines.append(f"fastfuse backend {name}: {'available' if entry['available'] else 'UNAVAILABLE'} ({entry['reason']})")
    return lines


@pytest.fixture(params=backend_cases())
def backend_device(request):
    return request.param


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny problems: more threads only add scheduling noise);
    used by ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

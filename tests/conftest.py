"""Shared fixtures: the ``xp`` fixture runs a test on NumPy, and on CuPy when a GPU exists."""

from __future__ import annotations

import pytest

from stemgpu.backend import available_backends

GPU_AVAILABLE = available_backends()["cupy"] == "available"
BACKENDS = ["numpy"] + (["cupy"] if GPU_AVAILABLE else [])


def pytest_collection_modifyitems(config, items):
    if GPU_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy (none usable here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Backend name: 'numpy' always, 'cupy' when a device is usable."""
    return request.param


@pytest.fixture
def xp(backend):
    """The array namespace of the ``backend`` fixture."""
    from stemgpu.backend import resolve_backend

    return resolve_backend(backend).xp


@pytest.fixture(autouse=True)
def _reset_backend_state():
    """Each test starts with no global backend choice."""
    import stemgpu

    stemgpu.set_backend(None)
    yield
    stemgpu.set_backend(None)

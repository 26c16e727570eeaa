"""Shared fixtures: the ``xp`` fixture runs a test on NumPy, and on CuPy when a GPU exists."""

from __future__ import annotations

import os

import pytest
from cupy_standin.autoenable import pytest_plugins  # noqa: F401 - CuPy stand-in without a GPU

from stemgpu.backend import available_backends

GPU_AVAILABLE = available_backends()["cupy"] == "available"
BACKENDS = ["numpy"] + (["cupy"] if GPU_AVAILABLE else [])


def pytest_configure(config):
    # On a GPU machine the tests not marked ``gpu`` are NumPy tests (they compare with NumPy
    # arrays): a session-wide default keeps "auto" from sending them, and the module-scoped
    # fixtures they use, to CuPy. GPU tests lift it (see _reset_backend_state).
    if GPU_AVAILABLE:
        os.environ.setdefault("STEMGPU_BACKEND", "numpy")


def pytest_collection_modifyitems(config, items):
    # A test run on the CuPy backend (the ``backend`` fixture's "cupy" case) is a GPU test:
    # ``pytest -m gpu`` selects it.
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "cupy":
            item.add_marker(pytest.mark.gpu)
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
def _reset_backend_state(request, monkeypatch):
    """Each test starts with no global backend choice; GPU tests without the session's
    NumPy default of a GPU machine (see pytest_configure)."""
    import stemgpu

    if GPU_AVAILABLE and "gpu" in request.node.keywords:
        monkeypatch.delenv("STEMGPU_BACKEND", raising=False)
    stemgpu.set_backend(None)
    yield
    stemgpu.set_backend(None)

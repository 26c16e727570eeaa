"""pytest plugin of the CuPy stand-in: a header line, a ``standin`` marker on every test that
runs on it, fresh transfer counters per test."""

from __future__ import annotations

import pytest

from . import _api, active, reset_counts


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standin: ran on the strict CuPy stand-in (tests/cupy_standin), not a GPU")


def pytest_report_header(config):
    if active():
        return (f"cupy: strict stand-in (NumPy on the CPU, CuPy {_api.version()} API list, "
                "kernels on the nvcc host build); gpu-marked tests run on it")
    return "cupy: real CuPy when a GPU is usable (stand-in off)"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not active():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.standin)


@pytest.fixture(autouse=True)
def _standin_counters():
    reset_counts()
    yield

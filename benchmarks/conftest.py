"""Shared benchmark fixtures: backends present on this machine and the size switch."""

from __future__ import annotations

import os

import pytest

from stemgpu.backend import available_backends, resolve_backend

FULL = os.environ.get("STEMGPU_BENCH_FULL") == "1"
BACKENDS = ["numpy"] + (["cupy"] if available_backends()["cupy"] == "available" else [])


@pytest.fixture(params=BACKENDS)
def bench_backend(request):
    """A stemgpu Backend (NumPy always, CuPy when a device is usable)."""
    return resolve_backend(request.param)


def sync_call(be, func, *args, **kwargs):
    """Call and wait for the device, so GPU timings include the work, not just the launch."""
    out = func(*args, **kwargs)
    be.synchronize()
    return out

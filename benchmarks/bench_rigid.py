"""Rigid registration: stemgpu (batched, NumPy/CuPy) vs scikit-image's per-frame loop.

Run ``python -m pytest benchmarks/bench_rigid.py --benchmark-only`` (default: 10 x 512 x 512,
a few minutes on a 2-core CPU); ``STEMGPU_BENCH_FULL=1`` adds 50 x 1024 x 1024.

scikit-image is run with its best setting on lattice images (plain cross-correlation,
``normalization=None``, Hann window, ``upsample_factor=100``) against the middle frame. Two
like-for-like pairs are timed on the same stack, each with its RMS error against the
simulator's exact offsets in ``extra_info``:

* ``stemgpu-<backend>`` (default call: mean reference, registered stack and mean image) vs
  ``skimage+fourier_shift`` (shifts, then ``scipy.ndimage.fourier_shift`` of every frame);
* ``stemgpu-<backend>-frame`` (``reference=`` the middle frame, shifts only) vs ``skimage``.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.registration.rigid import register_rigid
from stemgpu.synthetic import simulate_stack

from .conftest import FULL, sync_call

SIZES = [(10, 512, 512)] + ([(50, 1024, 1024)] if FULL else [])
PIXEL_PM = 14.6
ROUNDS = 3


def _case(shape):
    return "x".join(str(s) for s in shape)


@pytest.fixture(scope="module", params=SIZES, ids=_case)
def lattice_stack(request):
    shape = request.param
    stack, truth = simulate_stack(shape, pixel_size_pm=PIXEL_PM, dose=200.0,
                                  frame_jitter_px=0.7, drift_px=(0.25, -0.15), seed=1)
    return stack, truth


def _errors(shifts, truth):
    err = np.asarray(shifts) - truth.registration_shifts("mean")
    err -= err.mean(axis=0)
    return float(np.sqrt((err**2).sum(axis=1).mean())), float(np.abs(err).max())


def _record(benchmark, impl, stack, shifts, truth, device):
    rms, worst = _errors(shifts, truth)
    benchmark.extra_info.update({"impl": impl, "case": _case(stack.shape), "rms_px": rms,
                                 "max_error_px": worst, "device": device})


@pytest.mark.benchmark(group="rigid")
def test_stemgpu_mean_reference(benchmark, bench_backend, lattice_stack):
    stack, truth = lattice_stack
    be = bench_backend
    data = be.asarray(stack)
    res = benchmark.pedantic(sync_call, args=(be, register_rigid, data),
                             kwargs={"backend": be}, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"stemgpu-{be.name}", stack, res.shifts, truth, be.device_name)


@pytest.mark.benchmark(group="rigid")
def test_stemgpu_frame_reference(benchmark, bench_backend, lattice_stack):
    stack, truth = lattice_stack
    be = bench_backend
    data = be.asarray(stack)
    kwargs = {"backend": be, "reference": stack.shape[0] // 2, "keep_registered": False}
    res = benchmark.pedantic(sync_call, args=(be, register_rigid, data), kwargs=kwargs,
                             rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"stemgpu-{be.name}-frame", stack, res.shifts, truth, be.device_name)


def _skimage_loop(stack, register_frames):
    from scipy import fft, ndimage
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation

    win = window("hann", stack.shape[1:])
    ref = stack[stack.shape[0] // 2] * win
    shifts = np.array([
        phase_cross_correlation(ref, frame * win, upsample_factor=100, normalization=None)[0]
        for frame in stack
    ])
    if register_frames:
        registered = np.stack([
            fft.ifft2(ndimage.fourier_shift(fft.fft2(frame), s)).real.astype(np.float32)
            for frame, s in zip(stack, shifts, strict=True)
        ])
        return shifts, registered, registered.mean(axis=0)
    return shifts, None, None


@pytest.mark.benchmark(group="rigid")
@pytest.mark.parametrize("register_frames", [False, True], ids=["shifts", "registered"])
def test_skimage_per_frame(benchmark, lattice_stack, register_frames):
    pytest.importorskip("skimage")
    stack, truth = lattice_stack
    shifts, _, _ = benchmark.pedantic(_skimage_loop, args=(stack, register_frames),
                                      rounds=ROUNDS, warmup_rounds=1)
    impl = "skimage+fourier_shift" if register_frames else "skimage"
    _record(benchmark, impl, stack, shifts, truth, "CPU")

"""Atom fitting: stemgpu's batched LM (NumPy/CuPy) vs a per-atom scipy least_squares loop.

Run ``python -m pytest benchmarks/bench_fit.py --benchmark-only`` (default: 10^4 columns,
19 frames of 512 x 512 with 529 isolated columns each); ``STEMGPU_BENCH_FULL=1`` adds 10^5
(190 frames). The SciPy loop (one ``least_squares`` per column, analytic Jacobian, same
window and model, Poisson weights) is timed on the first ``SCIPY_SUBSET`` columns and its
time is *scaled per fit* to the full count; ``extra_info`` carries fits/s and the RMS
position error against the simulator's truth for both.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from stemgpu.atoms.fit import fit_atoms
from stemgpu.synthetic import simulate_stack

from .conftest import FULL, sync_call

SIZES = [10_000] + ([100_000] if FULL else [])
PER_FRAME = 529  # 23 x 23 columns (margin 10 px) of a 300 pm square lattice, 512 x 512
SCIPY_SUBSET = 300


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}cols")
def columns(request):
    frames = -(-request.param // PER_FRAME)
    stack, truth = simulate_stack((frames, 512, 512), lattice="square",
                                  lattice_parameter_pm=300.0, dose=200.0, seed=2,
                                  origin_px=(8.0, 8.0))
    pos = truth.image_positions(0)
    keep = truth.visible(0, margin=10)
    pos = pos[keep][:PER_FRAME]
    return stack, truth, pos


def _rms(fit_pos, true_pos):
    ok = np.isfinite(fit_pos).all(axis=-1)
    return float(np.sqrt(np.mean((fit_pos[ok] - true_pos[ok]) ** 2)))


@pytest.mark.benchmark(group="fit")
def test_stemgpu_batched(benchmark, bench_backend, columns):
    stack, truth, pos = columns
    start = pos + 0.3
    data = bench_backend.asarray(stack)
    out = benchmark.pedantic(
        sync_call, args=(bench_backend, fit_atoms, data, start),
        kwargs={"sigma": truth.probe_sigma_px, "neighbours": "none", "counts_per_unit": 1.0,
                "backend": bench_backend.name},
        rounds=1, iterations=1)
    fit = out.to_numpy()
    n = fit.status.size
    benchmark.extra_info.update({
        "impl": f"stemgpu-{bench_backend.name}", "case": f"{n} columns",
        "columns": n, "device": bench_backend.device_name,
        "fits_per_s": n / benchmark.stats.stats.mean,
        "rms_px": _rms(fit.positions, np.broadcast_to(pos, fit.positions.shape)),
        "converged": float(fit.converged.mean()),
    })


def _scipy_fit(win, origin, p0):
    from scipy.optimize import least_squares

    k = win.shape[0]
    yy, xx = np.mgrid[0:k, 0:k].astype(float)
    y, x, d = yy.ravel() + origin[0], xx.ravel() + origin[1], win.ravel().astype(float)
    w = 1.0 / np.sqrt(np.maximum(d, 1.0))

    def res(p):
        a, r, c, s, b = p
        return (a * np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * s * s)) + b - d) * w

    def jac(p):
        a, r, c, s, b = p
        g = np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * s * s))
        q = ((y - r) ** 2 + (x - c) ** 2) / s**2
        return np.stack([g, a * g * (y - r) / s**2, a * g * (x - c) / s**2, a * g * q / s,
                         np.ones_like(g)], axis=1) * w[:, None]

    return least_squares(res, p0, jac=jac, method="lm").x


@pytest.mark.benchmark(group="fit")
def test_scipy_least_squares_loop(benchmark, columns):
    stack, truth, pos = columns
    frames = stack.shape[0]
    s = truth.probe_sigma_px
    k = 2 * int(np.ceil(2.5 * s)) + 1
    jobs = []
    for i in range(SCIPY_SUBSET):
        f, n = divmod(i, len(pos))
        p = pos[n] + 0.3
        o = np.rint(p).astype(int) - k // 2
        win = stack[f % frames, o[0]:o[0] + k, o[1]:o[1] + k]
        jobs.append((win, o, [float(win.max() - np.median(win)), p[0], p[1], s,
                              float(np.median(win))]))

    def loop():
        return np.array([_scipy_fit(*j) for j in jobs])

    t0 = time.perf_counter()
    out = benchmark.pedantic(loop, rounds=1, iterations=1)
    per_fit = (time.perf_counter() - t0) / SCIPY_SUBSET
    true = np.array([pos[i % len(pos)] for i in range(SCIPY_SUBSET)])
    total = stack.shape[0] * len(pos)
    benchmark.extra_info.update({
        "impl": "scipy-loop", "case": f"{total} columns",
        "columns_timed": SCIPY_SUBSET, "columns_scaled_to": total,
        "scaled_total_s": per_fit * total, "fits_per_s": 1.0 / per_fit,
        "rms_px": _rms(out[:, 1:3], true), "device": "CPU (scipy, 1 thread per loop)",
    })

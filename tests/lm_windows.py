"""Fit problems shared by the kernel tests (host build and device): windows of a simulated
SrTiO3 stack around known columns, with perturbed starting values. NumPy and the simulator
only, so the GPU tests stay free of sidpy / pyNSID."""

from __future__ import annotations

import os

import numpy as np

from stemgpu.atoms.windows import extract_windows
from stemgpu.synthetic import simulate_stack

K = 13  # window side; probe sigma 50 pm / 14.6 pm = 3.4 px


def draw_seed() -> int:
    """A fresh seed per run, or ``$STEMGPU_TEST_SEED`` to replay a failing draw (print the
    seed in the failure message)."""
    env = os.environ.get("STEMGPU_TEST_SEED")
    return int(env) if env else int(np.random.SeedSequence().entropy % 2**32)


def window_problem(seed, model="gaussian", *, dose=200.0, frames=2, size=96,
                   species=("Sr", "TiO", "O"), width_spread=0.2, random_angle=True):
    """``(stack, frame index, origins, windows, init)`` for the columns of ``species``.

    Starts are the true positions +-0.5 px; widths the probe's times U(1 - spread,
    1 + spread); elliptical angles U(-0.5, 0.5) rad when ``random_angle`` (else 0). O columns
    in a plain window share it with Sr / TiO neighbours, so many of their fits end degenerate
    (width at its bound, Fisher information singular to rounding); ``species=("Sr", "TiO")``
    gives well-posed problems only.
    """
    stack, truth = simulate_stack((frames, size, size), seed=seed, dose=dose,
                                  frame_jitter_px=0.3)
    rng = np.random.default_rng(seed + 1)
    pos = truth.image_positions()[:, np.isin(truth.species, species)]  # (F, N, 2)
    f_idx = np.repeat(np.arange(frames), pos.shape[1])
    pos = pos.reshape(-1, 2)
    origins = np.rint(pos).astype(np.int64) - K // 2
    inside = ((origins >= 0) & (origins + K <= size)).all(axis=1)
    f_idx, pos, origins = f_idx[inside], pos[inside], origins[inside]
    wins = extract_windows(stack, f_idx, origins, K, np)
    lo = wins.min(axis=(1, 2))
    amp = wins.max(axis=(1, 2)) - lo
    start = pos + rng.uniform(-0.5, 0.5, pos.shape)
    sig = np.full(len(pos), 50.0 / 14.6)
    if width_spread:
        sig = sig * rng.uniform(1.0 - width_spread, 1.0 + width_spread, len(pos))
    if model == "gaussian":
        init = np.column_stack([amp, start, sig, np.maximum(lo, 1.0)])
    else:
        ang = rng.uniform(-0.5, 0.5, len(pos)) if random_angle else np.zeros(len(pos))
        init = np.column_stack([amp, start, sig * 1.05, sig / 1.05, ang, np.maximum(lo, 1.0)])
    return stack, f_idx, origins, wins, init

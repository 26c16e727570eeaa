"""Non-rigid registration: stemgpu batched demons (NumPy/CuPy) vs SimpleITK per frame.

Run ``python -m pytest benchmarks/bench_demons.py --benchmark-only`` (default: 8 x 256 x 256,
about a minute on a 2-core CPU); ``STEMGPU_BENCH_FULL=1`` adds 20 x 512 x 512 and
10 x 1024 x 1024 (10 frames, not 50, at 1024^2: SimpleITK takes ~6 s per such frame on a 2-core
CPU, so 50 frames x 3 rounds would be a quarter of an hour for the peer alone; both run the
same frames, so the ratio is unaffected).

Both implementations register SrTiO3 frames with 0.35 px per-line jitter at 300 counts onto
the stack mean and return the warped stack:

* ``stemgpu-<backend>``: :func:`register_demons` with its defaults (symmetric forces,
  diffeomorphic, field sigma 2 px, early stop);
* ``simpleitk``: ``FastSymmetricForcesDemonsRegistrationFilter`` (50 iterations, standard
  deviations 2, the setting the issue names) one frame at a time, then ``Resample`` with
  linear interpolation.

Accuracy is recorded beside the times (``extra_info``): ``scatter_px``, the RMS over columns of
the across-frame standard deviation of fitted Sr/Ti-O column positions (2-D), and
``raw_scatter_px`` before registration, so the speed ratio is read at matched accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.registration.demons import register_demons
from stemgpu.synthetic import simulate_stack

from .conftest import FULL, sync_call

SIZES = [(8, 256, 256)] + ([(20, 512, 512), (10, 1024, 1024)] if FULL else [])
ROUNDS = 3
MAX_COLUMNS = 300  # columns fitted for the accuracy figure (bounded memory at 1024^2)


def _case(shape):
    return "x".join(str(s) for s in shape)


@pytest.fixture(scope="module", params=SIZES, ids=_case)
def jitter_stack(request):
    shape = request.param
    stack, truth = simulate_stack(shape, line_jitter_px=0.35, dose=300.0, seed=7)
    pos = truth.image_positions(0)
    keep = np.flatnonzero(np.isin(truth.species, ["Sr", "TiO"]) & truth.visible(0, margin=12))
    keep = keep[:: max(1, len(keep) // MAX_COLUMNS)]
    return stack, truth, pos[keep]


def _fit_columns(frames, guesses, sigma0, radius=5, iterations=8):
    """(F, N, 2) positions from Gauss-Newton fits of a 2-D Gaussian + background per window."""
    frames = np.asarray(frames, dtype=np.float64)
    d = np.arange(-radius, radius + 1, dtype=float)
    dr, dc = (g.ravel() for g in np.meshgrid(d, d, indexing="ij"))
    r0 = np.rint(guesses[:, 0]).astype(int)
    c0 = np.rint(guesses[:, 1]).astype(int)
    win = frames[:, r0[:, None] + dr.astype(int), c0[:, None] + dc.astype(int)]
    f, n = win.shape[:2]
    bg = np.percentile(win, 10, axis=2)
    p = np.stack([win.max(axis=2) - bg, np.broadcast_to(guesses[:, 0] - r0, (f, n)),
                  np.broadcast_to(guesses[:, 1] - c0, (f, n)), np.full((f, n), float(sigma0)),
                  bg], axis=-1)
    for _ in range(iterations):
        a, y, x, s, b = (p[..., k][..., None] for k in range(5))
        u, v = dr - y, dc - x
        e = np.exp(-(u * u + v * v) / (2 * s * s))
        jac = np.stack([e, a * e * u / s**2, a * e * v / s**2, a * e * (u * u + v * v) / s**3,
                        np.ones_like(e)], axis=-1)
        jtj = np.einsum("fnpi,fnpj->fnij", jac, jac)
        jtj += 1e-3 * np.eye(5) * np.diagonal(jtj, axis1=-2, axis2=-1)[..., None, :]
        rhs = np.einsum("fnpi,fnp->fni", jac, win - (a * e + b))[..., None]
        p = p + np.linalg.solve(jtj, rhs)[..., 0]
    return np.stack([r0 + p[..., 1], c0 + p[..., 2]], axis=-1)


def _scatter(frames, truth, cols):
    sd = _fit_columns(frames, cols, truth.probe_sigma_px).std(axis=0)
    return float(np.sqrt((sd**2).sum(axis=1).mean()))


def _cpu_threads():
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _record(benchmark, impl, stack, registered, truth, cols, device):
    benchmark.extra_info.update({
        "impl": impl, "case": _case(stack.shape), "device": device,
        "cpu_threads": _cpu_threads(),  # both run one thread per core on the CPU
        "scatter_px": _scatter(registered, truth, cols),
        "raw_scatter_px": _scatter(stack, truth, cols),
    })


@pytest.mark.benchmark(group="demons")
def test_stemgpu_demons(benchmark, bench_backend, jitter_stack):
    stack, truth, cols = jitter_stack
    be = bench_backend
    data = be.asarray(stack)
    res = benchmark.pedantic(sync_call, args=(be, register_demons, data),
                             kwargs={"backend": be}, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"stemgpu-{be.name}", stack, be.to_numpy(res.registered), truth, cols,
            be.device_name)
    benchmark.extra_info["mean_iterations"] = float(be.to_numpy(res.iterations).mean())


def _simpleitk_loop(stack, iterations=50, sigma=2.0):
    import SimpleITK as sitk

    filt = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    filt.SetNumberOfIterations(iterations)
    filt.SetStandardDeviations(sigma)
    fixed = sitk.GetImageFromArray(stack.mean(axis=0).astype(np.float32))
    out = np.empty_like(stack)
    for i, frame in enumerate(stack):
        moving = sitk.GetImageFromArray(frame)
        field = filt.Execute(fixed, moving)
        tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        out[i] = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
    return out


@pytest.mark.benchmark(group="demons")
def test_simpleitk_demons(benchmark, jitter_stack):
    pytest.importorskip("SimpleITK")
    stack, truth, cols = jitter_stack
    out = benchmark.pedantic(_simpleitk_loop, args=(stack,), rounds=ROUNDS, warmup_rounds=0)
    import os

    _record(benchmark, "simpleitk", stack, out, truth, cols, f"CPU ({os.cpu_count()} cores)")

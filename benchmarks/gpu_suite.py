"""One command for a GPU machine: the GPU tests, the fit kernel's table, the stage benchmarks.

Run from a source tree (no install, no sidpy / pyNSID needed)::

    PYTHONPATH=. python -m benchmarks.gpu_suite            # default sizes
    STEMGPU_BENCH_FULL=1 PYTHONPATH=. python -m benchmarks.gpu_suite

It runs ``pytest -m gpu tests/`` (every GPU test, CuPy-backend cases included), then fits
the same 11 x 11 windows of a simulated square lattice (isotropic Gaussian, Poisson MLE,
float32 data) with

- ``numpy``: :func:`stemgpu.atoms.lm.lm_fit` on NumPy (timed on a subset, scaled per fit),
- ``cupy-array``: the same array code on CuPy,
- ``kernel``: :func:`stemgpu.atoms.cuda.lm_fit_kernel` (float64 and float32 arithmetic),

and prints a table with the device name: fits/s, speed-up over the CuPy array path, and the
largest position difference from NumPy on the common subset. Last it runs the benchmark
groups ``rigid``, ``demons``, ``fit``, ``cells`` and ``pipeline`` on NumPy and CuPy (and the
peers installed there) and prints them as ``benchmarks/RESULTS.md`` tables; the JSON is kept
in ``$OUT`` when set. Paste the tables into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

FULL = os.environ.get("STEMGPU_BENCH_FULL") == "1"
SIZES = [100_000, 1_000_000] + ([10_000_000] if FULL else [])
K = 11
NUMPY_SUBSET = 20_000


def _windows(n, seed=0):
    """(stack, frame_index, origins, init) for n fits: tiles of one simulated frame set."""
    from stemgpu.synthetic import simulate_stack

    stack, truth = simulate_stack((4, 512, 512), lattice="square", lattice_parameter_pm=200.0,
                                  probe_sigma_pm=30.0, dose=200.0, seed=seed)
    pos = truth.image_positions()  # (F, N, 2)
    f_idx = np.repeat(np.arange(pos.shape[0]), pos.shape[1])
    pos = pos.reshape(-1, 2)
    origins = np.rint(pos).astype(np.int64) - K // 2
    ok = ((origins >= 0) & (origins + K <= 512)).all(axis=1)
    f_idx, pos, origins = f_idx[ok], pos[ok], origins[ok]
    reps = -(-n // len(pos))
    f_idx, pos, origins = (np.tile(a, (reps,) + (1,) * (a.ndim - 1))[:n]
                           for a in (f_idx, pos, origins))
    rng = np.random.default_rng(seed)
    sig = 30.0 / 14.6
    init = np.column_stack([np.full(n, 180.0), pos + rng.uniform(-0.3, 0.3, pos.shape),
                            np.full(n, sig), np.full(n, 12.0)])
    return stack, f_idx, origins, init


def _time(fn, sync, repeat=3):
    fn()
    sync()
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _bench_size(n, cp, sync):
    from functools import partial

    from stemgpu.atoms.cuda import lm_fit_kernel
    from stemgpu.atoms.lm import lm_fit
    from stemgpu.atoms.windows import extract_windows

    stack, f_idx, origins, init = _windows(n)
    sub = slice(0, min(n, NUMPY_SUBSET))
    wins_np = extract_windows(stack, f_idx[sub], origins[sub], K, np)
    t_np, ref = _time(partial(lm_fit, wins_np, origins[sub].astype(float), init[sub], xp=np),
                      lambda: None, repeat=1)
    d_stack, d_fi, d_org, d_init = (cp.asarray(a) for a in (stack, f_idx, origins, init))
    d_wins = extract_windows(d_stack, d_fi, d_org, K, cp)
    t_arr, out_arr = _time(partial(lm_fit, d_wins, d_org.astype(cp.float64), d_init, xp=cp,
                                   chunk=65536), sync, repeat=1)
    res = {"numpy": ((sub.stop - sub.start) / t_np, 0.0),
           "cupy-array": (n / t_arr, _dpos(out_arr, ref, sub))}
    for cdt in ("float64", "float32"):
        t_k, out_k = _time(partial(lm_fit_kernel, d_stack, d_fi, d_org, d_init, window=K,
                                   compute_dtype=cdt), sync)
        res[f"kernel-{cdt}"] = (n / t_k, _dpos(out_k, ref, sub))
    return [(n, name, fps, fps / res["cupy-array"][0], dpos)
            for name, (fps, dpos) in res.items()]


def run_benchmarks():
    import cupy as cp

    from stemgpu.atoms.cuda import get_module
    from stemgpu.backend import resolve_backend

    be = resolve_backend("cupy")
    for cdt in ("float64", "float32"):  # compile outside the timings
        get_module(image_dtype="float32", compute_dtype=cdt)
    rows = []
    for n in SIZES:
        try:  # one failing size (e.g. out of memory) still leaves the others' rows
            rows += _bench_size(n, cp, be.synchronize)
        except Exception as exc:  # noqa: BLE001 - reported, the table goes on
            print(f"  size {n}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    return be.device_name, rows


def _dpos(out, ref, sub):
    import cupy as cp

    par = cp.asnumpy(out.params[sub])
    st = cp.asnumpy(out.status[sub])
    same = st == ref.status
    d = np.abs(par[:, 1:3] - ref.params[:, 1:3]).max() if len(par) else 0.0
    if not same.all():
        print(f"  note: {int((~same).sum())} status codes differ from NumPy", file=sys.stderr)
    return float(d)


def main() -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                          "-p", "no:cacheprovider", "tests/"], env=env)
    print(f"\npytest -m gpu: exit code {rc}\n")
    device, rows = run_benchmarks()
    print(f"Fused LM kernel vs CuPy array path vs NumPy — {K}x{K} windows, isotropic Gaussian, "
          f"Poisson MLE, float32 data\nDevice: {device}\n")
    print("| fits | engine | fits/s | x CuPy array | max |dpos| vs NumPy (px) |")
    print("|---:|---|---:|---:|---:|")
    for n, name, fps, ratio, dpos in rows:
        print(f"| {n:,} | {name} | {fps:.3g} | {ratio:.1f} | {dpos:.1e} |")
    print(f"\n(NumPy timed on the first {NUMPY_SUBSET:,} fits and scaled per fit; position "
          "differences on that subset.)")
    rc_stages = run_stage_benchmarks(env)
    return rc or rc_stages


def run_stage_benchmarks(env) -> int:
    """The pytest-benchmark groups (rigid, demons, fit, cells, pipeline) on every backend
    present, as RESULTS.md tables. I/O is left out (results files need sidpy / pyNSID). The
    JSON goes to ``$OUT`` when that is set (a device run's output folder), else to a
    temporary folder; its path is printed."""
    import tempfile
    from pathlib import Path

    from .report import render

    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="stemgpu-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_suite_benchmarks.json"
    rc = subprocess.call([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only",
                          "-q", "-p", "no:cacheprovider", "--ignore=benchmarks/bench_io.py",
                          f"--benchmark-json={path}"], env=env)
    print(f"\npytest benchmarks: exit code {rc}; JSON: {path}\n")
    if path.exists():
        import json

        print(render(json.loads(path.read_text())))
    return rc


if __name__ == "__main__":
    sys.exit(main())

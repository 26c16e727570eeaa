"""One command for a GPU machine: the GPU tests, the kernel agreement, the goals, the benchmarks.

Run from a source tree (no install needed)::

    PYTHONPATH=. python -m benchmarks.gpu_suite                # GPU machine, <= 7.5 min
    PYTHONPATH=. python -m benchmarks.gpu_suite --out results  # JSON there (default: $OUT)
    STEMGPU_CUPY_STANDIN=1 PYTHONPATH=.:tests python -m benchmarks.gpu_suite --small
                                                               # dry run on the CuPy stand-in

In one call, each part timed and guarded (a failing part is reported, the others still run):

1. ``pytest -m gpu tests/``: every GPU test (on the stand-in too when it is enabled);
2. **kernel agreement and speed**: the same 11 x 11 windows of a simulated square lattice
   (isotropic Gaussian, Poisson MLE, float32 data) fitted with :func:`stemgpu.atoms.lm.lm_fit`
   on NumPy (timed on a subset, scaled per fit), the same array code on CuPy, and the fused
   kernel :func:`stemgpu.atoms.cuda.lm_fit_kernel` in float64 and float32 arithmetic: fits/s,
   speed-up over the CuPy array engine, status codes and positions against NumPy;
3. **goals** of issue 18: kernel fits/s (>= 1e7 on an H100 / H200) and >= 10x the CuPy array
   engine; demons >= 100x SimpleITK (``FastSymmetricForcesDemonsRegistrationFilter`` per
   frame, timed on a few frames and scaled per frame); ``stemgpu run`` of a 100 x 2048^2
   stack < 30 s (a Nion ``.ndata`` file of tiled simulated frames, the CLI in a fresh process:
   start-up, kernel compilation, reading and saving included);
4. the pytest-benchmark groups ``rigid``, ``demons``, ``fit``, ``cells``, ``pipeline`` on NumPy
   and CuPy (I/O left out: results files need sidpy / pyNSID), one pytest run per group
   (fastest first, so the time budget cuts the slowest), rendered as ``benchmarks/RESULTS.md``
   tables.

It prints the device (name, compute capability, FP32:FP64 ratio, the kernel arithmetic
``compute_dtype="auto"`` picks), the tables and a goals table, and writes ``gpu_suite.json``
(and one benchmark JSON per group) to ``--out`` / ``$OUT`` / a temporary folder. ``--small``
shrinks every size for the stand-in (and runs only the ``fit`` and ``cells`` benchmark groups,
whose default sizes take seconds there); ``STEMGPU_BENCH_FULL=1`` adds 10^7 kernel fits.
``--budget-s`` (default 450) bounds the whole run: subprocesses get the time left, and a part
(or benchmark group) that would start past it is skipped and reported as such.

Paste the printed kernel, goals and benchmark tables into ``benchmarks/RESULTS.md`` (the
kernel and goals tables under a "GPU" heading with the device line printed above them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

K = 11
ROOT = Path(__file__).resolve().parents[1]
GOALS = {"kernel_fits_per_s": 1e7, "kernel_vs_array": 10.0, "demons_vs_simpleitk": 100.0,
         "run_s": 30.0}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (see :data:`DEFAULT` / :data:`SMALL`)."""

    fits: tuple[int, ...]
    numpy_subset: int
    lattice_frame: int            # side of the simulated frames the fit windows come from
    demons: tuple[int, int, int]  # (frames, height, width) of the demons goal
    simpleitk_frames: int         # frames SimpleITK is timed on (scaled per frame)
    run: tuple[int, int]          # (frames, side) of the `stemgpu run` goal
    run_unique: int               # distinct simulated frames, tiled to `run` frames
    run_timeout_s: float
    bench_files: tuple[str, ...]  # benchmarks/bench_<name>.py groups, fastest first


DEFAULT = Sizes(fits=(100_000, 1_000_000), numpy_subset=20_000, lattice_frame=512,
                demons=(50, 1024, 1024), simpleitk_frames=2, run=(100, 2048), run_unique=8,
                run_timeout_s=240.0,
                bench_files=("fit", "cells", "demons", "rigid", "pipeline"))
SMALL = Sizes(fits=(2_000,), numpy_subset=500, lattice_frame=256, demons=(4, 128, 128),
              simpleitk_frames=1, run=(4, 256), run_unique=4, run_timeout_s=300.0,
              bench_files=("fit", "cells"))


def _windows(n, frame, seed=0):
    """(stack, frame_index, origins, init) for n fits: tiles of one simulated frame set."""
    from stemgpu.synthetic import simulate_stack

    stack, truth = simulate_stack((4, frame, frame), lattice="square",
                                  lattice_parameter_pm=200.0, probe_sigma_pm=30.0, dose=200.0,
                                  seed=seed)
    pos = truth.image_positions()  # (F, N, 2)
    f_idx = np.repeat(np.arange(pos.shape[0]), pos.shape[1])
    pos = pos.reshape(-1, 2)
    origins = np.rint(pos).astype(np.int64) - K // 2
    ok = ((origins >= 0) & (origins + K <= frame)).all(axis=1)
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
    """Best wall time of ``repeat`` calls after one warm-up call; returns (s, last output)."""
    fn()
    sync()
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _agreement(be, out, ref, n_ref):
    """(max |dpos| px on the fits where the statuses agree, number of status mismatches)."""
    st = be.to_numpy(out.status[:n_ref])
    par = be.to_numpy(out.params[:n_ref])
    same = st == ref.status
    d = np.abs(par[same, 1:3] - ref.params[same, 1:3])
    return (float(d.max()) if d.size else 0.0), int((~same).sum())


def _bench_size(be, n, sizes):
    from stemgpu.atoms.cuda import lm_fit_kernel
    from stemgpu.atoms.lm import lm_fit
    from stemgpu.atoms.windows import extract_windows

    cp = be.xp
    stack, f_idx, origins, init = _windows(n, sizes.lattice_frame)
    m = min(n, sizes.numpy_subset)
    wins_np = extract_windows(stack, f_idx[:m], origins[:m], K, np)
    t_np, ref = _time(partial(lm_fit, wins_np, origins[:m].astype(float), init[:m], xp=np),
                      lambda: None, repeat=1)
    d_stack, d_fi, d_org, d_init = (cp.asarray(a) for a in (stack, f_idx, origins, init))
    d_wins = extract_windows(d_stack, d_fi, d_org, K, cp)
    t_arr, out_arr = _time(partial(lm_fit, d_wins, d_org.astype(cp.float64), d_init, xp=cp,
                                   chunk=65536), be.synchronize, repeat=1)
    rows = [{"fits": n, "engine": "numpy", "fits_per_s": m / t_np, "dpos_px": 0.0,
             "status_mismatch": 0}]
    dpos, bad = _agreement(be, out_arr, ref, m)
    rows.append({"fits": n, "engine": "cupy-array", "fits_per_s": n / t_arr, "dpos_px": dpos,
                 "status_mismatch": bad})
    for cdt in ("float64", "float32"):
        t_k, out_k = _time(partial(lm_fit_kernel, d_stack, d_fi, d_org, d_init, window=K,
                                   compute_dtype=cdt), be.synchronize)
        dpos, bad = _agreement(be, out_k, ref, m)
        rows.append({"fits": n, "engine": f"kernel-{cdt}", "fits_per_s": n / t_k,
                     "dpos_px": dpos, "status_mismatch": bad})
    for r in rows:
        r["x_cupy_array"] = r["fits_per_s"] / rows[1]["fits_per_s"]
    return rows


def kernel_table(be, sizes):
    """Fits/s and agreement rows of every engine at every size."""
    from stemgpu.atoms.cuda import get_module

    for cdt in ("float64", "float32"):  # compile outside the timings
        get_module(image_dtype="float32", compute_dtype=cdt)
    fits = sizes.fits + ((10_000_000,) if os.environ.get("STEMGPU_BENCH_FULL") == "1" else ())
    rows = []
    for n in fits:
        try:  # one failing size (e.g. out of memory) still leaves the others' rows
            rows += _bench_size(be, n, sizes)
        except Exception as exc:  # noqa: BLE001 - reported, the table goes on
            print(f"  size {n}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    return rows


def demons_goal(be, sizes):
    """register_demons on the backend vs SimpleITK per frame (scaled), same stack."""
    from stemgpu.registration.demons import register_demons
    from stemgpu.synthetic import simulate_stack

    stack, _ = simulate_stack(sizes.demons, line_jitter_px=0.35, dose=300.0, seed=7)
    data = be.asarray(stack)
    register_demons(data[:2], backend=be)  # warm-up: kernels, FFT plans
    be.synchronize()
    t0 = time.perf_counter()
    register_demons(data, backend=be)
    be.synchronize()
    t_sg = time.perf_counter() - t0
    res = {"case": "x".join(map(str, sizes.demons)), "stemgpu_s": t_sg}
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        res["simpleitk"] = "not installed"
        return res
    from .bench_demons import _simpleitk_loop

    n = sizes.simpleitk_frames
    t0 = time.perf_counter()
    _simpleitk_loop(stack[:n])
    t_sitk = (time.perf_counter() - t0) * len(stack) / n
    res.update({"simpleitk_frames_timed": n, "simpleitk_scaled_s": t_sitk,
                "x_simpleitk": t_sitk / t_sg})
    return res


def _subprocess_env(standin: bool) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(ROOT / "tests")] if standin else [])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


def run_goal(sizes, work: Path, env: dict, timeout: float):
    """``stemgpu run --backend cupy`` of a (frames, side, side) Nion file, fresh process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from nion_files import write_library_ndata

    from stemgpu.app import demo_stack

    frames, side = sizes.run
    uniq, _ = demo_stack(max(3, min(sizes.run_unique, frames)), side, seed=2026)
    stack = np.ascontiguousarray(np.resize(uniq, (frames, side, side)))  # tiled frames
    path = work / f"run_{frames}x{side}.ndata"
    write_library_ndata(path, stack)
    del stack, uniq
    cmd = [sys.executable, "-m", "stemgpu.cli", "run", str(path), "--out",
           str(work / "run-stemgpu.h5"), "--backend", "cupy", "--quiet"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"killed after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    path.unlink(missing_ok=True)  # keep $OUT small: only the timings come back
    (work / "run-stemgpu.h5").unlink(missing_ok=True)
    return {"case": f"{frames}x{side}x{side}", "unique_frames": min(sizes.run_unique, frames),
            "wall_s": wall, "rc": rc, "output_tail": tail}


def run_stage_benchmarks(env, out_dir: Path, sizes, deadline: float):
    """The pytest-benchmark groups as RESULTS.md tables, one file (group) per pytest run so a
    run cut by the time budget keeps the groups already measured; JSON per group in
    ``out_dir``, merged for the tables."""
    from .report import render

    merged, runs = None, {}
    for name in sizes.bench_files:
        left = deadline - time.monotonic()
        if left < 20:
            runs[name] = "skipped (time budget spent)"
            continue
        path = out_dir / f"gpu_suite_bench_{name}.json"
        cmd = [sys.executable, "-m", "pytest", f"benchmarks/bench_{name}.py", "--benchmark-only",
               "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}"]
        try:
            rc = subprocess.call(cmd, env=env, cwd=ROOT, timeout=left)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        runs[name] = rc
        if path.exists():
            run = json.loads(path.read_text())
            if merged is None:
                merged = run
            else:
                merged["benchmarks"] += run["benchmarks"]
    print(f"\npytest benchmarks: exit codes {runs}\n")
    tables = render(merged) if merged else ""
    print(tables)
    return {"rc": runs, "json_dir": str(out_dir), "tables": tables}


def device_info(be) -> dict:
    """Name, compute capability, FP32:FP64 ratio and the auto kernel arithmetic."""
    from stemgpu.atoms.cuda import auto_compute_dtype

    cp = be.xp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    return {"device": be.device_name, "compute_capability": f"{props['major']}.{props['minor']}",
            "fp32_to_fp64_ratio": props.get("singleToDoublePrecisionPerfRatio"),
            "auto_compute_dtype": auto_compute_dtype(props),
            "standin": bool(getattr(cp, "__standin__", False))}


def kernel_markdown(rows, info, sizes) -> str:
    lines = [f"Fused LM kernel vs CuPy array engine vs NumPy - {K}x{K} windows, isotropic "
             "Gaussian, Poisson MLE, float32 data", f"Device: {info['device']} (compute "
             f"capability {info['compute_capability']}, FP32:FP64 "
             f"{info['fp32_to_fp64_ratio']}, auto arithmetic {info['auto_compute_dtype']})", "",
             "| fits | engine | fits/s | x CuPy array | max abs dpos vs NumPy (px) "
             "| status mismatches |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fits']:,} | {r['engine']} | {r['fits_per_s']:.3g} | "
                     f"{r['x_cupy_array']:.1f} | {r['dpos_px']:.1e} | {r['status_mismatch']} |")
    lines.append(f"\n(NumPy timed on the first {sizes.numpy_subset:,} fits and scaled per fit; "
                 "agreement on that subset.)")
    return "\n".join(lines)


def goals_markdown(results) -> str:
    """The issue's GPU goals, measured: one row each (``-`` where a part did not run)."""
    rows = []
    kern = [r for r in results.get("kernel", []) if r["engine"].startswith("kernel")]
    if kern:
        best = max(kern, key=lambda r: (r["fits"], r["fits_per_s"]))
        rows.append(("kernel fits/s, 11x11 isotropic", f"{best['fits_per_s']:.3g} "
                     f"({best['engine']}, {best['fits']:,} fits)", ">= 1e7 (H100/H200)",
                     best["fits_per_s"] >= GOALS["kernel_fits_per_s"]))
        rows.append(("kernel / CuPy array engine", f"{best['x_cupy_array']:.1f}x", ">= 10x",
                     best["x_cupy_array"] >= GOALS["kernel_vs_array"]))
    dem = results.get("demons") or {}
    if "x_simpleitk" in dem:
        rows.append((f"demons vs SimpleITK ({dem['case']})", f"{dem['x_simpleitk']:.1f}x "
                     f"({dem['stemgpu_s']:.3g} s vs {dem['simpleitk_scaled_s']:.3g} s)",
                     ">= 100x", dem["x_simpleitk"] >= GOALS["demons_vs_simpleitk"]))
    run = results.get("run") or {}
    if "wall_s" in run:
        rows.append((f"stemgpu run {run['case']}", f"{run['wall_s']:.1f} s (rc {run['rc']})",
                     "< 30 s (100x2048^2)", run["rc"] == 0 and run["wall_s"] < GOALS["run_s"]))
    out = ["| goal | measured | target | met |", "|---|---|---|---|"]
    out += [f"| {g} | {m} | {t} | {'yes' if ok else 'no'} |" for g, m, t, ok in rows]
    return "\n".join(out)


def _part(results, name, fn, deadline):
    """Run one part, record its result / error and wall time; skip it past the deadline."""
    if time.monotonic() > deadline:
        results[name] = {"skipped": "time budget spent"}
        print(f"\n== {name}: skipped (time budget spent)")
        return
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - reported, the other parts still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    results.setdefault("wall_s", {})[name] = time.perf_counter() - t0
    print(f"  ({name}: {results['wall_s'][name]:.1f} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="small sizes (the CuPy stand-in, or a quick check on a GPU)")
    ap.add_argument("--out", help="folder for the JSON (default: $OUT, else a temporary one)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="time budget of the whole run in seconds (default 450)")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to leave out: tests,kernel,demons,run,stages")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = SMALL if args.small else DEFAULT
    t_start = time.perf_counter()
    deadline = time.monotonic() + args.budget_s
    out_dir = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="stemgpu-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    from stemgpu.backend import resolve_backend

    be = resolve_backend("cupy")  # before anything touches CuPy: a clear error without one
    info = device_info(be)
    env = _subprocess_env(info["standin"])
    results = {"device": info, "sizes": asdict(sizes), "goals": GOALS}
    print(f"device: {info}")

    def left():
        return max(30.0, deadline - time.monotonic())

    def tests():
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                              "-p", "no:cacheprovider", "tests/"], env=env, cwd=ROOT,
                             timeout=left())
        print(f"\npytest -m gpu: exit code {rc}")
        return {"rc": rc, "wall_s": time.perf_counter() - t0}

    parts = {"tests": tests, "kernel": lambda: kernel_table(be, sizes),
             "demons": lambda: demons_goal(be, sizes),
             "run": lambda: run_goal(sizes, out_dir, env, min(sizes.run_timeout_s, left())),
             "stages": lambda: run_stage_benchmarks(env, out_dir, sizes, deadline)}
    for name, fn in parts.items():
        if name not in skip:
            _part(results, name, fn, deadline)

    print()
    if isinstance(results.get("kernel"), list):
        print(kernel_markdown(results["kernel"], info, sizes))
    print(f"\nGoals (issue 18), device: {info['device']}\n")
    print(goals_markdown(results))
    results["total_s"] = time.perf_counter() - t_start
    path = out_dir / "gpu_suite.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\ntotal {results['total_s']:.0f} s; JSON: {path}")
    rc_tests = (results.get("tests") or {}).get("rc", 0)
    failed = [n for n, r in results.items() if isinstance(r, dict) and "error" in r]
    return 1 if (rc_tests not in (0, None) or failed) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``stemgpu run`` on a stack larger than the memory it may use.

Writes a synthetic Nion ``.h5`` stack (default 1024 x 512 x 512 float32 = 1 GiB) batch by
batch, so the writer itself stays small, then runs ``/usr/bin/time -v stemgpu run FILE
--steps rigid,demons,atoms,cells`` in a fresh process and prints its wall time and maximum
resident set size. The run streams the stack: rigid registration keeps only the mean,
demons registers the frames batch by batch and writes them (and the fields) to a temporary
store next to the results, and the results file is written from that store chunk by chunk.
The check: the peak must stay below half the stack size.

The frames repeat ``--base`` rendered frames of one scene (``stemgpu.simulate_stack``,
frame and line jitter, Poisson noise); every frame is registered as if it were new.

Usage::

    python benchmarks/large_stack.py                       # 1 GiB, every analysis step
    python benchmarks/large_stack.py --frames 256          # 256 MiB: a quicker first look
    python benchmarks/large_stack.py --dir /scratch --keep

Disk: the stack, the demons store (registered frames and fields: 3x the stack) and the
results file (3x the stack again) must fit; the free space is checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PIXEL_NM = 0.0146


def write_stack(path: str, frames: int, size: int, base: int, seed: int) -> float:
    """A Nion Swift ``.h5`` data item of ``frames`` x ``size`` x ``size`` float32 frames."""
    import h5py

    import stemgpu

    t0 = time.perf_counter()
    scene, _ = stemgpu.simulate_stack((base, size, size), frame_jitter_px=0.4,
                                      line_jitter_px=0.05, seed=seed)
    scene = scene.astype(np.float32)
    props = {
        "type": "data_item", "is_sequence": True, "collection_dimension_count": 0,
        "datum_dimension_count": 2, "created": "2026-01-01T00:00:00",
        "data_shape": [frames, size, size], "data_dtype": "float32",
        "dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""},
                                     {"offset": 0.0, "scale": PIXEL_NM, "units": "nm"},
                                     {"offset": 0.0, "scale": PIXEL_NM, "units": "nm"}],
        "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
    }
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("data", shape=(frames, size, size), dtype="float32",
                                 chunks=(1, size, size))
        dset.attrs["properties"] = json.dumps(props)
        step = max(1, (32 << 20) // (4 * size * size))  # 32 MiB per write
        for start in range(0, frames, step):
            idx = np.arange(start, min(frames, start + step)) % base
            dset[start:start + len(idx)] = scene[idx]
    return time.perf_counter() - t0


def _command() -> list[str]:
    exe = shutil.which("stemgpu")
    return [exe] if exe else [sys.executable, "-m", "stemgpu.app.cli"]


def run_measured(path: str, out: str, steps: str, extra: list[str]) -> dict:
    """``stemgpu run`` under ``/usr/bin/time -v``: wall time, peak RSS, exit code."""
    cmd = [*_command(), "run", path, "--out", out, "--steps", steps, "--quiet", *extra]
    timer = "/usr/bin/time"
    if os.path.exists(timer):
        cmd = [timer, "-v", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rec = {"command": " ".join(cmd), "rc": proc.returncode, "wall_s": wall}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m:
        rec["peak_rss_mib"] = int(m.group(1)) / 1024
    else:  # no GNU time: the children's peak from the kernel
        import resource

        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rec["stderr_tail"] = "\n".join(line for line in proc.stderr.splitlines()
                                   if not line.startswith("\t"))[-2000:]
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1024)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--base", type=int, default=8, help="rendered frames repeated")
    p.add_argument("--steps", default="rigid,demons,atoms,cells")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the stack and results")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("run_args", nargs="*", help="more arguments for stemgpu run (after --)")
    args = p.parse_args(argv)

    stack_bytes = args.frames * args.size * args.size * 4
    work = tempfile.mkdtemp(prefix="stemgpu-large-", dir=args.dir)
    need = 8 * stack_bytes  # stack + store (3x) + results (3x) + slack
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work, ignore_errors=True)
        print(f"not enough disk in {work}: {free / 2**30:.1f} GiB free, need "
              f"{need / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    path = os.path.join(work, "large.h5")
    out = os.path.join(work, "large-stemgpu.h5")
    try:
        t_write = write_stack(path, args.frames, args.size, args.base, args.seed)
        print(f"stack: {args.frames} x {args.size} x {args.size} float32 = "
              f"{stack_bytes / 2**20:.0f} MiB, written in {t_write:.1f} s ({path})")
        rec = run_measured(path, out, args.steps, args.run_args)
        bound = stack_bytes / 2 / 2**20
        print(f"command: {rec['command']}")
        print(f"exit code: {rec['rc']}")
        print(f"wall time: {rec['wall_s']:.1f} s")
        print(f"peak RSS: {rec['peak_rss_mib']:.0f} MiB (bound: half the stack, "
              f"{bound:.0f} MiB)")
        if rec["rc"] != 0:
            print(rec["stderr_tail"], file=sys.stderr)
            return 1
        if os.path.exists(out):
            print(f"results file: {os.path.getsize(out) / 2**20:.0f} MiB")
        left = [n for n in os.listdir(work) if n.startswith(".stemgpu-store-")]
        print(f"stores left behind: {len(left)}")
        ok = rec["peak_rss_mib"] < bound
        print("PASS" if ok else "FAIL: the peak is above half the stack size")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

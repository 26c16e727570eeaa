"""A 2 GiB stack registered by streaming from a Nion .h5 file, with peak memory measured.

Slow (minutes): run with ``pytest tests/test_io_large.py -m slow``. The stack repeats four
rendered frames whose offsets are known exactly from stemgpu.synthetic, so every one of the
128 frames has a known true shift. Registration runs in a fresh subprocess so that its peak
resident memory (``VmHWM``) is not polluted by the simulation that made the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from stemgpu.synthetic import simulate_stack

N_FRAMES, SIZE, N_BASE = 128, 2048, 4  # 128 x 2048 x 2048 float32 = 2 GiB
PIXEL_NM = 0.0146


def write_nion_h5(path, base):
    props = {
        "type": "data_item", "is_sequence": True, "collection_dimension_count": 0,
        "datum_dimension_count": 2, "created": "2024-03-05T14:07:31",
        "data_shape": [N_FRAMES, SIZE, SIZE], "data_dtype": "float32",
        "dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""},
                                     {"offset": 0.0, "scale": PIXEL_NM, "units": "nm"},
                                     {"offset": 0.0, "scale": PIXEL_NM, "units": "nm"}],
        "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"},
        "metadata": {"hardware_source": {"exposure": 4.2}},
    }
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("data", shape=(N_FRAMES, SIZE, SIZE), dtype="float32",
                                 chunks=(1, SIZE, SIZE))
        dset.attrs["properties"] = json.dumps(props)
        batch = 8
        for start in range(0, N_FRAMES, batch):  # written in batches: never 2 GiB in memory
            idx = np.arange(start, start + batch) % N_BASE
            dset[start:start + batch] = base[idx]


REGISTER = textwrap.dedent("""
    import json, resource, sys, time
    import h5py, numpy as np
    import stemgpu
    from stemgpu.io.nion import open_frames

    def peak_kib():
        # VmHWM belongs to this process image; ru_maxrss would inherit the parent's peak
        # across fork + exec on Linux
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    path, out_path = sys.argv[1], sys.argv[2]
    rss_start = peak_kib()
    src = open_frames(path)
    t0 = time.perf_counter()
    with h5py.File(out_path, "w") as out_file:
        out = out_file.create_dataset("registered", shape=src.shape, dtype="float32",
                                      chunks=(1, *src.shape[1:]))
        res = stemgpu.register_rigid(src, pixel_size=src.pixel_size_pm, out=out,
                                     backend="numpy")
        mid = np.asarray(out[src.shape[0] // 2])
    seconds = time.perf_counter() - t0
    peak = peak_kib()
    json.dump({"shifts": np.asarray(res.shifts).tolist(), "pixel_size_pm": res.pixel_size_pm,
               "streamed": res.parameters.get("streamed"),
               "peak_rss_kib": peak, "rss_after_imports_kib": rss_start,
               "seconds": seconds, "mean_std": float(np.std(res.mean)),
               "mid_mean_abs_diff": float(np.mean(np.abs(mid - np.asarray(res.mean))))},
              sys.stdout)
""")


@pytest.mark.slow
def test_register_2gib_stack_streamed_from_nion_h5(tmp_path):
    base, truth = simulate_stack((N_BASE, SIZE, SIZE), frame_jitter_px=2.0, dose=200.0,
                                 seed=21)
    path = tmp_path / "big.h5"
    write_nion_h5(path, base)
    del base
    stack_bytes = N_FRAMES * SIZE * SIZE * 4
    assert os.path.getsize(path) >= stack_bytes

    try:
        proc = subprocess.run([sys.executable, "-c", REGISTER, str(path),
                               str(tmp_path / "reg.h5")],
                              capture_output=True, text=True, timeout=3000)
    finally:  # pytest keeps old tmp dirs: do not leave 4 GiB behind
        for name in ("big.h5", "reg.h5"):
            if (tmp_path / name).exists():
                (tmp_path / name).unlink()
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    peak = report["peak_rss_kib"] * 1024
    print(f"\n2 GiB stack: peak RSS {peak / 2**20:.0f} MiB "
          f"(after imports {report['rss_after_imports_kib'] / 1024:.0f} MiB), "
          f"{peak / stack_bytes:.1%} of the stack, registered in {report['seconds']:.0f} s")

    assert report["streamed"] is True
    assert report["pixel_size_pm"] == pytest.approx(14.6)
    # peak memory well below the stack: under a quarter of it
    assert peak < stack_bytes / 4, f"peak RSS {peak / 2**20:.0f} MiB"

    true = truth.registration_shifts("mean")[np.arange(N_FRAMES) % N_BASE]
    shifts = np.asarray(report["shifts"])
    err = shifts - true
    err -= err.mean(axis=0)  # "mean" shifts are defined up to a constant
    assert np.abs(err).max() < 0.05, f"max shift error {np.abs(err).max():.4f} px"
    # the registered frames written to out= line up with the mean (not just any numbers)
    assert report["mid_mean_abs_diff"] < 0.5 * report["mean_std"]

"""I/O benchmarks: reading Nion frames in batches (memmap / HDF5 / deflated zip), results files.

Run: ``python -m pytest benchmarks/bench_io.py --benchmark-only``. Bigger stacks with
``STEMGPU_BENCH_FULL=1``. Frames are noise-free synthetic images; timings include the page
cache (files were just written), i.e. they measure the library's overhead, not the disk.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import numpy as np
import pytest

from stemgpu.io.nion import open_frames
from stemgpu.io.results import load, save

SIZES = [(32, 256, 256), (16, 512, 512)]
if os.environ.get("STEMGPU_BENCH_FULL") == "1":
    SIZES += [(64, 1024, 1024), (32, 2048, 2048)]

PROPS = {"is_sequence": True, "collection_dimension_count": 0, "datum_dimension_count": 2,
         "dimensional_calibrations": [{"offset": 0, "scale": 1, "units": ""},
                                      {"offset": 0, "scale": 0.0146, "units": "nm"},
                                      {"offset": 0, "scale": 0.0146, "units": "nm"}]}


def _stack(shape):
    rng = np.random.default_rng(0)
    return rng.random(shape, dtype=np.float32)


def _write(path, data, fmt):
    if fmt == "h5":
        with h5py.File(path, "w") as fh:
            fh.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
            fh["data"].attrs["properties"] = json.dumps(PROPS)
        return
    buf = io.BytesIO()
    np.save(buf, data)
    comp = zipfile.ZIP_DEFLATED if fmt == "deflated" else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", comp) as zf:
        zf.writestr("metadata.json", json.dumps(PROPS))
        zf.writestr("data.npy", buf.getvalue())


@pytest.mark.benchmark(group="io-read")
@pytest.mark.parametrize("fmt", ["memmap", "h5", "deflated"])
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_read_batches(benchmark, tmp_path, shape, fmt):
    data = _stack(shape)
    path = tmp_path / ("s.h5" if fmt == "h5" else "s.ndata")
    _write(path, data, fmt)

    def read_all():
        src = open_frames(path)
        total = 0.0
        for batch in src.iter_batches(8):
            total += float(batch[:, 0, 0].sum())
        src.close()
        return total

    assert benchmark(read_all) == pytest.approx(float(data[:, 0, 0].sum()), rel=1e-5)


@pytest.mark.benchmark(group="io-results")
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_save_load_results(benchmark, tmp_path, shape):
    data = _stack(shape)
    result = {"registered": data, "shifts": np.zeros((shape[0], 2)),
              "atoms": np.zeros((5000, 6), np.float32), "parameters": {"a": 1}}
    path = tmp_path / "r.h5"

    def round_trip():
        save(result, path, overwrite=True)
        return load(path)

    back = benchmark(round_trip)
    np.testing.assert_array_equal(back["registered"], data)

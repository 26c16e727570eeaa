"""Lazy frame sources pickle to a small file reference and read their own frames."""

from __future__ import annotations

import json
import pickle
import zipfile

import h5py
import numpy as np
import pytest
from nion_files import write_library_ndata

from stemgpu.io.lazy import LazyStack
from stemgpu.io.nion import open_frames

STACK = np.arange(12 * 32 * 40, dtype=np.float32).reshape(12, 32, 40)


def _npy_zip(path, data, compress=zipfile.ZIP_STORED):
    import io

    buf = io.BytesIO()
    np.save(buf, data)
    with zipfile.ZipFile(path, "w", compress) as zf:
        zf.writestr("data.npy", buf.getvalue())
    return str(path)


def _nion_h5(path, data):
    props = {"type": "data_item", "is_sequence": True, "collection_dimension_count": 0,
             "datum_dimension_count": 2,
             "dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""}]
             + [{"offset": 0.0, "scale": 0.0146, "units": "nm"}] * 2,
             "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": "counts"}}
    with h5py.File(path, "w") as fh:
        fh.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
        fh["data"].attrs["properties"] = json.dumps(props)
    return str(path)


@pytest.fixture(params=["npy-memmap", "npy-deflated", "hdf5", "nion-ndata", "nion-h5"])
def source(request, tmp_path):
    kind = request.param
    if kind == "npy-memmap":
        src = LazyStack.from_zip_npy(_npy_zip(tmp_path / "s.ndata1", STACK))
    elif kind == "npy-deflated":
        src = LazyStack.from_zip_npy(_npy_zip(tmp_path / "s.ndata1", STACK, zipfile.ZIP_DEFLATED))
    elif kind == "hdf5":
        path = tmp_path / "s.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("grp/frames", data=STACK)
        src = LazyStack.from_hdf5(path, "grp/frames")
    elif kind == "nion-ndata":
        src = open_frames(write_library_ndata(tmp_path / "s.ndata", STACK))
    else:
        src = open_frames(_nion_h5(tmp_path / "s.h5", STACK))
    yield src
    src.close()


def test_pickle_is_a_small_file_reference(source):
    blob = pickle.dumps(source)
    assert len(blob) < 2048, len(blob)
    back = pickle.loads(blob)
    assert (back.shape, back.dtype, back.kind, back.path) == (
        source.shape, source.dtype, source.kind, source.path)
    assert back.pixel_size_pm == source.pixel_size_pm
    assert back.metadata == source.metadata
    np.testing.assert_array_equal(np.asarray(back), STACK)
    np.testing.assert_array_equal(back[3], STACK[3])
    np.testing.assert_array_equal(back[[7, 2, 7]], STACK[[7, 2, 7]])
    back.close()


def test_frame_range_pickles_with_its_range(source):
    view = source.frame_range(4, 9)
    assert view.shape == (5, 32, 40) and view.frames == (4, 9)
    blob = pickle.dumps(view)
    assert len(blob) < 2048
    back = pickle.loads(blob)
    assert back.frames == (4, 9)
    np.testing.assert_array_equal(np.asarray(back), STACK[4:9])
    np.testing.assert_array_equal(back[-1], STACK[8])
    np.testing.assert_array_equal(back[::-2], STACK[4:9][::-2])
    np.testing.assert_array_equal(back[np.array([True, False, True, False, False])],
                                  STACK[[4, 6]])
    # a range of a range
    np.testing.assert_array_equal(np.asarray(back.frame_range(1, 3)), STACK[5:7])
    np.testing.assert_array_equal(np.asarray(view), STACK[4:9])
    back.close()


def test_frame_range_checks_bounds(source):
    with pytest.raises(ValueError, match="stop must be"):
        source.frame_range(3, 13)
    with pytest.raises(ValueError, match="stop must be"):
        source.frame_range(5, 4)


def test_memmap_reference_holds_no_data(tmp_path):
    # 64 MiB of frames: the pickle must not grow with the data
    big = np.zeros((64, 512, 512), np.float32)
    src = LazyStack.from_zip_npy(_npy_zip(tmp_path / "big.ndata1", big))
    assert src.kind == "memmap" and len(pickle.dumps(src)) < 2048


def test_from_array_memmap_is_a_reference_other_arrays_travel(tmp_path):
    path = tmp_path / "raw.bin"
    STACK.tofile(path)
    mm = np.memmap(path, dtype=STACK.dtype, mode="r", shape=STACK.shape)
    src = LazyStack.from_array(path, mm, kind="memmap")
    assert len(pickle.dumps(src)) < 2048
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[2:5], STACK[2:5])
    # a slice of a memmap is no whole-file map: it travels as data
    part = LazyStack.from_array(path, mm[2:5], kind="memmap")
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(part))), STACK[2:5])
    mem = LazyStack.from_array("x.npy", STACK[:3], kind="memory")
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(mem))), STACK[:3])


def test_to_dask_works_for_every_kind_and_stays_small(source):
    import cloudpickle
    import dask

    arr = source.to_dask(batch_size=5)
    assert arr.chunks[0] == (5, 5, 2)
    graph = dict(arr.__dask_graph__())
    assert len(cloudpickle.dumps(graph)) < 20_000
    np.testing.assert_array_equal(arr[3:8].compute(scheduler="sync"), STACK[3:8])
    # a process pool pickles every task: the h5py kind failed here before
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(arr.sum(axis=0).compute(), STACK.sum(axis=0))

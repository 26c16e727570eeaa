"""Streamed analysis of a lazy stack: the frame store, demons batch by batch, saving from it."""

from __future__ import annotations

import gc
import os
import pickle

import h5py
import numpy as np
import pytest

import stemgpu
from stemgpu.app import stages
from stemgpu.backend import resolve_backend
from stemgpu.io.lazy import LazyStack
from stemgpu.io.store import FrameStore, IncompleteStoreError
from stemgpu.registration.demons import register_demons

# ----------------------------------------------------------------------------- the store


def test_store_writes_batches_and_reads_back_a_picklable_source(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 2, 5, 6)).astype("float32")
    with FrameStore(tmp_path) as store:
        assert os.path.dirname(store.directory) == str(tmp_path)
        store.create("fields", data.shape, "float32")
        for start in (4, 0, 2):  # any order
            store.write("fields", start, data[start:start + 2 if start < 4 else 7])
        store.finish()
        src = store.array("fields")
        assert src.shape == data.shape and src.dtype == np.float32
        np.testing.assert_array_equal(src[2:5], data[2:5])
        np.testing.assert_array_equal(src[6], data[6])
        with h5py.File(store.path, "r", locking=False) as fh:
            assert fh["fields"].chunks == (1, 2, 5, 6) and fh["fields"].attrs["complete"]
        back = pickle.loads(pickle.dumps(src))
        assert len(pickle.dumps(src)) < 4096  # a file reference, not the data
        np.testing.assert_array_equal(back[1:3], data[1:3])
        back.close()
        # saved into a results file, read back the same
        path = stemgpu.save({"fields": src}, tmp_path / "r.h5")
        np.testing.assert_array_equal(stemgpu.load(path)["fields"], data)
        directory = store.directory
    assert not os.path.exists(directory)
    with pytest.raises(ValueError, match="closed"):
        store.array("fields")


def test_store_flags_an_incomplete_dataset(tmp_path):
    store = FrameStore(tmp_path)
    store.create("a", (4, 3, 3), "float32")
    store.create("b", (2, 3, 3), "float32")
    store.write("a", 0, np.ones((3, 3, 3), "f4"))  # frame 3 never written
    store.write("b", 0, np.ones((2, 3, 3), "f4"))
    with pytest.raises(ValueError, match="does not fit"):
        store.write("b", 1, np.ones((2, 3, 3), "f4"))
    with pytest.raises(IncompleteStoreError, match="read before finish"):
        store.array("b")
    with pytest.raises(IncompleteStoreError, match="never written"):
        store.finish()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        store.array("a")
    with h5py.File(store.path, "r", locking=False) as fh:
        assert not fh["a"].attrs["complete"] and fh["b"].attrs["complete"]
    assert store.array("b").shape == (2, 3, 3)  # the complete one is served
    store.close()
    assert os.listdir(tmp_path) == []


def test_store_lives_as_long_as_its_arrays(tmp_path):
    store = FrameStore(tmp_path)
    store.create("a", (2, 3, 3), "float32")
    store.write("a", 0, np.full((2, 3, 3), 5.0, "f4"))
    store.finish()
    src = store.array("a")
    del store
    gc.collect()
    assert float(src[1, 2, 2]) == 5.0  # the array keeps the store alive
    del src
    gc.collect()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- demons


def _lazy_file(tmp_path, stack, name="s.h5"):
    path = tmp_path / name
    with h5py.File(path, "w") as fh:
        fh.create_dataset("data", data=stack.astype("float32"), chunks=(1, *stack.shape[1:]))
    return LazyStack.from_hdf5(path, "data", pixel_size_pm=14.6)


@pytest.fixture(scope="module")
def stack():
    s, _ = stemgpu.simulate_stack((7, 128, 128), frame_jitter_px=0.3, line_jitter_px=0.1,
                                  seed=21)
    s = s.astype("float32")
    s[3] = np.random.default_rng(2).poisson(20.0, s[3].shape)  # a frame rigid flags
    return s


_DEMONS_FIELDS = ("registered", "displacement", "reference", "mean", "metric_before",
                  "metric_after", "metric_history", "update_history", "iterations", "flagged")


@pytest.mark.parametrize("options", [{"iterations": 12, "batch_size": 2},
                                     {"iterations": 8, "batch_size": 4, "keep_fields": False},
                                     {"iterations": 6, "batch_size": 3, "rounds": 2}])
def test_streamed_demons_is_bit_identical_to_register_demons(tmp_path, stack, options):
    """Batches of a streamed stack onto the float32 mean of its rigidly registered frames
    give the bits of register_demons of the whole (unflagged) registered stack."""
    src = _lazy_file(tmp_path, stack)
    res = stemgpu.analyze(src, steps=("rigid", "demons"), progress=False, scratch_dir=tmp_path,
                          demons=options)
    rigid = res.rigid
    flagged = np.asarray(rigid.flagged)
    assert flagged[3] and flagged.sum() == 1
    assert res.info["demons_frames"] == [0, 1, 2, 4, 5, 6]
    in_memory = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid",), progress=False)
    np.testing.assert_array_equal(in_memory.rigid.shifts, rigid.shifts)
    frames = in_memory.rigid.registered[~flagged]
    opts = {k: v for k, v in options.items() if k != "batch_size"}
    memory = register_demons(frames, backend="numpy", **opts)
    d = res.demons
    assert isinstance(d.registered, LazyStack)
    assert d.parameters["streamed"] is True and d.parameters["batch_size"] == \
        options["batch_size"]
    for name in _DEMONS_FIELDS:
        a, b = getattr(d, name), getattr(memory, name)
        if b is None:
            assert a is None, name
            continue
        a = np.asarray(a[:] if isinstance(a, LazyStack) else a)
        assert a.dtype == np.asarray(b).dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(res.mean_image, memory.registered.mean(axis=0))
    store_dir = os.path.dirname(d.registered.path)
    assert os.path.dirname(store_dir) == str(tmp_path)
    res.close()
    assert not os.path.exists(store_dir)
    src.close()


def test_streamed_analysis_with_every_step_equals_the_in_memory_one(tmp_path, stack):
    """rigid + demons + atoms + cells + track on the demons frames: the streamed analysis
    gives the in-memory numbers bit for bit, saves from its store and loads back the same."""
    src = _lazy_file(tmp_path, stack)
    kw = dict(steps=("rigid", "demons", "atoms", "cells", "track"), progress=False,
              demons={"iterations": 10, "batch_size": 2},
              track={"frames": "demons", "batch_frames": 2})
    streamed = stemgpu.analyze(src, scratch_dir=tmp_path, **kw)
    memory = stemgpu.analyze(stack, pixel_size=14.6, **kw)
    assert streamed.info["streamed"] and not memory.info["streamed"]
    np.testing.assert_array_equal(streamed.demons.registered[:], memory.demons.registered)
    np.testing.assert_array_equal(streamed.mean_image, memory.mean_image)
    np.testing.assert_array_equal(streamed.atoms.positions, memory.atoms.positions)
    np.testing.assert_array_equal(streamed.tracks.positions, memory.tracks.positions)
    assert streamed.summary(as_text=True) == memory.summary(as_text=True)
    assert streamed.statistics.n_cells > 4
    fig = streamed.plot_report()
    assert len(fig.axes) > 4
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = stemgpu.save(streamed, tmp_path / "streamed.h5")
    streamed.close()
    back = stemgpu.load(path)
    np.testing.assert_array_equal(back.demons.registered, memory.demons.registered)
    np.testing.assert_array_equal(back.demons.displacement, memory.demons.displacement)
    assert back.summary(as_text=True) == memory.summary(as_text=True)
    assert sorted(os.listdir(tmp_path)) == ["s.h5", "streamed.h5"]  # no store left
    src.close()


def test_a_failed_streamed_demons_leaves_no_store(tmp_path, stack):
    src = _lazy_file(tmp_path, stack)
    with pytest.raises(ValueError, match="iterations"):
        stemgpu.analyze(src, steps=("rigid", "demons"), progress=False, scratch_dir=tmp_path,
                        demons={"iterations": -1})
    assert os.listdir(tmp_path) == ["s.h5"]
    src.close()


def test_registered_frames_pickle_with_their_backend_by_name(tmp_path, stack):
    src = _lazy_file(tmp_path, stack)
    rf = stages.RegisteredFrames(src, np.zeros((7, 2)), "fourier", [0, 2, 5],
                                 resolve_backend("numpy"))
    back = pickle.loads(pickle.dumps(rf))
    assert back.backend.name == "numpy" and back.shape == (3, 128, 128)
    np.testing.assert_array_equal(back[1:3], rf[1:3])
    src.close()


def test_demons_batches_follow_the_memory_budget():
    be = resolve_backend("numpy")
    per = stages.DEMONS_BYTES_PER_PIXEL * 512 * 512
    n = stages.demons_batch_size((100, 512, 512), be)
    assert 1 <= n and (n * per <= 2 * stages.DEMONS_BATCH_BYTES)
    assert stages.demons_batch_size((100, 512, 512), be, 7) == 7
    assert stages.demons_batch_size((100, 4096, 4096), be) == 1


def test_saving_images_imports_neither_sidpy_nor_dask(tmp_path):
    """The pyNSID layout is written by h5py alone: importing sidpy (and dask-ml through it)
    would cost ~300 MB, more than a streamed analysis of a large stack may use."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, stemgpu; "
            "s, _ = stemgpu.simulate_stack((4, 96, 96), seed=1); "
            "r = stemgpu.register_rigid(s, pixel_size=14.6, backend='numpy'); "
            f"stemgpu.save({{'rigid': r}}, {str(tmp_path / 'r.h5')!r}); "
            "bad = [m for m in ('sidpy', 'pyNSID', 'dask') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    import pyNSID

    with h5py.File(tmp_path / "r.h5", "r") as fh:
        mains = pyNSID.hdf_utils.get_all_main(fh)
        assert len(mains) == 2
        ds = pyNSID.hdf_utils.read_h5py_dataset(
            fh["Measurement_000/Channel_000/rigid_registered/rigid_registered"])
        assert ds.shape == (4, 96, 96) and ds._axes[1].units == "nm"
        assert float(ds._axes[2].values[1]) == pytest.approx(0.0146)


def test_scratch_dir_is_checked_before_any_stage(tmp_path):
    stack, _ = stemgpu.simulate_stack((4, 96, 96), seed=1)
    with pytest.raises(ValueError, match="scratch_dir must be an existing folder"):
        stemgpu.analyze(stack, pixel_size=14.6, scratch_dir=tmp_path / "missing",
                        progress=False)
    with pytest.raises(TypeError, match="scratch_dir must be a folder path"):
        stemgpu.analyze(stack, pixel_size=14.6, scratch_dir=12345, progress=False)

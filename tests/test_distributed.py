"""Opt-in dask.distributed runs: same numbers as in process, a killed worker changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from nion_files import write_library_ndata

import stemgpu
from stemgpu.app.distributed import (
    ParallelStageError,
    cluster_client,
    map_bounded,
    register_rigid_on,
)
from stemgpu.io.nion import open_frames
from stemgpu.registration.rigid import register_rigid

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit="2GiB")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    stack, _ = stemgpu.simulate_stack((10, 128, 128), frame_jitter_px=0.4, seed=5)
    path = tmp_path_factory.mktemp("dist") / "stack.ndata"
    return write_library_ndata(path, stack.astype("float32")), stack.astype("float32")


def _same_rigid(a, b):
    for name in ("shifts", "quality", "mean", "flagged"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)),
                                      np.asarray(getattr(b, name)), err_msg=name)


@pytest.mark.parametrize("options", [{}, {"reference": 4}, {"iterations": 2, "upsample": 20}])
def test_rigid_on_a_cluster_is_bit_identical(client, stack_file, options):
    path, stack = stack_file
    src = open_frames(path)  # the lazy source travels as a file reference
    try:
        on = register_rigid_on(client, src, batch_size=3, backend="numpy", **options)
        ref = register_rigid(src, batch_size=3, backend="numpy", **options)
    finally:
        src.close()
    _same_rigid(on, ref)
    assert on.parameters == ref.parameters
    # an in-memory stack: frames travel with the tasks, registered frames come back
    on = register_rigid_on(client, stack, batch_size=4, backend="numpy", pixel_size=14.6,
                           **options)
    ref = register_rigid(stack, batch_size=4, backend="numpy", pixel_size=14.6, **options)
    _same_rigid(on, ref)
    np.testing.assert_array_equal(on.registered, ref.registered)


def test_rigid_on_a_cluster_refuses_what_it_does_not_run(client, stack_file):
    with pytest.raises(ValueError, match="mode='reference' without polish"):
        register_rigid_on(client, stack_file[1], mode="pairs", pixel_size=14.6)
    with pytest.raises(ValueError, match="mode='reference' without polish"):
        register_rigid_on(client, stack_file[1], polish=True, pixel_size=14.6)
    with pytest.raises(ValueError, match="upsample must be"):
        register_rigid_on(client, stack_file[1], upsample=0, pixel_size=14.6)


def test_analyze_with_a_client_gives_the_same_results(client, stack_file):
    path, stack = stack_file
    src = open_frames(path)
    try:
        opts = {"steps": ("rigid", "atoms", "cells"), "progress": False, "backend": "numpy",
                "rigid": {"batch_size": 4}}
        on = stemgpu.analyze(src, client=client, **opts)
        ref = stemgpu.analyze(src, **opts)
    finally:
        src.close()
    np.testing.assert_array_equal(np.asarray(on.mean_image), np.asarray(ref.mean_image))
    a, b = on.summary(), ref.summary()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].as_dict() == b[name].as_dict(), name
    # in memory, with demons on the registered frames the cluster returned
    opts["steps"] = ("rigid", "demons", "atoms")
    on = stemgpu.analyze(stack, pixel_size=14.6, client=client, **opts)
    ref = stemgpu.analyze(stack, pixel_size=14.6, **opts)
    np.testing.assert_array_equal(on.demons.registered, ref.demons.registered)
    np.testing.assert_array_equal(np.asarray(on.atoms.positions),
                                  np.asarray(ref.atoms.positions))


def test_a_killed_worker_changes_nothing(client, stack_file):
    stack, _ = stemgpu.simulate_stack((40, 128, 128), frame_jitter_px=0.4, seed=6)
    stack = stack.astype("float32")
    opts = {"batch_size": 1, "backend": "numpy", "pixel_size": 14.6, "iterations": 3}
    ref = register_rigid(stack, **opts)
    t0 = time.perf_counter()
    register_rigid_on(client, stack, **opts)
    wall = time.perf_counter() - t0
    pids = client.run(os.getpid)
    out = {}
    run = threading.Thread(target=lambda: out.update(res=register_rigid_on(client, stack,
                                                                           **opts)))
    run.start()
    time.sleep(0.4 * wall)
    assert run.is_alive()  # the kill lands mid-run
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    run.join(timeout=120)
    assert not run.is_alive()
    _same_rigid(out["res"], ref)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def _exit_worker(item):
    os._exit(3)


def test_a_task_that_always_kills_its_worker_names_its_item(client):
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(ParallelStageError, match="poison: the task for frames 4:8"):
            map_bounded(client, _exit_worker, [(4, 8)], stage="poison",
                        label=lambda it: f"frames {it[0]}:{it[1]}")
    client.wait_for_workers(2, timeout=60)


def test_local_cuda_without_dask_cuda_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # importing it now fails
    with pytest.raises(ImportError, match="dask-cuda"), cluster_client("local-cuda"):
        pass


def test_bad_client_values():
    with pytest.raises(ValueError, match="client must be"):
        with cluster_client(3):
            pass
    with pytest.raises(ValueError, match="workers must be"):
        with cluster_client("local", workers=0):
            pass


def test_analyze_without_a_client_loads_no_cluster_code(stack_file):
    code = ("import sys, stemgpu; from stemgpu.io.nion import open_frames; "
            f"src = open_frames({stack_file[0]!r}); "
            "stemgpu.analyze(src, steps=('rigid',), progress=False); "
            "assert 'stemgpu.app.distributed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def _same_tracks(a, b):
    for name in ("positions", "position_errors", "amplitudes", "status", "motion",
                 "column_flags", "frame_flagged"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)),
                                      np.asarray(getattr(b, name)), err_msg=name)
    assert a.counts_per_unit == b.counts_per_unit
    assert repr(a.calibration) == repr(b.calibration)


def test_track_columns_on_a_cluster_is_bit_identical(client, stack_file):
    from stemgpu.app.distributed import track_columns_on

    path, stack = stack_file
    fit = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid", "atoms"), progress=False,
                          backend="numpy").atoms
    ref = stemgpu.track_columns(stack, fit, batch_frames=3, backend="numpy")
    on = track_columns_on(client, stack, fit, batch_frames=3, backend="numpy")
    _same_tracks(on, ref)
    assert on.parameters == ref.parameters
    src = open_frames(path)  # read by the tasks themselves
    try:
        _same_tracks(track_columns_on(client, src, fit, batch_frames=4, backend="numpy"),
                     stemgpu.track_columns(src, fit, batch_frames=4, backend="numpy"))
    finally:
        src.close()


def test_streamed_analyze_with_tracking_on_a_cluster(client, stack_file):
    src = open_frames(stack_file[0])
    try:
        opts = {"steps": ("rigid", "atoms", "track"), "progress": False, "backend": "numpy",
                "rigid": {"batch_size": 4}, "track": {"batch_frames": 3}}
        on = stemgpu.analyze(src, client=client, **opts)
        ref = stemgpu.analyze(src, **opts)
    finally:
        src.close()
    _same_tracks(on.tracks, ref.tracks)
    a, b = on.summary(), ref.summary()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].as_dict() == b[name].as_dict(), name


def _slow_square(x):
    time.sleep(0.05)
    return x * x


def test_at_most_two_tasks_per_worker_are_queued(client):
    submitted = []

    class Counting:  # the client, counting the tasks not yet finished at each submit
        def __getattr__(self, name):
            return getattr(client, name)

        def submit(self, *args, **kwargs):
            fut = client.submit(*args, **kwargs)
            submitted.append(fut)
            outstanding.append(sum(not f.done() for f in submitted))
            return fut

    outstanding: list[int] = []
    out = map_bounded(Counting(), _slow_square, list(range(12)), label=str, stage="sq")
    assert out == [x * x for x in range(12)]
    assert len(submitted) == 12 and max(outstanding) <= 2 * 2


def test_h5py_and_memmap_sources_reach_the_workers(client, tmp_path, stack_file):
    import h5py

    stack = stack_file[1]
    ref = register_rigid(stack, batch_size=4, backend="numpy", pixel_size=14.6)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh["frames"] = stack
    with h5py.File(tmp_path / "s.h5", "r") as fh:
        on = register_rigid_on(client, fh["frames"], batch_size=4, backend="numpy",
                               pixel_size=14.6)
    _same_rigid(on, ref)
    stack.tofile(tmp_path / "s.raw")
    mm = np.memmap(tmp_path / "s.raw", dtype=stack.dtype, mode="r", shape=stack.shape)
    _same_rigid(register_rigid_on(client, mm, batch_size=4, backend="numpy",
                                  pixel_size=14.6), ref)


def test_streamed_demons_on_a_cluster_is_bit_identical(client, stack_file, tmp_path):
    """Demons batches of a streamed stack as tasks (each reads and shifts its own frames;
    the client writes the store, batches arriving in any order) give the in-process bits,
    on the same rigid registration."""
    from stemgpu.app import stages

    path, _ = stack_file
    src = open_frames(path)
    try:
        prep = stages.prepare_input(src, ("rigid", "demons"), None, "numpy")
        rigid = stemgpu.analyze(src, steps=("rigid",), progress=False, backend="numpy",
                                rigid={"batch_size": 4}).rigid
        opts = {"iterations": 8, "batch_size": 2}
        on, _, mean_on, store_on = stages.streamed_demons_stage(
            prep, rigid, opts, False, store_dir=tmp_path, client=client)
        ref, _, mean_ref, store_ref = stages.streamed_demons_stage(
            prep, rigid, opts, False, store_dir=tmp_path)
        for name in ("registered", "displacement"):
            np.testing.assert_array_equal(getattr(on, name)[:], getattr(ref, name)[:])
        for name in ("mean", "reference", "metric_before", "metric_after", "metric_history",
                     "iterations", "flagged"):
            np.testing.assert_array_equal(np.asarray(getattr(on, name)),
                                          np.asarray(getattr(ref, name)), err_msg=name)
        np.testing.assert_array_equal(mean_on, mean_ref)
    finally:
        src.close()
    store_on.close()
    store_ref.close()
    assert os.listdir(tmp_path) == []


def test_run_with_a_scheduler_gives_the_in_process_results(stack_file, tmp_path, capsys):
    """``stemgpu run FILE --scheduler local``: a 2-worker cluster started for the run (its
    dashboard printed), results equal to the in-process run."""
    from stemgpu.app.cli import main

    path = stack_file[0]
    args = ["run", path, "--steps", "rigid,demons,atoms,cells", "--backend", "numpy"]
    assert main([*args, "--out", str(tmp_path / "local.h5"), "--scheduler", "local",
                 "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "dask dashboard: http" in out and "streaming the frames" in out
    assert main([*args, "--out", str(tmp_path / "here.h5"), "--quiet"]) == 0
    on, here = stemgpu.load(tmp_path / "local.h5"), stemgpu.load(tmp_path / "here.h5")
    assert on.demons.parameters["streamed"] and here.demons.parameters["streamed"]
    # Bit-identical: rigid's matrix products run on one BLAS thread in process as in the
    # (single-threaded) workers, and demons given the same rigid result is bit-identical.
    np.testing.assert_array_equal(on.rigid.shifts, here.rigid.shifts)
    np.testing.assert_array_equal(on.mean_image, here.mean_image)
    np.testing.assert_array_equal(np.asarray(on.atoms.positions),
                                  np.asarray(here.atoms.positions))
    a, b = on.summary(), here.summary()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].value == b[name].value, name
        assert a[name].uncertainty == b[name].uncertainty, name
    assert sorted(os.listdir(tmp_path)) == ["here.h5", "local.h5"]

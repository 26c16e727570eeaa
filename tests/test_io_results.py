"""Results files: exact round trips, pyNSID layout, provenance, atomic writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import pytest

import stemgpu
from stemgpu.io import _codec as codec
from stemgpu.io import results as results_mod
from stemgpu.io.results import load, read_provenance, save
from stemgpu.io.sidpy_io import to_dataset
from stemgpu.synthetic import simulate_stack

# ------------------------------------------------------------ test result types (same shapes
# as stemgpu's: arrays, scalars, nested dataclasses, parameter dicts, optional None fields)


class Pair(NamedTuple):
    x: float
    y: float


@dataclass(frozen=True)
class RigidLike:
    shifts: Any
    quality: Any
    registered: Any
    mean: Any
    valid_region: tuple
    flagged: Any
    pixel_size_pm: float | None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DriftLike:
    jitter_pm: Any
    jitter_std_pm: Pair
    drift_rate_pm_per_s: Pair | None
    model: str
    frame_time_s: float | None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FitLike:
    positions: Any          # (N, 2) float64
    params: Any             # (N, 6) float32
    uncertainties: Any      # (N, 6) float32
    status: Any             # (N,) int8
    species: Any            # (N,) unicode
    n_converged: int
    chi2: np.float32
    drift: DriftLike        # nested dataclass
    displacement: Any = None  # optional field left None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cells:
    corners: Any
    side_nm: Any
    statistics: dict        # dict of arrays and figures with uncertainties
    lattice: Any            # a nested stemgpu dataclass (synthetic.Lattice)
    parameters: dict = field(default_factory=dict)


class AnalysisLike:
    """Not a dataclass: an object with a ``results`` mapping (the pipeline's Analysis)."""

    def __init__(self, results):
        self.results = dict(results)


def assert_same(a, b, where="obj"):
    """Exact structural equality: types, dtypes, shapes, values (NaN == NaN)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b, err_msg=where)  # treats NaN as equal
        else:
            assert np.array_equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float | np.floating) and math.isnan(a):
        assert math.isnan(b), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a == b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def sim():
    return simulate_stack((4, 40, 48), frame_jitter_px=1.0, seed=11)


def make_rigid(sim, registered=True):
    data, truth = sim
    shifts = truth.registration_shifts("mean")
    return RigidLike(
        shifts=shifts, quality=np.linspace(0.5, 1, 4, dtype=np.float32),
        registered=data.copy() if registered else None, mean=data.mean(axis=0),
        valid_region=(slice(2, 38), slice(1, 47)), flagged=np.array([False, True, False, False]),
        pixel_size_pm=14.6,
        parameters={"reference": "mean", "upsample": 100, "max_shift": (3.0, 4.0),
                    "window": None, "backend": "numpy", "shape": (4, 40, 48)})


def make_fit(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    drift = DriftLike(jitter_pm=rng.normal(size=(4, 2)), jitter_std_pm=Pair(1.25, 2.5),
                      drift_rate_pm_per_s=None, model="linear", frame_time_s=None,
                      parameters={"degree": 2, "model": "linear"})
    params = rng.normal(size=(n, 6)).astype(np.float32)
    params[3, 2] = np.nan  # a failed fit keeps its NaN and its status
    return FitLike(
        positions=rng.uniform(0, 2048, size=(n, 2)), params=params,
        uncertainties=np.abs(rng.normal(size=(n, 6))).astype(np.float32),
        status=rng.integers(0, 3, size=n).astype(np.int8),
        species=np.array(["Sr", "TiO", "O"] * (n // 3) + ["Sr"] * (n % 3)),
        n_converged=int(n - 7), chi2=np.float32(1.0625), drift=drift,
        parameters={"model": "gaussian", "window_px": 7, "tol": 1e-10, "max_iter": 50,
                    "inf": math.inf, "nan": math.nan, "flags": {1: "converged", 2: "max_iter"},
                    "ids": list(range(20000)), "note": "x" * 100_000,
                    "weights": np.arange(6, dtype=np.float32), "complex": 1 + 2j,
                    "seed": np.int64(7), "path": Path("/data/run1.ndata1"),
                    "empty": {}, "none": None, "set": {3, 1, 2}})


# ------------------------------------------------------------------------------ round trips


def test_round_trip_dataclass_exact(tmp_path, sim):
    rigid = make_rigid(sim)
    path = save(rigid, tmp_path / "rigid.h5")
    back = load(path)
    assert_same(rigid, back)
    assert back.shifts.dtype == np.float64 and back.quality.dtype == np.float32
    assert back.valid_region == (slice(2, 38), slice(1, 47))
    assert back.parameters["max_shift"] == (3.0, 4.0)  # a tuple stays a tuple


@pytest.mark.parametrize("value", [np.bytes_(b""), np.str_(""), np.bytes_(b"a\x00b"),
                                   np.str_("\u00b5m")])
def test_round_trip_numpy_string_scalars(tmp_path, value):
    """Empty NumPy string scalars (a TIA file's metadata holds them) come back equal and of
    their type: the scalar's itemsize is 0, its array's is not."""
    path = tmp_path / "s.h5"
    save({"meta": {"v": value}}, path)
    back = load(path)["meta"]["v"]
    assert type(back) is type(value) and back == value


def test_round_trip_large_atom_table_and_metadata(tmp_path):
    fit = make_fit()
    path = save(fit, tmp_path / "fit.h5")
    back = load(path)
    assert_same(fit, back)
    assert back.positions.shape == (5000, 2)  # 80 kB: would be dropped as an attribute
    assert len(back.parameters["note"]) == 100_000
    assert back.parameters["flags"] == {1: "converged", 2: "max_iter"}  # int keys kept
    assert back.drift.jitter_std_pm == Pair(1.25, 2.5)
    assert type(back.drift.jitter_std_pm) is Pair
    with h5py.File(path, "r") as fh:  # arrays are datasets, not attributes
        grp = fh["stemgpu/root"]
        assert isinstance(grp["positions"], h5py.Dataset)
        assert grp["positions"].shape == (5000, 2)
        assert grp.attrs["stemgpu_class"].endswith(":FitLike")


def test_round_trip_dict_of_named_results_and_real_lattice(tmp_path, sim):
    _, truth = sim
    cells = Cells(corners=np.arange(40, dtype=np.int32).reshape(10, 4),
                  side_nm=np.full(10, 0.3905),
                  statistics={"median_side_nm": (0.3905, 0.0012), "areas": np.ones(5000)},
                  lattice=truth.lattice, parameters={"min_angle": 60})
    named = {"rigid": make_rigid(sim), "fit": make_fit(300), "cells": cells,
             "truth": truth, "comment": "run 3", 7: [np.zeros(3, np.uint16), None]}
    back = load(save(named, tmp_path / "all.h5"))
    assert_same(named, back)
    assert isinstance(back["truth"], type(truth))
    with h5py.File(tmp_path / "all.h5", "r") as fh:
        names = set(fh["stemgpu/root"].keys())
    assert {"rigid", "fit", "cells", "truth"} <= names  # readable names in the file


def test_round_trip_analysis_like_object(tmp_path, sim):
    analysis = AnalysisLike({"rigid": make_rigid(sim), "fit": make_fit(50)})
    back = load(save(analysis, tmp_path / "analysis.h5"))
    assert type(back) is AnalysisLike
    assert_same(analysis.results, back.results)


def test_round_trip_sidpy_dataset_with_large_metadata(tmp_path, sim):
    data, _ = sim
    big = {"positions": np.arange(20000, dtype=np.float64).reshape(10000, 2),
           "text": "y" * 200_000, "nested": {"a": [1, 2, (3, 4)]}}
    ds = to_dataset(data, pixel_size=14.6, frame_time_s=0.5, title="raw",
                    metadata={"pixel_size_pm": 14.6}, original_metadata=big)
    back = load(save({"raw": ds}, tmp_path / "ds.h5"))["raw"]
    np.testing.assert_array_equal(np.asarray(back.compute()), data)
    assert back.dtype == np.float32
    assert_same(big, back.original_metadata)
    assert back.metadata == {"pixel_size_pm": 14.6}
    for i in range(3):
        a, b = ds._axes[i], back._axes[i]
        assert (a.name, a.units, a.dimension_type) == (b.name, b.units, b.dimension_type)
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    assert stemgpu._inputs.pixel_size_from_dataset(back) == pytest.approx(14.6)


def test_real_rigid_result_round_trip(tmp_path, sim):
    data, _ = sim
    res = stemgpu.register_rigid(data, backend="numpy", pixel_size=14.6)
    back = load(save(res, tmp_path / "real.h5"))
    assert type(back) is type(res)
    assert_same(res.to_numpy(), back)
    drift = stemgpu.drift_report(res.shifts, pixel_size=14.6, frame_time=0.5)
    back = load(save(drift, tmp_path / "drift.h5"))
    assert type(back) is type(drift)
    assert_same(drift, back)


def test_real_demons_result_round_trip(tmp_path, sim):
    demons = pytest.importorskip("stemgpu.registration.demons")
    data, _ = sim
    try:
        res = demons.register_demons(data, iterations=3, backend="numpy")
    except TypeError as exc:  # signature still changing upstream
        pytest.skip(f"register_demons not callable as expected: {exc}")
    back = load(save(res, tmp_path / "demons.h5"))
    assert type(back) is type(res)
    assert_same(res.to_numpy() if hasattr(res, "to_numpy") else res, back)


# ------------------------------------------------------------------------------ pyNSID layout


def test_pynsid_layout_and_calibration(tmp_path, sim):
    import pyNSID

    rigid = make_rigid(sim)
    path = save({"rigid": rigid}, tmp_path / "nsid.h5")
    with h5py.File(path, "r") as fh:
        mains = pyNSID.hdf_utils.get_all_main(fh)
        names = sorted(m.name for m in mains)
        assert len(names) == 2, names
        stack = next(m for m in mains if m.ndim == 3)
        mean = next(m for m in mains if m.ndim == 2)
        ds = pyNSID.hdf_utils.read_h5py_dataset(stack)
        np.testing.assert_array_equal(np.asarray(ds), rigid.registered)
        assert ds._axes[0].dimension_type.name == "TEMPORAL"
        assert ds._axes[1].units == "nm"
        assert stemgpu._inputs.pixel_size_from_dataset(ds) == pytest.approx(14.6)
        np.testing.assert_array_equal(
            np.asarray(pyNSID.hdf_utils.read_h5py_dataset(mean)), rigid.mean)
        # stored once: the generic tree hard-links the pyNSID dataset
        assert fh["stemgpu/root/rigid/registered"].id == stack.id
        assert stack.dtype == np.float32


def test_scifireaders_nsidreader(tmp_path, sim):
    scifi = pytest.importorskip("SciFiReaders")
    path = save(make_rigid(sim), tmp_path / "scifi.h5")
    reader = scifi.NSIDReader(str(path))
    datasets = reader.read()
    datasets = list(datasets.values()) if isinstance(datasets, dict) else list(datasets)
    assert sorted(tuple(d.shape) for d in datasets) == sorted([(40, 48), (4, 40, 48)])
    stack = next(d for d in datasets if d.ndim == 3)
    assert [stack._axes[i].dimension_type.name for i in range(3)] == [
        "TEMPORAL", "SPATIAL", "SPATIAL"]
    assert stemgpu._inputs.pixel_size_from_dataset(stack) == pytest.approx(14.6)
    if hasattr(reader, "close"):
        reader.close()


def test_streamed_registered_stack_is_copied(tmp_path, sim):
    data, _ = sim
    src_path = tmp_path / "out.h5"
    with h5py.File(src_path, "w") as fh:
        fh["registered"] = data
    with h5py.File(src_path, "r") as fh:
        rigid = dataclasses.replace(make_rigid(sim, registered=False),
                                    registered=fh["registered"])
        path = save(rigid, tmp_path / "streamed.h5")
    back = load(path)
    np.testing.assert_array_equal(back.registered, data)
    lazy = load(path, lazy=True)
    assert lazy.registered.shape == data.shape
    np.testing.assert_array_equal(lazy.registered[1:3], data[1:3])
    lazy.registered.close()


# ------------------------------------------------------------------------------ provenance


def test_provenance(tmp_path, sim):
    raw = tmp_path / "input.ndata1"
    raw.write_bytes(b"pretend raw data" * 1000)
    rigid = make_rigid(sim)
    path = save({"rigid": rigid, "fit": make_fit(10)}, tmp_path / "prov.h5", source=raw)
    prov = read_provenance(path)
    assert prov["stemgpu_version"] == stemgpu.__version__
    assert prov["backend"] == "numpy"
    assert prov["device"].startswith("CPU")
    assert prov["source"]["path"] == str(raw)
    assert prov["source"]["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert prov["source"]["size_bytes"] == 16000
    assert_same(prov["parameters"]["result['rigid']"], rigid.parameters)
    assert "result['fit'].drift" in prov["parameters"]
    # a Dataset opened from a file records that file as the source
    ds = to_dataset(sim[0], pixel_size=14.6,
                    metadata={"source": {"path": str(raw), "format": "nion-ndata1"}})
    prov = read_provenance(save({"raw": ds}, tmp_path / "prov2.h5", source=ds))
    assert prov["source"]["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    prov = read_provenance(save({"raw": ds, "rigid": rigid}, tmp_path / "prov3.h5"))
    assert prov["source"]["path"] == str(raw)  # found without source=
    assert read_provenance(save(rigid, tmp_path / "prov4.h5"))["source"] is None


# ------------------------------------------------------------------------------ atomic writes


def leftovers(directory):
    return [p for p in os.listdir(directory) if p.endswith(".stemgpu-tmp")]


def test_failed_write_leaves_nothing(tmp_path, sim, monkeypatch):
    def boom(fh):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(results_mod, "_before_commit", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(make_rigid(sim), tmp_path / "r.h5")
    assert os.listdir(tmp_path) == []
    # overwriting: the old file survives a failed write untouched
    monkeypatch.setattr(results_mod, "_before_commit", None)
    save({"version": 1}, tmp_path / "r.h5")
    monkeypatch.setattr(results_mod, "_before_commit", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save({"version": 2}, tmp_path / "r.h5", overwrite=True)
    assert load(tmp_path / "r.h5") == {"version": 1}
    assert leftovers(tmp_path) == []


def test_unsupported_object_fails_cleanly(tmp_path):
    with pytest.raises(TypeError, match=r"cannot save result\['cb'\]: objects of type "
                                        r"builtins\.function are not supported"):
        save({"cb": lambda x: x}, tmp_path / "bad.h5")
    assert os.listdir(tmp_path) == []


def test_killed_write_leaves_no_corrupt_file_and_no_stale_temp(tmp_path):
    target = tmp_path / "killed.h5"
    save({"old": np.arange(5)}, target)
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from stemgpu.io import results
        def block(fh):
            fh.flush()
            print("writing", flush=True)
            time.sleep(120)
        results._before_commit = block
        results.save({{"new": np.ones((200, 200, 50))}}, {str(target)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(leftovers(tmp_path)) == 1  # the half-written temporary
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    back = load(target)  # the previous file is intact
    np.testing.assert_array_equal(back["old"], np.arange(5))
    save({"x": 1}, tmp_path / "next.h5")  # the next save cleans the dead writer's temp
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ errors


def test_errors(tmp_path):
    path = save({"a": 1}, tmp_path / "a.h5")
    with pytest.raises(FileExistsError, match=r"a\.h5' exists; pass overwrite=True"):
        save({"a": 2}, path)
    assert load(save({"a": 2}, path, overwrite=True)) == {"a": 2}
    with pytest.raises(FileNotFoundError, match=r"missing\.h5.*no such file"):
        load(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as fh:
        fh["x"] = 1
    with pytest.raises(ValueError, match=r"plain\.h5.*not a stemgpu results file"):
        load(tmp_path / "plain.h5")
    (tmp_path / "text.h5").write_text("no")
    with pytest.raises(ValueError, match=r"text\.h5.*not a stemgpu results file"):
        load(tmp_path / "text.h5")
    with pytest.raises(ValueError, match="compression must be None, 'gzip' or 'lzf'; got 'zip'"):
        save({"a": 1}, tmp_path / "c.h5", compression="zip")
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        save({"a": 1}, tmp_path / "nodir" / "c.h5")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike; got int"):
        save({"a": 1}, 5)


def test_compression_round_trip(tmp_path):
    fit = make_fit(200)
    back = load(save(fit, tmp_path / "gz.h5", compression="gzip"))
    assert_same(fit, back)


def test_json_encoding_is_valid_json(tmp_path):
    # the JSON datasets must be readable by any JSON parser except for NaN/Infinity tokens
    text = json.dumps(codec.to_json({"t": (1, 2), 3: slice(None, 4)}, "x"))
    assert json.loads(text) == {"__dict__": [["t", {"__tuple__": [1, 2]}],
                                             [3, {"__slice__": [None, 4, None]}]]}


@pytest.mark.gpu
def test_cupy_result_saved_as_numpy_with_cupy_provenance(tmp_path, sim):
    import cupy

    pytest.importorskip("sidpy", reason="results files write images through sidpy")
    pytest.importorskip("pyNSID", reason="results files write images through pyNSID")

    rigid = make_rigid(sim)
    on_gpu = dataclasses.replace(rigid, shifts=cupy.asarray(rigid.shifts),
                                 registered=cupy.asarray(rigid.registered),
                                 mean=cupy.asarray(rigid.mean))
    path = save(on_gpu, tmp_path / "gpu.h5")
    back = load(path)
    assert_same(rigid, back)  # NumPy arrays, same dtypes and values
    prov = read_provenance(path)
    assert prov["backend"] == "cupy" and not prov["device"].startswith("CPU")


def test_files_written_before_the_app_move_still_load():
    """Files written at commit fd99a0b (stemgpu.pipeline:Analysis, see tests/data/README.md)
    load into today's classes and give the same summary, number for number."""
    data = Path(__file__).resolve().parent / "data"
    expected = json.loads((data / "expected_fd99a0b.json").read_text())
    with h5py.File(data / "analysis_fd99a0b.h5", "r") as fh:
        assert fh["stemgpu"].attrs["stemgpu_wrapper_class"] == "stemgpu.pipeline:Analysis"
    analysis = load(data / "analysis_fd99a0b.h5")
    assert isinstance(analysis, stemgpu.Analysis)
    assert type(analysis.rigid) is stemgpu.RigidResult
    assert type(analysis.atoms) is stemgpu.AtomFit
    assert analysis.statistics.n_cells == expected["n_cells"]
    np.testing.assert_array_equal(np.asarray(analysis.rigid.shifts),
                                  np.asarray(expected["analysis_shifts"]))
    rows = {k: r.as_dict() for k, r in analysis.summary().items()}
    assert rows.keys() == expected["summary_rows"].keys()
    for name, row in rows.items():
        want = expected["summary_rows"][name]
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(want[key]), (name, key)
            elif isinstance(value, float):
                # The rows are recomputed from the loaded arrays (which are exact, above):
                # the drift fit's least squares differ in the last bit with the BLAS build
                # and its thread count.
                assert value == pytest.approx(want[key], rel=1e-12, abs=0.0), (name, key)
            else:
                assert value == want[key], (name, key)
    assert analysis.summary(as_text=True) == expected["summary_text"]
    rigid = load(data / "rigid_fd99a0b.h5")
    assert type(rigid) is stemgpu.RigidResult
    np.testing.assert_array_equal(np.asarray(rigid.shifts), np.asarray(expected["rigid_shifts"]))
    assert float(np.asarray(rigid.mean, dtype=np.float64).sum()) == expected["rigid_mean_sum"]


def test_one_lazy_array_rule_with_memmap_flag(tmp_path):
    from stemgpu._inputs import is_frame_source

    mm = np.memmap(tmp_path / "m.dat", dtype="float32", mode="w+", shape=(3, 8, 8))
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        dset = fh.create_dataset("d", data=np.zeros((3, 8, 8)))
        assert is_frame_source(dset) and is_frame_source(dset, memmap=False)
    assert is_frame_source(mm) and not is_frame_source(mm, memmap=False)
    for obj in (np.zeros(3), np.float32(1.0), "abc", b"x", [1, 2], {"shape": 1}):
        assert not is_frame_source(obj)
    # the results writer stores a memmap as the array it is, in one dataset
    back = load(save({"m": mm}, tmp_path / "mm.h5"))
    np.testing.assert_array_equal(back["m"], np.asarray(mm))


def test_provenance_of_an_opened_file_reaches_the_results_file(tmp_path):
    """analyze(stemgpu.open(f)) then save records the file without source= (no CLI)."""
    from nion_files import write_library_ndata

    from stemgpu.io.results import read_provenance

    stack, _ = stemgpu.simulate_stack((4, 96, 96), seed=3)
    path = write_library_ndata(str(tmp_path / "s.ndata"), stack.astype("float32"))
    res = stemgpu.analyze(stemgpu.open(path, lazy=False), steps=("rigid",), progress=False)
    out = tmp_path / "r.h5"
    stemgpu.save(res, out)
    src = read_provenance(out)["source"]
    assert src["path"] == os.path.abspath(path)
    assert len(src["sha256"]) == 64 and src["format"] == "nion-ndata"
    assert "original_metadata" in src


# ------------------------------------------------------------ no lost results, no lost kinds


def test_two_racing_saves_without_overwrite_exactly_one_wins(tmp_path, monkeypatch):
    """Both saves pass the early existence check before either commits: the commit itself
    refuses the second (a hard link fails onto an existing name), and the file is whole."""
    import threading

    target = tmp_path / "race.h5"
    barrier = threading.Barrier(2, timeout=30)
    monkeypatch.setattr(results_mod, "_before_commit", lambda fh: barrier.wait())
    outcomes = {}

    def one(k):
        try:
            save({"writer": k, "data": np.full((50, 50), k, np.float32)}, target)
            outcomes[k] = "saved"
        except FileExistsError as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(type(v).__name__ for v in outcomes.values()) == ["FileExistsError", "str"]
    loser = next(v for v in outcomes.values() if not isinstance(v, str))
    assert "created while this save was writing" in str(loser)
    winner = next(k for k, v in outcomes.items() if v == "saved")
    monkeypatch.setattr(results_mod, "_before_commit", None)
    back = load(target)
    assert back["writer"] == winner
    np.testing.assert_array_equal(back["data"], np.full((50, 50), winner, np.float32))
    assert leftovers(tmp_path) == []


def test_commit_without_hard_links_still_refuses_an_existing_file(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported (simulated)")

    monkeypatch.setattr(os, "link", no_links)
    target = save({"a": 1}, tmp_path / "nolink.h5")
    assert load(target) == {"a": 1}
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        results_mod._commit_new(save({"b": 2}, tmp_path / "other.h5"), target)
    assert load(target) == {"a": 1}


ARRAY_KINDS = {
    "0-d float": np.array(3.5),
    "0-d int16": np.array(3, "i2"),
    "0-d unicode": np.array("abc"),
    "0-d bytes": np.array(b"abc"),
    "structured": np.array([(1.5, (1, 2))], dtype=[("a", "f4"), ("b", "i2", (2,))]),
    "structured, large": np.zeros(2000, dtype=[("a", "f4"), ("b", "i2")]),
    "structured with text": np.array([(1, "ab")], dtype=[("a", "i4"), ("s", "U3")]),
    "nested structured": np.zeros(3, dtype=[("a", [("x", "f4")])]),
    "aligned structured": np.zeros(2, dtype=np.dtype([("a", "i1"), ("b", "f8")], align=True)),
    "masked": np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0], fill_value=7.0),
    "masked, large": np.ma.masked_array(np.arange(2000.0), mask=np.arange(2000) % 3 == 0),
    "masked structured": np.ma.masked_array(np.zeros(2, dtype=[("a", "f4"), ("b", "i2")]),
                                            mask=[(0, 1), (1, 0)]),
    "masked 0-d": np.ma.masked_array(3.0, mask=True),
    "datetime64": np.arange(3).astype("datetime64[s]"),
    "timedelta64, large": np.arange(2000).astype("timedelta64[ms]"),
    "big-endian": np.array([1.5, 2.0], dtype=">f8"),
    "empty unicode": np.zeros((0, 3), "U2"),
    "recarray": np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "matrix": np.array([[1, 2]]).view(np.matrix),  # a view: no PendingDeprecationWarning
    "numpy str scalar": np.str_("x"),
}


def _same(back, value):
    assert type(back) is type(value)
    if isinstance(value, np.ndarray | np.generic):
        assert back.dtype == value.dtype and back.shape == value.shape
        if isinstance(value, np.ma.MaskedArray):
            np.testing.assert_array_equal(np.ma.getmaskarray(back), np.ma.getmaskarray(value))
            assert back.fill_value == value.fill_value
            back, value = back.data, value.data
        assert np.asarray(back).tobytes() == np.asarray(value).tobytes()
    else:
        assert back == value


@pytest.mark.parametrize("kind", list(ARRAY_KINDS))
@pytest.mark.parametrize("wrap", ["bare", "in a dict", "in a dataclass"])
def test_every_array_kind_round_trips_exactly(tmp_path, kind, wrap):
    value = ARRAY_KINDS[kind]
    obj = {"bare": value, "in a dict": {"x": value},
           "in a dataclass": RigidLike(value, None, None, None, (), None, None)}[wrap]
    back = load(save(obj, tmp_path / "k.h5"))
    _same({"bare": back, "in a dict": back["x"] if isinstance(back, dict) else None,
           "in a dataclass": getattr(back, "shifts", None)}[wrap], value)


def test_unsupported_array_subclass_is_refused_by_name(tmp_path):
    class Tagged(np.ndarray):
        pass

    with pytest.raises(TypeError, match=r"cannot save result\['t'\]: ndarray subclass .*Tagged "
                                        r"is not supported.*numpy\.asarray"):
        save({"t": np.zeros(3).view(Tagged)}, tmp_path / "t.h5")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kw, match", [
    ({"overwrite": "no"}, "overwrite must be True or False; got 'no'"),
    ({"overwrite": 1}, "overwrite must be True or False; got 1"),
    ({"progress": "yes"}, "progress must be True or False; got 'yes'"),
    ({"compression": ["gzip"]}, r"compression must be None, 'gzip' or 'lzf'; got \['gzip'\]"),
])
def test_option_values_are_checked_before_anything_is_replaced(tmp_path, kw, match):
    path = save({"a": 1}, tmp_path / "keep.h5")
    with pytest.raises(ValueError, match=match):
        save({"a": 2}, path, **kw)  # overwrite="no" used to read as true and replace it
    assert load(path) == {"a": 1}
    with pytest.raises(ValueError, match="lazy must be True or False; got 'no'"):
        load(path, lazy="no")


def test_strings_with_nul_characters_round_trip(tmp_path):
    """HDF5 strings end at a NUL (h5py refuses them): found by tests/test_hypothesis.py."""
    value = {"a\x00b": "\x00", "k": ["x\x00"], "long": "y\x00" * 5000}
    assert load(save(value, tmp_path / "nul.h5")) == value
    assert load(save("\x00z", tmp_path / "bare.h5")) == "\x00z"

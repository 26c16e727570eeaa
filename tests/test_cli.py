"""The stemgpu command: run on a Nion file, bad input, exit codes, info and bench."""

from __future__ import annotations

import numpy as np
import pytest
from nion_files import write_library_ndata as write_ndata1

import stemgpu
from stemgpu.app.cli import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_USAGE, main


@pytest.fixture(scope="module")
def nion_file(tmp_path_factory):
    stack, _ = stemgpu.simulate_stack((6, 192, 192), frame_jitter_px=0.3, line_jitter_px=0.05,
                                      seed=11)
    path = tmp_path_factory.mktemp("nion") / "stack.ndata"
    write_ndata1(str(path), stack.astype("float32"), pixel_size_nm=0.0146)
    return path


def test_run_gives_the_same_numbers_as_the_python_api(nion_file, tmp_path, capsys):
    out = tmp_path / "res.h5"
    fig = tmp_path / "res.png"
    assert main(["run", str(nion_file), "--out", str(out), "--figure", str(fig),
                 "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    from_cli = stemgpu.load(out)
    direct = stemgpu.analyze(stemgpu.open(nion_file, lazy=False), progress=False)
    a, b = from_cli.summary(), direct.summary()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].value == pytest.approx(b[name].value, rel=1e-9, abs=1e-12), name
        assert a[name].uncertainty == pytest.approx(b[name].uncertainty, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(np.asarray(from_cli.rigid.shifts), np.asarray(direct.rigid.shifts))
    assert fig.stat().st_size > 10_000
    prov = stemgpu.io.results.read_provenance(out)
    assert str(nion_file.name) in str(prov)


def test_run_prints_summary_and_respects_steps(nion_file, tmp_path, capsys):
    out = tmp_path / "rigid.h5"
    assert main(["run", str(nion_file), "--out", str(out), "--steps", "rigid"]) == 0
    text = capsys.readouterr().out
    assert "jitter std x" in text and "results:" in text
    res = stemgpu.load(out)
    assert res.atoms is None and res.drift is not None


def _one_line_error(capsys):
    raw = capsys.readouterr().err
    assert "Traceback" not in raw
    # What a terminal shows: a progress bar cleared with "\r" leaves only the later text.
    err = "\n".join(line.split("\r")[-1] for line in raw.split("\n")).strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("content, match", [
    (b"this is not a microscope file\n", "stack.h5"),
    (b"PK\x03\x04truncated zip", "stack.h5"),
])
def test_bad_files_give_one_line_errors(tmp_path, capsys, content, match):
    bad = tmp_path / "stack.h5"
    bad.write_bytes(content)
    assert main(["run", str(bad), "--out", str(tmp_path / "o.h5")]) == EXIT_BAD_INPUT
    assert match in _one_line_error(capsys)
    assert not (tmp_path / "o.h5").exists()


def test_missing_file_and_directory(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.ndata1")]) == EXIT_BAD_INPUT
    assert "no such file" in _one_line_error(capsys)
    assert main(["run", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "directory" in _one_line_error(capsys)


@pytest.mark.parametrize("argv, code, match", [
    # a bad option value exits 3 (README), argparse's own errors 2
    (["run", "{f}", "--steps", "rigid,warp"], EXIT_BAD_INPUT, "--steps 'rigid,warp': unknown"),
    (["run", "{f}", "--pixel-size", "-3"], EXIT_BAD_INPUT,
     "--pixel-size must be a positive number (pm per pixel); got '-3'"),
    (["run", "{f}", "--pixel-size", "nan"], EXIT_BAD_INPUT, "positive number"),
    (["run", "{f}", "--pixel-size", "abc"], EXIT_BAD_INPUT,
     "--pixel-size must be a positive number (pm per pixel); got 'abc'"),
    (["run", "{f}", "--pixel-size"], EXIT_USAGE, "expected one argument"),
    (["demo", "--frames", "2"], EXIT_BAD_INPUT, "frames"),
    (["frobnicate"], EXIT_USAGE, "invalid choice"),
])
def test_bad_options_give_one_line_errors(nion_file, tmp_path, capsys, argv, code, match):
    argv = [a.replace("{f}", str(nion_file)) for a in argv]
    with pytest.raises(SystemExit) if code == EXIT_USAGE else _no_raise() as ctx:
        rc = main(argv + (["--out", str(tmp_path / "x.h5")] if argv[0] == "run" else []))
    if code == EXIT_USAGE:
        assert ctx.value.code == EXIT_USAGE
    else:
        assert rc == code
    assert match in _one_line_error(capsys)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unavailable_backend_exit_code(nion_file, tmp_path, capsys, monkeypatch):
    import sys

    from stemgpu.backend import _clear_caches

    # A machine without CuPy, also where CuPy (or its test stand-in) is usable.
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delenv("STEMGPU_CUPY_STANDIN", raising=False)
    _clear_caches()
    rc = main(["run", str(nion_file), "--backend", "cupy", "--out", str(tmp_path / "x.h5")])
    assert rc == EXIT_BACKEND
    assert "cupy" in _one_line_error(capsys).lower()
    _clear_caches()


def test_info_and_bench(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text and "numpy" in text and "kernel sources" in text
    assert main(["bench", "--size", "96", "--frames", "3"]) == 0
    text = capsys.readouterr().out
    assert "rigid" in text and "numpy" in text


def test_run_reads_a_pynsid_file(tmp_path, capsys):
    import warnings

    import h5py
    import pyNSID

    from stemgpu.io.sidpy_io import to_dataset

    stack, truth = stemgpu.simulate_stack((5, 128, 128), frame_jitter_px=0.4, seed=2)
    path = tmp_path / "nsid.h5"
    with h5py.File(path, "w") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grp = fh.create_group("Measurement_000/Channel_000")
        pyNSID.hdf_io.write_nsid_dataset(to_dataset(stack.astype("float32"), pixel_size=14.6),
                                         grp)
    out = tmp_path / "o.h5"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--steps", "rigid"]) == 0
    res = stemgpu.load(out)
    assert res.pixel_size_pm == pytest.approx(14.6)
    err = np.asarray(res.rigid.shifts) - truth.registration_shifts("mean")
    assert np.sqrt(np.mean(err**2)) < 0.05


def test_results_file_is_refused_as_input(nion_file, tmp_path, capsys):
    out = tmp_path / "res.h5"
    assert main(["run", str(nion_file), "--out", str(out), "--quiet", "--steps", "rigid"]) == 0
    assert main(["run", str(out), "--out", str(tmp_path / "again.h5")]) == EXIT_BAD_INPUT
    assert "stemgpu results file" in _one_line_error(capsys)


def test_output_paths_checked_before_the_analysis(nion_file, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "folder" / "o.h5"
    assert main(["run", str(nion_file), "--out", str(missing)]) == EXIT_BAD_INPUT
    assert "does not exist" in _one_line_error(capsys)
    assert main(["run", str(nion_file), "--out", str(tmp_path / "o.h5"), "--figure",
                 str(tmp_path / "fig.h5")]) == EXIT_BAD_INPUT
    assert "not an image file name" in _one_line_error(capsys)
    assert not (tmp_path / "o.h5").exists()


def test_nothing_found_is_an_analysis_failure(tmp_path, capsys):
    from stemgpu.app.cli import EXIT_FAILED

    rng = np.random.default_rng(0)
    path = tmp_path / "noise.ndata"
    write_ndata1(str(path), rng.poisson(5.0, (4, 96, 96)).astype("float32"))
    rc = main(["run", str(path), "--out", str(tmp_path / "o.h5"), "--steps", "atoms,cells"])
    assert rc == EXIT_FAILED
    assert "atoms: the species split by intensity is not supported" in _one_line_error(capsys)


def test_run_without_demons_streams_the_stack(nion_file, tmp_path, capsys):
    """Without demons the frames are streamed from disk; the numbers match the in-memory
    analysis of the same file."""
    out = tmp_path / "streamed.h5"
    assert main(["run", str(nion_file), "--out", str(out), "--steps", "rigid,atoms,cells"]) == 0
    assert "streaming the frames" in capsys.readouterr().out
    streamed = stemgpu.load(out)
    assert streamed.info["streamed"] is True and streamed.rigid.registered is None
    direct = stemgpu.analyze(stemgpu.open(nion_file, lazy=False), progress=False,
                             steps=("rigid", "atoms", "cells"))
    assert direct.info["streamed"] is False
    np.testing.assert_allclose(np.asarray(streamed.rigid.shifts),
                               np.asarray(direct.rigid.shifts), atol=1e-4)
    a, b = streamed.summary(), direct.summary()
    for name in ("a1_length_pm", "tetragonal", "jitter_std_x_pm"):
        assert a[name].value == pytest.approx(b[name].value, abs=0.05 * b[name].uncertainty)


def test_streamed_analysis_needs_rigid(nion_file):
    """A lazy stack is streamed through rigid (and demons) registration; without 'rigid'
    there is no registered mean to fit (demons is streamed since the frame store)."""
    source = stemgpu.open_frames(nion_file)
    try:
        with pytest.raises(ValueError, match="include 'rigid'"):
            stemgpu.analyze(source, progress=False, steps=("atoms", "cells"))
    finally:
        source.close()


def test_run_streams_demons_and_removes_its_store(nion_file, tmp_path, capsys):
    """With demons the frames are streamed too: the demons frames go to a temporary store
    next to the results (gone afterwards), and the results equal the in-memory run's."""
    out = tmp_path / "streamed.h5"
    assert main(["run", str(nion_file), "--out", str(out)]) == 0
    assert "the demons frames go to a temporary store" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.h5"]
    streamed = stemgpu.load(out)
    assert streamed.info["streamed"] is True
    assert streamed.demons.parameters["streamed"] is True
    direct = stemgpu.analyze(stemgpu.open(nion_file, lazy=False), progress=False)
    np.testing.assert_array_equal(streamed.demons.registered, direct.demons.registered)
    np.testing.assert_array_equal(streamed.demons.displacement, direct.demons.displacement)
    np.testing.assert_array_equal(streamed.mean_image, direct.mean_image)
    np.testing.assert_array_equal(streamed.atoms.positions, direct.atoms.positions)


def test_read_nsid_reads_what_run_reads(tmp_path):
    import warnings

    import h5py
    import pyNSID

    from stemgpu.io.nsid import read_nsid
    from stemgpu.io.sidpy_io import pixel_size_from_dataset, to_dataset

    stack, _ = stemgpu.simulate_stack((3, 64, 64), seed=1)
    path = tmp_path / "nsid.h5"
    with h5py.File(path, "w") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grp = fh.create_group("Measurement_000/Channel_000")
        pyNSID.hdf_io.write_nsid_dataset(to_dataset(stack.astype("float32"), pixel_size=14.6),
                                         grp)
    ds = read_nsid(path)
    np.testing.assert_array_equal(np.asarray(ds), stack.astype("float32"))
    assert pixel_size_from_dataset(ds) == pytest.approx(14.6)
    assert pixel_size_from_dataset(read_nsid(path, pixel_size=20.0)) == pytest.approx(20.0)
    with h5py.File(tmp_path / "plain.h5", "w") as fh:
        fh.create_dataset("data", data=stack)
    assert read_nsid(tmp_path / "plain.h5") is None
    assert read_nsid(tmp_path / "missing.h5") is None


def test_old_module_paths_are_the_new_objects():
    import stemgpu.app as app
    from stemgpu import cli, demo, pipeline, report

    assert cli.main is app.main and cli.STEP_NAMES is app.STEPS
    assert pipeline.analyze is app.analyze and pipeline.Analysis is app.Analysis
    assert demo.run_demo is app.run_demo and report.plot_report is app.plot_report

"""``stemgpu batch``: many files, one failing, a summary of all, resume."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from nion_files import write_library_ndata

import stemgpu
from stemgpu.app.batch import EXIT_PARTIAL, SUMMARY_NAME, run_batch
from stemgpu.app.cli import main

N_GOOD = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-in")
    paths = []
    for i in range(N_GOOD):
        stack, _ = stemgpu.simulate_stack((4, 128, 128), frame_jitter_px=0.3, seed=40 + i)
        paths.append(write_library_ndata(folder / f"stack{i}.ndata", stack.astype("float32")))
    good = open(paths[0], "rb").read()
    bad = folder / "corrupt.ndata"
    bad.write_bytes(good[: len(good) // 3])  # a truncated zip, as an interrupted copy leaves
    paths.insert(3, str(bad))
    return paths


def _rows(out_dir):
    with open(out_dir / SUMMARY_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def _mtimes(out_dir):
    return {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*-stemgpu.h5")}


def test_batch_reports_the_failed_file_and_finishes_the_others(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["batch", *files, "--out-dir", str(out)])
    assert code == EXIT_PARTIAL == 5
    captured = capsys.readouterr()
    results = sorted(p.name for p in out.glob("*-stemgpu.h5"))
    assert results == [f"stack{i}-stemgpu.h5" for i in range(N_GOOD)]
    rows = _rows(out)
    assert [os.path.basename(r["file"]) for r in rows] == [os.path.basename(f) for f in files]
    bad = rows[3]
    assert bad["status"] == "failed" and "corrupt.ndata" in bad["error"]
    assert "truncated" in bad["error"] or "corrupt" in bad["error"].replace("corrupt.ndata", "")
    assert all(r["status"] == "ok" and r["error"] == "" for i, r in enumerate(rows) if i != 3)
    # the printed table and one stderr line for the failure
    assert "corrupt.ndata" in captured.out and "stack4-stemgpu.h5" in captured.out
    err = [line for line in captured.err.splitlines() if line.startswith("stemgpu:")]
    assert len(err) == 1 and "corrupt.ndata" in err[0]
    # each results file is what `stemgpu run` would give
    res = stemgpu.load(out / "stack1-stemgpu.h5")
    for name, row in res.summary().items():
        assert float(rows[1][name]) == pytest.approx(row.value, rel=1e-12), name
    direct = stemgpu.analyze(stemgpu.open(files[1], lazy=False), progress=False)
    np.testing.assert_allclose(np.asarray(res.rigid.shifts), np.asarray(direct.rigid.shifts))

    # --resume: nothing finished is redone; the failed file is tried again (and fails again)
    before = _mtimes(out)
    code = main(["batch", *files, "--out-dir", str(out), "--resume", "--quiet"])
    assert code == EXIT_PARTIAL
    assert _mtimes(out) == before
    again = _rows(out)
    assert [r["status"] for r in again] == [r["status"] for r in rows]
    assert again[1]["a1_length_pm"] == rows[1]["a1_length_pm"]  # kept from the first run
    assert again[1]["resumed"] == "yes" and again[3]["resumed"] == ""
    capsys.readouterr()
    # without the corrupt file: everything is done, exit 0, still nothing rewritten
    good = [f for f in files if "corrupt" not in f]
    assert main(["batch", *good, "--out-dir", str(out), "--resume"]) == 0
    assert "5 of 5 file(s) already done, 0 to analyse" in capsys.readouterr().out
    assert _mtimes(out) == before


def test_batch_refuses_inputs_writing_the_same_results_file(files, tmp_path):
    twin = tmp_path / "twin"
    twin.mkdir()
    other = twin / os.path.basename(files[0])
    other.write_bytes(open(files[0], "rb").read())
    with pytest.raises(ValueError, match="would both write"):
        run_batch([files[0], str(other)], out_dir=tmp_path / "o", quiet=True)
    assert main(["batch", files[0], str(other), "--out-dir", str(tmp_path / "o")]) == 3


def test_batch_in_process_uses_no_cluster_code(files, tmp_path):
    # sidpy (reading and saving) imports dask itself; stemgpu's dask module stays unloaded
    import subprocess
    import sys

    code = ("import sys; from stemgpu.app.cli import main; "
            f"rc = main(['batch', {files[0]!r}, '--out-dir', {str(tmp_path)!r}, '--quiet', "
            "'--steps', 'rigid']); "
            "assert rc == 0, rc; "
            "assert 'stemgpu.app.distributed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_batch_on_a_local_cluster_gives_the_same_rows(files, tmp_path, capsys):
    inproc, dist = tmp_path / "a", tmp_path / "b"
    assert main(["batch", *files, "--out-dir", str(inproc), "--quiet"]) == EXIT_PARTIAL
    assert main(["batch", *files, "--out-dir", str(dist), "--scheduler", "local",
                 "--workers", "2"]) == EXIT_PARTIAL
    assert "dask dashboard:" in capsys.readouterr().out
    a, b = _rows(inproc), _rows(dist)
    assert [r["status"] for r in a] == [r["status"] for r in b]
    assert a[3]["error"] == b[3]["error"]
    skip = {"seconds", "results"}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in skip} == \
            {k: v for k, v in rb.items() if k not in skip}

"""The summary's quality section (Analysis.quality, format_quality): flagged frames and
columns with their reasons, the fraction of cells rejected, gate records and warnings, the
same after a save/load round trip, and absent from files written before it existed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stemgpu
from stemgpu.app import Analysis
from stemgpu.app.table import format_quality
from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.stats import cell_statistics

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def bad_frame_run():
    """Six SrTiO3 frames, frame 2 replaced by noise of the same mean; tracked."""
    stack, _ = stemgpu.simulate_stack((6, 160, 160), frame_jitter_px=0.3, seed=2)
    rng = np.random.default_rng(0)
    stack[2] = rng.poisson(float(stack[2].mean()), stack[2].shape).astype(stack.dtype)
    res = stemgpu.analyze(stack, pixel_size=14.6, progress=False,
                          steps=("rigid", "atoms", "cells", "track"))
    return res


def test_flagged_frame_and_its_reason(bad_frame_run):
    q = bad_frame_run.quality()
    flagged = np.flatnonzero(np.asarray(bad_frame_run.rigid.flagged))
    assert flagged.tolist() == [2]
    assert list(q["frames"]["flagged"]) == [2] and q["frames"]["n_frames"] == 6
    reason = q["frames"]["flagged"][2]
    assert reason  # a word for why, from the rigid result
    text = bad_frame_run.summary(as_text=True)
    assert f"  frames flagged (rigid): 1 of 6: frame 2: {reason}" in text.splitlines()


def test_columns_cells_and_tracking_match_the_results(bad_frame_run):
    res = bad_frame_run
    q = res.quality()
    assert q["columns"]["status"] == res.atoms.status_counts()
    assert q["columns"]["n_columns"] == len(np.asarray(res.atoms.status))
    assert q["columns"]["width_held"] == int(np.asarray(res.atoms.width_fixed).sum())
    p = res.cells.parameters
    assert q["cells"]["accepted"] == p["cells"] == res.cells.n_cells
    assert q["cells"]["candidates"] == p["cells"] + p["rejected_not_square"] + \
        p["rejected_shape"]
    assert q["cells"]["gates"] == p["gates"]
    assert set(p["gates"]) >= {"side_ratio", "angle_deviation_deg"}
    tr = res.tracks
    assert q["tracking"]["columns_flagged"] == int((np.asarray(tr.column_flags) != 0).sum())
    assert q["tracking"]["n_frames"] == tr.n_frames == 5  # the flagged frame is not tracked
    assert q["species"]["species_separation"]["passed"] and q["warnings"] == []


def test_quality_section_follows_the_notes_and_keeps_every_row(bad_frame_run):
    from stemgpu.app.table import format_rows

    text = bad_frame_run.summary(as_text=True)
    table = format_rows(bad_frame_run.summary())
    assert text.startswith(table + "\nquality:\n")
    assert text[len(table) + 1:] == bad_frame_run.quality(as_text=True)


def test_quality_survives_save_and_load(bad_frame_run, tmp_path):
    pytest.importorskip("sidpy", reason="results files write images through sidpy")
    pytest.importorskip("pyNSID", reason="results files write images through pyNSID")
    back = stemgpu.load(stemgpu.save(bad_frame_run, tmp_path / "q.h5"))
    assert back.summary(as_text=True) == bad_frame_run.summary(as_text=True)
    assert back.quality() == bad_frame_run.quality()


def _rectangle_analysis(ratio: float, pixel_size=10.0) -> Analysis:
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    pos = np.stack([r.ravel() * 20.0 * ratio, c.ravel() * 20.0], axis=1)
    pos += np.random.default_rng(0).normal(scale=0.05, size=pos.shape)
    cells = unit_cells(pos, pixel_size=pixel_size)
    return Analysis({"info": {"pixel_size_pm": pixel_size, "quality_section": True},
                     "cells": cells, "statistics": cell_statistics(cells)})


def test_warning_when_a_gate_was_close():
    """Cells of side ratio 1.18 pass the square gate (limit 1.2) with a warning line; 1.05
    gives none."""
    close = _rectangle_analysis(1.18)
    q = close.quality()
    ratio = q["cells"]["gates"]["side_ratio"]["value"]
    assert 1.16 < ratio < 1.2
    assert q["warnings"] == [f"gate side_ratio close: {ratio:.3g} against the limit 1.2"]
    assert close.summary(as_text=True).endswith("  WARNING: " + q["warnings"][0])
    assert _rectangle_analysis(1.05).quality()["warnings"] == []


def test_fraction_of_cells_rejected():
    """Columns shifted by a third of a cell spoil their cells: counted as rejected."""
    r, c = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    pos = np.stack([r.ravel(), c.ravel()], axis=1) * 20.0
    pos[[22, 57]] += 6.5
    cells = unit_cells(pos)
    q = Analysis({"info": {"pixel_size_pm": 1.0}, "cells": cells}).quality()["cells"]
    rejected = cells.parameters["rejected_not_square"] + cells.parameters["rejected_shape"]
    assert rejected > 0 and q["accepted"] == cells.n_cells
    assert q["fraction_rejected"] == pytest.approx(rejected / (rejected + cells.n_cells))
    line = next(x for x in format_quality({"cells": q, "warnings": []}).splitlines()
                if x.startswith("  cells"))
    assert f"{cells.n_cells} of {rejected + cells.n_cells} candidates accepted" in line


def test_failed_and_passed_gate_lines():
    text = format_quality({"species": {"species_separation": {
        "value": 2.5, "limit": 4.0, "passed": False, "bound": "min", "pairs": {"A/B": 2.5}}},
        "warnings": ["gate species_separation failed"]})
    assert text.splitlines() == ["quality:",
                                 "  gate species_separation: 2.5 (limit >= 4): failed (A/B D 2.5)",
                                 "  WARNING: gate species_separation failed"]


def test_old_file_prints_as_before_but_has_a_quality_record():
    """A file written before the quality section: its summary text has none (it must print
    as it did), but quality() reads what it stored; no gate records were kept then."""
    pytest.importorskip("sidpy", reason="results files write images through sidpy")
    analysis = stemgpu.load(DATA / "analysis_fd99a0b.h5")
    assert "quality:" not in analysis.summary(as_text=True)
    q = analysis.quality()
    assert q["frames"]["n_frames"] == 3 and q["cells"]["gates"] == {}
    assert q["columns"]["status"] == {"converged": 30, "out_of_bounds": 3}
    assert "  lattice gates: none recorded" in analysis.quality(as_text=True).splitlines()


def test_separation_record_covers_every_intensity_class():
    """O columns placed by geometry (fewer than 3 intensity classes) stay out of the record;
    with three intensity classes (O among them) both adjacent pairs are in it."""
    from stemgpu.atoms.fit import fit_atoms

    image, truth = stemgpu.simulate_image((160, 160), dose=2000.0, seed=1)
    keep = truth.visible(0, margin=10)
    fit = fit_atoms(image, truth.image_positions(0)[keep], sigma=truth.probe_sigma_px)
    labels = np.array([{"Sr": "A", "TiO": "B", "O": "O"}[x] for x in truth.species[keep]])
    pairs = {}
    for n_classes in (2, 3):
        info = {"pixel_size_pm": 14.6, "options": {"atoms": {"n_classes": n_classes}}}
        q = Analysis({"info": info, "atoms": fit, "species": labels}).quality()
        pairs[n_classes] = list(q["species"]["species_separation"]["pairs"])
    assert pairs == {2: ["A/B"], 3: ["A/B", "B/O"]}

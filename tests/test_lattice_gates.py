"""Lattice gates: refusals with reasons (square cells, lattice parameter, species separation),
the passes of unit_cells, the O-column placement and the lattice package's imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stemgpu.atoms.find import find_atoms
from stemgpu.atoms.fit import fit_atoms
from stemgpu.lattice import gates
from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.gates import AnalysisError, class_separation, gate_warnings
from stemgpu.lattice.perovskite import place_o_columns
from stemgpu.lattice.sublattice import assign_by_intensity, cell_edge_midpoints
from stemgpu.synthetic import Lattice, simulate_image, simulate_stack

PX = 14.6


def grid(n1, n2, a1, a2):
    i, j = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    return np.stack([i.ravel() * a1, j.ravel() * a2], 1) + 5.0


# --------------------------------------------------------------------------- cells gates

def test_rectangles_of_a_mixed_lattice_are_refused():
    """1:1.42 rectangles (what the ABF run reported as |a1| 271.7, |a2| 386.3 pm) are not
    the square A-site cells of a perovskite: refused, naming what was found."""
    pos = grid(12, 12, 271.7 / PX, 386.3 / PX)
    with pytest.raises(AnalysisError, match=r"not square: \|a1\| = 271.7 pm, \|a2\| = 386.3 pm "
                       r"\(ratio 1.422.*species.*contrast.*pixel size"):
        unit_cells(pos, pixel_size=PX)
    assert issubclass(AnalysisError, ValueError)
    # The same rectangles are a valid generic lattice, or given as lattice vectors.
    cells = unit_cells(pos, pixel_size=PX, lattice="generic")
    assert cells.n_cells == 121
    vec = np.diag([271.7, 386.3]) / PX
    assert unit_cells(pos, pixel_size=PX, lattice=vec).n_cells == 121


def test_square_gate_limits_and_records():
    ok = unit_cells(grid(10, 10, 26.0, 26.0 * 1.15), pixel_size=PX)  # ratio 1.15 < 1.2
    rec = ok.parameters["gates"]["side_ratio"]
    assert rec["passed"] and rec["value"] == pytest.approx(1.15) and rec["limit"] == 1.2
    assert gate_warnings(ok.parameters["gates"], closeness=0.7) == [
        "gate side_ratio close: 1.15 against the limit 1.2"]
    assert gate_warnings(ok.parameters["gates"]) == []  # 75 % of the way from 1 to 1.2
    far = unit_cells(grid(10, 10, 26.0, 26.0), pixel_size=PX)
    assert gate_warnings(far.parameters["gates"]) == []
    with pytest.raises(AnalysisError, match="ratio 1.250"):
        unit_cells(grid(10, 10, 26.0, 26.0 * 1.25), pixel_size=PX)
    # A rhombic lattice of 82 deg passes the per-cell test (12 deg) but not the median gate.
    v = np.array([[1.0, 0.0], [np.cos(np.radians(82.0)), np.sin(np.radians(82.0))]]) * 26.0
    i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    rhombic = np.stack([i.ravel(), j.ravel()], 1) @ v
    with pytest.raises(AnalysisError, match=r"angle 82.0 deg \(limit 90 \+- 6\)"):
        unit_cells(rhombic, lattice="median")


def test_lattice_parameter_gate():
    """A given lattice parameter far from the data's cells refuses (pixel size off by 1.4,
    or the a/sqrt(2) square of A and B columns taken together as corners)."""
    sq = grid(10, 10, 390.5 / PX, 390.5 / PX)
    good = unit_cells(sq, pixel_size=PX, lattice=390.5)
    assert good.parameters["gates"]["lattice_parameter"]["value"] < 1e-9
    with pytest.raises(AnalysisError, match=r"median sides 390.5 pm and 390.5 pm against "
                       r"546.7 pm and 546.7 pm of the lattice_parameter= / lattice= given "
                       r"\(off by 28.6%, limit 15%\)"):
        unit_cells(sq, pixel_size=PX, lattice=546.7)
    same = unit_cells(sq, pixel_size=PX, lattice_parameter=390.5, lattice="perovskite")
    np.testing.assert_array_equal(same.reference, good.reference)
    # Sr and Ti-O columns of SrTiO3 labelled as one species: squares of a / sqrt(2).
    _, truth = simulate_stack((1, 240, 240), dose=None, seed=1)
    mixed = truth.positions[truth.species != "O"]
    with pytest.raises(AnalysisError, match="does not match the lattice given"):
        unit_cells(mixed, pixel_size=PX, lattice=390.5)
    with pytest.raises(AnalysisError, match="does not match the lattice given"):
        unit_cells(mixed, lattice=truth.lattice_vectors)
    # Without a given parameter that lattice is a valid square lattice (a limitation: only
    # the expected lattice parameter tells it apart).
    assert unit_cells(mixed, pixel_size=PX).n_cells > 50


def test_gates_pass_on_simulated_perovskites():
    _, truth = simulate_stack((1, 300, 300), dose=None, strain=np.array([[0.01, 0.0],
                                                                         [0.0, -0.01]]),
                              distortion=[[1.02, 0.01], [0.0, 0.98]], seed=2)
    for lattice in (None, "median", 390.5):
        cells = unit_cells(truth.image_positions(0), species=truth.species, a_site="Sr",
                           b_site="TiO", pixel_size=PX, lattice=lattice)
        assert cells.n_cells > 50
        assert all(r["passed"] for r in cells.parameters["gates"].values())


# --------------------------------------------------------------------------- species

def fitted_amplitudes(image):
    """The pipeline's first pass: find, fit, converged amplitudes and positions."""
    found = find_atoms(image, threshold=0.03)
    fit = fit_atoms(image, found.positions, sigma=float(found.parameters["sigma"]))
    ok = np.asarray(fit.status) == 0
    return np.asarray(fit.param("amplitude"))[ok], np.asarray(fit.positions)[ok]


def nearest_species(truth, positions):
    from scipy.spatial import cKDTree

    _, k = cKDTree(truth.image_positions(0)).query(positions)
    return truth.species[k]


@pytest.mark.parametrize("seed", [0, 1])
def test_haadf_srtio3_split_passes_with_a_wide_margin(seed):
    image, truth = simulate_image((192, 192), dose=200.0, seed=seed)
    amp, pos = fitted_amplitudes(image)
    labels = assign_by_intensity(amp, n_classes=2)
    d = class_separation(amp, labels)[("A", "B")]
    assert d > 3 * gates.SEPARATION_MIN  # measured 40-42 at dose 200, 12-180 overall
    record = gates.check_separation(amp, labels)
    assert record["species_separation"]["value"] == d and gate_warnings(record) == []
    assert gate_warnings({"species_separation": {**record["species_separation"],
                                                 "value": 4.5}}) != []
    sp = nearest_species(truth, pos)
    assert np.all(labels[sp == "Sr"] == "A") and np.all(labels[sp == "TiO"] == "B")


@pytest.mark.parametrize("lattice", ["square", "honeycomb"])
def test_one_species_is_not_split(lattice):
    """One species split in two: D ~ 2.6-2.9 (square lattice) or an outlier tail of edge
    columns (honeycomb): refused; one class is accepted."""
    image, _ = simulate_image((192, 192), lattice=lattice, dose=1000.0, seed=0)
    amp, _ = fitted_amplitudes(image)
    with pytest.raises(AnalysisError, match=r"not supported by the data.*n_classes=1"):
        assign_by_intensity(amp, n_classes=2)
    assert set(assign_by_intensity(amp, n_classes=1).tolist()) == {"A"}
    labels = assign_by_intensity(amp, n_classes=2, min_separation=None)
    assert class_separation(amp, labels)[("A", "B")] < gates.SEPARATION_MIN or min(
        np.mean(labels == "A"), np.mean(labels == "B")) < gates.CLASS_FRACTION_MIN


def test_abf_sr_and_tio_do_not_separate_by_intensity():
    """Simulated ABF SrTiO3 (dips of depth (sum Z)^(1/3), inverted by its known bright level):
    Sr and Ti-O columns differ by 7 %; at 200 counts their split has D = 3.2-3.4: refused.
    All columns in two classes put Sr and Ti-O together beside O (D ~ 9): accepted as a
    split, and the lattice-parameter gate is what refuses the mixed cells."""
    image, truth = simulate_image((192, 192), contrast="dark", background=3.0, dose=200.0,
                                  seed=0)
    inverted = np.maximum(3.0 * 200.0 - image, 0.0).astype(np.float32)
    amp, pos = fitted_amplitudes(inverted)
    sp = nearest_species(truth, pos)
    cation = sp != "O"
    assert (sp == "O").sum() > 50  # O columns are visible in ABF
    with pytest.raises(AnalysisError, match="'A' and 'B' overlap"):
        assign_by_intensity(amp[cation], n_classes=2)
    labels = assign_by_intensity(amp, n_classes=2)
    assert np.all(labels[cation] == "A") and np.all(labels[~cation] == "B")
    with pytest.raises(AnalysisError, match="does not match the lattice given"):
        unit_cells(pos, species=labels, pixel_size=PX, lattice=390.5)
    # Without a lattice parameter the intensities tell: the corners are a checkerboard.
    with pytest.raises(AnalysisError, match=r"corners alternate between two intensities "
                       r"\(checkerboard ratio 2\.\d+, limit 1.5"):
        unit_cells(pos, species=labels, intensities=amp, pixel_size=PX)


def test_checkerboard_gate_passes_one_species_corners():
    image, _ = simulate_image((256, 256), dose=200.0, seed=1)
    amp, pos = fitted_amplitudes(image)
    labels = assign_by_intensity(amp, n_classes=2)
    cells = unit_cells(pos, species=labels, intensities=amp, pixel_size=PX)
    rec = cells.parameters["gates"]["corner_checkerboard"]
    assert rec["passed"] and rec["value"] < 1.0 and cells.n_cells >= 16
    same = unit_cells(pos, species=labels, pixel_size=PX)
    np.testing.assert_array_equal(cells.strain, same.strain)  # the gate changes no number


def test_merged_species_are_refused():
    """At high dose Sr and Ti-O separate in ABF too: then two classes merge two separated
    species, and the split says so."""
    image, _ = simulate_image((192, 192), contrast="dark", background=3.0, dose=5000.0,
                              seed=0)
    amp, _ = fitted_amplitudes(np.maximum(3.0 * 5000.0 - image, 0.0).astype(np.float32))
    with pytest.raises(AnalysisError, match=r"hold 3 separated classes .* n_classes=3"):
        assign_by_intensity(amp, n_classes=2)
    assert len(set(assign_by_intensity(amp, n_classes=3).tolist())) == 3


def test_mos2_two_species_separate():
    image, truth = simulate_image((192, 192), lattice="MoS2", dose=200.0, seed=0)
    amp, pos = fitted_amplitudes(image)
    labels = assign_by_intensity(amp, n_classes=2, names=["Mo", "S2"])
    np.testing.assert_array_equal(labels, nearest_species(truth, pos))
    with pytest.raises(AnalysisError, match="hold 2 separated classes"):
        assign_by_intensity(amp, n_classes=1)


# --------------------------------------------------------------------------- passes, imports

def test_place_o_columns_equals_cells_then_midpoints():
    _, truth = simulate_stack((1, 200, 200), dose=None, rotation_deg=3.0, seed=4)
    a = truth.positions[truth.species == "Sr"]
    np.testing.assert_array_equal(
        place_o_columns(a, merge_distance=1.3, side_tolerance=0.2),
        cell_edge_midpoints(unit_cells(a, side_tolerance=0.2), merge_distance=1.3))
    with pytest.raises(ValueError, match="at least 4 finite"):
        place_o_columns(a[:3])


def test_unit_cells_passes_alone():
    from stemgpu.lattice import cells as c

    pts = grid(5, 5, 20.0, 20.0)
    quads, counts = c._candidate_quads(pts)
    assert counts["pairs"] == len(quads) == 16
    tol = c._check_tolerances(12.0, 0.15, 0.1, 0.3)
    kept, hand, rejected = c._reject_non_cells(quads, pts, "square", None, tol)
    assert len(kept) == 16 and hand == 1.0 and rejected["rejected_not_square"] == 0
    geometry = c._cell_geometry(pts[kept])
    ref = c._reference_cell(geometry, "square", None, hand)
    np.testing.assert_allclose(np.abs(ref), np.eye(2) * 20.0, atol=1e-12)
    index, disp = c._assign_bsites(geometry["centres"], pts, None, np.zeros(25, bool), ref,
                                   0.3)
    assert np.all(index == -1) and np.isnan(disp).all()
    with pytest.raises(ValueError, match="side_tolerance must be a finite number > 0"):
        c._check_tolerances(12.0, 0.0, 0.1, 0.3)


def test_lattice_package_is_cheap_and_acyclic():
    code = ("import sys, stemgpu.lattice as L; names = L.__all__; "
            "assert 'scipy' not in sys.modules, 'scipy imported'; "
            "import stemgpu.lattice.stats; "
            "assert 'stemgpu.lattice.cells' not in sys.modules, 'stats imports cells'; "
            "[getattr(L, n) for n in names]; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) >= 25
    from stemgpu import lattice

    assert lattice.AnalysisError is AnalysisError and lattice.unit_cells is unit_cells
    assert Lattice.mos2 is not None

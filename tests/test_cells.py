"""unit_cells: squares from Delaunay pairs, rim/vacancy/grain rejection, species, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import stemgpu
from stemgpu.lattice.cells import UnitCells, unit_cells
from stemgpu.lattice.sublattice import assign_by_intensity, assign_by_lattice
from stemgpu.synthetic import Lattice, simulate_stack

PX = 14.6  # pm per pixel
A_PM = 390.5
A_PX = A_PM / PX


def rotation(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def srtio3_positions(n1, n2, *, rotation_deg=0.0, origin=(3.3, 4.7)):
    """Exact SrTiO3 column positions from stemgpu.synthetic.Lattice: (pos, species, V, idx)."""
    lat = Lattice.srtio3(A_PM)
    v = lat.vectors_pm @ rotation(rotation_deg).T / PX
    i, j = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    cells = np.stack([i.ravel(), j.ravel()], axis=1).astype(float)
    frac = (cells[:, None, :] + lat.basis[None]).reshape(-1, 2)
    pos = frac @ v + np.asarray(origin)
    species = np.tile(np.array(lat.species), len(cells))
    return pos, species, v, frac


def lattice_indices(points, v, origin):
    """Fractional coordinates of points in lattice v (rows) about origin."""
    return (np.asarray(points) - origin) @ np.linalg.inv(v)


def assert_genuine(cells, v, origin):
    """Every cell is one true unit cell with corners [n, n+e1, n+e1+e2, n+e2]; none twice."""
    f = lattice_indices(cells.corners, v, origin)  # (n, 4, 2)
    n = np.rint(f)
    assert np.abs(f - n).max() < 0.2, "corner off the lattice"
    d = n - n[:, :1, :]
    expected = np.array([[0, 0], [1, 0], [1, 1], [0, 1]])
    assert np.array_equal(d, np.broadcast_to(expected, d.shape)), "not a unit cell"
    keys = {tuple(k) for k in n[:, 0, :].astype(int).tolist()}
    assert len(keys) == cells.n_cells, "a cell found twice"
    return keys


def complete_cells(sites):
    """Origins (i, j) of the unit cells whose four corners are all in the integer set."""
    s = {tuple(k) for k in np.asarray(sites, dtype=int).tolist()}
    return {k for k in s if {(k[0] + 1, k[1]), (k[0], k[1] + 1), (k[0] + 1, k[1] + 1)} <= s}


# --------------------------------------------------------------------------- must show

def test_unstrained_srtio3_2pm_noise():
    pos, species, v, frac = srtio3_positions(40, 40, rotation_deg=7.0)
    rng = np.random.default_rng(11)
    sigma_px = 2.0 / PX
    noisy = pos + rng.normal(scale=sigma_px, size=pos.shape)
    cells = unit_cells(noisy, species=species, a_site="Sr", b_site="TiO", pixel_size=PX)
    sides_pm = cells.sides * PX
    assert abs(np.median(sides_pm) - A_PM) < 0.5
    a_len = np.linalg.norm(cells.vectors, axis=2) * PX
    assert np.all(np.abs(np.median(a_len, axis=0) - A_PM) < 0.5)
    assert abs(np.median(cells.angle_deviation_deg)) < 0.1
    # Smallest/longest sides are order statistics of four sides with std sigma*sqrt(2):
    # the median of the minimum of 4 normals lies 0.998 std below the mean.
    s = 2.0 * np.sqrt(2.0)
    assert abs(np.median(cells.smallest_side * PX) - (A_PM - 0.998 * s)) < 0.5
    assert abs(np.median(cells.longest_side * PX) - (A_PM + 0.998 * s)) < 0.5
    # All rim triangles excluded: exactly the 39 x 39 complete cells, each genuine.
    a_sites = np.rint(frac[species == "Sr"])
    keys = assert_genuine(cells, v, pos[0])
    assert keys == complete_cells(a_sites)
    assert cells.n_cells == 39 * 39
    assert cells.parameters["rim_or_unpaired_triangles"] > 0
    # B-site is at the centre (no displacement): median distance at the noise level only.
    assert cells.has_bsite.all()
    assert np.all(np.abs(np.nanmedian(cells.bsite_displacement, axis=0) * PX) < 0.2)
    # Corner indices point back into the input.
    np.testing.assert_array_equal(noisy[cells.corner_index], cells.corners)


def test_rim_of_irregular_patch():
    """A round patch: its hull has many slivers; none becomes a cell."""
    pos, species, v, frac = srtio3_positions(30, 30, rotation_deg=-23.0)
    keep = (species == "Sr") & (np.linalg.norm(frac - 15.0, axis=1) < 14.0)
    rng = np.random.default_rng(2)
    cells = unit_cells(pos[keep] + rng.normal(scale=0.1, size=(keep.sum(), 2)))
    keys = assert_genuine(cells, v, pos[0])
    assert keys == complete_cells(np.rint(frac[keep]))


def test_end_to_end_simulate_stack_with_vacancies():
    _, truth = simulate_stack((1, 300, 300), dose=None, vacancies=0.05, rotation_deg=4.0,
                              seed=5)
    sr = truth.species == "Sr"
    origin = truth.positions[sr][0]
    cells = unit_cells(truth.positions, species=truth.species, a_site="Sr", b_site="TiO",
                       pixel_size=truth.pixel_size_pm)
    keys = assert_genuine(cells, truth.lattice_vectors, origin)
    idx = np.rint(lattice_indices(truth.positions[sr], truth.lattice_vectors, origin))
    assert keys == complete_cells(idx)
    removed_sr = len(truth.removed_positions) > 0
    assert removed_sr and cells.n_cells > 50
    assert np.median(cells.sides) * truth.pixel_size_pm == pytest.approx(390.5, abs=1e-6)


def test_missing_columns_create_no_false_cells():
    pos, species, v, frac = srtio3_positions(30, 30, rotation_deg=12.0)
    a = species == "Sr"
    p, f = pos[a], frac[a]
    rng = np.random.default_rng(4)
    hole = (np.abs(f[:, 0] - 10) <= 1) & (np.abs(f[:, 1] - 12) <= 1)  # 3 x 3 missing block
    line = (f[:, 0] == 20) & (f[:, 1] > 5)  # a missing half row
    single = rng.random(len(p)) < 0.03  # scattered vacancies
    keep = ~(hole | line | single)
    cells = unit_cells(p[keep] + rng.normal(scale=1.5 / PX, size=(keep.sum(), 2)))
    keys = assert_genuine(cells, v, pos[0])
    assert keys == complete_cells(np.rint(f[keep]))
    # The sqrt(2)-larger squares around single vacancies were seen and rejected by size.
    assert cells.parameters["rejected_shape"] > 0


def test_grain_boundary_creates_no_false_cells():
    p1, s1, v1, _ = srtio3_positions(30, 30, rotation_deg=0.0, origin=(0.0, 0.0))
    p2, s2, v2, _ = srtio3_positions(40, 40, rotation_deg=25.0, origin=(-300.0, -200.0))
    a1 = p1[(s1 == "Sr")]
    a2 = p2[(s2 == "Sr")]
    # Grain 1 left of the line col = 0.4 * row + 300, grain 2 right of it (gap of 8 px).
    g1 = a1[a1[:, 1] < 0.4 * a1[:, 0] + 300 - 4]
    g2 = a2[(a2[:, 1] > 0.4 * a2[:, 0] + 300 + 4) & (a2[:, 0] > 0) & (a2[:, 0] < 780)
            & (a2[:, 1] < 800)]
    rng = np.random.default_rng(8)
    g1 = g1 + rng.normal(scale=2.0 / PX, size=g1.shape)
    g2 = g2 + rng.normal(scale=2.0 / PX, size=g2.shape)
    pts = np.concatenate([g1, g2])
    cells = unit_cells(pts)
    in1 = np.isin(cells.corner_index, np.arange(len(g1))).all(axis=1)
    in2 = np.isin(cells.corner_index, np.arange(len(g1), len(pts))).all(axis=1)
    assert np.all(in1 | in2), "a cell straddles the grain boundary"
    cells1 = unit_cells(g1)
    cells2 = unit_cells(g2)
    k1 = assert_genuine(cells1, v1, np.zeros(2))
    k2 = assert_genuine(cells2, v2, np.array([-300.0, -200.0]))
    assert len(k1) > 300 and len(k2) > 100
    # Every cell found in the two-grain set is a genuine cell of its own grain ...
    f1 = {tuple(k) for k in np.rint(lattice_indices(cells.corners[in1][:, 0], v1,
                                                    np.zeros(2))).astype(int).tolist()}
    f2 = {tuple(k) for k in np.rint(lattice_indices(cells.corners[in2][:, 0], v2,
                                                    np.array([-300.0, -200.0]))).astype(int)
          .tolist()}
    assert f1 <= k1 and f2 <= k2
    # ... and the second grain's cells keep their own orientation (rotation ~ 25 deg apart).
    rot = cells.rotation_deg
    assert abs(abs(np.median(rot[in1]) - np.median(rot[in2])) - 25.0) < 0.1
    assert len(f1) + len(f2) > 0.97 * (len(k1) + len(k2))


# --------------------------------------------------------------------------- species

def test_species_by_intensity_and_by_lattice():
    _, truth = simulate_stack((1, 160, 160), dose=None, seed=3)
    labels = assign_by_intensity(truth.intensity)
    expected = np.select([truth.species == "Sr", truth.species == "TiO"], ["A", "B"], "O")
    np.testing.assert_array_equal(labels, expected)
    by_lab = unit_cells(truth.positions, species=labels)
    by_int = unit_cells(truth.positions, intensities=truth.intensity)
    by_name = unit_cells(truth.positions, species=truth.species, a_site="Sr", b_site="TiO")
    np.testing.assert_array_equal(by_lab.corner_index, by_name.corner_index)
    np.testing.assert_array_equal(by_int.bsite_index, by_name.bsite_index)
    assert by_lab.has_bsite.all()
    sr0 = truth.positions[truth.species == "Sr"][0]
    lab2 = assign_by_lattice(truth.positions, lattice_vectors=truth.lattice_vectors,
                             origin=sr0, basis=truth.lattice.basis, names=truth.lattice.species)
    np.testing.assert_array_equal(lab2, truth.species)


def test_without_species_every_position_is_a_corner():
    pos, species, _, _ = srtio3_positions(6, 6)
    cells = unit_cells(pos[species == "Sr"])
    assert cells.n_cells == 25 and not cells.has_bsite.any()
    assert np.isnan(cells.bsite_displacement).all()


# --------------------------------------------------------------------------- results

def test_result_is_frozen_and_to_numpy_copies():
    pos, species, _, _ = srtio3_positions(5, 5)
    cells = stemgpu.unit_cells(pos[species == "Sr"], pixel_size=PX)
    assert isinstance(cells, UnitCells) and len(cells) == 16
    with pytest.raises(AttributeError, match="cannot assign"):
        cells.area = None
    copy = cells.to_numpy()
    copy.area[:] = 0
    assert cells.area.min() > 0
    assert cells.parameters["cells"] == 16 and "16 cells" in repr(cells)


# --------------------------------------------------------------------------- bad input

def test_nan_positions_raise_or_are_flagged():
    pos, species, _, _ = srtio3_positions(8, 8)
    a = pos[species == "Sr"].copy()
    a[[5, 17]] = np.nan
    with pytest.raises(ValueError, match=r"2 non-finite .* index 5, 17.*nan_policy='omit'"):
        unit_cells(a)
    cells = unit_cells(a, nan_policy="omit")
    assert np.flatnonzero(cells.flagged).tolist() == [5, 17]
    assert cells.parameters["n_flagged"] == 2
    assert not np.isin(cells.corner_index, [5, 17]).any()
    assert np.isfinite(cells.corners).all()


@pytest.mark.parametrize(
    ("positions", "kwargs", "match"),
    [
        (np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 0.0]]), {}, "at least 4 finite"),
        (np.stack([np.arange(10.0), 2 * np.arange(10.0)], 1), {}, "collinear"),
        (np.zeros((10, 3)), {}, r"shape \(N, 2\)"),
        (np.random.default_rng(0).random((20, 2)), {"lattice": 390.5},
         "needs pixel_size"),
        (np.random.default_rng(0).random((20, 2)), {"lattice": "cubic"},
         "lattice='cubic' is not accepted"),
        (np.random.default_rng(0).random((20, 2)), {"species": ["X"] * 20},
         "contain no 'A'; pass a_site="),
        (np.random.default_rng(0).random((20, 2)), {"species": ["A"] * 19},
         "one label per position"),
        (np.random.default_rng(0).random((20, 2)), {"side_tolerance": -1},
         "side_tolerance must be a finite number > 0"),
        (np.random.default_rng(0).random((20, 2)), {"nan_policy": "drop"},
         "nan_policy must be one of"),
        (np.random.default_rng(0).random((20, 2)), {"pixel_size": 0},
         "pixel_size must be a positive"),
    ],
)
def test_bad_input(positions, kwargs, match):
    with pytest.raises(ValueError, match=match):
        unit_cells(positions, **kwargs)


def test_too_few_a_sites_after_species():
    pos = np.random.default_rng(1).random((20, 2)) * 100
    species = np.array(["A"] * 3 + ["B"] * 17)
    with pytest.raises(ValueError, match="A-site positions must hold at least 4"):
        unit_cells(pos, species=species)


def test_bad_positions_type():
    with pytest.raises(TypeError, match="positions must be an"):
        unit_cells({"a": 1})


def test_intensity_assignment_errors():
    with pytest.raises(ValueError, match="non-finite value"):
        assign_by_intensity([1.0, np.nan, 0.5, 0.2])
    with pytest.raises(ValueError, match="at least n_classes=3"):
        assign_by_intensity([1.0, 0.5])
    with pytest.raises(ValueError, match="names must be 2 distinct"):
        assign_by_intensity([1.0, 0.5, 0.4], n_classes=2, names=["A", "A"])


def test_backends_give_the_same_cells(backend, xp):
    """CuPy positions give a CuPy-array result (geometry on host), equal to NumPy's."""
    pos, species, _, _ = srtio3_positions(8, 8, rotation_deg=3.0)
    ref = unit_cells(pos, species=species, a_site="Sr", b_site="TiO", backend="numpy")
    got = unit_cells(xp.asarray(pos), species=species, a_site="Sr", b_site="TiO",
                     backend=backend)
    assert type(got.corners).__module__.split(".")[0] == xp.__name__
    host = got.to_numpy()
    assert isinstance(host.corners, np.ndarray)
    np.testing.assert_array_equal(host.corner_index, ref.corner_index)
    np.testing.assert_allclose(host.tetragonal, ref.tetragonal, atol=1e-12)


def test_hexagonal_lattice_gives_no_square_cells():
    """Triangle pairs of a hexagonal lattice are 60/120 deg rhombi: none is a square cell."""
    i, j = np.meshgrid(np.arange(15), np.arange(15), indexing="ij")
    v = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2]]) * 20.0
    pos = np.stack([i.ravel(), j.ravel()], 1) @ v
    pos = pos + np.random.default_rng(0).normal(scale=0.05, size=pos.shape)
    cells = unit_cells(pos, pixel_size=PX)
    assert cells.n_cells == 0 and cells.parameters["pairs"] > 0
    assert cells.tetragonal.shape == (0,) and cells.corners.shape == (0, 4, 2)
    with pytest.raises(ValueError, match="at least 2 cells; got 0"):
        stemgpu.cell_statistics(cells)

"""cell_statistics: the lecture's table in one call, error bars, calibration, plots."""

from __future__ import annotations

import numpy as np
import pytest

import stemgpu
from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.stats import CellStatistics, cell_statistics, median_uncertainty
from stemgpu.synthetic import Lattice

PX = 14.6


def grid(n1, n2, a1_pm, a2_pm, *, noise_pm=0.0, seed=0):
    """A-site (A) and B-site (B) positions of a rectangular lattice, plus the exact grid."""
    i, j = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    a = np.stack([i.ravel() * a1_pm, j.ravel() * a2_pm], 1) / PX + 5.0
    b = a + np.array([a1_pm, a2_pm]) / (2 * PX)
    rng = np.random.default_rng(seed)
    pos = np.concatenate([a, b])
    pos = pos + rng.normal(scale=noise_pm / PX, size=pos.shape)
    species = np.array(["A"] * len(a) + ["B"] * len(b))
    return pos, species


def direct_cell_geometry(n1, n2, pos):
    """Sides, angles and areas of the cells computed cell by cell from the known grid."""
    a = pos[: n1 * n2].reshape(n1, n2, 2)
    p0, p1, p2, p3 = a[:-1, :-1], a[1:, :-1], a[1:, 1:], a[:-1, 1:]
    corners = np.stack([p0, p1, p2, p3], axis=2).reshape(-1, 4, 2)
    e = np.roll(corners, -1, axis=1) - corners
    sides = np.linalg.norm(e, axis=2)
    x, y = corners[..., 0], corners[..., 1]
    area = 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))
    return sides, area


def test_table_matches_direct_computation():
    n1 = n2 = 25
    pos, species = grid(n1, n2, 390.5, 390.5, noise_pm=2.0, seed=3)
    cells = unit_cells(pos, species=species, pixel_size=PX)
    stats = cell_statistics(cells)
    sides, area = direct_cell_geometry(n1, n2, pos)
    assert stats.n_cells == (n1 - 1) * (n2 - 1)
    assert stats["smallest_side_pm"].median == pytest.approx(np.median(sides.min(1)) * PX,
                                                             abs=1e-9)
    assert stats["longest_side_pm"].median == pytest.approx(np.median(sides.max(1)) * PX,
                                                            abs=1e-9)
    assert stats["smallest_side_pm"].std == pytest.approx(np.std(sides.min(1), ddof=1) * PX,
                                                          abs=1e-9)
    assert stats["area_nm2"].median == pytest.approx(np.median(area) * (PX / 1000) ** 2,
                                                     abs=1e-12)
    assert stats["equivalent_side_pm"].median == pytest.approx(
        np.median(np.sqrt(area)) * PX, abs=1e-9)
    assert stats["bsite_distance_pm"].n == stats.n_cells
    d = stats.as_dict()
    assert d["n_cells"] == stats.n_cells and d["pixel_size_pm"] == PX
    assert set(d["tetragonal"]) == {"median", "std", "median_uncertainty", "n", "unit"}
    text = str(stats)
    for phrase in ("median smallest side", "median longest side", "angle deviation",
                   "median area", "equivalent square side", "B-site distance",
                   "tetragonal distortion", "shear distortion"):
        assert phrase in text


def test_known_tetragonal_cells_give_exact_table():
    """Noise-free rectangular cells 400 x 390 pm with B-site off-centre by (6, -2) pm."""
    pos, species = grid(12, 14, 400.0, 390.0)
    species_pos = pos.copy()
    species_pos[species == "B"] += np.array([6.0, -2.0]) / PX
    stats = stemgpu.cell_statistics(unit_cells(species_pos, species=species), pixel_size=PX)
    assert stats["smallest_side_pm"].median == pytest.approx(390.0, abs=1e-9)
    assert stats["longest_side_pm"].median == pytest.approx(400.0, abs=1e-9)
    assert stats["area_nm2"].median == pytest.approx(0.39 * 0.40, rel=1e-12)
    side = np.sqrt(400.0 * 390.0)
    # Square reference of the equivalent side: Biot strains (400 - side)/side, (390 - side)/side.
    assert stats["tetragonal"].median == pytest.approx(10.0 / side, rel=1e-9)
    assert stats["tetragonal"].std == pytest.approx(0.0, abs=1e-12)
    assert stats["shear"].median == pytest.approx(0.0, abs=1e-12)
    assert stats["angle_deviation_deg"].median == pytest.approx(0.0, abs=1e-9)
    assert stats["bsite_distance_pm"].median == pytest.approx(np.hypot(6.0, 2.0), abs=1e-9)
    assert stats["bsite_displacement_row_pm"].median == pytest.approx(6.0, abs=1e-9)
    assert stats["bsite_displacement_col_pm"].median == pytest.approx(-2.0, abs=1e-9)


def test_lecture_like_dataset_reproduces_the_table_shape():
    """SrTiO3 with 1.2 pm position noise (lecture: smallest 389.4, longest 391.5 pm): the
    smallest/longest split is the order-statistic effect of the noise, the medians of the
    unbiased |a1|, |a2| sit on 390.5 pm and the area on 0.1525 nm^2."""
    lat = Lattice.srtio3()
    i, j = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    a = np.stack([i.ravel(), j.ravel()], 1) @ lat.vectors_pm / PX
    rng = np.random.default_rng(0)
    a = a + rng.normal(scale=1.2 / PX, size=a.shape)
    stats = cell_statistics(unit_cells(a), pixel_size=PX)
    s = 1.2 * np.sqrt(2)
    assert stats["smallest_side_pm"].median == pytest.approx(390.5 - 0.998 * s, abs=0.3)
    assert stats["longest_side_pm"].median == pytest.approx(390.5 + 0.998 * s, abs=0.3)
    assert stats["a1_length_pm"].median == pytest.approx(390.5, abs=0.3)
    assert stats["area_nm2"].median == pytest.approx(0.1525, abs=0.0002)
    assert abs(stats["tetragonal"].median) < 3 * stats["tetragonal"].median_uncertainty + 1e-4


def test_median_uncertainty_predicts_the_scatter_of_the_median():
    """For iid normal values all three estimates match the true scatter of the median."""
    rng = np.random.default_rng(1)
    n, reps = 400, 300
    x = rng.normal(size=(reps, n))
    true = np.median(x, axis=1).std()  # ~1.2533 / sqrt(400) = 0.0627
    for method in ("bootstrap", "order", "gaussian"):
        u, how = median_uncertainty(x[:40], method=method, n_bootstrap=300)
        assert how == method
        assert np.mean(u) == pytest.approx(true, rel=0.2), method
    u_auto, how = median_uncertainty(x[0])
    assert how == "bootstrap" and np.ndim(u_auto) == 0
    _, how_big = median_uncertainty(rng.normal(size=30_000))
    assert how_big == "order"


def test_bootstrap_is_reproducible_and_seeded():
    pos, species = grid(10, 10, 390.5, 390.5, noise_pm=2.0, seed=4)
    cells = unit_cells(pos, species=species, pixel_size=PX)
    s1 = cell_statistics(cells, seed=5)
    s2 = cell_statistics(cells, seed=5)
    s3 = cell_statistics(cells, seed=6)
    assert s1.as_dict() == s2.as_dict()
    assert s1["tetragonal"].median_uncertainty != s3["tetragonal"].median_uncertainty
    g = cell_statistics(cells, uncertainty="gaussian")
    assert g.method == "gaussian"
    t = g["tetragonal"]
    assert t.median_uncertainty == pytest.approx(1.2533 * t.std / np.sqrt(t.n))


def test_calibration_required():
    pos, species = grid(6, 6, 390.5, 390.5)
    cells = unit_cells(pos, species=species)  # no pixel size
    with pytest.raises(ValueError, match="needs a calibration: pass pixel_size="):
        cell_statistics(cells)
    assert isinstance(cell_statistics(cells, pixel_size=PX), CellStatistics)
    assert cells.statistics(pixel_size=PX).n_cells == 25


def test_bad_arguments():
    pos, species = grid(6, 6, 390.5, 390.5)
    cells = unit_cells(pos, species=species, pixel_size=PX)
    with pytest.raises(TypeError, match="cells must be a UnitCells"):
        cell_statistics(pos, pixel_size=PX)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        cell_statistics(cells, uncertainty="jackknife")
    with pytest.raises(ValueError, match="pixel_size must be a positive"):
        cell_statistics(cells, pixel_size=-1.0)
    one = unit_cells(np.array([[0.0, 0.0], [0.0, 26.0], [26.0, 0.0], [26.0, 26.0]]),
                     pixel_size=PX)
    with pytest.raises(ValueError, match="at least 2 cells; got 1"):
        cell_statistics(one)
    with pytest.raises(KeyError, match="no row 'volume'"):
        cell_statistics(cells)["volume"]


def test_no_bsite_rows_without_bsites():
    pos, species = grid(6, 6, 390.5, 390.5)
    stats = cell_statistics(unit_cells(pos[species == "A"], pixel_size=PX))
    assert "bsite_distance_pm" not in stats.rows
    assert "B-site" not in str(stats)


def test_maps_and_plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stemgpu.lattice.plot import (
        cell_map,
        plot_bsite_displacement,
        plot_cell_histograms,
        plot_cell_map,
    )

    pos, species = grid(8, 8, 400.0, 390.0)
    cells = unit_cells(pos, species=species, pixel_size=PX)
    m = cell_map(cells, "tetragonal", (220, 220))
    covered = np.isfinite(m)
    assert 0.5 < covered.mean() < 1.0
    np.testing.assert_allclose(m[covered], cells.tetragonal[0], rtol=1e-6)
    with pytest.raises(ValueError, match="quantity='volume' is not known"):
        cell_map(cells, "volume", (10, 10))
    for fig in (plot_cell_map(cells, "area", pixel_size=PX),
                plot_bsite_displacement(cells, pixel_size=PX),
                plot_cell_histograms(cells, pixel_size=PX)):
        assert len(fig.axes) >= 2
        plt.close(fig)


@pytest.mark.parametrize("kw, match", [
    ({"n_bootstrap": 1}, "n_bootstrap must be an integer >= 2 and <= 100000; got 1"),
    ({"n_bootstrap": 0}, "n_bootstrap must be an integer >= 2 and <= 100000; got 0"),
    ({"n_bootstrap": 10**9}, "n_bootstrap must be an integer >= 2 and <= 100000"),
    ({"n_bootstrap": "200"}, "n_bootstrap must be an integer .*; got '200'"),
    ({"n_bootstrap": 2.5}, "n_bootstrap must be an integer .*; got 2.5"),
    ({"seed": -1}, "seed must be an integer >= 0; got -1"),
    ({"seed": "0"}, "seed must be an integer >= 0; got '0'"),
    ({"pixel_size": "14.6"}, "pixel_size must be a positive number in pm; got '14.6'"),
    ({"uncertainty": 3}, "uncertainty must be one of 'auto', 'bootstrap'"),
])
def test_bad_options_are_refused_by_name(kw, match):
    """n_bootstrap=1 used to give NaN uncertainties (the std of one resampled median)."""
    pos, species = grid(6, 6, 390.5, 390.5)
    cells = unit_cells(pos, species=species, pixel_size=PX)
    with pytest.raises(ValueError, match=match):
        cell_statistics(cells, **kw)
    stats = cell_statistics(cells, n_bootstrap=2)
    assert all(np.isfinite(s.median_uncertainty) for s in stats.rows.values())


def test_median_uncertainty_refuses_bad_values():
    with pytest.raises(ValueError, match="values must be a 1-D or 2-D array of numbers; got list"):
        median_uncertainty(["a", "b"])
    with pytest.raises(ValueError, match=r"values must be .*; got shape \(2, 2, 2\)"):
        median_uncertainty(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="n_bootstrap must be an integer >= 2"):
        median_uncertainty(np.arange(5.0), n_bootstrap=1)

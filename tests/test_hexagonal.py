"""Hexagonal and generic lattices: simulator truth (MoS2, graphene-like honeycomb, ABF-like dark
contrast) and primitive unit cells against that truth."""

from __future__ import annotations

import numpy as np
import pytest

import stemgpu
from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.gates import AnalysisError
from stemgpu.synthetic import Lattice, simulate_image, simulate_stack

NOISE_PM = 3.0  # position noise added to the truth for the cell tests


def corner_indices(cells, truth, species):
    """Integer lattice indices of each cell's corners (asserting they are sites of the one
    sublattice of the first corner, a column of ``species``)."""
    first = int(np.asarray(cells.corner_index)[0, 0])
    assert truth.species[first] == species
    f = (np.asarray(cells.corners) - truth.positions[first]) @ np.linalg.inv(
        truth.lattice_vectors)
    n = np.rint(f)
    assert np.abs(f - n).max() < 0.2, "corner off the corner sublattice"
    return n


def assert_primitive(cells, truth, species):
    """Every cell is [n, n+e1, n+e1+e2, n+e2] of two primitive vectors, none twice."""
    n = corner_indices(cells, truth, species)
    d = n - n[:, :1, :]
    e1, e2 = d[0, 1], d[0, 3]
    assert abs(e1[0] * e2[1] - e1[1] * e2[0]) == 1, "not a primitive cell"
    expected = np.stack([0 * e1, e1, e1 + e2, e2])
    assert np.array_equal(d, np.broadcast_to(expected, d.shape)), "cells not all alike"
    keys = {tuple(k) for k in n[:, 0].astype(int).tolist()}
    assert len(keys) == cells.n_cells, "a cell found twice"


# --------------------------------------------------------------------------- simulator

def test_mos2_and_honeycomb_truth():
    lat = Lattice.mos2()
    assert lat.species == ("Mo", "S2")
    assert lat.intensity[1] == pytest.approx(2 * 16 ** 1.7 / 42 ** 1.7)
    np.testing.assert_allclose(np.linalg.norm(lat.vectors_pm, axis=1), 316.0)
    _, truth = simulate_stack((1, 200, 200), lattice="MoS2", dose=None, seed=0)
    a = np.linalg.norm(truth.lattice_vectors, axis=1) * truth.pixel_size_pm
    np.testing.assert_allclose(a, 316.0)
    # Mo-S nearest-neighbour distance a / sqrt(3) in projection.
    from scipy.spatial import cKDTree

    mo, s2 = truth.positions[truth.species == "Mo"], truth.positions[truth.species == "S2"]
    d, _ = cKDTree(s2).query(mo)
    np.testing.assert_allclose(d * truth.pixel_size_pm, 316.0 / np.sqrt(3), rtol=1e-12)
    _, honey = simulate_stack((1, 200, 200), lattice="honeycomb", dose=None, seed=0)
    assert set(honey.species.tolist()) == {"C"}
    d, _ = cKDTree(honey.positions).query(honey.positions, k=2)
    np.testing.assert_allclose(d[:, 1] * honey.pixel_size_pm, 246.0 / np.sqrt(3), rtol=1e-9)


def test_dark_contrast_is_the_bright_image_below_a_level():
    """Noise-free: dark = background - (the bright render of the same columns), exactly."""
    lat = Lattice.srtio3(contrast="dark")
    dark, t = simulate_image((96, 96), lattice=lat, contrast="dark", background=4.0,
                             dose=None, seed=3)
    bright, _ = simulate_image((96, 96), lattice=lat, background=0.0, dose=None, seed=3)
    np.testing.assert_allclose(dark, np.float32(4.0) - bright, atol=1e-5)
    assert t.contrast == "dark" and dark.max() <= 4.0
    # ABF depths (sum Z)^(1/3): Sr 1, Ti-O 0.93, O 0.60 - the O columns are visible dips.
    depth = dict(zip(lat.species, lat.intensity, strict=False))
    assert depth["O"] == pytest.approx(8 ** (1 / 3) / 38 ** (1 / 3))
    assert depth["TiO"] == pytest.approx(30 ** (1 / 3) / 38 ** (1 / 3))
    q = np.rint(t.image_positions(0)).astype(int)
    inside = t.visible(0, margin=2)
    for species, expect in (("Sr", 1.0), ("O", depth["O"])):
        rows, cols = q[inside & (t.species == species)].T
        assert np.median(4.0 - dark[rows, cols]) == pytest.approx(expect, rel=0.1)


def test_dark_contrast_with_noise_and_named_lattice():
    stack, t = simulate_stack((2, 64, 64), contrast="dark", background=3.0, dose=500.0,
                              seed=1)
    assert t.contrast == "dark" and t.intensity.max() == 1.0
    assert stack.mean() > 2.0 * 500.0  # mostly the bright level, dips at the columns
    _, bright = simulate_stack((1, 64, 64), seed=1)
    assert bright.contrast == "bright"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"contrast": "dark"}, r"background must be a number > 1 with contrast='dark'"),
    ({"contrast": "abf"}, r"contrast must be one of 'bright', 'dark'; got 'abf'"),
    ({"lattice": "graphene"}, r"'MoS2', 'honeycomb'"),
])
def test_bad_contrast_and_lattice_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_stack((1, 16, 16), **kwargs)


# --------------------------------------------------------------------------- cells

def noisy(truth, seed, noise_pm=NOISE_PM):
    rng = np.random.default_rng(seed)
    return truth.positions + rng.normal(scale=noise_pm / truth.pixel_size_pm,
                                        size=truth.positions.shape)


@pytest.mark.parametrize(("lattice", "a_site"), [("MoS2", "Mo"), ("honeycomb", None)])
def test_hexagonal_cell_parameter_within_its_uncertainty(lattice, a_site):
    """|a1|, |a2| of the primitive cells against truth: within 1 sigma in most of 10 noise
    draws (the bootstrap sigma is conservative: cells share corners) and within 2 sigma in
    all; every cell is a genuine primitive cell of the corner sublattice."""
    _, truth = simulate_stack((1, 400, 400), lattice=lattice, dose=None, rotation_deg=7.0,
                              seed=1)
    a_true = float(np.linalg.norm(truth.lattice_vectors[0])) * truth.pixel_size_pm
    kw = {"species": truth.species, "a_site": a_site} if a_site else {}
    z = []
    for seed in range(10):
        cells = unit_cells(noisy(truth, seed), lattice="hexagonal",
                           pixel_size=truth.pixel_size_pm, **kw)
        stats = stemgpu.cell_statistics(cells)
        z += [(stats[k].median - a_true) / stats[k].median_uncertainty
              for k in ("a1_length_pm", "a2_length_pm")]
        assert abs(stats["angle_deviation_deg"].median - 30.0) < 0.2  # 120 deg cells
    z = np.abs(np.array(z))
    assert np.mean(z < 1.0) >= 0.6 and z.max() < 2.0, z.round(2)
    corner = a_site or "C"
    assert_primitive(cells, truth, corner)
    assert cells.n_cells > 300 and cells.parameters["reference_kind"] == "hexagonal"
    assert not cells.has_bsite.any()


def test_honeycomb_cells_sit_on_one_sublattice():
    _, truth = simulate_stack((1, 240, 240), lattice="honeycomb", dose=None, seed=4)
    cells = unit_cells(truth.positions, lattice="hexagonal", pixel_size=truth.pixel_size_pm)
    corners = np.unique(np.asarray(cells.corner_index).ravel())
    # Fractional position in the cell of every corner: all the same basis site.
    origin = truth.positions[corners[0]]
    f = (truth.positions[corners] - origin) @ np.linalg.inv(truth.lattice_vectors)
    assert np.abs(f - np.rint(f)).max() < 1e-9
    assert_primitive(cells, truth, "C")
    assert cells.n_cells > 0.4 * len(truth.positions) / 2


def test_strain_and_rotation_against_the_median_cell():
    """A stretch of 1 % along col in the right third: cells there carry exactly that Biot
    strain against the (unstrained) median cell, the others none; no rotation."""
    eps, c0 = 0.01, 260.0

    def field(p):
        return np.stack([np.zeros(len(p)), np.where(p[:, 1] > c0, eps * (p[:, 1] - c0), 0.0)],
                        axis=1)

    _, truth = simulate_stack((1, 380, 380), lattice="MoS2", dose=None, strain=field,
                              rotation_deg=11.0, seed=2)
    cells = unit_cells(truth.positions, species=truth.species, a_site="Mo",
                       lattice="generic", pixel_size=truth.pixel_size_pm)
    cols = np.asarray(cells.corners)[..., 1]
    inside, outside = np.all(cols > c0 + 1, axis=1), np.all(cols < c0 - 1, axis=1)
    assert inside.sum() > 20 and outside.sum() > inside.sum()
    np.testing.assert_allclose(cells.strain[inside], np.broadcast_to(
        [[0.0, 0.0], [0.0, eps]], (int(inside.sum()), 2, 2)), atol=1e-9)
    np.testing.assert_allclose(cells.strain[outside], 0.0, atol=1e-9)
    np.testing.assert_allclose(cells.rotation_deg[outside], 0.0, atol=1e-7)
    np.testing.assert_allclose(cells.reference, np.median(cells.vectors[outside], axis=0),
                               atol=1e-9)


def test_generic_rectangular_and_oblique_lattices():
    i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    idx = np.stack([i.ravel(), j.ravel()], 1).astype(float)
    for v in (np.array([[20.0, 0.0], [0.0, 31.0]]), np.array([[20.0, 3.0], [6.0, 25.0]])):
        cells = unit_cells(idx @ v + 3.0, lattice="generic")
        # 11 x 11 cells, or 11 x 10 when a2 is the other (more obtuse) of two near-equal
        # second-shortest translations (the oblique lattice: 25.7 and 26.1 px).
        assert cells.n_cells in (110, 121)
        m = np.median(cells.vectors, axis=0)
        # The two shortest translations span the same lattice as v (unimodular change).
        t = m @ np.linalg.inv(v)
        np.testing.assert_allclose(t, np.rint(t), atol=1e-9)
        assert abs(round(np.linalg.det(np.rint(t)))) == 1
        np.testing.assert_allclose(cells.tetragonal, 0.0, atol=1e-12)


def test_hexagonal_gates():
    _, truth = simulate_stack((1, 300, 300), lattice="MoS2", dose=None, seed=0)
    kw = {"species": truth.species, "a_site": "Mo", "pixel_size": truth.pixel_size_pm}
    ok = unit_cells(truth.positions, lattice="hexagonal", lattice_parameter=316.0, **kw)
    assert ok.parameters["gates"]["lattice_parameter"]["passed"]
    with pytest.raises(AnalysisError, match=r"does not match the lattice given.*316\.0 pm"):
        unit_cells(truth.positions, lattice="hexagonal", lattice_parameter=400.0, **kw)
    # A square lattice is not hexagonal.
    i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    square = np.stack([i.ravel(), j.ravel()], 1) * 20.0
    with pytest.raises(AnalysisError, match="the median cell is not hexagonal"):
        unit_cells(square, lattice="hexagonal")
    with pytest.raises(ValueError, match="b_site= is for the perovskite path"):
        unit_cells(truth.positions, lattice="hexagonal", b_site="S2", **kw)
    with pytest.raises(ValueError, match="lattice_parameter= goes with"):
        unit_cells(square, lattice="median", lattice_parameter=300.0, pixel_size=10.0)
    with pytest.raises(AnalysisError, match="no two lattice translations"):
        unit_cells(np.random.default_rng(0).random((50, 2)) * 100, lattice="generic")


# --------------------------------------------------------------------------- analyze

MOS2_PROBE_PM = 35.0  # Mo-S 182 pm apart = 5.2 probe sigmas: windows see little of neighbours


@pytest.fixture(scope="module")
def mos2_runs():
    """analyze(lattice="hexagonal") of four simulated MoS2 images (200 counts per Mo peak)."""
    runs = []
    for seed in range(4):
        image, truth = simulate_image((384, 384), lattice="MoS2", dose=200.0, rotation_deg=7.0,
                                      probe_sigma_pm=MOS2_PROBE_PM, seed=seed)
        res = stemgpu.analyze(image, pixel_size=truth.pixel_size_pm, steps=("atoms", "cells"),
                              progress=False, lattice="hexagonal")
        runs.append((image, truth, res))
    return runs


def test_analyze_mos2_positions_at_the_crlb(mos2_runs):
    """Fitted Mo and S2 positions scatter about the truth within 1.1x the Cramer-Rao bound
    (rms over the columns inside the image), labelled by intensity as two classes."""
    from scipy.spatial import cKDTree

    from stemgpu.atoms.crlb import crlb

    image, truth, res = mos2_runs[0]
    pos = truth.image_positions(0)
    n = len(pos)
    params = np.stack([truth.intensity * 200.0, pos[:, 0], pos[:, 1],
                       np.full(n, truth.probe_sigma_px), np.full(n, truth.background * 200.0)],
                      axis=1)
    bound = crlb(params, image_shape=image.shape)
    ok = np.asarray(res.atoms.status) == 0
    fitted = np.asarray(res.atoms.positions)[ok]
    dist, near = cKDTree(pos).query(fitted)
    inside = truth.visible(0, margin=12)[near] & (dist < 1.0)
    labels = np.asarray(res.species)[ok]
    for species, label in (("Mo", "A"), ("S2", "B")):
        m = inside & (truth.species[near] == species)
        assert m.sum() > 250 and set(labels[m]) == {label}
        rms = np.sqrt(np.mean((fitted[m] - pos[near[m]]) ** 2))
        assert rms <= 1.1 * np.sqrt(np.mean(bound[near[m]][:, 1:3] ** 2)), species


def test_analyze_mos2_cell_parameter_within_one_sigma(mos2_runs):
    """The summary's |a1|, |a2| (primitive Mo cells) lie within their one-sigma total
    uncertainty of 316 pm in each of the four images; the quality section records the
    hexagonal gates and no warning."""
    for _, truth, res in mos2_runs:
        a_true = float(np.linalg.norm(truth.lattice_vectors[0])) * truth.pixel_size_pm
        rows = res.summary()
        for key in ("a1_length_pm", "a2_length_pm"):
            assert abs(rows[key].value - a_true) <= rows[key].total_uncertainty, key
        q = res.quality()
        assert q["cells"]["lattice"] == "hexagonal" and q["warnings"] == []
        assert set(q["cells"]["gates"]) == {"side_ratio", "angle_deviation_deg"}
        assert "O" not in set(np.asarray(res.species).tolist())  # no perovskite O columns


def test_analyze_graphene_one_class():
    """A one-species honeycomb: atoms={"n_classes": 1}, cells on one of its sublattices."""
    image, truth = simulate_image((320, 320), lattice="honeycomb", dose=200.0,
                                  probe_sigma_pm=MOS2_PROBE_PM, seed=1)
    res = stemgpu.analyze(image, pixel_size=truth.pixel_size_pm, steps=("atoms", "cells"),
                          progress=False, cells={"lattice": "hexagonal"},
                          atoms={"n_classes": 1})
    row = res.summary()["a1_length_pm"]
    assert abs(row.value - 246.0) <= 2 * row.total_uncertainty
    assert "species" not in res.quality()  # one class: no separation to test


def test_analyze_lattice_keyword_and_cells_option_must_agree():
    image, _ = simulate_image((64, 64), dose=None, seed=0)
    with pytest.raises(ValueError, match=r"lattice= and cells=\{'lattice': \.\.\.\} both given "
                                         r"\('hexagonal', 'generic'\); give one"):
        stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"), progress=False,
                        lattice="hexagonal", cells={"lattice": "generic"})

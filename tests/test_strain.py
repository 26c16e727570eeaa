"""Strain, rotation, tetragonal/shear distortion and B-site displacement against known truth."""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.strain import (
    deformation_gradient,
    lattice_frame,
    polar_decomposition,
    strain_components,
)
from stemgpu.synthetic import Lattice, simulate_stack

PX = 14.6
A_PM = 390.5
A_PX = A_PM / PX
EPS = 0.01  # tetragonal strain of the region


def rotation(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def strained_srtio3(n, *, noise_pm, seed, rotation_deg=0.0):
    """A and B-site positions of n x n cells: a tetragonal region (col > middle) stretched by
    EPS along a2 (col), and B-sites displaced by +6 pm along row in the top half and by
    (-3, -8) pm in the bottom half (two polarisation domains). Exact truth returned."""
    lat = Lattice.srtio3(A_PM)
    v = lat.vectors_pm @ rotation(rotation_deg).T / PX
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    cells = np.stack([i.ravel(), j.ravel()], 1).astype(float)
    basis = lat.basis[:2]  # Sr and TiO
    frac = (cells[:, None, :] + basis[None]).reshape(-1, 2)
    species = np.tile(np.array(["Sr", "TiO"]), len(cells))
    # Strain acts on the fractional coordinate along a2: continuous, uniaxial for f2 > n/2.
    f2 = frac[:, 1]
    mid = n / 2.0
    stretch = np.where(f2 > mid, EPS * (f2 - mid), 0.0)
    pos = (frac + np.stack([np.zeros_like(f2), stretch], 1)) @ v
    is_b = species == "TiO"
    top = frac[:, 0] < mid
    bdisp_pm = np.where(top[:, None], [[6.0, 0.0]], [[-3.0, -8.0]]) * is_b[:, None]
    bdisp_pm = bdisp_pm @ rotation(rotation_deg).T  # domains' polarisation turns with the lattice
    pos = pos + bdisp_pm / PX
    rng = np.random.default_rng(seed)
    pos = pos + rng.normal(scale=noise_pm / PX, size=pos.shape)
    return pos, species, v


def region_masks(cells, v, n):
    f = (cells.centres - 0.0) @ np.linalg.inv(v)
    # Tetragonal cells: centre at least one cell inside the region (no cell across the edge).
    tet = f[:, 1] > n / 2 + 1.0
    cubic = f[:, 1] < n / 2 - 1.0
    top = f[:, 0] < n / 2 - 1.0
    bottom = f[:, 0] > n / 2 + 1.0
    return tet, cubic, top, bottom


def test_tetragonal_region_and_bsite_field_exact():
    n = 24
    pos, species, v = strained_srtio3(n, noise_pm=0.0, seed=0, rotation_deg=9.0)
    cells = unit_cells(pos, species=species, a_site="Sr", b_site="TiO", lattice=A_PM,
                       pixel_size=PX)
    tet, cubic, top, bottom = region_masks(cells, v, n)
    assert tet.sum() > 150 and cubic.sum() > 150
    np.testing.assert_allclose(cells.tetragonal[tet], -EPS, atol=1e-9)
    np.testing.assert_allclose(cells.strain_lattice[tet][:, 1, 1], EPS, atol=1e-9)
    np.testing.assert_allclose(cells.strain_lattice[tet][:, 0, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(cells.tetragonal[cubic], 0.0, atol=1e-9)
    np.testing.assert_allclose(cells.shear, 0.0, atol=1e-9)
    np.testing.assert_allclose(cells.rotation_deg, 0.0, atol=1e-6)  # reference follows data
    d = cells.bsite_displacement * PX @ rotation(9.0)  # back into the lattice axes
    np.testing.assert_allclose(d[top & cubic], np.broadcast_to([6.0, 0.0], d[top & cubic].shape),
                               atol=1e-7)
    np.testing.assert_allclose(d[bottom & cubic],
                               np.broadcast_to([-3.0, -8.0], d[bottom & cubic].shape), atol=1e-7)


def test_tetragonal_region_and_bsite_field_with_noise():
    """2 pm position noise, 300 x 300 cells: medians within 1e-4 strain and 1 pm."""
    n = 300
    pos, species, v = strained_srtio3(n, noise_pm=2.0, seed=21)
    cells = unit_cells(pos, species=species, a_site="Sr", b_site="TiO", lattice=A_PM,
                       pixel_size=PX)
    tet, cubic, top, bottom = region_masks(cells, v, n)
    assert tet.sum() > 40_000
    assert abs(np.median(cells.tetragonal[tet]) - (-EPS)) < 1e-4
    assert abs(np.median(cells.tetragonal[cubic])) < 1e-4
    assert abs(np.median(cells.strain_lattice[tet, 1, 1]) - EPS) < 1e-4
    assert abs(np.median(cells.strain_lattice[tet, 0, 0])) < 1e-4
    assert abs(np.median(cells.shear)) < 1e-4
    d = cells.bsite_displacement * PX
    np.testing.assert_allclose(np.median(d[top & cubic], axis=0), [6.0, 0.0], atol=1.0)
    np.testing.assert_allclose(np.median(d[bottom & tet], axis=0), [-3.0, -8.0], atol=1.0)
    assert cells.has_bsite.mean() > 0.999


def test_simulate_stack_strain_gradient_and_bsite():
    """End to end through simulate_stack truth: a symmetric displacement gradient G gives
    F = I + G, so the Biot strain equals G exactly; B-site displacement is the given pm pair."""
    g = np.array([[0.012, 0.003], [0.003, -0.006]])
    _, truth = simulate_stack((1, 240, 240), dose=None, strain=g, bsite_displacement_pm=(5.0, -3.0),
                              seed=2)
    cells = unit_cells(truth.positions, species=truth.species, a_site="Sr", b_site="TiO",
                       lattice=truth.lattice_vectors, pixel_size=truth.pixel_size_pm)
    assert cells.n_cells > 40
    np.testing.assert_allclose(cells.strain, np.broadcast_to(g, cells.strain.shape), atol=1e-9)
    np.testing.assert_allclose(cells.tetragonal, g[0, 0] - g[1, 1], atol=1e-9)
    np.testing.assert_allclose(cells.shear, g[0, 1], atol=1e-9)
    np.testing.assert_allclose(cells.deformation_gradient[0], np.eye(2) + g, atol=1e-9)
    np.testing.assert_allclose(cells.bsite_displacement * truth.pixel_size_pm,
                               np.broadcast_to([5.0, -3.0], (cells.n_cells, 2)), atol=1e-7)
    # The truth's own B-site field agrees with the measurement column by column.
    np.testing.assert_allclose(cells.bsite_displacement,
                               truth.bsite_displacement[cells.bsite_index], atol=1e-9)


def test_reference_choices():
    pos, species, v = strained_srtio3(12, noise_pm=0.0, seed=0)
    a = species == "Sr"
    sq = unit_cells(pos[a])
    med = unit_cells(pos[a], lattice="median")
    vec = unit_cells(pos[a], lattice=v)
    np.testing.assert_allclose(vec.reference, v)
    assert med.parameters["reference_kind"] == "median"
    # The median cell is a cell of the lattice: most cells carry zero strain against it.
    assert np.median(np.abs(med.strain_lattice[:, 1, 1])) < 1e-9
    # Square reference of the median equivalent side: tetragonal distortion is intrinsic.
    np.testing.assert_allclose(sq.tetragonal, vec.tetragonal, atol=1e-9)


def test_left_handed_reference_vectors():
    """Reference rows (r1, r2) with r2 on the other side: a2 follows r2, strain unchanged."""
    pos, species, v = strained_srtio3(10, noise_pm=0.0, seed=0)
    a = species == "Sr"
    flipped = np.array([v[0], -v[1]])
    cells = unit_cells(pos[a], lattice=flipped)
    assert np.all(np.einsum("ki,i->k", cells.vectors[:, 1], flipped[1]) > 0)
    ref = unit_cells(pos[a], lattice=v)
    np.testing.assert_allclose(np.sort(cells.tetragonal), np.sort(ref.tetragonal), atol=1e-12)


def test_polar_decomposition_and_rotation_invariance():
    rng = np.random.default_rng(0)
    F = np.eye(2) + rng.normal(scale=0.05, size=(50, 2, 2))
    theta, U = polar_decomposition(F)
    c, s = np.cos(theta), np.sin(theta)
    Q = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    np.testing.assert_allclose(Q @ U, F, atol=1e-12)
    np.testing.assert_allclose(U, np.swapaxes(U, 1, 2), atol=1e-15)
    assert np.all(np.linalg.eigvalsh(U) > 0)
    # Rotating every cell by 5 deg leaves the strain and adds 5 deg of rotation.
    ref = np.eye(2) * 20
    cells = ref[None] @ np.swapaxes(F, 1, 2)  # rows a_i = F r_i
    rot = rotation(-5.0)  # x -> rot @ x turns the row axis towards the col axis by 5 deg
    turned = cells @ rot.T
    a, b = strain_components(cells, ref), strain_components(turned, ref)
    np.testing.assert_allclose(a["strain"], b["strain"], atol=1e-12)
    np.testing.assert_allclose(b["rotation_deg"] - a["rotation_deg"], 5.0, atol=1e-9)
    np.testing.assert_allclose(deformation_gradient(turned, ref), rot @ F, atol=1e-12)


def test_lattice_frame_components():
    """A 30 deg rotated reference: a stretch along r1 is epsilon_11 in the lattice frame."""
    r = rotation(30.0) @ (np.eye(2) * 10.0)
    ref = r.T  # rows r1, r2 (rotated by 30 deg)
    P = lattice_frame(ref)
    np.testing.assert_allclose(P.T @ P, np.eye(2), atol=1e-15)
    cell = np.array([ref[0] * 1.02, ref[1]])[None]
    out = strain_components(cell, ref)
    assert out["strain_lattice"][0, 0, 0] == pytest.approx(0.02, abs=1e-12)
    assert out["strain_lattice"][0, 1, 1] == pytest.approx(0.0, abs=1e-12)
    assert out["tetragonal"][0] == pytest.approx(0.02, abs=1e-12)
    # A pure shear of the angle by 2 s: shear distortion s.
    s = 0.004
    sheared = np.array([[[10 * np.cos(s), 10 * np.sin(s)], [10 * np.sin(s), 10 * np.cos(s)]]])
    out = strain_components(sheared, np.eye(2) * 10.0)
    assert out["shear"][0] == pytest.approx(s, rel=1e-5)
    assert out["rotation_deg"][0] == pytest.approx(0.0, abs=1e-12)

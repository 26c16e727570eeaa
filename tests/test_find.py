"""Candidate finding on simulated SrTiO3 with exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemgpu.atoms.find import estimate_sigma, find_atoms
from stemgpu.synthetic import simulate_image


@pytest.fixture(scope="module")
def sto():
    return simulate_image((256, 256), dose=200.0, seed=8)


def test_estimate_sigma_close_to_probe(sto):
    image, truth = sto
    assert estimate_sigma(image) == pytest.approx(truth.probe_sigma_px, rel=0.1)


def test_finds_every_column_subpixel(sto):
    image, truth = sto
    found = find_atoms(image, sigma=truth.probe_sigma_px)
    pos, inten = found
    # Sr and Ti-O columns: all found. O columns at 200 counts sit on the slope of the Sr
    # tails (a saddle, not a maximum) and are placed from the lattice instead.
    keep = truth.visible(0, margin=3) & (truth.species != "O")
    true = truth.image_positions(0)[keep]
    dist, _ = cKDTree(pos).query(true)
    assert np.all(dist < 1.0)
    sp = truth.species[keep]
    for s in ("Sr", "TiO"):
        assert np.sqrt(np.mean(dist[sp == s] ** 2)) < 0.3
    # No spurious peaks: each candidate is near a true column.
    back, _ = cKDTree(truth.image_positions(0)).query(pos)
    assert np.all(back < 1.5)
    assert np.all(np.diff(inten) <= 0)  # brightest first


def test_sigma_estimated_when_omitted(sto):
    image, truth = sto
    found = find_atoms(image)
    assert found.parameters["sigma"] == pytest.approx(truth.probe_sigma_px, rel=0.1)
    assert found.positions.shape[1] == 2 and found.to_numpy().positions.dtype == np.float64


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": -1.0}, r"sigma must be a positive number of pixels; got -1.0"),
    ({"threshold": 1.5}, r"threshold must be a fraction in \(0, 1\); got 1.5"),
    ({"min_distance": 0}, r"min_distance must be an integer >= 1 \(px\); got 0"),
])
def test_find_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_atoms(np.ones((32, 32)), **{"sigma": 2.0, **kwargs})


def test_find_rejects_3d():
    with pytest.raises(ValueError, match=r"image must be a 2-D image"):
        find_atoms(np.ones((2, 32, 32)), sigma=2.0)

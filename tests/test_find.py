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


def _full_scale_space_sigma(image):
    """The previous estimator (reference): 24 scale-normalised LoG passes on the whole image."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    scales = np.geomspace(0.7, min(img.shape) / 6.0, 24)
    scores = [float(np.percentile(-(s * s) * ndimage.gaussian_laplace(img, float(s)), 99.5))
              for s in scales]
    i = int(np.argmax(scores))
    if 0 < i < len(scales) - 1:
        y0, y1, y2 = scores[i - 1], scores[i], scores[i + 1]
        den = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        return float(np.exp(np.log(scales[i]) + frac * np.log(scales[1] / scales[0])))
    return float(scales[i])


def _image(size, sigma, seed, lattice="SrTiO3"):
    return simulate_image((size, size), lattice=lattice, pixel_size_pm=10.0,
                          probe_sigma_pm=10.0 * sigma, dose=200.0, seed=seed)


@pytest.mark.parametrize("sigma", [2.0, 3.0, 4.0, 5.0, 6.0])
@pytest.mark.parametrize("size", [384, 640], ids=["whole", "region"])
def test_estimate_sigma_matches_full_scale_space(sigma, size):
    """Block-mean levels (384 px: the whole image, levels only for scales >= 16 px) and the
    busiest-region crops (640 px) give the full-image scale space's answer within a few %.
    Measured at sigma 2-6 px: 384 px identical; 640 px <= 2.2 % (30 draws; the percentile
    score is flat near its maximum, so the pixels it sees move the answer a little)."""
    seed = int(np.random.SeedSequence().entropy % 2**16)
    image, _ = _image(size, sigma, seed, lattice="square" if seed % 2 else "SrTiO3")
    ref = _full_scale_space_sigma(image)
    rel = 0.03 if size <= 512 else 0.04
    assert estimate_sigma(image) == pytest.approx(ref, rel=rel), f"seed={seed}"


@pytest.mark.parametrize("sigma", [2.0, 3.0, 4.0, 5.0, 6.0])
def test_estimate_sigma_vs_truth(sigma):
    """Known truth. The percentile of a pixel-sampled response favours wider scales (column
    centres fall between pixels), so the estimator (as the full scale space before it) reads
    high at small widths: measured +16-20 % at 2 px, +6-12.3 % at 3 px, -7 to +5.4 % at 4-6 px
    (the full scale space: +16-18 %, +6-9 %, -7 to +4 %). It seeds the fit, which measures
    the width itself."""
    seed = int(np.random.SeedSequence().entropy % 2**16)
    image, truth = _image(768, sigma, seed)
    rel = {2.0: 0.22, 3.0: 0.15}.get(sigma, 0.1)
    assert estimate_sigma(image) == pytest.approx(truth.probe_sigma_px, rel=rel), f"seed={seed}"


def test_estimate_sigma_finds_the_columns_in_a_mostly_empty_image():
    """Columns only in the lower-right 45 % x 45 %: the measured region is the busiest one."""
    image, truth = _image(1024, 4.0, 3)
    rng = np.random.default_rng(3)
    flat = rng.poisson(np.median(image), image.shape).astype(image.dtype)
    keep = np.zeros(image.shape, dtype=bool)
    keep[560:, 560:] = True
    image = np.where(keep, image, flat)
    assert estimate_sigma(image) == pytest.approx(truth.probe_sigma_px, rel=0.1)


def test_found_atoms_carries_sigma(sto):
    image, truth = sto
    found = find_atoms(image)
    assert found.sigma == found.parameters["sigma"] and found.parameters["sigma_estimated"]
    given = find_atoms(image, sigma=3.0)
    assert given.sigma == 3.0 and not given.parameters["sigma_estimated"]
    host = given.to_numpy()
    assert host.sigma == 3.0 and host.positions is not given.positions
    np.testing.assert_array_equal(host.positions, given.positions)
    assert host.parameters == given.parameters and host.parameters is not given.parameters

"""The simulator is the ground truth of every other test, so it is checked against itself
analytically: centroids of noise-free isolated columns, dose scaling, the sign of the frame
offsets, line jitter and scan distortion."""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.synthetic import Lattice, simulate_image, simulate_stack

# Isolated columns: 600 pm spacing is 41 px at 14.6 pm, twelve probe sigmas.
SPARSE = Lattice.square(a_pm=600.0)
HALF = 17  # centroid window half-width, 5 probe sigmas


def _centroids(image, positions, half=HALF):
    """Intensity centroids in square windows centred on the rounded positions."""
    h, w = image.shape
    inside = (
        (positions[:, 0] >= half + 1) & (positions[:, 0] < h - half - 2)
        & (positions[:, 1] >= half + 1) & (positions[:, 1] < w - half - 2)
    )
    pos = positions[inside]
    r0 = np.rint(pos[:, 0]).astype(int)
    c0 = np.rint(pos[:, 1]).astype(int)
    d = np.arange(-half, half + 1)
    rr = r0[:, None, None] + d[None, :, None]
    cc = c0[:, None, None] + d[None, None, :]
    win = image[rr, cc].astype(np.float64)
    total = win.sum(axis=(1, 2))
    cent = np.stack([(win * rr).sum(axis=(1, 2)) / total, (win * cc).sum(axis=(1, 2)) / total], 1)
    return cent, pos


def test_noise_free_centroids_match_truth_to_1e3_px():
    stack, truth = simulate_stack(
        (3, 160, 160), lattice=SPARSE, dose=None, background=0.0, frame_jitter_px=1.3,
        drift_px=(0.4, -0.7), seed=5,
    )
    for f in range(3):
        cent, pos = _centroids(stack[f], truth.image_positions(f))
        assert len(pos) >= 4
        np.testing.assert_allclose(cent, pos, atol=1e-3)


def test_noise_free_centroids_with_scan_distortion():
    a = np.array([[1.02, 0.015], [-0.01, 0.985]])
    stack, truth = simulate_stack(
        (2, 160, 160), lattice=SPARSE, dose=None, background=0.0, distortion=a,
        frame_jitter_px=0.8, seed=11,
    )
    for f in range(2):
        cent, pos = _centroids(stack[f], truth.image_positions(f))
        np.testing.assert_allclose(cent, pos, atol=1e-3)
    # the truth's image positions are the sample positions seen through A^-1
    expected = (truth.positions - truth.offsets[1]) @ np.linalg.inv(a).T
    np.testing.assert_allclose(truth.image_positions(1), expected)


def test_line_jitter_moves_each_row_of_a_column_by_minus_the_jitter():
    # Probe at col c of row r sits at c + j[r]; a column at x therefore shows at x - j[r].
    stack, truth = simulate_stack(
        (1, 120, 120), lattice=SPARSE, dose=None, background=0.0, line_jitter_px=0.4, seed=2,
    )
    img = stack[0].astype(np.float64)
    pos = truth.image_positions(0)
    sel = pos[(pos[:, 0] > 20) & (pos[:, 0] < 100) & (pos[:, 1] > 20) & (pos[:, 1] < 100)]
    assert len(sel) >= 2
    cols = np.arange(img.shape[1])
    for r0, c0 in sel:
        for r in range(int(r0) - 3, int(r0) + 4):
            lo, hi = int(round(c0)) - HALF, int(round(c0)) + HALF + 1
            prof = img[r, lo:hi]
            centroid = (prof * cols[lo:hi]).sum() / prof.sum()
            assert centroid == pytest.approx(c0 - truth.line_jitter[0, r], abs=2e-3)


def test_offset_sign_convention_by_cross_correlation():
    from skimage.registration import phase_cross_correlation

    stack, truth = simulate_stack(
        (2, 128, 128), dose=None, frame_jitter_px=2.5, drift_px=(1.0, -3.0), seed=3,
    )
    expected = truth.registration_shifts(reference=0)[1]
    # Hann apodisation: the scene does not wrap around, so unwindowed correlation is biased.
    window = np.outer(np.hanning(128), np.hanning(128))
    a, b = ((f - f.mean()) * window for f in stack)
    measured, _, _ = phase_cross_correlation(a, b, upsample_factor=100, normalization=None)
    # 0.06 px allows for the small bias apodisation gives on a non-periodic lattice; the
    # exact check of positions is the centroid test above, this one checks the sign.
    np.testing.assert_allclose(measured, expected, atol=0.06)
    assert np.all(np.sign(measured) == np.sign(expected))
    # applying the true shift to frame 1 moves its columns onto those of frame 0
    np.testing.assert_allclose(
        truth.image_positions(1) + expected, truth.image_positions(0), atol=1e-9
    )


def test_registration_shifts_to_mean_are_zero_mean():
    _, truth = simulate_stack((6, 32, 32), frame_jitter_px=1.0, drift_px=0.5, seed=1)
    shifts = truth.registration_shifts("mean")
    np.testing.assert_allclose(shifts.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(shifts, truth.offsets - truth.offsets.mean(axis=0))


def test_mean_counts_scale_with_dose():
    low, _ = simulate_image((96, 96), dose=50.0, origin_px=(2.0, 5.0), seed=7)
    high, _ = simulate_image((96, 96), dose=500.0, origin_px=(2.0, 5.0), seed=7)
    clean, _ = simulate_image((96, 96), dose=None, origin_px=(2.0, 5.0), seed=7)
    ratio = high.mean() / low.mean()
    assert ratio == pytest.approx(10.0, rel=0.01)
    assert high.mean() == pytest.approx(500.0 * clean.mean(), rel=0.005)


def test_poisson_noise_variance_equals_mean():
    stack, _ = simulate_stack((8, 64, 64), dose=100.0, origin_px=(3.3, 1.7), seed=4)
    clean, _ = simulate_stack((1, 64, 64), dose=None, origin_px=(3.3, 1.7), seed=4)
    resid = stack - 100.0 * clean[0]
    expected_var = 100.0 * clean[0].mean()
    assert resid.var() == pytest.approx(expected_var, rel=0.03)


def test_srtio3_peak_intensity_ratios():
    img, truth = simulate_image((128, 128), dose=None, background=0.0, seed=0)
    assert set(truth.species) == {"Sr", "TiO", "O"}
    pos = truth.image_positions(0)
    inside = truth.visible(0, margin=3)
    peaks = img[np.rint(pos[inside, 0]).astype(int), np.rint(pos[inside, 1]).astype(int)]
    sp = truth.species[inside]
    ratio = np.median(peaks[sp == "TiO"]) / np.median(peaks[sp == "Sr"])
    assert ratio == pytest.approx(truth.lattice.intensity[1], rel=0.05)


def test_strain_and_bsite_displacement_in_truth():
    grad = np.array([[0.01, 0.0], [0.0, -0.01]])
    _, truth = simulate_stack(
        (1, 64, 64), dose=None, strain=grad, bsite_displacement_pm=(5.0, -3.0), seed=9,
    )
    is_b = truth.species == "TiO"
    np.testing.assert_allclose(truth.bsite_displacement[is_b], [[5 / 14.6, -3 / 14.6]] * is_b.sum())
    np.testing.assert_allclose(truth.bsite_displacement[~is_b], 0.0)
    ideal = truth.positions - truth.displacement
    strain_part = truth.displacement - truth.bsite_displacement
    centre = ideal.mean(axis=0)
    np.testing.assert_allclose(strain_part, (ideal - centre) @ grad.T, atol=1e-9)


def test_vacancies_remove_columns():
    _, full = simulate_stack((1, 64, 64), dose=None, seed=2)
    _, holes = simulate_stack((1, 64, 64), dose=None, vacancies=0.2, seed=2)
    n_removed = len(holes.removed_positions)
    assert n_removed > 0
    assert len(holes.positions) + n_removed == len(full.positions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dose": -5.0}, r"dose must be a finite number > 0; got -5.0"),
        ({"shape": (0, 64, 64)}, r"shape must be .* every size >= 1; got \(0, 64, 64\)"),
        ({"shape": (4, 64)}, None),
        ({"distortion": [[1.0, 2.0], [0.5, 1.0]]}, r"distortion must be non-singular"),
        ({"distortion": [[1.0, 0.0]]}, r"distortion must be a finite 2 x 2 matrix"),
        ({"pixel_size_pm": 0}, r"pixel_size_pm must be a finite number > 0"),
        ({"probe_sigma_pm": np.nan}, r"probe_sigma_pm must be a finite number > 0"),
        ({"read_noise": -1}, r"read_noise must be a finite number >= 0"),
        ({"vacancies": 1.0}, r"vacancies must be a fraction in \[0, 1\)"),
        ({"lattice": "graphene"}, r"lattice must be a Lattice, 'SrTiO3' or 'square'"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    kwargs = dict(kwargs)
    shape = kwargs.pop("shape", (1, 16, 16))
    if message is None:  # a 2-D shape is a valid single frame, not an error
        stack, _ = simulate_stack(shape, dose=None, **kwargs)
        assert stack.shape == (1, 4, 64)
        return
    with pytest.raises(ValueError, match=message):
        simulate_stack(shape, **kwargs)


def test_lattice_validation():
    with pytest.raises(ValueError, match=r"vectors_pm must be a finite, non-singular"):
        Lattice(np.array([[1.0, 0.0], [2.0, 0.0]]), np.zeros((1, 2)), ("X",), np.ones(1))
    with pytest.raises(ValueError, match=r"one entry per basis column"):
        Lattice(np.eye(2) * 400, np.zeros((2, 2)), ("X",), np.ones(2))

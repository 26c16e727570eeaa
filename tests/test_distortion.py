"""Scan-distortion matrix: estimate on a reference dataset, correct another (positions, images)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

import stemgpu
from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.distortion import DistortionEstimate, correct_distortion, estimate_distortion
from stemgpu.lattice.strain import polar_decomposition
from stemgpu.synthetic import simulate_stack

PX = 14.6
# A 2 % affine scan distortion (stretch, shear and a little rotation).
A = np.array([[1.02, 0.015], [-0.006, 0.985]])


def distorted_positions(seed, *, shape=(1, 700, 700), distortion=A, noise_pm=2.0):
    """Pixel positions q = A^-1 (x - o) of the Sr columns from simulate_stack truth, + noise."""
    _, truth = simulate_stack(shape, dose=None, distortion=distortion, rotation_deg=3.0,
                              probe_sigma_pm=30.0, seed=seed)
    sr = truth.species == "Sr"
    q = truth.image_positions(0)[sr]
    rng = np.random.default_rng(seed + 100)
    return q + rng.normal(scale=noise_pm / PX, size=q.shape), truth


def test_affine_distortion_recovered_and_corrected():
    q, truth = distorted_positions(1)
    est = estimate_distortion(q, lattice=truth.lattice_vectors)
    assert isinstance(est, DistortionEstimate) and est.kind == "full"
    assert est.n_cells > 400
    np.testing.assert_allclose(est.matrix, A, atol=1e-3)
    # The error bars are honest (conservative: cells sharing corners are not independent).
    assert np.all(np.abs(est.matrix - A) < 4 * est.uncertainty + 1e-5)
    assert np.all(est.uncertainty < 5e-4)
    # A second dataset (new origin, new noise) is made square by the correction.
    q2, truth2 = distorted_positions(2)
    before = unit_cells(q2, pixel_size=PX)
    assert abs(np.median(before.angle_deviation_deg)) > 0.5  # the distortion shows
    after = unit_cells(correct_distortion(q2, est), pixel_size=PX)
    assert abs(np.median(after.angle_deviation_deg)) < 0.1
    assert abs(np.median(after.sides) * PX - 390.5) < 0.5
    assert abs(np.median(after.tetragonal)) < 1e-3


def test_symmetric_distortion_from_lattice_parameter():
    s = np.array([[1.02, 0.01], [0.01, 0.985]])
    q, _ = distorted_positions(3, distortion=s)
    est = estimate_distortion(q, lattice=390.5, pixel_size=PX)
    assert est.kind == "symmetric"
    np.testing.assert_allclose(est.matrix, s, atol=1e-3)
    np.testing.assert_allclose(est.matrix, est.matrix.T)
    # With a rotation in A only its symmetric (stretch) part is returned.
    q, _ = distorted_positions(4, distortion=A)
    est = estimate_distortion(q, lattice=390.5, pixel_size=PX)
    _, stretch = polar_decomposition(A[None])
    np.testing.assert_allclose(est.matrix, stretch[0], atol=1e-3)
    cells = unit_cells(correct_distortion(q, est), pixel_size=PX)
    assert abs(np.median(cells.angle_deviation_deg)) < 0.1


def test_estimate_from_unit_cells_object():
    q, truth = distorted_positions(5, shape=(1, 400, 400), noise_pm=0.0)
    cells = unit_cells(q, lattice=truth.lattice_vectors)
    est = stemgpu.estimate_distortion(cells, lattice=truth.lattice_vectors)
    np.testing.assert_allclose(est.matrix, A, atol=1e-9)
    assert est.residual_rms_px < 1e-9
    assert "scan distortion (full" in str(est)
    np.testing.assert_allclose(est.inverse @ est.matrix, np.eye(2), atol=1e-12)


def test_image_correction_matches_undistorted_rendering():
    """Correcting a stack rendered with distortion A gives the stack rendered without it
    (analytic renderings of both; the fixed point c maps x -> x - c + A c)."""
    shape = (2, 96, 96)
    o0 = np.array([3.1, 5.7])
    c = np.array([(shape[1] - 1) / 2, (shape[2] - 1) / 2])
    kw = dict(dose=None, frame_jitter_px=1.0, seed=9, probe_sigma_pm=60.0)
    dist, truth_d = simulate_stack(shape, distortion=A, origin_px=o0, **kw)
    ref, truth_r = simulate_stack(shape, origin_px=o0 + c - A @ c, **kw)
    np.testing.assert_array_equal(truth_d.offsets, truth_r.offsets)
    out = correct_distortion(dist, A)
    assert out.shape == shape and out.dtype == np.float32
    inner = (slice(None), slice(8, -8), slice(8, -8))
    err = np.abs(out[inner] - ref[inner]).max() / ref.max()
    assert err < 5e-3
    # Without the correction the images differ a lot (the test can fail).
    assert np.abs(dist[inner] - ref[inner]).max() / ref.max() > 0.1
    # One frame as a 2-D image gives the same as the stack's frame.
    np.testing.assert_allclose(correct_distortion(dist[1], A), out[1], atol=1e-5)
    # Positions: the corrected image's columns sit at A (q - c) + c.
    q = truth_d.image_positions(1)
    moved = correct_distortion(q, A, center=c)
    d, _ = cKDTree(truth_r.image_positions(1)).query(moved)
    assert d.max() < 1e-9


def test_correct_positions_convention():
    q = np.array([[10.0, 0.0], [0.0, 10.0], [3.0, 4.0]])
    np.testing.assert_allclose(correct_distortion(q, A), q @ A.T)
    back = correct_distortion(correct_distortion(q, A, center=(5, 5)), np.linalg.inv(A),
                              center=(5, 5))
    np.testing.assert_allclose(back, q, atol=1e-12)


@pytest.mark.parametrize(
    ("matrix", "kwargs", "match"),
    [
        (np.zeros((2, 2)), {}, "non-singular 2 x 2"),
        (np.eye(3), {}, "non-singular 2 x 2"),
        (np.eye(2), {"kind": "volume"}, "kind must be"),
        (np.eye(2), {"center": (1, 2, 3)}, "center must be a"),
    ],
)
def test_correct_bad_input(matrix, kwargs, match):
    with pytest.raises(ValueError, match=match):
        correct_distortion(np.zeros((5, 2)), matrix, **kwargs)


def test_correct_bad_image_input():
    with pytest.raises(ValueError, match="order must be an integer 0-5"):
        correct_distortion(np.zeros((8, 8)), np.eye(2), order=7)
    with pytest.raises(ValueError, match="NaN or infinite"):
        correct_distortion(np.full((8, 8), np.nan), np.eye(2))


def test_estimate_bad_input():
    q, truth = distorted_positions(6, shape=(1, 200, 200), noise_pm=0.0)
    with pytest.raises(ValueError, match="needs pixel_size"):
        estimate_distortion(q, lattice=390.5)
    with pytest.raises(ValueError, match="lattice must be a lattice parameter"):
        estimate_distortion(q, lattice=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lattice vectors must be finite and non-singular"):
        estimate_distortion(q, lattice=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least 3 unit cells"):
        two_cells = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]) * 26.75
        estimate_distortion(two_cells, lattice=np.eye(2) * 26.75)
    with pytest.raises(ValueError, match="at least 4 finite"):
        estimate_distortion(q[:3], lattice=truth.lattice_vectors)


def test_backends_agree(backend, xp):
    """The same correction on each backend (one batched affine_transform on xp)."""
    stack, _ = simulate_stack((2, 48, 48), dose=None, distortion=A, seed=1)
    ref = correct_distortion(stack, A, backend="numpy")
    out = correct_distortion(xp.asarray(stack), A, backend=backend)
    assert type(out).__module__.split(".")[0] == xp.__name__
    host = out.get() if hasattr(out, "get") else out
    np.testing.assert_allclose(host, ref, atol=1e-4 * float(ref.max()))
    q = np.array([[1.0, 2.0], [30.0, 4.0]])
    moved = correct_distortion(xp.asarray(q), A, backend=backend)
    moved = moved.get() if hasattr(moved, "get") else moved
    np.testing.assert_allclose(moved, q @ A.T, atol=1e-12)

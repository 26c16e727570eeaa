"""Tests of non-rigid (demons) registration against exact ground truth from stemgpu.synthetic.

Column positions are measured with a small test-local estimator (Gauss-Newton fit of a 2-D
Gaussian plus background on an 11 x 11 window around each known column, vectorised over
frames and columns), used identically for raw, stemgpu-registered and SimpleITK-registered
frames. Stacks have no frame offsets (only line jitter / smooth distortion), so these tests do
not depend on rigid registration.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from stemgpu.backend import resolve_backend
from stemgpu.registration import _warp
from stemgpu.registration import demons as demons_mod
from stemgpu.registration.demons import DemonsResult, register_demons, warp
from stemgpu.synthetic import simulate_stack

# ----------------------------------------------------------------------------- helpers


def fit_columns(frames, guesses, sigma0, radius=5, iterations=8):
    """Per-frame (row, col) of each column: Gauss-Newton fits of A exp(-r^2/2s^2) + B.

    ``frames`` (F, H, W); ``guesses`` (N, 2) px. Returns (F, N, 2). Levenberg damping 1e-3
    keeps the normal equations well conditioned; 8 iterations converge to < 1e-4 px here.
    """
    frames = np.asarray(frames, dtype=np.float64)
    d = np.arange(-radius, radius + 1, dtype=float)
    dr, dc = (g.ravel() for g in np.meshgrid(d, d, indexing="ij"))
    r0 = np.rint(guesses[:, 0]).astype(int)
    c0 = np.rint(guesses[:, 1]).astype(int)
    win = frames[:, r0[:, None] + dr.astype(int), c0[:, None] + dc.astype(int)]  # (F, N, P)
    f, n = win.shape[:2]
    bg = np.percentile(win, 10, axis=2)
    p = np.stack([win.max(axis=2) - bg,
                  np.broadcast_to(guesses[:, 0] - r0, (f, n)),
                  np.broadcast_to(guesses[:, 1] - c0, (f, n)),
                  np.full((f, n), float(sigma0)), bg], axis=-1)
    for _ in range(iterations):
        a, y, x, s, b = (p[..., k][..., None] for k in range(5))
        u, v = dr - y, dc - x
        e = np.exp(-(u * u + v * v) / (2 * s * s))
        res = win - (a * e + b)
        jac = np.stack([e, a * e * u / s**2, a * e * v / s**2, a * e * (u * u + v * v) / s**3,
                        np.ones_like(e)], axis=-1)
        jtj = np.einsum("fnpi,fnpj->fnij", jac, jac)
        jtj += 1e-3 * np.eye(5) * np.diagonal(jtj, axis1=-2, axis2=-1)[..., None, :]
        rhs = np.einsum("fnpi,fnp->fni", jac, res)[..., None]
        p = p + np.linalg.solve(jtj, rhs)[..., 0]
    return np.stack([r0 + p[..., 1], c0 + p[..., 2]], axis=-1)


def scatter(positions):
    """RMS over columns of the across-frame standard deviation: (row, col) and 2-D total."""
    sd = positions.std(axis=0)  # (N, 2)
    per_axis = np.sqrt((sd**2).mean(axis=0))
    return per_axis, float(np.sqrt((per_axis**2).sum()))


def field_at(displacement, points):
    """Bilinear samples (F, N, 2) of fields (F, 2, H, W) at points (N, 2)."""
    return np.stack([
        np.stack([ndi.map_coordinates(displacement[f, k], points.T, order=1) for k in range(2)],
                 axis=-1)
        for f in range(displacement.shape[0])
    ])


def sitk_register(stack, reference, iterations=50, sigma=2.0):
    """SimpleITK FastSymmetricForcesDemons per frame onto ``reference``, linear resampling."""
    sitk = pytest.importorskip("SimpleITK")
    filt = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    filt.SetNumberOfIterations(iterations)
    filt.SetStandardDeviations(sigma)
    fixed = sitk.GetImageFromArray(reference.astype(np.float32))
    out = np.empty_like(stack)
    for i, frame in enumerate(stack):
        moving = sitk.GetImageFromArray(frame.astype(np.float32))
        fld = filt.Execute(fixed, moving)
        tx = sitk.DisplacementFieldTransform(sitk.Cast(fld, sitk.sitkVectorFloat64))
        out[i] = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
    return out


def bright_columns(truth, margin=12):
    """Image positions of the Sr and Ti-O columns at least ``margin`` px inside the frame."""
    keep = np.isin(truth.species, ["Sr", "TiO"]) & truth.visible(0, margin=margin)
    return truth.image_positions(0)[keep]


# ----------------------------------------------------------------------------- line jitter


@pytest.fixture(scope="module")
def jitter_case():
    """8 x 256 x 256 SrTiO3 frames, 300 counts, 0.35 px per-line jitter, no frame offsets."""
    stack, truth = simulate_stack((8, 256, 256), line_jitter_px=0.35, dose=300, seed=7)
    result = register_demons(stack, backend="numpy")
    return stack, truth, result


def test_line_jitter_scatter_drops_3x(jitter_case):
    stack, truth, result = jitter_case
    cols = bright_columns(truth)
    raw_axes, raw = scatter(fit_columns(stack, cols, truth.probe_sigma_px))
    reg_axes, reg = scatter(fit_columns(result.registered, cols, truth.probe_sigma_px))
    # Measured (seed 7): raw 0.139 px (row 0.047, col 0.130) -> 0.034 px (0.022, 0.026).
    assert raw / reg >= 3.0, (raw, reg)
    assert raw_axes[1] / reg_axes[1] >= 3.0, (raw_axes, reg_axes)  # the jitter (fast) axis
    assert not result.flagged.any()


def test_line_jitter_no_worse_than_simpleitk(jitter_case):
    stack, truth, result = jitter_case
    cols = bright_columns(truth)
    sitk_out = sitk_register(stack, stack.mean(axis=0), iterations=50, sigma=2.0)
    _, ours = scatter(fit_columns(result.registered, cols, truth.probe_sigma_px))
    _, theirs = scatter(fit_columns(sitk_out, cols, truth.probe_sigma_px))
    # Measured (seed 7): stemgpu 0.034 px, SimpleITK 0.039 px.
    assert ours <= theirs, (ours, theirs)


def test_line_jitter_field_follows_truth(jitter_case):
    """The col component of the field, averaged along each line, tracks the per-line truth.

    From the scan model, frame f's pixel (r, c) shows the sample at c + j[f, r]; the mean
    shows it near c + jbar[r], so registered(x) = moving(x + d(x)) needs
    d_col[f, r] = jbar[r] - j[f, r]. A field smoothed over ~2 px cannot resolve independent
    lines; it recovers the line-averaged (column-scale) part, hence a positive slope < 1.
    """
    _, truth, result = jitter_case
    j = truth.line_jitter
    d_true = (j.mean(axis=0)[None] - j)[:, 12:-12]
    d_row = result.displacement[:, 1, 12:-12, 12:-12].mean(axis=2)
    # Gaussian-smooth the truth over rows like the field was (sigma 2 px) to compare like
    # with like. Measured (seed 7): error 0.072 px RMS against a smoothed truth of 0.130 px
    # RMS (a zero field would score 0.130); correlation with the raw per-line truth 0.40.
    smooth_true = ndi.gaussian_filter1d(d_true, 2.0, axis=1, mode="nearest")
    err = np.sqrt(np.mean((d_row - smooth_true) ** 2))
    assert err < 0.1, err
    assert err < 0.7 * np.sqrt(np.mean(smooth_true**2)), err
    assert np.corrcoef(d_row.ravel(), d_true.ravel())[0, 1] > 0.3


# ----------------------------------------------------------------------------- smooth distortion


def _smooth_distortion_stack(n=8, size=256, amplitude=0.4, seed=3, dose=300):
    """Frames rendered with their own smooth sinusoidal column displacement u_f(x), px.

    Each frame is simulated separately with the same lattice origin and its own ``strain``
    callable and noise seed, so truth.positions are the exact column positions per frame.
    """
    rng = np.random.default_rng(seed)
    amp = rng.normal(scale=amplitude, size=(n, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2))

    def field(f):
        def u(p):
            out = np.empty_like(p)
            out[:, 0] = amp[f, 0] * np.sin(2 * np.pi * p[:, 1] / 200 + phase[f, 0])
            out[:, 1] = amp[f, 1] * np.sin(2 * np.pi * p[:, 0] / 160 + phase[f, 1])
            return out
        return u

    frames, positions = [], []
    for f in range(n):
        s, t = simulate_stack((1, size, size), dose=dose, strain=field(f),
                              origin_px=(3.3, 5.7), seed=100 + f)
        frames.append(s[0])
        positions.append(t.positions)
    return np.stack(frames), np.stack(positions), t


def test_smooth_distortion_field_recovered():
    stack, pos, truth = _smooth_distortion_stack()
    mean_pos = pos.mean(axis=0)
    # registered(y) = moving(y + d(y)); the mean shows column k at y_k = mean_f pos[f, k],
    # frame f at pos[f, k], so d_f(y_k) = pos[f, k] - y_k exactly.
    d_true = pos - mean_pos[None]
    keep = np.isin(truth.species, ["Sr", "TiO"]) & np.all((mean_pos > 12) & (mean_pos < 243),
                                                            axis=1)
    assert np.sqrt((d_true[:, keep] ** 2).sum(-1).mean()) > 0.4  # a real distortion
    # Smooth distortion: a wider field smoothing than the line-jitter default (docstring).
    result = register_demons(stack, sigma_field=3.0, backend="numpy")
    got = field_at(result.displacement, mean_pos[keep])
    rms = float(np.sqrt(((got - d_true[:, keep]) ** 2).sum(-1).mean()))
    # Measured: 0.063 px at 300 counts (0.090 px with the default sigma_field=2; SimpleITK
    # FastSymmetricForces, 50 iterations, sigma 2: 0.126 px).
    assert rms < 0.1, rms


def test_no_distortion_left_unchanged():
    stack, truth = simulate_stack((8, 256, 256), dose=300, seed=11)
    result = register_demons(stack, backend="numpy")
    cols = bright_columns(truth)
    d_cols = field_at(result.displacement, cols)
    # No invented warp: the field at the columns is at the level of their position noise
    # (measured 0.060 px RMS) and has no systematic part common to the frames (0.018 px).
    assert np.sqrt(np.mean(d_cols**2)) < 0.08
    assert np.sqrt(np.mean(result.displacement.mean(axis=0) ** 2)) < 0.04
    p_raw = fit_columns(stack, cols, truth.probe_sigma_px)
    p_reg = fit_columns(result.registered, cols, truth.probe_sigma_px)
    noise = np.sqrt(np.mean(p_raw.std(axis=0) ** 2))  # per-frame position noise, ~0.045 px
    moved = np.sqrt(np.mean((p_reg - p_raw) ** 2))  # measured 0.037 px
    assert moved < noise, (moved, noise)
    # ... and no farther from the truth than before (the noise is partly averaged out).
    assert np.sqrt(np.mean((p_reg - cols) ** 2)) <= np.sqrt(np.mean((p_raw - cols) ** 2))
    # Pixel changes are a fraction of the shot noise (std ~ sqrt(mean counts)).
    change = (result.registered - stack)[:, 12:-12, 12:-12].std()
    assert change < 0.35 * np.sqrt(stack.mean()), change
    assert not result.flagged.any()


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize(("force", "diffeomorphic", "levels"),
                         [("symmetric", True, 1), ("thirion", False, 1), ("symmetric", True, 2)])
def test_uniform_shift_sign_and_variants(force, diffeomorphic, levels):
    """A frame rendered 0.6 px off: d = -(scikit-image registration shift) everywhere."""
    stack, truth = simulate_stack((2, 96, 96), dose=None, frame_jitter_px=0.6, seed=4)
    shift = truth.registration_shifts(reference=0)[1]  # applying it registers frame 1
    result = register_demons(stack, reference=stack[0], force=force,
                             diffeomorphic=diffeomorphic, levels=levels, iterations=80,
                             tolerance=0.0, backend="numpy")
    d = result.displacement[1][:, 16:-16, 16:-16].reshape(2, -1)
    # warp semantics out(x) = moving(x + d): content moves by -d, so d = -shift.
    np.testing.assert_allclose(np.median(d, axis=1), -shift, atol=0.05)
    np.testing.assert_allclose(result.displacement[0], 0.0, atol=1e-6)
    assert result.metric_after[1] < 0.05 * result.metric_before[1]


def test_registered_is_warp_of_stack_with_displacement(jitter_case):
    stack, _, result = jitter_case
    again = warp(stack, result.displacement, backend="numpy")
    np.testing.assert_allclose(again, result.registered, rtol=0, atol=1e-3)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_warp_matches_scipy_per_frame(order):
    rng = np.random.default_rng(0)
    stack = rng.random((3, 20, 24)).astype(np.float32)
    disp = rng.normal(scale=1.5, size=(3, 2, 20, 24)).astype(np.float32)
    out = warp(stack, disp, order=order, backend="numpy")
    grid = np.indices((20, 24), dtype=np.float32)
    for f in range(3):
        expected = ndi.map_coordinates(stack[f], grid + disp[f], order=order, mode="nearest")
        np.testing.assert_allclose(out[f], expected, atol=2e-5)
    single = warp(stack[1], disp[1], order=order, backend="numpy")
    np.testing.assert_allclose(single, out[1], atol=1e-6)


def test_warp_constant_field_matches_rendered_scene():
    """Warping by a constant d equals the scene rendered with columns moved by -d."""
    d = np.array([0.3, -0.7])
    img, _ = simulate_stack((1, 64, 64), dose=None, origin_px=(4.0, 6.0), seed=0)
    moved, _ = simulate_stack((1, 64, 64), dose=None, origin_px=(4.0 - d[0], 6.0 - d[1]),
                              seed=0)
    field = np.broadcast_to(d[:, None, None], (2, 64, 64)).astype(np.float32)
    out = warp(img[0], field, order=3, backend="numpy")
    err = np.abs(out - moved[0])[4:-4, 4:-4].max() / moved[0].max()
    assert err < 2e-3, err


def test_exponential_of_small_field_and_compose():
    be = resolve_backend("numpy")
    v = np.zeros((1, 2, 16, 16), dtype=np.float32)
    v[:, 1] = 1.6  # a constant velocity: exp(v) = v exactly, after 2 squarings
    np.testing.assert_allclose(_warp.exponential(be, v, max_norm=1.6), v, atol=1e-6)
    u = np.zeros_like(v)
    u[:, 0] = 0.25
    np.testing.assert_allclose(_warp.compose(be, v, u)[:, :, 2:-2, 2:-2],
                               (u + v)[:, :, 2:-2, 2:-2], atol=1e-6)


def test_resample_and_downsample_are_consistent():
    be = resolve_backend("numpy")
    r, c = np.mgrid[0:32, 0:40].astype(np.float32)
    ramp = (0.5 * r + 0.25 * c)[None]
    small = _warp.downsample(be, ramp)
    # 2 x 2 block means of a linear ramp sit at the block centres.
    np.testing.assert_allclose(small[0, 3, 5], 0.5 * 6.5 + 0.25 * 10.5)
    big = _warp.resample(be, small, (32, 40))
    np.testing.assert_allclose(big[0, 1:-1, 1:-1], ramp[0, 1:-1, 1:-1], atol=1e-5)


def test_batching_does_not_change_the_result():
    stack, _ = simulate_stack((5, 64, 64), line_jitter_px=0.3, dose=300, seed=2)
    kw = dict(iterations=15, rounds=2, backend="numpy")
    a = register_demons(stack, batch_size=5, **kw)
    b = register_demons(stack, batch_size=2, **kw)
    np.testing.assert_allclose(a.displacement, b.displacement, atol=1e-6)
    np.testing.assert_allclose(a.registered, b.registered, atol=1e-4)
    np.testing.assert_array_equal(a.iterations, b.iterations)
    c = register_demons(stack, batch_size=2, keep_fields=False, **kw)
    assert c.displacement is None
    np.testing.assert_allclose(c.registered, a.registered, atol=1e-4)


def test_result_metrics_and_to_numpy():
    stack, _ = simulate_stack((4, 64, 64), line_jitter_px=0.3, dose=300, seed=5)
    res = register_demons(stack, iterations=(5, 12), levels=2, rounds=2, backend="numpy")
    assert isinstance(res, DemonsResult)
    assert res.metric_history.shape == (2, 2, 12, 4)
    assert res.update_history.shape == (2, 2, 12, 4)
    assert np.all(res.metric_after <= res.metric_before)
    assert np.all((res.iterations >= 1) & (res.iterations <= 12))
    assert res.parameters["iterations"] == [5, 12] and res.parameters["levels"] == 2
    assert res.parameters["reference"] == "mean" and res.parameters["backend"] == "numpy"
    # The coarse level ran 5 iterations: afterwards the metric is repeated, the update 0.
    np.testing.assert_array_equal(res.update_history[:, 0, 5:], 0.0)
    assert np.all(res.update_history[:, 1, 0] > 0)
    mean_good = res.registered[~res.flagged].mean(axis=0)
    np.testing.assert_allclose(res.mean, mean_good, rtol=1e-5, atol=1e-3)
    host = res.to_numpy()
    assert isinstance(host.registered, np.ndarray) and host.registered is not res.registered
    with pytest.raises(AttributeError, match="cannot assign"):
        res.flagged = None  # frozen


def test_frame_made_worse_is_flagged_and_left_unwarped(monkeypatch):
    """If the iterations return a field that worsens the match, the frame is not warped."""
    stack, _ = simulate_stack((3, 64, 64), line_jitter_px=0.3, dose=300, seed=6)
    real = demons_mod._run_level

    def sabotaged(be, moving, *args, **kwargs):
        disp, runs = real(be, moving, *args, **kwargs)
        disp = disp.copy()
        disp[1] += 3.0  # frame 1: a 3 px shift, clearly worse than no warp
        return disp, runs

    monkeypatch.setattr(demons_mod, "_run_level", sabotaged)
    res = register_demons(stack, iterations=5, backend="numpy")
    np.testing.assert_array_equal(res.flagged, [False, True, False])
    np.testing.assert_array_equal(res.displacement[1], 0.0)
    np.testing.assert_array_equal(res.registered[1], stack[1])
    assert res.metric_after[1] == res.metric_before[1]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    return np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(force="fast"), r"force must be one of 'symmetric', 'thirion'; got 'fast'"),
    (dict(diffeomorphic="yes"), r"diffeomorphic must be True or False; got 'yes'"),
    (dict(keep_fields=1), r"keep_fields must be True or False; got 1"),
    (dict(order=2), r"order must be one of 0, 1, 3; got 2"),
    (dict(levels=0), r"levels must be an integer >= 1 and <= 16; got 0"),
    (dict(levels=6), r"levels=6 needs frames of at least 64 px; got \(32, 32\)"),
    (dict(rounds=1.5), r"rounds must be an integer >= 1 and <= 100; got 1.5"),
    (dict(iterations=0), r"iterations must be >= 0 per level and >= 1 at the finest"),
    (dict(iterations=(10, 10)), r"iterations must be an integer or a sequence of 1 integers"),
    (dict(iterations="many"), r"iterations must be an integer or a sequence of 1 integers"),
    (dict(sigma_field=-1.0), r"sigma_field must be a number >= 0 or a \(row, col\) pair"),
    (dict(sigma_update=(1.0, np.nan)), r"sigma_update must be a number >= 0"),
    (dict(sigma_image="wide"), r"sigma_image must be a number >= 0 .*got 'wide'"),
    (dict(max_step=0), r"max_step must be a finite number >= 1e-06 and <= 1e\+06; got 0"),
    (dict(tolerance=1.0), r"tolerance must be a number in \[0, 1\); got 1.0"),
    (dict(batch_size=0), r"batch_size must be 'auto' or an integer >= 1; got 0"),
    (dict(batch_size="big"), r"batch_size must be 'auto' or an integer >= 1; got 'big'"),
    (dict(backend="torch"), r"backend='torch' is not a known backend"),
])
def test_bad_options(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_demons(small, **kwargs)


def test_bad_stack_and_reference(small):
    with pytest.raises(ValueError, match=r"stack must be a 3-D stack .* got an array of shape"):
        register_demons(small[0])
    with pytest.raises(ValueError, match=r"stack must have at least 2 frames; got 1"):
        register_demons(small[:1])
    bad = small.copy()
    bad[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"stack has NaN or infinite pixels in frame\(s\) 2"):
        register_demons(bad)
    with pytest.raises(TypeError, match=r"stack must be a NumPy array, a CuPy array or a sidpy"):
        register_demons("frames.h5")
    with pytest.raises(TypeError, match=r"stack must hold real numbers"):
        register_demons(small.astype(np.complex64))
    with pytest.raises(ValueError, match=r"reference must have the frame shape \(32, 32\); "
                                         r"got \(32, 31\)"):
        register_demons(small, reference=small[0, :, :31])
    with pytest.raises(ValueError, match=r"reference must be a 2-D image \(rows, cols\)"):
        register_demons(small, reference=small)
    # One frame is fine when a reference is given.
    res = register_demons(small[:1], reference=small[0], iterations=2, backend="numpy")
    assert res.registered.shape == (1, 32, 32)


def test_bad_warp_input(small):
    with pytest.raises(ValueError, match=r"displacement must have shape \(3, 2, 32, 32\) for "
                                         r"this stack; got \(3, 32, 32\)"):
        warp(small, np.zeros((3, 32, 32)))
    field = np.zeros((3, 2, 32, 32))
    field[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"displacement must be finite"):
        warp(small, field)
    with pytest.raises(ValueError, match=r"order must be one of 0, 1, 3; got 5"):
        warp(small, np.zeros((3, 2, 32, 32)), order=5)
    with pytest.raises(ValueError, match=r"stack must be a 2-D image or a 3-D stack"):
        warp(small[None], np.zeros((1, 3, 2, 32, 32)))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy as cp

    stack, _ = simulate_stack((4, 96, 96), line_jitter_px=0.3, dose=300, seed=8)
    kw = dict(iterations=20, tolerance=0.0)
    host = register_demons(stack, backend="numpy", **kw)
    dev = register_demons(cp.asarray(stack), **kw)
    assert isinstance(dev.registered, cp.ndarray)
    dev = dev.to_numpy()
    np.testing.assert_allclose(dev.displacement, host.displacement, atol=2e-3)
    np.testing.assert_allclose(dev.registered, host.registered, atol=0.05)


def test_progress_bar_and_sequence_iterations(capsys):
    stack, _ = simulate_stack((2, 64, 64), line_jitter_px=0.3, dose=300, seed=9)
    res = register_demons(stack, iterations=np.array([3, 4]), levels=2, progress=True,
                          backend="numpy")
    assert "demons" in capsys.readouterr().err
    assert res.parameters["iterations"] == [3, 4]


def test_offset_corrected_frames_with_negative_values():
    """Dark-subtracted data (mean near or below zero) is matched by an offset, not a gain."""
    stack, _ = simulate_stack((4, 128, 128), seed=1, frame_jitter_px=0.2, line_jitter_px=0.1)
    plain = register_demons(stack, iterations=10)
    shifted = register_demons(stack - 200.0, iterations=10)
    assert np.isfinite(shifted.displacement).all()
    np.testing.assert_allclose(shifted.displacement, plain.displacement, atol=0.05)


def test_batches_on_cpu_threads_give_the_same_numbers(monkeypatch):
    """On NumPy the array path splits a batch across CPU threads; frames are independent, so
    the numbers are those of one thread, bit for bit. (The compiled kernels thread over rows
    themselves and never split batches: they are switched off here.)"""
    from stemgpu.registration import _compiled_warp

    monkeypatch.setattr(_compiled_warp, "ENABLED", False)
    assert demons_mod._frame_chunks(4, 4, 2, 512 * 512) == [slice(0, 2), slice(2, 4)]
    assert demons_mod._frame_chunks(3, 3, 2, 64 * 64) == [slice(0, 3)]  # too small to split
    assert demons_mod._frame_chunks(16, 12, 2, 512 * 512) == [
        slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    stack, _ = simulate_stack((4, 512, 512), line_jitter_px=0.3, dose=300, seed=5)
    kw = dict(iterations=4, backend="numpy")
    from stemgpu.backend import Backend

    monkeypatch.setattr(Backend, "cpu_workers", property(lambda be: 2))
    threaded = register_demons(stack, **kw)
    monkeypatch.setattr(Backend, "cpu_workers", property(lambda be: 1))
    serial = register_demons(stack, **kw)
    for name in ("registered", "displacement", "metric_history", "update_history",
                 "iterations", "mean"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name))

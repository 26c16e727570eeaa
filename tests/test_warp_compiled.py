"""The compiled (numba) demons kernels against the array path they replace on NumPy.

Each kernel is compared with the ``xp`` code of :mod:`stemgpu.registration._warp` /
:mod:`~stemgpu.registration.demons` (switched on with ``_compiled_warp.ENABLED = False``) on
rendered scenes and random fields, including samples far outside the frame (edge clamping).
Tolerances are float32 rounding: the kernels do the same arithmetic in a different order
(smoothing in one pass with float32 accumulation instead of scipy's float64 lines).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from stemgpu.backend import resolve_backend
from stemgpu.registration import _compiled_warp, _warp
from stemgpu.registration import demons as demons_mod
from stemgpu.registration.demons import register_demons
from stemgpu.synthetic import simulate_stack

BE = resolve_backend("numpy")


@pytest.fixture
def array_path(monkeypatch):
    """A callable running ``f(*args)`` with the compiled kernels switched off."""
    def run(f, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(_compiled_warp, "ENABLED", False)
            return f(*args, **kwargs)
    return run


@pytest.fixture(scope="module")
def scene():
    stack, _ = simulate_stack((3, 96, 80), line_jitter_px=0.4, dose=300, seed=3)
    rng = np.random.default_rng(0)
    disp = rng.normal(0.0, 1.5, (3, 2, 96, 80)).astype(np.float32)
    disp[0, :, :5] = 40.0  # far outside the frame: clamped to the edge
    disp[1, 1, :, -3:] = -200.0
    return stack.astype(np.float32), disp


def test_compiled_kernels_are_available():
    ok, why = _compiled_warp.available()
    assert ok, why  # numba is a dependency: the fast path must run here
    assert _compiled_warp.usable(BE, np.zeros(2, np.float32))
    assert not _compiled_warp.usable(BE, np.zeros(2, np.float32), np.zeros(2))  # mixed dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bilinear_matches_array_path(scene, array_path, dtype):
    stack, disp = scene
    ch = np.stack([stack, stack[::-1] * 0.5]).astype(dtype)
    d = disp.astype(dtype)
    got = _warp.bilinear(BE, ch, d)
    want = array_path(_warp.bilinear, BE, ch, d)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(abs(want).max()))
    # and both are scipy's bilinear map_coordinates with edge clamping
    grid = np.mgrid[0:96, 0:80].astype(np.float64)
    ref = ndi.map_coordinates(ch[1, 2].astype(np.float64), grid + d[2], order=1, mode="nearest")
    np.testing.assert_allclose(got[1, 2], ref, rtol=1e-5, atol=1e-4)


def test_compose_matches_array_path(scene, array_path):
    _, disp = scene
    field = np.ascontiguousarray(disp * 0.3)
    update = np.ascontiguousarray(disp[::-1] * 0.2)
    got = _warp.compose(BE, field, update)
    want = array_path(_warp.compose, BE, field, update)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a non-contiguous update (a view) gives the same numbers
    big = np.zeros((*update.shape[:3], 2 * update.shape[3]), dtype=update.dtype)
    big[..., ::2] = update
    view = big[..., ::2]
    np.testing.assert_allclose(_warp.compose(BE, field, view), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [(2.0, 2.0), (0.0, 1.5), (3.2, 0.0), (0.7, 5.0), (30.0, 30.0),
                                   (1e-200, 2.0), (1e-15, 1e-14)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smoothing_matches_scipy(scene, sigma, dtype):
    """The one-pass separable kernel has scipy's taps and 'nearest' edges; (30, 30) px is
    wider than a third of the frame (every row clamps); widths <= 1e-15 are skipped as scipy
    skips them (1e-200 squared underflows to zero)."""
    stack, disp = scene
    for arr in (stack.astype(dtype), disp.astype(dtype)):
        got = _warp.smooth(BE, arr, sigma)
        want = ndi.gaussian_filter(arr.astype(np.float64), (0,) * (arr.ndim - 2) + sigma,
                                   mode="nearest", truncate=3.0)
        assert got.dtype == dtype and got.shape == arr.shape
        tol = 2e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * float(abs(want).max()))


def test_warp_metric_and_force_match_array_path(scene):
    stack, disp = scene
    be = BE
    mu, sd = stack.mean(), stack.std()
    moving = ((stack - mu) / sd).astype(np.float32)
    fixed = moving.mean(axis=0)[None]
    grad_fixed = _warp.gradient(be, fixed)
    small = np.ascontiguousarray(disp * 0.2)
    warped, metric = _compiled_warp.warp_metric(moving, small, fixed[0])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_compiled_warp, "ENABLED", False)
        want = _warp.warp_batch(be, moving, small)
    np.testing.assert_allclose(warped, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metric, demons_mod._metric(want - fixed), rtol=1e-5)
    active = np.array([True, False, True])
    for force in ("symmetric", "thirion"):
        opts = demons_mod._Options.checked(
            iterations=5, force=force, diffeomorphic=True, sigma_field=2.0, sigma_update=0.0,
            sigma_image=1.0, max_step=0.5, levels=1, rounds=1, tolerance=1e-3, order=1,
            keep_fields=True)
        alpha2 = (0.5 / opts.max_step) ** 2
        u, length = _compiled_warp.demons_force(warped, fixed[0], grad_fixed[0], active, alpha2,
                                                force == "symmetric")
        ref = demons_mod._force_update(be, opts, grad_fixed, warped, warped - fixed, active,
                                       alpha2)
        np.testing.assert_allclose(u, ref, rtol=1e-5, atol=1e-6)
        assert not u[1].any()  # a stopped frame gets no update
        np.testing.assert_allclose(length, np.sqrt((ref * ref).sum(axis=1).mean(axis=(1, 2))),
                                   rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"levels": 2, "sigma_update": 1.0, "max_step": 1.2},
                                    {"force": "thirion", "diffeomorphic": False}])
def test_register_demons_compiled_equals_array_path(array_path, kwargs):
    """Whole registrations agree: fields to 1e-3 px, the same iterations and flags."""
    stack, _ = simulate_stack((4, 128, 128), line_jitter_px=0.35, dose=300, seed=7)
    fast = register_demons(stack, iterations=20, backend="numpy", **kwargs)
    ref = array_path(register_demons, stack, iterations=20, backend="numpy", **kwargs)
    np.testing.assert_allclose(fast.displacement, ref.displacement, rtol=0, atol=1e-3)
    np.testing.assert_allclose(fast.registered, ref.registered, rtol=1e-4,
                               atol=1e-4 * float(stack.max()))
    np.testing.assert_array_equal(fast.iterations, ref.iterations)
    np.testing.assert_array_equal(fast.flagged, ref.flagged)
    np.testing.assert_allclose(fast.metric_after, ref.metric_after, rtol=1e-4)
    assert np.abs(fast.displacement).max() > 0.05  # the fields are not trivially zero

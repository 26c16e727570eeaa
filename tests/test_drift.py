"""Drift vs jitter decomposition, against the simulator's exact frame offsets."""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.registration.drift import DriftReport, drift_report
from stemgpu.registration.rigid import register_rigid
from stemgpu.synthetic import simulate_stack

PIXEL_PM = 14.6


def _truth_jitter_std_pm(truth):
    """Std (x, y) of the true offsets about their own best straight line (ddof 2), pm.

    The simulator's random jitter contains, by chance, a small linear trend that no method
    can tell from drift; the figure a user can recover is the jitter about the linear fit.
    """
    t = np.arange(len(truth.offsets))
    out = []
    for k in (1, 0):  # x = col, y = row
        coef = np.polyfit(t, truth.offsets[:, k], 1)
        resid = truth.offsets[:, k] - np.polyval(coef, t)
        out.append(np.sqrt((resid**2).sum() / (len(t) - 2)) * truth.pixel_size_pm)
    return np.array(out)


@pytest.fixture(scope="module")
def jitter_stack():
    # 3 pm frame jitter with a linear drift of (4.4, -2.9) pm/frame, 40 frames.
    return simulate_stack((40, 256, 256), pixel_size_pm=PIXEL_PM, dose=200.0,
                          frame_jitter_px=3.0 / PIXEL_PM, drift_px=(0.3, -0.2), seed=5)


def test_jitter_std_within_10_percent(jitter_stack):
    stack, truth = jitter_stack
    res = register_rigid(stack, pixel_size=PIXEL_PM, backend="numpy")
    rep = drift_report(res, model="linear")
    expected = _truth_jitter_std_pm(truth)
    got = np.array([rep.jitter_std_pm.x, rep.jitter_std_pm.y])
    np.testing.assert_allclose(got, expected, rtol=0.10)
    # The nominal 3 pm too, within the sampling spread of 40 frames (~11 %, 2 sigma).
    np.testing.assert_allclose(got, 3.0, rtol=0.25)
    # Drift rate: truth is (row, col) = (0.3, -0.2) px/frame.
    assert rep.drift_rate_pm_per_frame.y == pytest.approx(0.3 * PIXEL_PM, abs=0.15)
    assert rep.drift_rate_pm_per_frame.x == pytest.approx(-0.2 * PIXEL_PM, abs=0.15)
    # White jitter: raw frame-to-frame and about-the-fit figures agree, residual ~ uncorrelated.
    raw = np.array([rep.jitter_std_raw_pm.x, rep.jitter_std_raw_pm.y])
    np.testing.assert_allclose(raw, got, rtol=0.25)
    assert abs(rep.residual_lag1.x) < 0.35 and abs(rep.residual_lag1.y) < 0.35
    assert rep.residual_white and "residual is white" in rep.summary(as_text=True)


def test_exact_linear_plus_alternating_jitter():
    t = np.arange(12.0)
    shifts = np.stack([0.5 * t, -0.25 * t], axis=1)
    shifts[:, 0] += 0.1 * (-1.0) ** t  # y jitter of exactly +-0.1 px
    rep = drift_report(shifts, pixel_size=10.0, frame_time=0.5)
    assert isinstance(rep, DriftReport)
    assert rep.jitter_std_pm.x == pytest.approx(0.0, abs=1e-9)
    assert rep.drift_rate_pm_per_frame.x == pytest.approx(-2.5, abs=1e-12)
    assert rep.drift_rate_pm_per_s.x == pytest.approx(-5.0, abs=1e-12)
    assert rep.drift_rate_raw_pm_per_frame.y == pytest.approx(5.0 + (-2.0 / 11), abs=1e-12)
    # Alternating +-1 pm about a line: the fitted line absorbs a tiny trend; std ~ 1 pm.
    assert rep.jitter_std_pm.y == pytest.approx(1.0, rel=0.1)
    assert rep.residual_lag1.y < -0.8  # alternating: strongly anti-correlated
    np.testing.assert_allclose(rep.offsets_pm, shifts * 10.0)
    np.testing.assert_allclose(rep.smooth_pm + rep.jitter_pm, rep.offsets_pm)
    np.testing.assert_allclose(rep.time, t * 0.5)


def test_models_on_curved_drift():
    # Quadratic drift with white jitter: the line leaves correlated residuals, poly and
    # spline recover the jitter.
    rng = np.random.default_rng(3)
    t = np.arange(60.0)
    jitter = rng.normal(scale=0.2, size=(60, 2))
    shifts = np.stack([0.002 * (t - 30) ** 2, 0.05 * t], axis=1) + jitter
    true_std = jitter.std(axis=0, ddof=1)[::-1] * 10.0  # (x, y) pm
    lin = drift_report(shifts, pixel_size=10.0, model="linear")
    poly = drift_report(shifts, pixel_size=10.0, model="poly", degree=2)
    spl = drift_report(shifts, pixel_size=10.0, model="spline")
    assert lin.jitter_std_pm.y > 1.5 * true_std[1] and lin.residual_lag1.y > 0.5
    assert not lin.residual_white and "try model='poly'" in str(lin)
    assert poly.residual_white
    np.testing.assert_allclose(poly.jitter_std_pm, true_std, rtol=0.15)
    np.testing.assert_allclose(spl.jitter_std_pm, true_std, rtol=0.2)
    assert abs(spl.residual_lag1.y) < 0.35
    # per axis: the curved y drift takes more freedom than the straight x drift, and each
    # axis' jitter std uses its own (regression: both used the last axis' dof)
    dof_y, dof_x = spl.parameters["fit_dof"]
    assert dof_y > dof_x + 3 and dof_x >= 2.0
    res_y = spl.jitter_pm[:, 0]
    assert spl.jitter_std_pm.y == pytest.approx(np.sqrt((res_y**2).sum() / (len(res_y) - dof_y)))


def test_summary_plot_and_exclusion(jitter_stack):
    stack, truth = jitter_stack
    res = register_rigid(stack[:10], backend="numpy")
    rep = drift_report(res.shifts, pixel_size=PIXEL_PM, frame_time=2.0)
    d = rep.summary()
    assert d["jitter_std_x_pm"] == rep.jitter_std_pm.x and d["frames"] == 10
    assert d["drift_rate_y_pm_per_s"] == pytest.approx(rep.drift_rate_pm_per_frame.y / 2.0)
    text = rep.summary(as_text=True)
    assert "jitter std about the fit" in text and "pm/s" in text and str(rep) == text

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = rep.plot()
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4
    plt.close(fig)
    fig, ax = plt.subplots()
    assert rep.plot(ax=ax) is fig
    plt.close(fig)

    mask = np.zeros(10, dtype=bool)
    mask[4] = True
    shifted = res.shifts.copy()
    shifted[4] += 5.0  # an outlier frame, excluded from the statistics
    ex = drift_report(shifted, pixel_size=PIXEL_PM, exclude=mask)
    clean = drift_report(np.delete(res.shifts, 4, axis=0), pixel_size=PIXEL_PM)
    assert ex.jitter_std_pm.x == pytest.approx(clean.jitter_std_pm.x, rel=0.2)
    assert ex.jitter_pm[4, 0] > 50 and ex.parameters["excluded"] == [4]
    host = rep.to_numpy()
    np.testing.assert_array_equal(host.offsets_pm, rep.offsets_pm)


def test_rigid_result_supplies_pixel_size_and_flags():
    stack, _ = simulate_stack((6, 96, 96), dose=200.0, frame_jitter_px=0.5, seed=1)
    res = register_rigid(stack, pixel_size=20.0, backend="numpy")
    rep = drift_report(res)
    assert rep.pixel_size_pm == 20.0
    np.testing.assert_allclose(rep.offsets_pm, res.shifts * 20.0)
    assert drift_report(res, pixel_size=10.0).pixel_size_pm == 10.0


def test_bad_inputs():
    good = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"shifts must have shape \(n, 2\) .* got \(5, 3\)"):
        drift_report(np.zeros((5, 3)), pixel_size=1.0)
    with pytest.raises(ValueError, match=r"shifts must be finite; frames \[2\] are not"):
        bad = good.copy()
        bad[2, 1] = np.nan
        drift_report(bad, pixel_size=1.0)
    with pytest.raises(ValueError, match="drift_report needs a calibration: pass pixel_size="):
        drift_report(good)
    with pytest.raises(ValueError, match="pixel_size must be a positive number in pm; got 0"):
        drift_report(good, pixel_size=0)
    with pytest.raises(ValueError,
                       match="model must be one of 'linear', 'poly', 'spline'; got 'cubic'"):
        drift_report(good, pixel_size=1.0, model="cubic")
    with pytest.raises(ValueError, match="degree must be an integer >= 1 for model='poly'"):
        drift_report(good, pixel_size=1.0, model="poly", degree=0)
    with pytest.raises(ValueError, match="frame_time must be a positive number of s; got -1"):
        drift_report(good, pixel_size=1.0, frame_time=-1)
    with pytest.raises(ValueError, match="model='linear' needs at least 3 frames"):
        drift_report(good[:2], pixel_size=1.0)
    with pytest.raises(ValueError, match=r"exclude must be a boolean mask of shape \(5,\)"):
        drift_report(good, pixel_size=1.0, exclude=[True])
    with pytest.raises(TypeError, match="shifts must be an .n, 2. array of px or a RigidResult"):
        drift_report("shifts", pixel_size=1.0)


@pytest.mark.parametrize("model, kw", [("linear", {}), ("poly", {"degree": 3}),
                                       ("spline", {"smoothing": 1.0})])
def test_drift_rate_uncertainty_matches_monte_carlo(model, kw):
    rng = np.random.default_rng(1)
    n, rates, errs = 16, [], []
    for _ in range(300):
        shifts = np.stack([0.05 * np.arange(n), -0.02 * np.arange(n)], 1)
        shifts = shifts + rng.normal(0, 0.2, (n, 2))
        rep = drift_report(shifts, pixel_size=10.0, model=model, **kw)
        rates.append(rep.drift_rate_pm_per_frame.x)
        errs.append(rep.drift_rate_uncertainty_pm_per_frame.x)
    assert np.mean(errs) == pytest.approx(np.std(rates), rel=0.15)


@pytest.mark.parametrize("smoothing", [0, 0.0, 1e-12, 1e-3])
def test_interpolating_spline_is_refused_not_reported_as_zero_jitter(smoothing):
    """smoothing=0 interpolates every shift: the residual is 0 by construction, which used
    to be printed as a jitter of 0 +- 0; now the fit is refused with the reason."""
    shifts = np.cumsum(np.random.default_rng(0).normal(size=(20, 2)), axis=0)
    with pytest.raises(ValueError, match=r"smoothing=.* leaves .* residual degrees of freedom "
                                         r"\(the spline uses .* of 20 frames\): the fit passes "
                                         r"through every shift.*no jitter can be measured"):
        drift_report(shifts, pixel_size=10.0, model="spline", smoothing=smoothing)
    rep = drift_report(shifts, pixel_size=10.0, model="spline", smoothing=1.0)
    assert rep.jitter_std_pm.x > 0 and rep.jitter_std_pm.y > 0


@pytest.mark.parametrize("kw, match", [
    ({"pixel_size": "10"}, "pixel_size must be a positive number in pm; got '10'"),
    ({"pixel_size": [10.0]}, r"pixel_size must be a positive number in pm; got \[10\.0\]"),
    ({"frame_time": "2"}, "frame_time must be a positive number of s; got '2'"),
    ({"frame_time": True}, "frame_time must be a positive number of s; got True"),
    ({"model": "spline", "smoothing": "1"}, "smoothing must be a finite number >= 0; got '1'"),
    ({"model": "spline", "smoothing": -1.0}, "smoothing must be a finite number >= 0; got -1"),
    ({"model": "spline", "smoothing": np.inf}, "smoothing must be a finite number >= 0"),
    ({"exclude": [3] * 8}, r"exclude must be a boolean mask of shape \(8,\); got \[3, 3"),
    ({"exclude": np.full(8, 0.5)}, r"exclude must be a boolean mask .* \(dtype float64\)"),
])
def test_string_and_out_of_range_options_get_our_messages(kw, match):
    shifts = np.cumsum(np.random.default_rng(1).normal(size=(8, 2)), axis=0)
    with pytest.raises(ValueError, match=match):
        drift_report(shifts, **{"pixel_size": 1.0, **kw})


def test_string_shifts_get_our_message():
    with pytest.raises(ValueError, match=r"shifts must be an \(n, 2\) array of numbers "
                                         r"\(row, col\) in px; got list"):
        drift_report([["a", "b"]] * 4, pixel_size=1.0)
    rep = drift_report(np.zeros((4, 2)), pixel_size=1.0, exclude=[1, 0, 0, 0])  # 0/1 is a mask
    assert rep.used.tolist() == [False, True, True, True]


@pytest.mark.parametrize("pixel_size", [1e-220, 1e153])
def test_pixel_sizes_that_underflow_or_overflow_are_refused(pixel_size):
    """Found by tests/test_hypothesis.py: 1e-220 pm gave a jitter of exactly 0 (squares
    underflow), 1e153 pm infinite figures (squares overflow)."""
    shifts = np.cumsum(np.random.default_rng(2).normal(size=(8, 2)), axis=0)
    with pytest.raises(ValueError, match=r"pixel_size must be a positive number in pm, from "
                                         r"1e-06 to 1e\+09 \(1 mm\)"):
        drift_report(shifts, pixel_size=pixel_size)
    with pytest.raises(ValueError, match=r"shifts must be at most 1e\+12 px in magnitude"):
        drift_report(shifts * 1e140, pixel_size=1.0)

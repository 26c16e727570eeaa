"""The statistics behind the summary table: intervals of a standard deviation and of a
Student t estimate, and the systematic floors of figures derived from fitted positions."""

from __future__ import annotations

import numpy as np

__all__ = ["LEVEL_68", "SYSTEMATIC", "std_interval", "systematic_floor", "t_quantile"]

#: Coverage of a one-sigma interval of a normal distribution.
LEVEL_68 = 0.6827

#: Systematic floors (one sigma) of the figures derived from fitted column positions. The
#: bootstrap uncertainty of a median over hundreds of cells reaches 0.01 pm, below the bias
#: of the fit itself: position-dependent neighbour overlap and the finite-dose bias of the
#: Poisson MLE. Measured as the largest |median - truth| on SrTiO3 images (384 x 384,
#: seeds 3 and 4, noise-free and 1600 counts per Sr column): lengths 1.3e-4 relative, area
#: 2.4e-4, angles 0.004 deg, tetragonal/shear 4e-5, B-site displacement 0.08 pm; floors
#: are those rounded up. ``pytest tests/test_pipeline.py -k systematic`` checks that they
#: cover the bias on other scenes (seeds 5 and 6).
SYSTEMATIC = {"length_relative": 2e-4, "area_relative": 4e-4, "angle_deg": 0.005,
              "strain": 5e-5, "bsite_pm": 0.1}


def systematic_floor(name: str, value: float) -> float:
    """The systematic floor (one sigma) of summary row ``name`` with median ``value``.

    Examples
    --------
    >>> from stemgpu.app.statistics import systematic_floor
    >>> systematic_floor("a1_length_pm", 390.5), systematic_floor("jitter_std_x_pm", 3.0)
    (0.0781, 0.0)
    """
    if name in ("smallest_side_pm", "longest_side_pm", "a1_length_pm", "a2_length_pm"):
        return SYSTEMATIC["length_relative"] * abs(value)
    if name == "area_nm2":
        return SYSTEMATIC["area_relative"] * abs(value)
    if name in ("angle_deviation_deg", "rotation_deg"):
        return SYSTEMATIC["angle_deg"]
    if name in ("tetragonal", "shear"):
        return SYSTEMATIC["strain"]
    if name.startswith("bsite_"):
        return SYSTEMATIC["bsite_pm"]
    return 0.0


def std_interval(s: float, dof: float, level: float = LEVEL_68) -> tuple[float, float]:
    """Central confidence interval of a normal standard deviation estimated as ``s``.

    From ``dof * s^2 / sigma^2 ~ chi^2(dof)``: ``(s sqrt(dof / q_hi), s sqrt(dof / q_lo))``
    with ``q`` the chi-square quantiles at ``(1 +- level) / 2``. Asymmetric: for ``dof = 6``
    the 68 % interval is about ``(0.80 s, 1.48 s)``.

    Examples
    --------
    >>> from stemgpu.app import std_interval
    >>> [round(v, 2) for v in std_interval(3.0, 6)]
    [2.41, 4.44]
    """
    from scipy.stats import chi2

    if not (dof > 0):
        raise ValueError(f"dof must be positive; got {dof!r}")
    tail = 0.5 * (1.0 - level)
    q_lo, q_hi = chi2.ppf(tail, dof), chi2.ppf(1.0 - tail, dof)
    return float(s * np.sqrt(dof / q_hi)), float(s * np.sqrt(dof / q_lo))


def t_quantile(dof: float, level: float = LEVEL_68) -> float:
    """Half-width factor of the central ``level`` interval of Student's t with ``dof``.

    An estimate whose standard error scales with a residual std of ``dof`` degrees of
    freedom lies within ``t_quantile(dof) * error`` of the truth with probability ``level``.

    Examples
    --------
    >>> from stemgpu.app.statistics import t_quantile
    >>> round(t_quantile(4), 4)
    1.1417
    """
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.5 + 0.5 * level, dof))

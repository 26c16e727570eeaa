"""The end-to-end analysis: rigid -> demons -> atoms -> cells, in one call.

:func:`analyze` runs the stages a user asks for on one stack and returns an
:class:`Analysis` holding every stage's result. ``Analysis.summary()`` gives the lecture's
table (jitter, drift, cell sides, angles, area, B-site displacement, tetragonal and shear
distortion), every figure with its one-sigma uncertainty; ``Analysis.plot_report()`` draws
the report figure; ``stemgpu.save(analysis, path)`` writes everything to one HDF5 file.

Stages
------
``"rigid"``
    :func:`stemgpu.register_rigid` (reference: the stack mean) and
    :func:`stemgpu.drift_report` (linear drift plus frame jitter, in pm).
``"demons"``
    :func:`stemgpu.register_demons` of the rigidly registered frames onto their mean.
``"atoms"``
    On the registered mean image: :func:`stemgpu.find_atoms`, a first
    :func:`stemgpu.fit_atoms`, species by fitted amplitude (A-site brightest), then, for a
    perovskite (``edge_columns=True``), the faint O columns are started at the A-A edge
    midpoints and every column is refitted together so that the O tails do not bias the
    B-site positions.
``"cells"``
    :func:`stemgpu.unit_cells` on the converged A- and B-site columns and
    :func:`stemgpu.cell_statistics` (medians with bootstrap uncertainties).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._inputs import as_image, as_stack, is_frame_source, is_sidpy_dataset, resolve_pixel_size
from ._progress import progress_bar
from .backend import to_host

__all__ = ["STEPS", "SYSTEMATIC", "Analysis", "AnalysisError", "Row", "analyze",
           "std_interval"]

#: Stage names in the order they run.
STEPS = ("rigid", "demons", "atoms", "cells")

_ATOM_OPTIONS = {"sigma", "threshold", "min_distance", "n_classes", "names", "edge_columns",
                 "model", "estimator", "window", "max_iter", "counts_per_unit"}
_DRIFT_OPTIONS = {"frame_time", "model", "degree", "smoothing"}

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


def _systematic(name: str, value: float) -> float:
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


class AnalysisError(ValueError):
    """A stage ran but found nothing usable (no columns, no cells, no usable frames)."""


@dataclass(frozen=True)
class Row:
    """One line of :meth:`Analysis.summary`: a value, its one-sigma uncertainty, its spread."""

    label: str
    value: float
    uncertainty: float
    unit: str
    std: float | None = None
    note: str = ""
    systematic: float = 0.0

    @property
    def total_uncertainty(self) -> float:
        """Statistical and systematic uncertainty added in quadrature."""
        return float(np.hypot(self.uncertainty, self.systematic))

    def as_dict(self) -> dict:
        """Plain dict of the row."""
        return {"label": self.label, "value": self.value, "uncertainty": self.uncertainty,
                "systematic": self.systematic, "unit": self.unit, "std": self.std,
                "note": self.note}


def std_interval(s: float, dof: float, level: float = 0.6827) -> tuple[float, float]:
    """Central confidence interval of a normal standard deviation estimated as ``s``.

    From ``dof * s^2 / sigma^2 ~ chi^2(dof)``: ``(s sqrt(dof / q_hi), s sqrt(dof / q_lo))``
    with ``q`` the chi-square quantiles at ``(1 +- level) / 2``. Asymmetric: for ``dof = 6``
    the 68 % interval is about ``(0.80 s, 1.48 s)``.

    Examples
    --------
    >>> from stemgpu.pipeline import std_interval
    >>> [round(v, 2) for v in std_interval(3.0, 6)]
    [2.41, 4.44]
    """
    from scipy.stats import chi2

    if not (dof > 0):
        raise ValueError(f"dof must be positive; got {dof!r}")
    tail = 0.5 * (1.0 - level)
    q_lo, q_hi = chi2.ppf(tail, dof), chi2.ppf(1.0 - tail, dof)
    return float(s * np.sqrt(dof / q_hi)), float(s * np.sqrt(dof / q_lo))


class Analysis:
    """Every stage's result of :func:`analyze`, with the summary table and the plots.

    Attributes
    ----------
    results : dict
        ``"info"`` (pixel size, steps, timings, backend, options) and, per stage run,
        ``"rigid"`` (:class:`~stemgpu.registration.rigid.RigidResult`), ``"drift"``
        (:class:`~stemgpu.registration.drift.DriftReport`), ``"demons"``
        (:class:`~stemgpu.registration.demons.DemonsResult`), ``"mean_image"`` (the
        registered mean), ``"atoms"`` (:class:`~stemgpu.atoms.fit.AtomFit`), ``"species"``
        (label per fitted column), ``"cells"``
        (:class:`~stemgpu.lattice.cells.UnitCells`) and ``"statistics"``
        (:class:`~stemgpu.lattice.stats.CellStatistics`).

    The stage results are also attributes (``analysis.rigid``, ``analysis.cells``, ...;
    ``None`` for a stage not run). ``stemgpu.load`` rebuilds an Analysis from a saved file.
    """

    def __init__(self, results: Mapping[str, Any]):
        self.results = dict(results)

    def __getattr__(self, name: str):
        if name in ("rigid", "drift", "demons", "mean_image", "atoms", "species", "cells",
                    "statistics", "info"):
            return self.__dict__["results"].get(name)
        raise AttributeError(f"'Analysis' object has no attribute {name!r}")

    @property
    def pixel_size_pm(self) -> float:
        """Pixel size (pm) every calibrated figure uses."""
        return float(self.results["info"]["pixel_size_pm"])

    def __repr__(self) -> str:
        done = [k for k in self.results if k != "info"]
        return f"Analysis(pixel_size_pm={self.pixel_size_pm:g}, results={done})"

    # ------------------------------------------------------------------ summary
    def summary(self, as_text: bool = False):
        """The lecture's table: every figure with its one-sigma uncertainty.

        Returns a dict ``name -> Row`` (or an aligned text table with ``as_text=True``).

        Uncertainties (one sigma; ``Row.uncertainty`` statistical, ``Row.systematic`` the
        known systematic floor of the fit, ``Row.total_uncertainty`` both): the jitter std
        of ``n`` frames about a fit with ``p`` parameters has
        ``s / sqrt(2 (n - p))`` (normal jitter); the drift rate has the standard error of
        the smooth fit (``s / sqrt(sum (t - mean t)^2)`` for a straight line, propagated
        through the hat matrix for a polynomial or spline); cell figures are medians with the
        bootstrap uncertainty of the median (:func:`stemgpu.cell_statistics`); ``std`` is
        the spread over frames or cells. The jitter rows' notes also give the 68 % interval
        of the jitter std (:func:`std_interval`): for few frames the sampling distribution of
        a standard deviation is skewed and ``s / sqrt(2 (n - p))`` understates how far above
        ``s`` the true value can lie; the drift rows' notes give the 68 % half-width of the
        rate's Student t distribution (its error scales with the residual std). Smallest and
        longest side are order statistics of four noisy sides: position noise biases them
        apart (see ``|a1|``, ``|a2|`` for unbiased side lengths).
        """
        rows: dict[str, Row] = {}
        drift = self.drift
        if drift is not None:
            used = np.asarray(drift.used, dtype=bool)
            n = int(used.sum())
            dofs = np.broadcast_to(np.asarray(drift.parameters.get("fit_dof", 2.0),
                                              dtype=float), (2,))  # (row, col) axes
            nus = {"y": max(n - float(dofs[0]), 1.0), "x": max(n - float(dofs[1]), 1.0)}
            unit_t = "s" if drift.frame_time_s is not None else "frame"
            per = drift.frame_time_s or 1.0
            rate = drift.drift_rate_pm_per_s if drift.frame_time_s is not None \
                else drift.drift_rate_pm_per_frame
            rate_err = drift.drift_rate_uncertainty_pm_per_frame
            for axis in ("x", "y"):
                s, nu = float(getattr(drift.jitter_std_pm, axis)), nus[axis]
                lo, hi = std_interval(s, nu)
                rows[f"jitter_std_{axis}_pm"] = Row(
                    f"jitter std {axis}", s, s / np.sqrt(2.0 * nu), "pm",
                    note=f"{n} frames about the {drift.model} drift; 68 % interval "
                         f"[{lo:.3g}, {hi:.3g}] pm")
            # The rate's error scales with the residual std (nu dof): Student t, not normal.
            from scipy.stats import t as student_t

            for axis in ("x", "y"):
                nu = nus[axis]
                k68 = float(student_t.ppf(0.5 + 0.5 * 0.6827, nu))
                err = float(getattr(rate_err, axis)) / per
                rows[f"drift_rate_{axis}_pm_per_{unit_t}"] = Row(
                    f"drift rate {axis}", float(getattr(rate, axis)), err, f"pm/{unit_t}",
                    note=f"t with {nu:g} dof: 68 % interval +-{k68 * err:.3g}")
        atoms = self.atoms
        if atoms is not None:
            ok = to_host(atoms.status) == 0
            species = self.species
            main = ok if species is None else ok & (np.asarray(species) != "O")
            rows["columns_fitted"] = Row("columns fitted (converged)", float(ok.sum()), 0.0,
                                         "", note=f"of {len(ok)}; "
                                         + ", ".join(f"{k} {v}" for k, v in
                                                     atoms.status_counts().items()))
            use, note = (main, "one sigma per axis, A and B columns (Fisher information)") \
                if main.any() else (ok, "")
            if use.any():
                err = to_host(atoms.position_errors)[use] * self.pixel_size_pm
                rows["position_error_pm"] = Row("median column position error",
                                                float(np.median(err)), 0.0, "pm", note=note)
        stats = self.statistics
        if stats is not None:
            rows["n_cells"] = Row("unit cells", float(stats.n_cells), 0.0, "")
            table = (
                ("smallest_side_pm", "median smallest side", "pm"),
                ("longest_side_pm", "median longest side", "pm"),
                ("a1_length_pm", "median |a1|", "pm"),
                ("a2_length_pm", "median |a2|", "pm"),
                ("angle_deviation_deg", "median angle deviation (a1, a2)", "deg"),
                ("area_nm2", "median area", "nm^2"),
                ("bsite_displacement_row_pm", "median B-site displacement y", "pm"),
                ("bsite_displacement_col_pm", "median B-site displacement x", "pm"),
                ("bsite_distance_pm", "median B-site distance", "pm"),
                ("tetragonal", "median tetragonal distortion", ""),
                ("shear", "median shear distortion", ""),
                ("rotation_deg", "median rotation", "deg"),
            )
            for name, label, unit in table:
                if name not in stats.rows:
                    continue
                st = stats.rows[name]
                note = ""
                if name in ("smallest_side_pm", "longest_side_pm"):
                    note = "order statistic of 4 sides: biased by position noise"
                elif name == "bsite_distance_pm":
                    note = "a magnitude: biased upwards by position noise"
                rows[name] = Row(label, st.median, st.median_uncertainty, unit, std=st.std,
                                 note=note, systematic=_systematic(name, st.median))
        if not as_text:
            return rows
        return format_rows(rows)

    def __str__(self) -> str:
        return self.summary(as_text=True)

    # ------------------------------------------------------------------ plots
    def plot_drift(self, ax=None):
        """Drift trajectory with its smooth fit, and the jitter (see ``DriftReport.plot``)."""
        if self.drift is None:
            raise ValueError("plot_drift needs the 'rigid' step; it was not run")
        return self.drift.plot(ax=ax)

    def plot_columns(self, ax=None):
        """The registered mean with the refined columns overlaid by species."""
        from .report import plot_columns

        return plot_columns(self, ax=ax)

    def plot_maps(self):
        """Maps of tetragonal distortion, shear, rotation and B-site displacement."""
        from .report import plot_maps

        return plot_maps(self)

    def plot_histograms(self, bins: int = 40):
        """Histograms of sides, angles, areas, distortions and B-site distance."""
        from .lattice.plot import plot_cell_histograms

        if self.cells is None:
            raise ValueError("plot_histograms needs the 'cells' step; it was not run")
        return plot_cell_histograms(self.cells, pixel_size=self.pixel_size_pm, bins=bins)

    def plot_report(self, path=None):
        """One-page report figure (drift, columns, maps, histograms); saved when ``path``."""
        from .report import plot_report

        return plot_report(self, path=path)


def format_rows(rows: Mapping[str, Row], truth: Mapping[str, float] | None = None,
                truth_note: Mapping[str, str] | None = None) -> str:
    """Aligned text table of summary rows (with a truth column when ``truth`` is given)."""
    def num(v):
        if v is None or not np.isfinite(v):
            return "-"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.2f}"
        if a >= 1:
            return f"{v:.3f}"
        return f"{v:.4g}"

    head = ["quantity", "value", "+/- stat", "sys", "unit", "std"]
    if truth is not None:
        head += ["truth", "|diff|/sigma"]
    lines = []
    for name, r in rows.items():
        line = [r.label, num(r.value), num(r.uncertainty) if r.uncertainty else "",
                num(r.systematic) if r.systematic else "", r.unit,
                num(r.std) if r.std is not None else ""]
        if truth is not None:
            tv = truth.get(name)
            if tv is None:
                line += [(truth_note or {}).get(name, ""), ""]
            else:
                sigma = r.total_uncertainty
                z = abs(r.value - tv) / sigma if sigma > 0 else np.nan
                line += [num(tv), f"{z:.1f}" if np.isfinite(z) else ""]
        lines.append(line)
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))
    notes = [f"  {r.label}: {r.note}" for r in rows.values() if r.note]
    if notes:
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


# ====================================================================== the analysis


def _check_steps(steps) -> tuple[str, ...]:
    if isinstance(steps, str):
        steps = tuple(s.strip() for s in steps.split(",") if s.strip())
    try:
        steps = tuple(steps)
    except TypeError:
        raise TypeError(f"steps must be a sequence of stage names; got {steps!r}") from None
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise ValueError(f"steps={steps!r}: unknown or empty; choose from {STEPS}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps={steps!r} names a stage twice")
    if "cells" in steps and "atoms" not in steps:
        raise ValueError("steps: 'cells' needs 'atoms' (cells are built from fitted columns)")
    if "demons" in steps and "rigid" not in steps:
        raise ValueError("steps: 'demons' needs 'rigid' first (demons corrects distortions "
                         "of a pixel or two, not frame offsets)")
    return tuple(s for s in STEPS if s in steps)


def _check_options(stage_options: Mapping[str, Any]) -> dict[str, dict]:
    allowed = (*STEPS, "drift")
    out = {}
    for key, value in stage_options.items():
        if key not in allowed:
            raise TypeError(f"analyze() got an unexpected keyword {key!r}; stage options are "
                            f"{allowed} (each a dict)")
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}= must be a dict of options for that stage; got "
                            f"{type(value).__name__}")
        out[key] = dict(value)
    for key, known in (("atoms", _ATOM_OPTIONS), ("drift", _DRIFT_OPTIONS)):
        extra = set(out.get(key, {})) - known
        if extra:
            raise TypeError(f"{key}= has unknown option(s) {sorted(extra)}; accepted: "
                            f"{sorted(known)}")
    return out


def analyze(stack, *, pixel_size: float | None = None,
            steps: Sequence[str] = STEPS, backend=None, progress: bool = True,
            **stage_options) -> Analysis:
    """Register a stack, fit its atom columns and measure its unit cells, in one call.

    Parameters
    ----------
    stack : (n, h, w) or (h, w) array, sidpy.Dataset, or lazy frame source
        NumPy or CuPy data (a sidpy Dataset from :func:`stemgpu.open` carries its
        calibration and frame time). A single image allows only ``("atoms", "cells")``. A
        lazy source (:func:`stemgpu.open_frames`, an h5py dataset, a memmap) is streamed
        through rigid registration batch by batch and only the registered mean is kept, so a
        stack larger than memory can be analysed; it needs ``"rigid"`` and no ``"demons"``.
    pixel_size : float, optional
        pm per pixel; overrides the data's calibration and is required without one.
    steps : sequence of {"rigid", "demons", "atoms", "cells"}
        Stages to run (always in this order). ``"demons"`` needs ``"rigid"``, ``"cells"``
        needs ``"atoms"``.
    backend : {"numpy", "cupy", "auto"}, optional
        See :mod:`stemgpu.backend`; every stage runs on it.
    progress : bool
        tqdm progress bars per stage.
    **stage_options : dict
        Options per stage, passed on: ``rigid={...}`` to :func:`stemgpu.register_rigid`,
        ``drift={...}`` to :func:`stemgpu.drift_report` (``frame_time``, ``model``, ...),
        ``demons={...}`` to :func:`stemgpu.register_demons`, ``cells={...}`` to
        :func:`stemgpu.unit_cells`, and ``atoms={...}`` with ``sigma``, ``threshold``,
        ``min_distance`` (peak finding), ``n_classes`` (intensity classes, default 2: A-
        and B-site), ``names``, ``edge_columns`` (default True: start and fit the O columns
        of a perovskite at the A-A edge midpoints) and ``model``, ``estimator``,
        ``window``, ``max_iter``, ``counts_per_unit`` (fitting).

    Returns
    -------
    Analysis

    Raises
    ------
    ValueError
        Unknown steps, a missing calibration, a stack too small, or a stage that found
        nothing to work on (e.g. no atom columns); the message names the stage.
    TypeError
        Unknown stage options.

    Examples
    --------
    >>> import stemgpu
    >>> stack, truth = stemgpu.simulate_stack((4, 192, 192), frame_jitter_px=0.3, seed=0)
    >>> res = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid", "atoms", "cells"),
    ...                       progress=False)
    >>> res.statistics.n_cells > 20
    True
    >>> round(res.summary()["a1_length_pm"].value / 10) * 10  # SrTiO3: a = 390.5 pm
    390
    """
    steps = _check_steps(steps)
    opts = _check_options(stage_options)
    frame_time = _frame_time(stack) if is_sidpy_dataset(stack) else None
    ndim = len(getattr(stack, "shape", np.shape(stack)))
    streamed = is_frame_source(stack)
    if streamed:
        be, px, frame_time = _check_frame_source(stack, steps, pixel_size, backend)
        shape = tuple(int(x) for x in stack.shape)
        data = stack
    else:
        if ndim == 2:
            if {"rigid", "demons"} & set(steps):
                raise ValueError("steps 'rigid'/'demons' need a stack (frames, rows, cols); "
                                 "got a single image: use steps=('atoms', 'cells')")
            cal = as_image(stack, name="stack", backend=backend)
        else:
            cal = as_stack(stack, name="stack", min_frames=1 if "rigid" not in steps else 3,
                           backend=backend)
        be = cal.backend
        px = resolve_pixel_size(pixel_size, cal.pixel_size_pm, required=True, what="analyze")
        shape = tuple(int(x) for x in cal.data.shape)
        data = cal.data
    info: dict[str, Any] = {"pixel_size_pm": px, "steps": list(steps), "backend": be.name,
                            "device": be.device_name, "shape": list(shape),
                            "timings_s": {}, "options": opts, "streamed": streamed}
    results: dict[str, Any] = {"info": info}
    bar = progress_bar(progress, total=len(steps), desc="stemgpu", unit="stage", leave=False)

    def timed(name):
        info["timings_s"][name] = time.perf_counter() - t0
        bar.update(1)

    try:
        current = data
        flagged = None
        if "rigid" in steps:
            from .registration.drift import drift_report
            from .registration.rigid import register_rigid

            bar.set_postfix_str("rigid registration")
            t0 = time.perf_counter()
            rigid = register_rigid(data, pixel_size=px, progress=progress, backend=be,
                                   **{"keep_registered": not streamed,
                                      **opts.get("rigid", {})})
            results["rigid"] = rigid
            flagged = to_host(rigid.flagged).astype(bool)
            if (~flagged).sum() < 3:
                raise AnalysisError(
                    f"rigid: {int(flagged.sum())} of {len(flagged)} frames were flagged as failed "
                    "registrations; fewer than 3 usable frames are left for the drift fit")
            dopts = {"frame_time": frame_time, **opts.get("drift", {})}
            results["drift"] = drift_report(rigid, **dopts)
            current = rigid.registered
            if streamed:
                # Nothing but the mean is kept: the stack may be larger than memory.
                current = _streamed_mean(data, rigid, be, flagged)
                flagged = None
            timed("rigid")
        if "demons" in steps:
            from .registration.demons import register_demons

            bar.set_postfix_str("demons registration")
            t0 = time.perf_counter()
            if flagged is not None and flagged.any():
                # Failed frames stay out of the demons reference and of the mean.
                current = current[be.asarray(np.flatnonzero(~flagged))]
                info["demons_frames"] = np.flatnonzero(~flagged).tolist()
                flagged = None
            demons = register_demons(current, progress=progress, backend=be,
                                     **opts.get("demons", {}))
            results["demons"] = demons
            current = demons.registered
            timed("demons")
        xp = be.xp
        if current.ndim == 3:
            keep = np.ones(current.shape[0], dtype=bool) if flagged is None else ~flagged
            mean = current[be.asarray(np.flatnonzero(keep))].mean(axis=0) if not keep.all() \
                else current.mean(axis=0)
        else:
            mean = current
        results["mean_image"] = xp.asarray(mean, dtype=xp.float32)
        if "atoms" in steps:
            bar.set_postfix_str("atom columns")
            t0 = time.perf_counter()
            fit, species = _atoms_stage(results["mean_image"], opts.get("atoms", {}), be,
                                        cells_options=opts.get("cells", {}))
            results["atoms"] = fit
            results["species"] = species
            timed("atoms")
        if "cells" in steps:
            bar.set_postfix_str("unit cells")
            t0 = time.perf_counter()
            cells, stats = _cells_stage(results["atoms"], results["species"], px,
                                        opts.get("cells", {}),
                                        names=opts.get("atoms", {}).get("names"))
            results["cells"] = cells
            results["statistics"] = stats
            timed("cells")
    finally:
        bar.close()  # also on errors: no half-drawn bar before the message
    return Analysis(results)


def _check_frame_source(stack, steps, pixel_size, backend):
    from .backend import resolve_backend

    if len(stack.shape) != 3:
        raise ValueError(f"stack: a lazy source must be a (frames, rows, cols) stack; got "
                         f"shape {tuple(stack.shape)}")
    if "demons" in steps or "rigid" not in steps:
        raise ValueError("steps: a lazy stack (e.g. stemgpu.open_frames) is analysed by "
                         "streaming 'rigid' and keeping only the registered mean: use steps "
                         "without 'demons' (e.g. ('rigid', 'atoms', 'cells')), or load it "
                         "into memory first")
    px = resolve_pixel_size(pixel_size, getattr(stack, "pixel_size_pm", None), required=True,
                            what="analyze")
    meta = dict(getattr(stack, "metadata", {}) or {})
    frame_time = meta.get("frame_time_s")
    return resolve_backend(backend), px, (float(frame_time) if frame_time else None)


def _streamed_mean(stack, rigid, be, flagged):
    """Mean of the registered frames that were not flagged, read and shifted batch by batch."""
    from .registration.rigid import _shift

    if not flagged.any():
        return be.asarray(rigid.mean)
    xp = be.xp
    n = int(stack.shape[0])
    shifts = np.asarray(rigid.shifts, dtype=float)
    order = rigid.parameters.get("order", "fourier")
    batch = max(1, int(rigid.parameters.get("batch_size") or 8))
    acc = None
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        keep = np.flatnonzero(~flagged[start:stop])
        if len(keep) == 0:
            continue
        frames = np.asarray(stack[start:stop], dtype=np.float32)[keep]
        moved = _shift(be, be.asarray(frames), shifts[start + keep], order)
        part = moved.sum(axis=0, dtype=xp.float64)
        acc = part if acc is None else acc + part
    return (acc / float((~flagged).sum())).astype(xp.float32)


def _frame_time(dataset) -> float | None:
    """Frame time (s) of a sidpy stack: its metadata, else a frame axis calibrated in s."""
    meta = dict(getattr(dataset, "metadata", {}) or {})
    if meta.get("frame_time_s"):
        return float(meta["frame_time_s"])
    if getattr(dataset, "ndim", 0) != 3:
        return None
    try:
        axis = dataset._axes[0]
        unit = str(getattr(axis, "units", "")).strip().lower()
        values = np.asarray(axis.values, dtype=float)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if unit in ("s", "sec", "second", "seconds") and len(values) > 1:
        step = float(np.median(np.diff(values)))
        return step if np.isfinite(step) and step > 0 else None
    return None


def _fit_options(options: Mapping[str, Any]) -> dict:
    keys = ("model", "estimator", "window", "max_iter", "counts_per_unit")
    return {k: options[k] for k in keys if k in options}


def _atoms_stage(image, options: Mapping[str, Any], be, *, cells_options):
    """Find, fit, label; then add the perovskite O columns and refit all together."""
    from .atoms.find import find_atoms
    from .atoms.fit import fit_atoms
    from .lattice.cells import unit_cells
    from .lattice.sublattice import assign_by_intensity, cell_edge_midpoints

    n_classes = int(options.get("n_classes", 2))
    names = options.get("names")
    found = find_atoms(image, sigma=options.get("sigma"),
                       threshold=options.get("threshold", 0.03),
                       min_distance=options.get("min_distance"), backend=be)
    start = to_host(found.positions)
    if len(start) < max(4, n_classes):
        raise AnalysisError(f"atoms: found {len(start)} column(s) in the registered mean; need at "
                         "least 4 (check pixel_size, or pass atoms={'sigma': ..., "
                         "'threshold': ...})")
    sigma = float(found.parameters["sigma"])
    # No nested bar per fitting pass: the stage bar says "atom columns" already.
    fit_kw = {"sigma": sigma, "backend": be, **_fit_options(options)}
    first = fit_atoms(image, start, **fit_kw)
    ok = to_host(first.status) == 0
    if ok.sum() < max(4, n_classes):
        hint = ""
        if float(image.min()) < 0:
            hint = ("; the image has negative values (offset-corrected data?): the Poisson "
                    "fit needs counts - add the dark level back")
        raise AnalysisError(f"atoms: only {int(ok.sum())} of {len(ok)} column fits converged "
                            f"({first.status_counts()}){hint}")
    pos = to_host(first.positions)
    amp = to_host(first.param("amplitude"))
    labels = np.full(len(pos), "-", dtype=object)
    labels[ok] = assign_by_intensity(amp[ok], n_classes=n_classes, names=names)
    labels = labels.astype(str)
    if not options.get("edge_columns", True) or n_classes != 2:
        return first, labels
    a_name = names[0] if names else "A"
    a_ok = ok & (labels == a_name)
    try:
        a_cells = unit_cells(pos[a_ok], **{k: v for k, v in cells_options.items()
                                           if k in ("angle_tolerance_deg", "side_tolerance",
                                                    "parallelogram_tolerance")})
    except ValueError:
        return first, labels  # no square A-site lattice: nothing to complete
    mids = cell_edge_midpoints(a_cells, merge_distance=0.25 * sigma + 0.5)
    if len(mids) == 0:
        return first, labels
    # Start the known columns from their first-pass fits (failed ones from the peak).
    start2 = np.where(np.isfinite(pos), pos, start)
    allpos = np.concatenate([start2, mids])
    all_labels = np.concatenate([labels, np.full(len(mids), "O")])
    second = fit_atoms(image, allpos, **fit_kw)
    return second, all_labels


def _cells_stage(fit, species, px, options, names=None):
    from .lattice.cells import unit_cells
    from .lattice.stats import cell_statistics

    ok = to_host(fit.status) == 0
    species = np.asarray(species)
    labels = sorted(set(species[ok]) - {"O", "-"})
    if names is not None and len(names) > 2:  # a third named class (e.g. "O") is not a cell
        labels = [x for x in labels if x in {str(n) for n in names[:2]}]
    use = ok & np.isin(species, labels)
    pos = to_host(fit.positions)[use]
    kw = dict(options)
    if names is not None and len(names) >= 2:
        kw.setdefault("a_site", str(names[0]))
        kw.setdefault("b_site", str(names[1]))
    try:
        cells = unit_cells(pos, species=species[use], pixel_size=px, **kw)
    except ValueError as exc:
        raise AnalysisError(f"cells: {exc}") from None
    if cells.n_cells < 2:
        raise AnalysisError(f"cells: found {cells.n_cells} unit cell(s) among {len(pos)} fitted "
                         "columns; need at least 2 for statistics")
    return cells, cell_statistics(cells, pixel_size=px)

"""The rows of :meth:`stemgpu.Analysis.summary`: drift and jitter, fitted columns, unit cells.

Each row is a :class:`Row`: a value with its one-sigma statistical uncertainty, the known
systematic floor of the fit (:data:`~stemgpu.app.statistics.SYSTEMATIC`), the spread over
frames or cells and a note. :func:`summary_rows` builds them from the stage results;
:func:`~stemgpu.app.table.format_rows` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from .statistics import std_interval, systematic_floor, t_quantile

__all__ = ["CELL_ROWS", "Row", "atom_rows", "cell_rows", "drift_rows", "summary_rows",
           "track_rows"]

#: Cell-statistics rows shown in the summary: (name, label, unit), in table order.
CELL_ROWS = (
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

_CELL_NOTES = {
    "smallest_side_pm": "order statistic of 4 sides: biased by position noise",
    "longest_side_pm": "order statistic of 4 sides: biased by position noise",
    "bsite_distance_pm": "a magnitude: biased upwards by position noise",
}


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


def drift_rows(drift) -> dict[str, Row]:
    """Jitter std and drift rate per axis of a :class:`~stemgpu.DriftReport`.

    The jitter std of ``n`` frames about a fit with ``p`` parameters has the uncertainty
    ``s / sqrt(2 (n - p))``, its note the skewed 68 % interval (:func:`std_interval`); the
    drift rate's note gives the 68 % half-width of its Student t distribution, since its
    error scales with the residual std.
    """
    used = np.asarray(drift.used, dtype=bool)
    n = int(used.sum())
    dofs = np.broadcast_to(np.asarray(drift.parameters.get("fit_dof", 2.0), dtype=float),
                           (2,))  # (row, col) axes
    nus = {"y": max(n - float(dofs[0]), 1.0), "x": max(n - float(dofs[1]), 1.0)}
    unit_t = "s" if drift.frame_time_s is not None else "frame"
    per = drift.frame_time_s or 1.0
    rate = drift.drift_rate_pm_per_s if drift.frame_time_s is not None \
        else drift.drift_rate_pm_per_frame
    rows: dict[str, Row] = {}
    for axis in ("x", "y"):
        s, nu = float(getattr(drift.jitter_std_pm, axis)), nus[axis]
        lo, hi = std_interval(s, nu)
        rows[f"jitter_std_{axis}_pm"] = Row(
            f"jitter std {axis}", s, s / np.sqrt(2.0 * nu), "pm",
            note=f"{n} frames about the {drift.model} drift; 68 % interval "
                 f"[{lo:.3g}, {hi:.3g}] pm")
    for axis in ("x", "y"):
        nu = nus[axis]
        k68 = t_quantile(nu)
        err = float(getattr(drift.drift_rate_uncertainty_pm_per_frame, axis)) / per
        rows[f"drift_rate_{axis}_pm_per_{unit_t}"] = Row(
            f"drift rate {axis}", float(getattr(rate, axis)), err, f"pm/{unit_t}",
            note=f"t with {nu:g} dof: 68 % interval +-{k68 * err:.3g}")
    return rows


def atom_rows(atoms, species, pixel_size_pm: float) -> dict[str, Row]:
    """Converged column count and the median position error (A and B columns when labelled)."""
    ok = to_host(atoms.status) == 0
    main = ok if species is None else ok & (np.asarray(species) != "O")
    rows = {"columns_fitted": Row(
        "columns fitted (converged)", float(ok.sum()), 0.0, "",
        note=f"of {len(ok)}; " + ", ".join(f"{k} {v}" for k, v in
                                           atoms.status_counts().items()))}
    use, note = (main, "one sigma per axis, A and B columns (Fisher information)") \
        if main.any() else (ok, "")
    if use.any():
        err = to_host(atoms.position_errors)[use] * pixel_size_pm
        rows["position_error_pm"] = Row("median column position error",
                                        float(np.median(err)), 0.0, "pm", note=note)
    return rows


def cell_rows(stats) -> dict[str, Row]:
    """Cell count and the medians of :data:`CELL_ROWS` of a :class:`~stemgpu.CellStatistics`,
    each with its bootstrap uncertainty and systematic floor."""
    rows = {"n_cells": Row("unit cells", float(stats.n_cells), 0.0, "")}
    for name, label, unit in CELL_ROWS:
        if name not in stats.rows:
            continue
        st = stats.rows[name]
        rows[name] = Row(label, st.median, st.median_uncertainty, unit, std=st.std,
                         note=_CELL_NOTES.get(name, ""),
                         systematic=systematic_floor(name, st.median))
    return rows


def track_rows(tracks, series=None) -> dict[str, Row]:
    """Calibration ratio of the error bars per species, flagged columns and frames, and the
    drift of the lattice over the frames (from the ``"track"`` step)."""
    rows: dict[str, Row] = {}
    for name, r in tracks.calibration.items():
        rows[f"calibration_ratio_{name}"] = Row(
            f"calibration ratio {name}", r.ratio, 0.5 * (r.high - r.low), "",
            note=f"frame scatter / Fisher error over {tracks.n_frames} frames, {r.n_columns} "
                 f"columns; 68 % interval [{r.low:.3f}, {r.high:.3f}]; 1 = error bars right")
    flagged = tracks.flagged_columns()
    rows["columns_flagged"] = Row(
        "columns flagged (tracking)", float((tracks.column_flags != 0).sum()), 0.0, "",
        note=(", ".join(f"{k} {v}" for k, v in flagged.items()) or "none") +
             f" of {len(tracks.column_flags)}")
    bad = np.flatnonzero(tracks.frame_flagged)
    rows["frames_flagged"] = Row(
        "frames flagged (tracking)", float(len(bad)), 0.0, "",
        note="; ".join(f"frame {f}: {tracks.frame_reasons[f]}" for f in bad[:3])
             + (" ..." if len(bad) > 3 else "") if len(bad) else "none")
    if series is not None:
        for key, label in (("a1_length_pm", "|a1|"), ("a2_length_pm", "|a2|")):
            t = series.trends.get(key)
            if t is None:
                continue
            verdict = "significant" if t.significant else "not significant"
            rows[f"lattice_drift_{key}"] = Row(
                f"drift of median {label} over frames", t.slope, t.slope_error, "pm/frame",
                note=f"{len(series.frames)} frames; z {t.z:+.1f}, p {t.p:.2g}: {verdict} "
                     f"at alpha {series.parameters['alpha']:g}")
    return rows


def summary_rows(analysis) -> dict[str, Row]:
    """Every row of ``analysis.summary()``, for the stages that ran, in table order."""
    rows: dict[str, Row] = {}
    if analysis.drift is not None:
        rows.update(drift_rows(analysis.drift))
    if analysis.atoms is not None:
        rows.update(atom_rows(analysis.atoms, analysis.species, analysis.pixel_size_pm))
    if analysis.statistics is not None:
        rows.update(cell_rows(analysis.statistics))
    if analysis.tracks is not None:
        rows.update(track_rows(analysis.tracks, analysis.frame_series))
    return rows

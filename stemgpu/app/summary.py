"""The rows of :meth:`stemgpu.Analysis.summary`: drift and jitter, fitted columns, unit cells.

Each row is a :class:`Row`: a value with its one-sigma statistical uncertainty, the known
systematic floor of the fit (:data:`~stemgpu.app.statistics.SYSTEMATIC`), the spread over
frames or cells and a note. :func:`summary_rows` builds them from the stage results;
:func:`~stemgpu.app.table.format_rows` prints them. :func:`quality` gathers, from the same
stored results, how far the numbers can be trusted: frames and columns flagged and why, the
fraction of candidate cells rejected, every gate's record and a warning for each gate that
came close to its limit (:func:`~stemgpu.app.table.format_quality` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from .statistics import std_interval, systematic_floor, t_quantile

__all__ = ["CELL_ROWS", "Row", "atom_rows", "cell_rows", "drift_rows", "quality",
           "summary_rows", "track_rows"]

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


def _contrast_note(parameters) -> str:
    """How the columns' contrast was chosen, when it is not the plain default (bright, given)."""
    note = parameters.get("contrast_note")
    chosen = parameters.get("contrast_chosen")
    if note and (parameters.get("contrast") == "dark" or chosen == "auto"):
        return f"; {note}"
    return ""


def atom_rows(atoms, species, pixel_size_pm: float) -> dict[str, Row]:
    """Converged column count and the median position error (A and B columns when labelled)."""
    ok = to_host(atoms.status) == 0
    main = ok if species is None else ok & (np.asarray(species) != "O")
    rows = {"columns_fitted": Row(
        "columns fitted (converged)", float(ok.sum()), 0.0, "",
        note=f"of {len(ok)}; " + ", ".join(f"{k} {v}" for k, v in
                                           atoms.status_counts().items())
        + _contrast_note(atoms.parameters))}
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


# ---------------------------------------------------------------------------- quality


def _rigid_reasons(rigid) -> dict[int, str]:
    """Why each flagged frame was flagged: ``RigidResult.flag_reasons`` when the result has
    them, else what the stored qualities tell (a weak correlation peak, or the shift on a
    search limit / inconsistent pair measurements, which the result does not tell apart)."""
    flagged = np.flatnonzero(to_host(rigid.flagged).astype(bool))
    stored = getattr(rigid, "flag_reasons", None)
    if stored is not None:
        if isinstance(stored, dict):
            return {int(k): str(v) for k, v in stored.items() if int(k) in set(flagged)}
        return {int(f): str(stored[f]) or "flagged" for f in flagged}
    q = np.asarray(to_host(rigid.quality), dtype=float)
    half = 0.5 * float(np.median(q))
    return {int(f): (f"correlation peak {q[f]:.3g} below half the median ({half:.3g})"
                     if q[f] < half else
                     "shift on a search limit or pair measurements inconsistent")
            for f in flagged}


def _frames(analysis) -> dict:
    rigid = analysis.rigid
    n = len(to_host(rigid.flagged))
    out = {"n_frames": n, "flagged": _rigid_reasons(rigid)}
    kept = (analysis.info or {}).get("demons_frames")
    if kept is not None:
        out["demons_left_out"] = sorted(set(range(n)) - {int(k) for k in kept})
    return out


def _columns(atoms, species) -> dict:
    st = to_host(atoms.status)
    out = {"n_columns": int(st.size), "status": atoms.status_counts()}
    if atoms.width_fixed is not None:
        out["width_held"] = int(np.asarray(to_host(atoms.width_fixed)).sum())
    if species is not None:
        sp = np.asarray(species).astype(str)
        bad = st != 0
        out["not_converged_by_species"] = {
            str(s): int((bad & (sp == s)).sum()) for s in sorted(set(sp[bad]) - {"-"})}
    return out


def _separation(atoms, species, n_classes: int) -> dict:
    """The species-separation gate's record, measured on the final fit's amplitudes of the
    intensity classes (unlabelled columns left out, and the O columns when they were placed
    by geometry: with fewer than 3 intensity classes)."""
    from ..lattice.gates import AnalysisError, check_separation

    sp = np.asarray(species).astype(str)
    out = ("-",) if n_classes >= 3 else ("O", "-")
    use = (to_host(atoms.status) == 0) & ~np.isin(sp, out)
    amp = np.asarray(to_host(atoms.param("amplitude")), dtype=float)[use]
    if len(set(sp[use])) < 2:
        return {}
    try:
        return check_separation(amp, sp[use])
    except AnalysisError as exc:
        return {"species_separation": {"value": float("nan"), "limit": 0.0, "passed": False,
                                       "reason": str(exc)}}


def _cells(cells) -> dict:
    p = cells.parameters
    accepted = int(p.get("cells", cells.n_cells))
    rejected = {k[len("rejected_"):]: int(v) for k, v in p.items()
                if k.startswith("rejected_")}
    candidates = int(p.get("candidates", accepted + sum(rejected.values())))
    return {"candidates": candidates, "accepted": accepted,
            "fraction_rejected": 1.0 - accepted / candidates if candidates else float("nan"),
            "rejected": rejected, "positions_skipped": int(p.get("n_flagged", 0)),
            "lattice": p.get("reference_kind"), "gates": dict(p.get("gates", {}))}


def _tracking(tracks) -> dict:
    ff = np.asarray(to_host(tracks.frame_flagged), dtype=bool)
    reasons = np.asarray(tracks.frame_reasons).astype(str)
    return {"n_columns": int(len(tracks.column_flags)),
            "columns_flagged": int((np.asarray(tracks.column_flags) != 0).sum()),
            "column_flags": tracks.flagged_columns(),
            "n_frames": int(len(ff)),
            "frames_flagged": {int(f): str(reasons[f]) for f in np.flatnonzero(ff)}}


def quality(analysis) -> dict:
    """How far the numbers of an analysis can be trusted, from its stored results.

    Returns a dict with, for the stages that ran: ``"frames"`` (rigid registration: number
    of frames, ``{frame: reason}`` of the flagged ones, frames left out of demons),
    ``"columns"`` (fit status counts by :data:`~stemgpu.atoms.models.STATUS_NAMES`, columns
    whose width was held at the median, failed fits by species), ``"species"`` (the
    species-separation gate's record, on the final fit's amplitudes), ``"cells"`` (candidate
    cells, accepted, the fraction rejected and why, every lattice gate's record),
    ``"tracking"`` (flagged columns and frames of the ``"track"`` step) and ``"warnings"``:
    one line per gate that passed but came close to its limit
    (:func:`~stemgpu.lattice.gates.gate_warnings`) or failed.

    Examples
    --------
    >>> import stemgpu
    >>> from stemgpu.app.summary import quality
    >>> image, _ = stemgpu.simulate_image((160, 160), seed=0)
    >>> q = quality(stemgpu.analyze(image, pixel_size=14.6, steps=("atoms", "cells"),
    ...                             progress=False))
    >>> sorted(q), q["cells"]["lattice"], q["warnings"]
    (['cells', 'columns', 'species', 'warnings'], 'square', [])
    """
    from ..lattice.gates import gate_warnings

    out: dict = {}
    records: dict = {}
    if analysis.rigid is not None:
        out["frames"] = _frames(analysis)
    if analysis.atoms is not None:
        out["columns"] = _columns(analysis.atoms, analysis.species)
        n_classes = int(((analysis.info or {}).get("options") or {}).get("atoms", {})
                        .get("n_classes", 2))
        separation = {} if analysis.species is None else _separation(
            analysis.atoms, analysis.species, n_classes)
        if separation:  # none for one intensity class
            out["species"] = separation
            records.update(separation)
    if analysis.cells is not None:
        out["cells"] = _cells(analysis.cells)
        records.update(out["cells"]["gates"])
    if analysis.tracks is not None:
        out["tracking"] = _tracking(analysis.tracks)
    warnings = gate_warnings({k: r for k, r in records.items() if np.isfinite(r["value"])})
    warnings += [f"gate {k} failed: {r.get('reason', '')}".rstrip(": ")
                 for k, r in records.items() if not r.get("passed", True)]
    out["warnings"] = warnings
    return out

"""The summary as aligned text: :func:`format_rows` (with a truth column for the demo) and
:func:`format_quality` (the quality section, after the notes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .summary import Row

__all__ = ["format_number", "format_quality", "format_rows"]

_HEAD = ["quantity", "value", "+/- stat", "sys", "unit", "std"]


def format_number(v: float | None) -> str:
    """A table cell: ``-`` for missing or non-finite, 2 decimals from 100, 3 from 1, else
    4 significant digits.

    Examples
    --------
    >>> from stemgpu.app.table import format_number
    >>> [format_number(v) for v in (390.512, 2.44712, 0.004296, 0.0, None)]
    ['390.51', '2.447', '0.004296', '0', '-']
    """
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


def _cells(name: str, r: Row, truth, truth_note) -> list[str]:
    num = format_number
    line = [r.label, num(r.value), num(r.uncertainty) if r.uncertainty else "",
            num(r.systematic) if r.systematic else "", r.unit,
            num(r.std) if r.std is not None else ""]
    if truth is None:
        return line
    tv = truth.get(name)
    if tv is None:
        return line + [(truth_note or {}).get(name, ""), ""]
    sigma = r.total_uncertainty
    z = abs(r.value - tv) / sigma if sigma > 0 else np.nan
    return line + [num(tv), f"{z:.1f}" if np.isfinite(z) else ""]


def format_rows(rows: Mapping[str, Row], truth: Mapping[str, float] | None = None,
                truth_note: Mapping[str, str] | None = None) -> str:
    """Aligned text table of summary rows (with a truth column when ``truth`` is given).

    Examples
    --------
    >>> from stemgpu.app import Row, format_rows
    >>> print(format_rows({"a": Row("median |a1|", 390.51, 0.013, "pm", systematic=0.078)}))
    quantity     value   +/- stat  sys    unit  std
    -----------  ------  --------  -----  ----  ---
    median |a1|  390.51  0.013     0.078  pm
    """
    head = _HEAD + (["truth", "|diff|/sigma"] if truth is not None else [])
    lines = [_cells(name, r, truth, truth_note) for name, r in rows.items()]
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


def _reasons(flagged: Mapping[int, str], limit: int = 5) -> str:
    items = [f"frame {f}: {why}" for f, why in sorted(flagged.items())[:limit]]
    return "; ".join(items) + (" ..." if len(flagged) > limit else "")


def _gate_line(name: str, r: Mapping) -> str:
    if "reason" in r:
        return f"  gate {name}: failed ({r['reason']})"
    op = ">=" if r.get("bound", "max") == "min" else "<="
    verdict = "passed" if r.get("passed", True) else "failed"
    return f"  gate {name}: {float(r['value']):.4g} (limit {op} {float(r['limit']):.4g}): {verdict}"


def format_quality(q: Mapping) -> str:
    """The quality section of the summary: one line per check, then the warnings.

    ``q`` is :func:`stemgpu.app.summary.quality` of an analysis.

    Examples
    --------
    >>> from stemgpu.app.table import format_quality
    >>> print(format_quality({"frames": {"n_frames": 6, "flagged": {2: "weak peak"}},
    ...                       "warnings": ["gate side_ratio close: 1.18 against the limit 1.2"]}))
    quality:
      frames flagged (rigid): 1 of 6: frame 2: weak peak
      WARNING: gate side_ratio close: 1.18 against the limit 1.2
    """
    out = ["quality:"]
    fr = q.get("frames")
    if fr is not None:
        flagged = fr["flagged"]
        out.append(f"  frames flagged (rigid): {len(flagged)} of {fr['n_frames']}"
                   + (f": {_reasons(flagged)}" if flagged else ""))
        if fr.get("demons_left_out"):
            out.append(f"  frames left out of demons: {fr['demons_left_out']}")
    col = q.get("columns")
    if col is not None:
        counts = ", ".join(f"{k} {v}" for k, v in col["status"].items())
        line = f"  columns: {col['n_columns']} fitted ({counts})"
        if "width_held" in col:
            line += f"; width held at the median: {col['width_held']}"
        bad = {k: v for k, v in col.get("not_converged_by_species", {}).items() if v}
        if bad:
            line += "; not converged by species: " + ", ".join(f"{k} {v}"
                                                              for k, v in bad.items())
        out.append(line)
    for name, r in (q.get("species") or {}).items():
        out.append(_gate_line(name, r) + (
            " (" + ", ".join(f"{k} D {v:.3g}" for k, v in r["pairs"].items()) + ")"
            if r.get("pairs") else ""))
    cells = q.get("cells")
    if cells is not None:
        why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cells["rejected"].items())
        out.append(f"  cells ({cells['lattice']}): {cells['accepted']} of "
                   f"{cells['candidates']} candidates accepted, "
                   f"{100 * cells['fraction_rejected']:.1f} % rejected"
                   + (f" ({why})" if why else "")
                   + (f"; {cells['positions_skipped']} non-finite positions skipped"
                      if cells["positions_skipped"] else ""))
        out.extend(_gate_line(name, r) for name, r in cells["gates"].items())
        if not cells["gates"]:
            out.append("  lattice gates: none recorded")
    tr = q.get("tracking")
    if tr is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in tr["column_flags"].items())
        out.append(f"  columns flagged (tracking): {tr['columns_flagged']} of {tr['n_columns']}"
                   + (f" ({kinds})" if kinds else ""))
        ff = tr["frames_flagged"]
        out.append(f"  frames flagged (tracking): {len(ff)} of {tr['n_frames']}"
                   + (f": {_reasons(ff)}" if ff else ""))
    out.extend(f"  WARNING: {w}" for w in q.get("warnings", []))
    return "\n".join(out)

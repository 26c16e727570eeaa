"""The summary as aligned text: :func:`format_rows` (with a truth column for the demo)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .summary import Row

__all__ = ["format_number", "format_rows"]

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

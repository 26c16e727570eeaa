"""Perovskite-specific column placement: the O columns of ABO3 viewed along [001].

Kept apart from :mod:`~stemgpu.lattice.cells` and :mod:`~stemgpu.lattice.sublattice` so that
the imports run one way (this module uses both; neither uses it).
"""

from __future__ import annotations

import numpy as np

from .cells import unit_cells
from .sublattice import cell_edge_midpoints

__all__ = ["CELL_TOLERANCES", "place_o_columns"]

#: Options of :func:`stemgpu.unit_cells` that :func:`place_o_columns` accepts (the tolerances
#: that decide which A-site quadrilaterals are cells).
CELL_TOLERANCES = ("angle_tolerance_deg", "side_tolerance", "parallelogram_tolerance")


def place_o_columns(a_positions, *, merge_distance: float = 1.0,
                    angle_tolerance_deg: float = 12.0, side_tolerance: float = 0.15,
                    parallelogram_tolerance: float = 0.1) -> np.ndarray:
    """Start positions of the pure-O columns of ABO3 [001]: the A-site cells' edge midpoints.

    The A-site columns are grouped into unit cells by :func:`stemgpu.unit_cells` (square
    reference, the given tolerances) and every shared cell edge gives one O column at its
    midpoint (:func:`~stemgpu.lattice.sublattice.cell_edge_midpoints`). Fitting these faint
    columns together with the others keeps their tails from biasing the B-site positions.

    Parameters
    ----------
    a_positions : (N, 2) array
        Positions (row, col) px of the A-site (corner) columns only.
    merge_distance : float
        Midpoints closer than this (px) are one edge shared by two cells.
    angle_tolerance_deg, side_tolerance, parallelogram_tolerance : float
        Cell acceptance tolerances of :func:`stemgpu.unit_cells`.

    Returns
    -------
    (M, 2) float64
        O-column start positions (row, col) px; empty when no A-site cell was found.

    Raises
    ------
    ValueError
        Whatever :func:`stemgpu.unit_cells` refuses: fewer than 4 finite positions,
        collinear positions, bad tolerances (the caller decides whether to go on without O
        columns).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.perovskite import place_o_columns
    >>> grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij"), -1)
    >>> place_o_columns(grid.reshape(-1, 2) * 20 + 5).shape  # 4 cells share 12 edges
    (12, 2)
    """
    cells = unit_cells(a_positions, angle_tolerance_deg=angle_tolerance_deg,
                       side_tolerance=side_tolerance,
                       parallelogram_tolerance=parallelogram_tolerance)
    return cell_edge_midpoints(cells, merge_distance=merge_distance)

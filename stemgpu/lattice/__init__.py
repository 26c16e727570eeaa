"""Unit cells, their statistics, strain, scan distortion and sublattices of fitted columns.

Data flow: column positions (and species or intensities) -> :func:`unit_cells` ->
:func:`cell_statistics` (the table with error bars) and the maps of :mod:`.plot`.
Everything here runs on the host with NumPy (see :mod:`.cells`); only
:func:`correct_distortion` resamples images on the data's backend.

The names below are loaded from their modules on first use, so importing this package is
as cheap as importing :mod:`stemgpu` (no SciPy, no matplotlib).

Examples
--------
>>> import numpy as np
>>> from stemgpu import lattice
>>> r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
>>> lattice.unit_cells(np.stack([r.ravel(), c.ravel()], 1) * 20.0).n_cells
9
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Public name -> module (relative to this package) that defines it.
_LAZY = {
    "UnitCells": ".cells",
    "unit_cells": ".cells",
    "CELL_QUANTITIES": ".stats",
    "CellStatistics": ".stats",
    "Quantity": ".stats",
    "Stat": ".stats",
    "calibrate": ".stats",
    "cell_statistics": ".stats",
    "median_uncertainty": ".stats",
    "bsite_displacement": ".strain",
    "deformation_gradient": ".strain",
    "lattice_frame": ".strain",
    "polar_decomposition": ".strain",
    "strain_components": ".strain",
    "DistortionEstimate": ".distortion",
    "correct_distortion": ".distortion",
    "estimate_distortion": ".distortion",
    "DEFAULT_NAMES": ".sublattice",
    "assign_by_intensity": ".sublattice",
    "assign_by_lattice": ".sublattice",
    "cell_edge_midpoints": ".sublattice",
    "AnalysisError": ".gates",
    "check_separation": ".gates",
    "class_separation": ".gates",
    "gate_warnings": ".gates",
    "CELL_TOLERANCES": ".perovskite",
    "place_o_columns": ".perovskite",
    "QUANTITIES": ".plot",
    "cell_map": ".plot",
    "cell_values": ".plot",
    "plot_bsite_displacement": ".plot",
    "plot_cell_histograms": ".plot",
    "plot_cell_map": ".plot",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

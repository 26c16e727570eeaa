"""Unit cells: ``unit_cells`` (Delaunay pairing, geometry, strain, B-site; the hexagonal
primitive-cell path) and the statistics.

Run ``python -m pytest benchmarks/bench_cells.py --benchmark-only`` (default: 10^4 A-site
columns, seconds on a 2-core CPU); ``STEMGPU_BENCH_FULL=1`` adds 10^6 columns. The geometry
runs on the host (scipy.spatial Delaunay and KD-tree), so there is one implementation,
``stemgpu-host``; ``extra_info`` records the cells found and the median side error against
the exact lattice (2 pm position noise).
"""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.lattice.cells import unit_cells
from stemgpu.lattice.stats import cell_statistics
from stemgpu.synthetic import Lattice

from .conftest import FULL

SIZES = [10_000] + ([1_000_000] if FULL else [])
PIXEL_PM = 14.6


@pytest.fixture(scope="module", params=SIZES, ids=str)
def columns(request):
    """``n`` A-site columns plus as many B-site columns of SrTiO3, 2 pm noise, rotated 5 deg."""
    n = int(request.param)
    side = int(round(np.sqrt(n)))
    lat = Lattice.srtio3()
    t = np.deg2rad(5.0)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    v = lat.vectors_pm @ rot.T / PIXEL_PM
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    frac = np.stack([i.ravel(), j.ravel()], 1).astype(float)
    a = frac @ v
    b = (frac + 0.5) @ v
    rng = np.random.default_rng(0)
    pos = np.concatenate([a, b]) + rng.normal(scale=2.0 / PIXEL_PM, size=(2 * len(a), 2))
    species = np.repeat(np.array(["A", "B"]), len(a))
    return pos, species, side


@pytest.mark.benchmark(group="cells")
def test_unit_cells(benchmark, columns):
    pos, species, side = columns
    cells = benchmark.pedantic(unit_cells, args=(pos,),
                               kwargs={"species": species, "pixel_size": PIXEL_PM},
                               rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({
        "impl": "stemgpu-host", "case": f"{side * side} A-site columns",
        "cells": cells.n_cells, "expected_cells": (side - 1) ** 2,
        "median_side_error_pm": float(np.median(cells.sides) * PIXEL_PM - 390.5),
    })


@pytest.mark.benchmark(group="cells")
def test_cell_statistics(benchmark, columns):
    pos, species, side = columns
    cells = unit_cells(pos, species=species, pixel_size=PIXEL_PM)
    stats = benchmark.pedantic(cell_statistics, args=(cells,), rounds=3, iterations=1,
                               warmup_rounds=0)
    benchmark.extra_info.update({"impl": f"stemgpu-host-{stats.method}",
                                 "case": f"{side * side} A-site columns",
                                 "cells": cells.n_cells})


@pytest.fixture(scope="module", params=SIZES, ids=str)
def hexagonal_columns(request):
    """``n`` columns of a hexagonal lattice (a = 316 pm, the Mo sublattice of MoS2), 2 pm
    noise."""
    side = int(round(np.sqrt(int(request.param))))
    v = np.array([[1.0, 0.0], [-0.5, np.sqrt(3.0) / 2.0]]) * 316.0 / PIXEL_PM
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([i.ravel(), j.ravel()], 1) @ v
    rng = np.random.default_rng(0)
    return pos + rng.normal(scale=2.0 / PIXEL_PM, size=pos.shape), side


@pytest.mark.benchmark(group="cells")
def test_unit_cells_hexagonal(benchmark, hexagonal_columns):
    pos, side = hexagonal_columns
    cells = benchmark.pedantic(unit_cells, args=(pos,),
                               kwargs={"lattice": "hexagonal", "pixel_size": PIXEL_PM},
                               rounds=3, iterations=1, warmup_rounds=0)
    lengths = np.linalg.norm(cells.vectors, axis=2) * PIXEL_PM
    benchmark.extra_info.update({
        "impl": "stemgpu-host", "case": f"{side * side} hexagonal columns",
        "cells": cells.n_cells, "expected_cells": (side - 1) ** 2,
        "median_a_error_pm": float(np.median(lengths) - 316.0),
    })

"""Candidate finding: ``find_atoms`` (column width estimated, then band-pass and maxima) and
``estimate_sigma`` alone, on simulated SrTiO3 at 10 pm/px.

Run ``python -m pytest benchmarks/bench_find.py --benchmark-only`` (default: 512^2 at sigma 2
and 4 px, 1024^2 at sigma 6 px: ~1,350 bright columns); ``STEMGPU_BENCH_FULL=1`` adds 2048^2
at sigma 2 and 6 px and 1024^2 at sigma 2 px. ``extra_info`` carries the estimated width
against the truth and the fraction of the Sr / TiO columns found within 1 px.

Group ``find-fit`` (issue 15): ``find_atoms`` then ``fit_atoms`` on what it found (default
options: the width measured by ``find_atoms``, neighbour refits, the gain estimated), on
the same scenes at sigma 6 px: 1024^2 (1,369 columns found) by default, 2048^2 (5,446) with
``STEMGPU_BENCH_FULL=1``; the 2048^2 case alone::

    STEMGPU_BENCH_FULL=1 python -m pytest benchmarks/bench_find.py -k "find_then_fit and 2048" \
        --benchmark-only

``extra_info`` carries the columns found and fitted, the engine and the Sr / TiO position
RMS against the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemgpu.atoms.find import estimate_sigma, find_atoms
from stemgpu.atoms.fit import fit_atoms
from stemgpu.synthetic import simulate_image

from .conftest import FULL, sync_call

CASES = [(512, 2.0), (512, 4.0), (1024, 6.0)] + (
    [(1024, 2.0), (2048, 2.0), (2048, 6.0)] if FULL else [])
FIND_FIT_CASES = [(1024, 6.0)] + ([(2048, 6.0)] if FULL else [])
ROUNDS = 3


def _case(c):
    return f"{c[0]}x{c[0]}-sigma{c[1]:g}px"


def _scene(case):
    size, sigma = case
    img, truth = simulate_image((size, size), pixel_size_pm=10.0, probe_sigma_pm=10.0 * sigma,
                                dose=200.0, seed=4)
    return _case(case), img, truth


@pytest.fixture(scope="module", params=CASES, ids=_case)
def image(request):
    return _scene(request.param)


def _found_fraction(pos, truth):
    keep = truth.visible(0, margin=3) & (truth.species != "O")
    dist, _ = cKDTree(np.asarray(pos)).query(truth.image_positions(0)[keep])
    return float(np.mean(dist < 1.0)), int(keep.sum())


@pytest.mark.benchmark(group="find")
def test_find_atoms(benchmark, bench_backend, image):
    case, img, truth = image
    data = bench_backend.asarray(img)
    found = benchmark.pedantic(sync_call, args=(bench_backend, find_atoms, data),
                               kwargs={"backend": bench_backend.name}, rounds=ROUNDS,
                               iterations=1, warmup_rounds=1)
    frac, n_true = _found_fraction(found.to_numpy().positions, truth)
    benchmark.extra_info.update({
        "impl": f"stemgpu-{bench_backend.name}", "case": case,
        "device": bench_backend.device_name, "candidates": int(found.positions.shape[0]),
        "sr_tio_columns": n_true, "found_fraction": frac,
        "sigma_px": found.sigma, "sigma_ratio": found.sigma / truth.probe_sigma_px,
    })


@pytest.mark.benchmark(group="find-sigma")
def test_estimate_sigma(benchmark, bench_backend, image):
    case, img, truth = image
    data = bench_backend.asarray(img)
    sigma = benchmark.pedantic(sync_call, args=(bench_backend, estimate_sigma, data),
                               kwargs={"backend": bench_backend.name}, rounds=ROUNDS,
                               iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({
        "impl": f"stemgpu-{bench_backend.name}", "case": case,
        "device": bench_backend.device_name, "sigma_px": float(sigma),
        "sigma_ratio": float(sigma) / truth.probe_sigma_px,
    })


@pytest.fixture(scope="module", params=FIND_FIT_CASES, ids=_case)
def fit_image(request):
    return _scene(request.param)


def _find_then_fit(data, backend):
    found = find_atoms(data, backend=backend)
    return found, fit_atoms(data, found, backend=backend)


@pytest.mark.benchmark(group="find-fit")
def test_find_then_fit(benchmark, bench_backend, fit_image):
    case, img, truth = fit_image
    data = bench_backend.asarray(img)
    found, fit = benchmark.pedantic(sync_call, args=(bench_backend, _find_then_fit, data,
                                                     bench_backend.name),
                                    rounds=ROUNDS, iterations=1, warmup_rounds=1)
    fit = fit.to_numpy()
    ok = fit.status == 0
    keep = truth.visible(0, margin=3) & (truth.species != "O")
    true_pos = truth.image_positions(0)[keep]
    dist, j = cKDTree(true_pos).query(fit.positions[ok])
    species = truth.species[keep][j]
    rms = {s: float(np.sqrt(np.mean(np.square(dist[species == s]))))
           for s in ("Sr", "TiO") if (species == s).any()}
    benchmark.extra_info.update({
        "impl": f"stemgpu-{bench_backend.name}", "case": case,
        "device": bench_backend.device_name, "columns_found": int(found.positions.shape[0]),
        "columns_fitted": int(ok.sum()), "engine": fit.parameters["engine"],
        **{f"rms_radial_{s}_px": round(v, 4) for s, v in rms.items()},
    })

"""Column tracking: every column in every frame, one batched call vs a loop over frames.

Run ``python -m pytest benchmarks/bench_track.py --benchmark-only``: 20 frames of 512 x 512
SrTiO3 at 15 pm/px and 200 counts per Sr column (1,444 tracked columns per frame, 28,880
fits: the case of issue 19; the 116 columns too close to the edge for a window are not
tracked but enter the neighbour models), started from the fit of the registered mean.
``STEMGPU_BENCH_FULL=1``: 1024 x 1024 frames. Group ``track``:

``stemgpu-<backend>``
    :func:`stemgpu.track_columns` (all frames in one ``fit_atoms`` call on the default
    engine, then the motion, calibration and outlier passes).
``per-frame fit_atoms loop``
    What a user would write without it: ``fit_atoms`` once per frame.

``extra_info`` carries fits/s, the engine, the thread count and the calibration ratios.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemgpu.atoms.fit import fit_atoms
from stemgpu.atoms.track import track_columns
from stemgpu.synthetic import simulate_stack

from .conftest import FULL, sync_call

FRAMES = 20
SIZE = 1024 if FULL else 512
PIXEL_PM = 15.0  # 26 px per SrTiO3 cell: ~1,400 columns per 512 x 512 frame


@pytest.fixture(scope="module")
def tracked_scene():
    stack, truth = simulate_stack((FRAMES, SIZE, SIZE), dose=200.0, seed=21,
                                  pixel_size_pm=PIXEL_PM)
    # Every column in the image, as find_atoms would give them: those too close to the edge
    # for a window are not fitted but enter the neighbour models (of the mean and the frames).
    keep = truth.visible(0, margin=0)
    mean_fit = fit_atoms(stack.mean(axis=0), truth.image_positions(0)[keep])
    return stack, mean_fit, truth.species[keep]


def _threads():
    try:
        import numba
    except ImportError:
        return None
    return int(numba.get_num_threads())


@pytest.mark.benchmark(group="track")
def test_track_columns(benchmark, bench_backend, tracked_scene):
    stack, mean_fit, species = tracked_scene
    data = bench_backend.asarray(stack)
    tracks = benchmark.pedantic(
        sync_call, args=(bench_backend, track_columns, data, mean_fit),
        kwargs={"species": species, "counts_per_unit": 1.0, "backend": bench_backend},
        rounds=3, iterations=1, warmup_rounds=1)
    n_fits = int(np.prod(tracks.status.shape))
    benchmark.extra_info.update({"impl": f"stemgpu-{bench_backend.name}",
        "case": f"{FRAMES}x{SIZE}x{SIZE}, {tracks.status.shape[1]} columns",
        "fits": n_fits, "fits_per_s": n_fits / benchmark.stats.stats.median,
        "engine": tracks.parameters.get("engine"), "threads": _threads(),
        **{f"ratio_{k}": round(v.ratio, 3) for k, v in tracks.calibration.items()}})


@pytest.mark.benchmark(group="track")
def test_per_frame_loop(benchmark, tracked_scene):
    stack, mean_fit, _ = tracked_scene
    ok = np.asarray(mean_fit.status) == 0
    start = np.asarray(mean_fit.positions)[ok]
    sigma = float(np.nanmedian(np.asarray(mean_fit.param("sigma"))[ok]))

    def loop():
        return [fit_atoms(frame, start, sigma=sigma, counts_per_unit=1.0) for frame in stack]

    fits = benchmark.pedantic(loop, rounds=1, iterations=1)
    n_fits = sum(int(np.size(f.status)) for f in fits)
    benchmark.extra_info.update({"impl": "per-frame fit_atoms loop",
                                 "case": f"{FRAMES}x{SIZE}x{SIZE}, {len(start)} columns",
                                 "fits": n_fits,
                                 "fits_per_s": n_fits / benchmark.stats.stats.median})

"""The built-in example: a simulated SrTiO3 [001] stack whose truth is known exactly.

:func:`demo_stack` renders the stack (drift, frame jitter of ~3 pm, scan-
line jitter, a slight scan distortion and a B-site displacement); :func:`demo_truth` gives
the true value of every row of :meth:`stemgpu.Analysis.summary` that has an unbiased
estimator; :func:`compare` lists measured value, uncertainty and truth side by side;
:func:`run_demo` is ``stemgpu demo``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .analysis import analyze
from .errors import EXIT_FAILED, EXIT_OK
from .paths import check_output_paths
from .table import format_rows

__all__ = ["DEMO", "compare", "demo_stack", "demo_truth", "run_demo"]

#: Parameters of the demo scene (14.6 pm pixels, SrTiO3: a = 390.5 pm).
DEMO = {
    "pixel_size_pm": 14.6,
    "dose": 100.0,
    "drift_px": (0.25, -0.15),
    "frame_jitter_px": 0.2,
    "line_jitter_px": 0.08,
    "distortion": ((1.006, 0.004), (0.0, 0.994)),
    "bsite_displacement_pm": (2.0, 6.0),
}

#: Rows whose estimator is biased by position noise: shown, not compared with the truth.
BIASED = {
    "smallest_side_pm": "biased (order stat.)",
    "longest_side_pm": "biased (order stat.)",
    "bsite_distance_pm": "biased (magnitude)",
}


def demo_stack(frames: int = 16, size: int = 512, *, seed: int = 2026):
    """Simulate the demo stack; returns ``(stack, truth)`` (see :func:`stemgpu.simulate_stack`).

    Examples
    --------
    >>> from stemgpu.app.demo import demo_stack
    >>> stack, truth = demo_stack(frames=3, size=160)
    >>> stack.shape, truth.pixel_size_pm
    ((3, 160, 160), 14.6)
    """
    from ..synthetic import simulate_stack

    if int(frames) < 3:
        raise ValueError(f"frames must be at least 3 for the drift fit; got {frames!r}")
    if int(size) < 160:
        raise ValueError(f"size must be at least 160 px (a few unit cells); got {size!r}")
    d = DEMO
    return simulate_stack(
        (int(frames), int(size), int(size)), lattice="SrTiO3",
        pixel_size_pm=d["pixel_size_pm"], dose=d["dose"], drift_px=d["drift_px"],
        frame_jitter_px=d["frame_jitter_px"], line_jitter_px=d["line_jitter_px"],
        distortion=np.array(d["distortion"]),
        bsite_displacement_pm=d["bsite_displacement_pm"], seed=seed)


def demo_truth(truth) -> dict[str, float]:
    """True values of the summary rows, in the units of :meth:`Analysis.summary`.

    Jitter: the standard deviation of the simulated jitter process, mapped through the scan
    distortion into image axes. Drift: the simulated rate in image axes. Cells: the table of
    :func:`stemgpu.cell_statistics` computed from the exact column positions (no noise) at
    the mean frame offset, which is where registration onto the mean puts them.

    Examples
    --------
    >>> from stemgpu.app.demo import demo_truth
    >>> from stemgpu.synthetic import simulate_stack
    >>> stack, truth = simulate_stack((3, 160, 160), frame_jitter_px=0.4, seed=1)
    >>> values = demo_truth(truth)
    >>> round(values["a1_length_pm"], 1), round(values["jitter_std_x_pm"], 2)
    (390.5, 5.84)
    """
    from ..lattice.cells import unit_cells
    from ..lattice.stats import cell_statistics

    px = truth.pixel_size_pm
    ainv = np.linalg.inv(truth.distortion)
    sig = np.asarray(truth.parameters.get("frame_jitter_px", DEMO["frame_jitter_px"]),
                     dtype=float) * np.ones(2)
    cov = ainv @ np.diag(sig**2) @ ainv.T
    n = len(truth.drift)
    rate = ainv @ ((truth.drift[-1] - truth.drift[0]) / max(n - 1, 1))
    out = {
        "jitter_std_x_pm": float(np.sqrt(cov[1, 1]) * px),
        "jitter_std_y_pm": float(np.sqrt(cov[0, 0]) * px),
        "drift_rate_x_pm_per_frame": float(rate[1] * px),
        "drift_rate_y_pm_per_frame": float(rate[0] * px),
    }
    pos = (truth.positions - truth.offsets.mean(axis=0)) @ ainv.T
    brightest = {sp: float(truth.intensity[truth.species == sp].max())
                 for sp in set(truth.species.tolist())}
    a_site, b_site = sorted(brightest, key=brightest.get, reverse=True)[:2]
    keep = np.isin(truth.species, [a_site, b_site])
    species = np.where(truth.species[keep] == a_site, "A", "B")
    stats = cell_statistics(unit_cells(pos[keep], species=species, pixel_size=px))
    for name, row in stats.rows.items():
        if name not in BIASED:
            out[name] = float(row.median)
    return out


def compare(analysis, truth_values: dict[str, float], *, limit: float = 3.0):
    """Rows, truth and ``|diff| / sigma`` side by side; returns ``(text, disagreeing rows)``.

    A row disagrees when its value is more than ``limit`` total uncertainties (statistical
    and systematic in quadrature) from the truth.

    Examples
    --------
    >>> import stemgpu
    >>> from stemgpu.app.demo import compare, demo_truth
    >>> stack, truth = stemgpu.simulate_stack((8, 192, 192), frame_jitter_px=0.3, seed=1)
    >>> res = stemgpu.analyze(stack, pixel_size=14.6, steps=("rigid", "atoms", "cells"),
    ...                       progress=False)
    >>> text, disagreeing = compare(res, demo_truth(truth))
    >>> "median |a1|" in text, set(disagreeing) <= set(res.summary())
    (True, True)
    """
    rows = analysis.summary()
    shown = {k: v for k, v in truth_values.items() if k in rows}
    bad = [k for k, t in shown.items()
           if not (rows[k].total_uncertainty > 0 and abs(rows[k].value - t) <= limit
                   * rows[k].total_uncertainty)]
    text = format_rows(rows, truth=shown, truth_note=BIASED)
    return text, bad


def run_demo(*, out="stemgpu-demo.h5", figure="stemgpu-demo.png", backend=None,
             quiet: bool = False, frames: int = 16, size: int = 512, seed: int = 2026) -> int:
    """``stemgpu demo``: simulate, analyse, compare with the truth, save; returns an exit code.

    Exit code 0 when every compared row lies within 3 of its printed uncertainties of the
    truth, 1 otherwise (the table says which).
    """
    from ..io.results import save

    say = (lambda *a: None) if quiet else print
    check_output_paths(out, figure)
    t0 = time.perf_counter()
    say(f"simulating a SrTiO3 [001] stack: {frames} frames of {size} x {size} px at "
        f"{DEMO['pixel_size_pm']} pm/px, {DEMO['dose']:g} counts per Sr column ...")
    stack, truth = demo_stack(frames, size, seed=seed)
    analysis = analyze(stack, pixel_size=truth.pixel_size_pm, backend=backend,
                       progress=not quiet)
    t1 = time.perf_counter()
    text, bad = compare(analysis, demo_truth(truth))
    say(f"\nanalysis on backend {analysis.info['backend']} ({analysis.info['device']}): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in analysis.info["timings_s"].items()))
    say("\nmeasured (value, one-sigma statistical and systematic uncertainty) against the "
        "simulated truth; |diff|/sigma uses both:\n")
    say(text)
    if out:
        path = save(analysis, out, overwrite=True)
        say(f"\nresults: {os.path.abspath(path)}")
    if figure:
        from .report import save_report

        say(f"report figure: {save_report(analysis, figure)}")
    say(f"total {time.perf_counter() - t0:.1f} s (analysis {t1 - t0:.1f} s with simulation)")
    if bad:
        print("demo: rows further than 3 sigma from the truth: " + ", ".join(bad))
        return EXIT_FAILED
    say("every compared row agrees with the truth within 3 sigma")
    return EXIT_OK
